"""TLS server contexts for the listeners, reloadable without dropping sessions.

Owns the TLS settings, Mozilla's "intermediate" profile (server side TLS
guidelines 5.7, https://wiki.mozilla.org/Security/Server_Side_TLS): TLS 1.2
minimum (RFC 8996 retires 1.0/1.1), ECDHE with AES-GCM or ChaCha20-Poly1305
only for TLS 1.2 (no DHE: no DH parameters to manage), key exchange groups
X25519, P-256 and P-384 only, the client's cipher order (the profile's
``server_preferred_order = false``: clients without AES hardware pick
ChaCha20), no session tickets (as the profile's server examples: the ticket
key would live for the process lifetime, weakening forward secrecy), no
compression, no renegotiation.  ``tests/test_tls_profile.py`` checks every
listener with sslyze's Mozilla checker.
:meth:`TlsContexts.reload` (SIGHUP) first loads the files into a fresh
context to validate them, then into the live context: new handshakes get the
new certificate, established sessions keep theirs.  The live context object
never changes, so a listener that was given it at start (implicit TLS) picks
up the renewal too.  A reload that fails keeps the old certificate and
reports why.

Security exposure: reads the private key; a bad key or certificate is a
config error at start, and a logged error (old key kept) on reload.
"""

from __future__ import annotations

import ssl

from postwarden.config import ConfigError, TlsConfig
from postwarden.observe.log import get_logger

log = get_logger("tls")

# TLS 1.2 suites: ECDHE key exchange with AES-GCM or ChaCha20-Poly1305
# (the Mozilla "intermediate" profile).  TLS 1.3 suites are all acceptable.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!SHA1:!DSS"
# Key exchange groups of the profile (OpenSSL 3 would also offer X448,
# P-521 and the FFDHE groups).
TLS_GROUPS = "X25519:P-256:P-384"
# SSL_CTX_ctrl command behind the SSL_CTX_set1_groups_list() macro.
_SSL_CTRL_SET_GROUPS_LIST = 92


def build_context(tls: TlsConfig) -> ssl.SSLContext:
    if tls.cert is None or tls.key is None:
        raise ConfigError("tls", "no certificate configured")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = (ssl.TLSVersion.TLSv1_3 if tls.min_version == "TLSv1.3"
                           else ssl.TLSVersion.TLSv1_2)
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_TICKET
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    set_groups(ctx)
    try:
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("tls", f"cannot load certificate {tls.cert} / key {tls.key}: "
                                 f"{exc}") from None
    return ctx


def set_groups(ctx: ssl.SSLContext) -> str:
    """Restrict key exchange to :data:`TLS_GROUPS`; returns the groups set.

    Python before 3.15 exposes only ``set_ecdh_curve`` (a single group), so
    the list is set through OpenSSL's ``SSL_CTX_set1_groups_list`` on the
    context's ``SSL_CTX``: CPython's ``_ssl._SSLContext`` object starts with
    that pointer after the object header.  The pointer is checked first (the
    options OpenSSL reports must be the context's); if anything does not
    match, fall back to P-256 alone, still within the profile.
    """
    setter = getattr(ctx, "set_groups", None)
    if setter is not None:  # Python 3.15+
        setter(TLS_GROUPS.split(":"))
        return TLS_GROUPS
    import sys

    # The object layout is known for these CPython versions only.
    if sys.implementation.name != "cpython" or not (3, 11) <= sys.version_info[:2] <= (3, 14):
        ctx.set_ecdh_curve("prime256v1")
        return "P-256"
    try:
        import _ssl
        import ctypes

        lib = ctypes.CDLL(_ssl.__file__)
        lib.SSL_CTX_get_options.restype = ctypes.c_uint64
        lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        lib.SSL_CTX_ctrl.restype = ctypes.c_long
        lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long,
                                     ctypes.c_char_p]
        header = sys.getsizeof(object())  # PyObject_HEAD
        ssl_ctx = ctypes.c_void_p.from_address(id(ctx) + header).value
        if ssl_ctx and lib.SSL_CTX_get_options(ssl_ctx) == int(ctx.options) and \
                lib.SSL_CTX_ctrl(ssl_ctx, _SSL_CTRL_SET_GROUPS_LIST, 0,
                                 TLS_GROUPS.encode("ascii")) == 1:
            return TLS_GROUPS
    except (OSError, AttributeError, ImportError, ValueError) as exc:
        log.warning("tls_groups_fallback", error=str(exc))
    ctx.set_ecdh_curve("prime256v1")
    return "P-256"


class TlsContexts:
    """Holds the current server context; ``None`` when TLS is not configured."""

    def __init__(self, tls: TlsConfig) -> None:
        self.config = tls
        self.server: ssl.SSLContext | None = (
            build_context(tls) if tls.cert is not None else None)

    def reload(self, tls: TlsConfig | None = None) -> bool:
        """Load the certificate again (after renewal); keep the old on error."""
        tls = tls or self.config
        if tls.cert is None:
            return False
        try:
            ctx = build_context(tls)
            assert tls.key is not None
            if self.server is None:
                self.server = ctx
            else:
                self.server.load_cert_chain(str(tls.cert), str(tls.key))
        except (ConfigError, OSError, ssl.SSLError) as exc:
            log.error("tls_reload_failed", error=str(exc))
            return False
        self.config = tls
        log.info("tls_reloaded", cert=str(tls.cert))
        return True
