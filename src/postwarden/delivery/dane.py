"""DANE for SMTP (RFC 7672): TLSA records authenticate MX hosts.

:class:`Dane` looks up the TLSA records ``_<port>._tcp.<mxhost>`` of a mail
host, and :class:`TlsaSet` checks the certificate chain a server presented
against them.  The transport (:mod:`postwarden.delivery.remote`) applies
the outcome, which takes precedence over MTA-STS and the configured policy:

* usable TLSA records: STARTTLS is mandatory and the chain must match a
  record; any failure defers the host (4.7.5), never a downgrade;
* TLSA records, none usable: STARTTLS is mandatory, unauthenticated
  (RFC 7672 2.2, as Postfix's ``dane`` level does);
* no TLSA records (securely or not): DANE does not apply to the host;
* the TLSA lookup fails (SERVFAIL, timeout): the host is not used, the
  delivery is deferred (RFC 7672 2.2: an attacker could cause the failure).

DANE is only as good as DNSSEC, which this server does not validate
itself: it relies on the AD bit of its resolver, and only when told to
(``dnssec_trust_ad = true``: the resolver validates and the path to it is
trusted, e.g. a validating resolver on loopback; RFC 7672 2.1.1).  The MX
answer and the host's address records must be authenticated too (RFC 7672
2.2.1, 2.2.2), or the TLSA records are not even looked up.

Usages (RFC 7672 3.1): DANE-EE(3) matches the server certificate or its
public key, name and expiry ignored (RFC 7672 3.1.1); DANE-TA(2) matches a
trust anchor in the presented chain, and the chain from the server
certificate up to it must verify (signatures, validity, CA constraints)
with the MX host name (or the TLSA base domain) in the certificate
(RFC 7672 3.1.2, 3.2.3).  PKIX-TA(0) and PKIX-EE(1) are unusable for SMTP
(RFC 7672 3.1.3).  Selectors 0 (certificate) and 1 (SubjectPublicKeyInfo),
matching types 0 (exact), 1 (SHA-256) and 2 (SHA-512).

The chain: ``getpeercert(binary_form=True)`` gives only the server
certificate.  Python 3.13 has ``SSLObject.get_unverified_chain()``; on
3.11/3.12 the private ``_sslobj.get_unverified_chain()`` of the ``_ssl``
module gives the same list.  Without either, only the server certificate
is seen: enough for DANE-EE (the common ``3 1 1``), not for DANE-TA.

Security exposure: TLSA data and the server's certificates are untrusted
input.  Certificates are parsed by ``cryptography``, chains are bounded
(:data:`MAX_CHAIN`), and a certificate is only accepted when it matches a
record obtained over an authenticated DNS path.
"""

from __future__ import annotations

import _ssl
import datetime
import hashlib
import ssl
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from postwarden.delivery.dns import DnsError, DnsPermanent, Resolver
from postwarden.observe.log import get_logger

log = get_logger("dane")

# RFC 7218 names of the TLSA parameters.
DANE_TA, DANE_EE = 2, 3
SELECTOR_CERT, SELECTOR_SPKI = 0, 1
MATCH_FULL, MATCH_SHA256, MATCH_SHA512 = 0, 1, 2
# Certificates looked at in a presented chain.
MAX_CHAIN = 10
# TLSA records used per host (a hostile zone could publish many).
MAX_TLSA_RECORDS = 32

PeerCheck = Callable[[Any], str | None]


# -- settings ------------------------------------------------------------


def _bool(table: Mapping[str, Any], key: str, default: bool) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{key}: must be true or false")
    return value


@dataclass(frozen=True, slots=True)
class DaneSettings:
    """``[delivery]`` keys: ``dnssec_trust_ad`` (trust the resolver's AD
    bit: it validates DNSSEC and the path to it is secure) and ``dane``
    (use TLSA records when the AD bit is trusted)."""

    dnssec_trust_ad: bool = False
    enabled: bool = True

    @property
    def active(self) -> bool:
        return self.enabled and self.dnssec_trust_ad

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> DaneSettings:
        """From the ``[delivery]`` table (other keys are ignored); raises
        ``ValueError("KEY: reason")``."""
        return cls(dnssec_trust_ad=_bool(table, "dnssec_trust_ad", False),
                   enabled=_bool(table, "dane", True))


