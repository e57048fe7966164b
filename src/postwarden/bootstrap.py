"""First-time setup material: the config file ``postwarden init`` writes,
its self-signed certificate, and the first DKIM key of the domain.

Security exposure: creates the TLS private key and the DKIM signing key;
files are written atomically (temporary file, fsync, rename) with their
final mode from the start (0600 for the keys).
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from postwarden import config as _config
from postwarden.limits import Limits

if TYPE_CHECKING:
    from postwarden.dkim_keys import Key

CONFIG_TEMPLATE = """\
# postwarden configuration, written by 'postwarden init'.
# Check it with: postwarden -c {config_path} check-config
# Relative paths are relative to the directory of this file.

# The name this server gives in its greeting and EHLO, and the name its TLS
# certificate is for.  Publish an A (and AAAA) record for it, and point the
# MX record of each domain below at it.
hostname = "{hostname}"

# The queue, the account database (postwarden.db) and local mailboxes.
# Keep it private (mode 0700).
data_dir = "{data_dir}"

# Domains this server receives mail for.  More can be added without editing
# this file: postwarden domain add DOMAIN (stored in the database).
domains = [{domains}]

# Listeners: address = "HOST:PORT", "[IPv6]:PORT", or "*:PORT" for all
# addresses.  A listener can be switched off with enabled = false.

# Mail from other servers (MX).  STARTTLS is offered; no AUTH.
[listeners.mx]
address = "{mx_address}"

# Mail from your users' clients and applications: STARTTLS, then AUTH
# (RFC 6409).  Both are required.
[listeners.submission]
address = "{submission_address}"

# The same with implicit TLS (RFC 8314), preferred by modern clients.
[listeners.submissions]
address = "{submissions_address}"

[tls]
{tls}min_version = "TLSv1.2"  # TLSv1.2 or TLSv1.3

[log]
format = "json"  # json or logfmt
level = "info"  # debug, info, warning or error
# file = "postwarden.log"  # default: standard error

# Protocol limits and timeouts (seconds).  The defaults are shown; remove the
# '#' to change one.
[limits]
{limits}

# The delivery queue (times in seconds).
[queue]
{queue}
"""


def _commented_defaults(cls: type) -> str:
    """``# name = default`` lines for each field of a config dataclass."""
    return "\n".join(f"# {f.name} = {f.default!r}" for f in dataclasses.fields(cls))


SELF_SIGNED_TLS = """\
# A self-signed certificate made by 'postwarden init' (valid 2 years).  Mail
# clients will warn about it: replace both files with a certificate from a
# public CA (for example Let's Encrypt) for {hostname}.
cert = "tls/cert.pem"
key = "tls/key.pem"  # must not be readable by others (chmod 600)
"""

PUBLIC_CA_TLS = """\
# The certificate of {hostname} found by 'postwarden init' (Let's Encrypt:
# certbot renews it; 'systemctl reload postwarden' picks up the new one).
cert = "{cert}"
key = "{key}"  # must not be readable by others (chmod 600)
"""


def render_config(*, hostname: str, domain: str, listen_host: str, mx_port: int,
                  submission_port: int, submissions_port: int,
                  config_path: str = _config.DEFAULT_CONFIG,
                  domains: Sequence[str] = (), cert: str | None = None,
                  key: str | None = None, data_dir: str = "data") -> str:
    """The text of a new config file (values are validated by the caller).
    ``domains``: all of them (default: just ``domain``); ``cert``/``key``:
    an existing certificate (default: the self-signed one init writes)."""
    host = f"[{listen_host}]" if ":" in listen_host else listen_host
    tls = (PUBLIC_CA_TLS.format(hostname=hostname, cert=cert, key=key) if cert and key
           else SELF_SIGNED_TLS.format(hostname=hostname))
    return CONFIG_TEMPLATE.format(
        config_path=config_path, hostname=hostname, tls=tls, data_dir=data_dir,
        domains=", ".join(f'"{d}"' for d in (domains or [domain])),
        mx_address=f"{host}:{mx_port}",
        submission_address=f"{host}:{submission_port}",
        submissions_address=f"{host}:{submissions_port}",
        limits=_commented_defaults(Limits), queue=_commented_defaults(_config.QueueConfig))


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` atomically (temporary file, fsync, rename) with ``mode``."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, mode)  # the file may have existed with other permissions
        f.write(data)
        f.flush()
        os.fsync(fd)
    os.replace(tmp, path)


def write_install(directory: Path, cfg: _config.Config, path: Path, text: str, *,
                  self_signed_for: tuple[str, str] | None) -> None:
    """What ``init`` writes: the directory, a self-signed certificate for
    ``(hostname, address)`` unless ``None`` (a certificate found elsewhere),
    the data directory (0700) and the config file ``text`` at ``path``."""
    assert cfg.tls.cert is not None and cfg.tls.key is not None
    directory.mkdir(parents=True, exist_ok=True)
    if self_signed_for is not None:
        cert_pem, key_pem = self_signed_certificate(*self_signed_for)
        cfg.tls.cert.parent.mkdir(parents=True, exist_ok=True)
        write_file(cfg.tls.key, key_pem, 0o600)
        write_file(cfg.tls.cert, cert_pem, 0o644)
    cfg.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(cfg.data_dir, 0o700)
    write_file(path, text.encode("utf-8"), 0o644)


# Self-signed certificate: EC P-256 (fast, accepted by every current client).
CERT_VALID_DAYS = 2 * 365


def self_signed_certificate(hostname: str, listen_host: str) -> tuple[bytes, bytes]:
    """A self-signed certificate and its private key, both PEM.

    Subject alternative names: ``hostname``, ``localhost`` and the listen
    address when it is a specific IP (not ``*`` or an unspecified address).
    """
    # cryptography takes a while to import; only init needs it.

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(hostname), x509.DNSName("localhost")]
    ips = {ipaddress.ip_address("127.0.0.1")}
    if listen_host not in ("*", "localhost"):
        ip = ipaddress.ip_address(listen_host)
        if not ip.is_unspecified:
            ips.add(ip)
    names += [x509.IPAddress(ip) for ip in sorted(ips, key=str)]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert_pem, key_pem


def init_dkim(data_dir: Path, domain: str) -> list[Key]:
    """The active DKIM keys of ``domain``, creating and activating an
    RSA-2048 key (selector ``pwYYYYMM``) when it has none.  Safe to run
    again (``init --force``): existing keys are kept, never replaced."""
    # cryptography takes a while to import; only init and signing need it.
    from postwarden.dkim_keys import KeyStore, default_selector

    store = KeyStore.for_data_dir(data_dir)
    active = store.active(domain)
    if active:
        return active
    selector = default_selector("rsa")
    if any(k.selector == selector for k in store.list_keys(domain)):
        return [store.activate(domain, selector)]
    return [store.generate(domain, selector, "rsa", activate=True)]
