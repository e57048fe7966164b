"""TLS server contexts for the listeners, reloadable without dropping sessions.

Owns the TLS settings: TLS 1.2 minimum (RFC 8996 retires 1.0/1.1), forward-
secret AEAD cipher suites only for TLS 1.2, no compression, no renegotiation.
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


def build_context(tls: TlsConfig) -> ssl.SSLContext:
    if tls.cert is None or tls.key is None:
        raise ConfigError("tls", "no certificate configured")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = (ssl.TLSVersion.TLSv1_3 if tls.min_version == "TLSv1.3"
                           else ssl.TLSVersion.TLSv1_2)
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    try:
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("tls", f"cannot load certificate {tls.cert} / key {tls.key}: "
                                 f"{exc}") from None
    return ctx


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