class DaneTemporary(Exception):
    """The TLSA lookup failed: the host must not be used now."""

    dsn = "4.7.5"

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


# -- records and matching ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tlsa:
    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        """RFC 7672 3.1: only DANE-TA(2) and DANE-EE(3) for SMTP; unknown
        selectors and matching types are unusable (RFC 6698 4.1)."""
        return (self.usage in (DANE_TA, DANE_EE)
                and self.selector in (SELECTOR_CERT, SELECTOR_SPKI)
                and self.mtype in (MATCH_FULL, MATCH_SHA256, MATCH_SHA512))

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()[:16]}"


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def association(der: bytes, selector: int, mtype: int) -> bytes:
    """The TLSA association data of a DER certificate (RFC 6698 2.1)."""
    selected = der if selector == SELECTOR_CERT else _spki(x509.load_der_x509_certificate(der))
    if mtype == MATCH_SHA256:
        return hashlib.sha256(selected).digest()
    if mtype == MATCH_SHA512:
        return hashlib.sha512(selected).digest()
    return selected


def tlsa_matches(record: Tlsa, der: bytes) -> bool:
    try:
        return association(der, record.selector, record.mtype) == record.data
    except ValueError:  # not a certificate we can parse
        return False


def name_matches(pattern: str, name: str) -> bool:
    """A certificate DNS name against a reference identifier (RFC 6125 6.4;
    RFC 7672 3.2.3: a wildcard only as the whole left-most label)."""
    pattern, name = pattern.lower().rstrip("."), name.lower().rstrip(".")
    if pattern.startswith("*."):
        first, _, rest = name.partition(".")
        return bool(first) and rest == pattern[2:]
    return pattern == name


def certificate_names(cert: x509.Certificate) -> list[str]:
    """The DNS names of a certificate: subjectAltName dNSName entries, or
    the subject's common names when it has none (RFC 7672 3.2.3)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = san.value.get_values_for_type(x509.DNSName)
        if names:
            return list(names)
    except x509.ExtensionNotFound:
        pass
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(
        x509.oid.NameOID.COMMON_NAME)]


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False  # names differ, bad signature, unknown key type
    return True


def _in_validity(cert: x509.Certificate, now: datetime.datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


@dataclass(frozen=True, slots=True)
class TlsaSet:
    """The secure TLSA records of one host; ``records`` only the usable
    ones (empty: TLS is mandatory but unauthenticated)."""

    base: str  # the TLSA base domain (the MX host name)
    records: tuple[Tlsa, ...]

    def verify(self, chain: Sequence[bytes], names: Iterable[str],
               now: datetime.datetime | None = None) -> str | None:
        """``None`` when the presented ``chain`` (DER, server certificate
        first) matches a record, otherwise why not."""
        if not chain:
            return "no server certificate"
        chain = list(chain[:MAX_CHAIN])
        for rec in self.records:
            if rec.usage == DANE_EE and tlsa_matches(rec, chain[0]):
                return None  # RFC 7672 3.1.1: name and expiry not checked
        anchors = [r for r in self.records if r.usage == DANE_TA]
        if not anchors:
            return "no TLSA record matches the server certificate"
        return self._verify_ta(chain, anchors, names,
                               now or datetime.datetime.now(datetime.UTC))

    def _verify_ta(self, chain: list[bytes], anchors: list[Tlsa], names: Iterable[str],
                   now: datetime.datetime) -> str | None:
        try:
            certs = [x509.load_der_x509_certificate(d) for d in chain]
        except ValueError:
            return "unparsable certificate in the server's chain"
        if len(chain) < 2:
            return "no TLSA record matches (the server sent no issuer certificates)"
        # From the server certificate up through the presented chain to a
        # certificate that a DANE-TA record names (RFC 7671 5.2.2).
        path = [0]
        while True:
            current = certs[path[-1]]
            if len(path) > 1 and any(tlsa_matches(r, chain[path[-1]]) for r in anchors):
                break
            issuer = next((i for i in range(1, len(certs)) if i not in path
                           and _issued_by(current, certs[i])), None)
            if issuer is None:
                return "no TLSA trust anchor in the server's certificate chain"
            if not _is_ca(certs[issuer]):
                return "an issuer in the server's chain is not a CA"
            path.append(issuer)
        for i in path[:-1]:  # the trust anchor's own dates do not matter
            if not _in_validity(certs[i], now):
                return "a certificate in the server's chain is expired or not yet valid"
        refs = [n.lower().rstrip(".") for n in names]
        presented = certificate_names(certs[0])
        if not any(name_matches(p, r) for p in presented for r in refs):
            return (f"server certificate names {presented[:4]} do not match "
                    f"{' or '.join(refs)}")
        return None

    def checker(self, *names: str) -> PeerCheck:
        """A check of a finished handshake for
        :attr:`postwarden.delivery.smtp_client.SessionOptions.peer_check`;
        ``names`` are the reference identifiers for DANE-TA."""
        refs = names or (self.base,)

        def check(ssl_object: Any) -> str | None:
            problem = self.verify(peer_chain(ssl_object), refs)
            if problem is None:
                log.info("dane_verified", host=self.base)
                return None
            return f"DANE: {problem}"

        return check


def peer_chain(ssl_object: Any) -> list[bytes]:
    """The certificates the peer sent, DER, its own first (see the module
    docstring for the versions of Python)."""
    public = getattr(ssl_object, "get_unverified_chain", None)
    if callable(public):  # Python >= 3.13
        chain = public()
        if chain:
            return [bytes(c) for c in chain]
    inner = getattr(getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)
    if callable(inner):  # Python 3.10-3.12, private
        try:
            certs = inner() or []
            der = [bytes(c.public_bytes(_ssl.ENCODING_DER)) for c in certs]
        except (AttributeError, TypeError, ValueError, ssl.SSLError):
            der = []
        if der:
            return der
    leaf = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return [leaf] if leaf else []


# -- lookups -------------------------------------------------------------


class Dane:
    """TLSA lookups through a resolver made with ``dnssec=True``."""

    def __init__(self, resolver: Resolver, settings: DaneSettings | None = None) -> None:
        self.resolver = resolver
        self.settings = settings or DaneSettings(dnssec_trust_ad=True)
        if self.settings.active and not resolver.dnssec:
            log.warning("dane_disabled", reason="the resolver was not made with dnssec=True")

    @classmethod
    def from_settings(cls, settings: DaneSettings, resolver: Resolver) -> Dane | None:
        """As ``app.py`` makes it: ``None`` unless the AD bit is trusted."""
        return cls(resolver, settings) if settings.active else None

    @property
    def active(self) -> bool:
        return self.settings.active and self.resolver.dnssec

    async def lookup(self, host: str, port: int) -> TlsaSet | None:
        """The TLSA records of ``host`` (its addresses known to be secure),
        or ``None`` when DANE does not apply; raises :class:`DaneTemporary`
        when the lookup fails (RFC 7672 2.2)."""
        qname = f"_{port}._tcp.{host}"
        try:
            answer, secure = await self.resolver.query_secure(qname, "TLSA")
        except DnsPermanent:
            return None  # NXDOMAIN: no records
        except DnsError as exc:
            raise DaneTemporary(f"TLSA lookup error for {host}:{port}: {exc.text}") from None
        if answer is None:
            return None
        if not secure:
            # RFC 7672 2.2: records without DNSSEC authentication are ignored.
            log.info("dane_insecure_tlsa", host=host, port=port)
            return None
        records = []
        for rr in list(answer)[:MAX_TLSA_RECORDS]:
            fields = (getattr(rr, "usage", None), getattr(rr, "selector", None),
                      getattr(rr, "mtype", None), getattr(rr, "cert", None))
            if (isinstance(fields[0], int) and isinstance(fields[1], int)
                    and isinstance(fields[2], int) and isinstance(fields[3], bytes)):
                records.append(Tlsa(fields[0], fields[1], fields[2], fields[3]))
        usable = tuple(r for r in records if r.usable)
        log.info("dane_tlsa", host=host, port=port, records=len(records), usable=len(usable))
        return TlsaSet(host.lower().rstrip("."), usable)
