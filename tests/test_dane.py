"""DANE for SMTP (RFC 7672): TLSA matching tables, and delivery to an
aiosmtpd sink with STARTTLS whose TLSA records come from a LoopbackDns that
pretends DNSSEC (the AD bit)."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import io
import ssl
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from tests.conftest import json_log_events as events

from dns_server import LoopbackDns
from fixtures_outbound import Sink, aiosmtpd_server, delivery_config, make_job
from postwarden.config import DnsConfig
from postwarden.delivery.dane import (
    Dane,
    DaneSettings,
    DaneTemporary,
    Tlsa,
    TlsaSet,
    association,
    name_matches,
)
from postwarden.delivery.dns import Resolver
from postwarden.delivery.remote import SmtpTransport
from postwarden.delivery.result import DeliveryResult, DeliveryStatus

T = TypeVar("T")
DELIVERED, DEFERRED = DeliveryStatus.DELIVERED, DeliveryStatus.DEFERRED
DOMAIN = "example.org"
MX_HOST = "mx.example.org"
UTC = datetime.UTC


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, 20)

    return asyncio.run(bounded())


def self_signed(name: str, days: int = 30) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM): self-signed, so PKIX can never verify it;
    valid until ``days`` from now (negative: expired)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now + datetime.timedelta(days=min(days, 0) - 10))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(Encoding.PEM),
            key.private_bytes(Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def der_of(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


@pytest.fixture(scope="module")
def mx_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, bytes]:
    """A server context with a self-signed certificate, and its DER."""
    cert, key = self_signed(MX_HOST)
    d = tmp_path_factory.mktemp("dane")
    (d / "cert.pem").write_bytes(cert)
    (d / "key.pem").write_bytes(key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "cert.pem", d / "key.pem")
    return ctx, der_of(cert)


# -- tables ------------------------------------------------------------------


@pytest.mark.parametrize(("usage", "selector", "mtype", "usable"), [
    (3, 1, 1, True), (3, 0, 0, True), (2, 0, 1, True), (2, 1, 2, True),
    (0, 0, 1, False),  # PKIX-TA: not for SMTP (RFC 7672 3.1.3)
    (1, 1, 1, False),  # PKIX-EE
    (3, 2, 1, False), (3, 1, 3, False), (4, 1, 1, False),
])
def test_usable(usage: int, selector: int, mtype: int, usable: bool) -> None:
    assert Tlsa(usage, selector, mtype, b"").usable is usable


@pytest.mark.parametrize(("selector", "mtype"), [(s, m) for s in (0, 1) for m in (0, 1, 2)])
def test_dane_ee_matches_every_selector_and_matching_type(selector: int, mtype: int) -> None:
    cert_pem, _ = self_signed("anything.example", days=-2)  # expired: ignored for EE
    der = der_of(cert_pem)
    cert = x509.load_der_x509_certificate(der)
    selected = der if selector == 0 else cert.public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    data = {0: selected, 1: hashlib.sha256(selected).digest(),
            2: hashlib.sha512(selected).digest()}[mtype]
    assert association(der, selector, mtype) == data
    good = TlsaSet(MX_HOST, (Tlsa(3, selector, mtype, data),))
    assert good.verify([der], [MX_HOST]) is None  # name and expiry ignored
    bad = TlsaSet(MX_HOST, (Tlsa(3, selector, mtype, b"\0" * len(data)),))
    assert bad.verify([der], [MX_HOST]) is not None


@pytest.mark.parametrize(("pattern", "name", "expected"), [
    ("mx.example.org", "MX.example.org.", True),
    ("*.example.org", "mx.example.org", True),
    ("*.example.org", "a.mx.example.org", False),
    ("*.example.org", "example.org", False),
    ("m*.example.org", "mx.example.org", False),
])
def test_name_matches(pattern: str, name: str, expected: bool) -> None:
    assert name_matches(pattern, name) is expected


def ta_chain(names: tuple[str, ...] = (MX_HOST,), **kw: Any) -> tuple[list[bytes], bytes]:
    """(chain DER server first, intermediate DER) from a fresh root."""
    intermediate = trustme.CA().create_child_ca()
    leaf = intermediate.issue_cert(*names, **kw)
    chain = [der_of(p.bytes()) for p in leaf.cert_chain_pems]
    return chain, chain[1]


def test_dane_ta_verifies_the_chain_and_the_name() -> None:
    chain, ta = ta_chain()
    tlsa = TlsaSet(MX_HOST, (Tlsa(2, 0, 1, hashlib.sha256(ta).digest()),))
    assert tlsa.verify(chain, [MX_HOST]) is None
    problem = tlsa.verify(chain, ["other.example.org"])
    assert problem is not None and "do not match" in problem
    assert tlsa.verify(chain[:1], [MX_HOST]) is not None  # the anchor is not sent
    spki = TlsaSet(MX_HOST, (Tlsa(2, 1, 1, association(ta, 1, 1)),))
    assert spki.verify(chain, [MX_HOST]) is None
    # A DANE-TA record naming the server certificate itself is no anchor.
    leaf_as_ta = TlsaSet(MX_HOST, (Tlsa(2, 0, 1, association(chain[0], 0, 1)),))
    assert leaf_as_ta.verify(chain, [MX_HOST]) is not None


def test_dane_ta_checks_expiry_and_signatures() -> None:
    past = datetime.datetime.now(UTC) - datetime.timedelta(days=10)
    chain, ta = ta_chain(not_before=past - datetime.timedelta(days=10), not_after=past)
    tlsa = TlsaSet(MX_HOST, (Tlsa(2, 0, 1, hashlib.sha256(ta).digest()),))
    problem = tlsa.verify(chain, [MX_HOST])
    assert problem is not None and "expired" in problem
    # A server certificate from another CA, next to the named anchor.
    other, _ = ta_chain()
    assert tlsa.verify([other[0], ta], [MX_HOST]) is not None


@pytest.mark.parametrize(("table", "expected"), [
    ({}, DaneSettings(False, True)),
    ({"dnssec_trust_ad": True, "tls": "may"}, DaneSettings(True, True)),
    ({"dnssec_trust_ad": True, "dane": False}, DaneSettings(True, False)),
])
def test_settings(table: dict[str, Any], expected: DaneSettings) -> None:
    settings = DaneSettings.from_table(table)
    assert settings == expected
    assert settings.active is (expected.dnssec_trust_ad and expected.enabled)


@pytest.mark.parametrize("key", ["dnssec_trust_ad", "dane"])
def test_settings_errors_name_the_key(key: str) -> None:
    with pytest.raises(ValueError, match=f"^{key}: "):
        DaneSettings.from_table({key: "yes"})


# -- the resolver's AD bit -----------------------------------------------------


def resolver_for(dns: LoopbackDns, dnssec: bool = True) -> Resolver:
    return Resolver(DnsConfig(nameservers=dns.nameservers, timeout=2.0), dnssec=dnssec)


def test_resolver_reports_the_ad_bit() -> None:
    zones = {DOMAIN: {"MX": [(10, MX_HOST)]}, MX_HOST: {"A": ["127.0.0.1"]}}

    async def go(dns: LoopbackDns) -> None:
        secure = resolver_for(dns)
        mx = await secure.lookup_mx(DOMAIN)
        assert mx.authenticated and mx.hosts == (MX_HOST,)
        assert await secure.addresses_secure(MX_HOST) == (["127.0.0.1"], True)
        dns.signed.discard(MX_HOST)
        assert await secure.addresses_secure(MX_HOST) == (["127.0.0.1"], False)
        # A resolver not asked to validate never claims so.
        plain = resolver_for(dns, dnssec=False)
        assert not (await plain.lookup_mx(DOMAIN)).authenticated
        assert (await plain.query_secure(DOMAIN, "MX"))[1] is False

    with LoopbackDns(zones, signed={DOMAIN, MX_HOST}) as dns:
        run(go(dns))


def test_tlsa_lookup_outcomes() -> None:
    name = f"_25._tcp.{MX_HOST}"

    async def go(dns: LoopbackDns) -> None:
        dane = Dane(resolver_for(dns), DaneSettings(dnssec_trust_ad=True))
        assert dane.active
        dns.set(name, {"TLSA": [(3, 1, 1, "00" * 32), (1, 1, 1, "11" * 32)]})
        found = await dane.lookup(MX_HOST, 25)
        assert found is not None and found.records == (Tlsa(3, 1, 1, bytes(32)),)
        dns.set(name, {"TLSA": [(1, 1, 1, "11" * 32)]})
        unusable = await dane.lookup(MX_HOST, 25)
        assert unusable is not None and unusable.records == ()
        dns.signed.discard(name)
        assert await dane.lookup(MX_HOST, 25) is None  # insecure: ignored
        dns.remove(name)
        assert await dane.lookup(MX_HOST, 25) is None  # NXDOMAIN
        dns.set(name, "SERVFAIL")
        with pytest.raises(DaneTemporary, match="TLSA lookup error"):
            await dane.lookup(MX_HOST, 25)

    with LoopbackDns({MX_HOST: {"A": ["127.0.0.1"]}}, signed={name}) as dns:
        run(go(dns))


def test_dane_is_off_unless_the_ad_bit_is_trusted() -> None:
    with LoopbackDns({}) as dns:
        assert Dane.from_settings(DaneSettings(), resolver_for(dns)) is None
        assert Dane.from_settings(DaneSettings(True, False), resolver_for(dns)) is None
        made = Dane.from_settings(DaneSettings(dnssec_trust_ad=True), resolver_for(dns))
        assert made is not None and made.active
        # A resolver not asking for validation cannot serve DANE.
        assert not Dane(resolver_for(dns, dnssec=False)).active


# -- delivery -----------------------------------------------------------------


class TlsSink(Sink):
    def __init__(self) -> None:
        super().__init__()
        self.tls: list[bool] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.tls.append(session.ssl is not None)
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
def dns() -> Iterator[LoopbackDns]:
    zones = {DOMAIN: {"MX": [(10, MX_HOST)]}, MX_HOST: {"A": ["127.0.0.1"]}}
    with LoopbackDns(zones, signed={DOMAIN, MX_HOST}) as server:
        yield server


async def deliver(dns: LoopbackDns, mx_tls: ssl.SSLContext | None,
                  tlsa: list[tuple[int, int, int, bytes]] | str | None, *, tls: str = "may",
                  signed_tlsa: bool = True, **kw: Any) -> tuple[DeliveryResult, TlsSink]:
    sink = TlsSink()
    server, port = await aiosmtpd_server(sink, **({"tls_context": mx_tls} if mx_tls else {}))
    name = f"_{port}._tcp.{MX_HOST}"  # the port actually used (RFC 7672 2.2.2)
    if tlsa is not None:
        dns.set(name, tlsa if isinstance(tlsa, str) else {"TLSA": tlsa})
    if signed_tlsa:
        dns.signed.add(name)
    resolver = resolver_for(dns)
    transport = SmtpTransport("mail.example.test", delivery_config(tls=tls, **kw), resolver,
                              mx_port=port,
                              dane=Dane(resolver, DaneSettings(dnssec_trust_ad=True)))
    try:
        (result,) = await transport.deliver(make_job([f"bob@{DOMAIN}"]))
    finally:
        server.close()
        dns.remove(name)
    return result, sink


def test_tlsa_3_1_1_delivers_to_a_self_signed_server(
        dns: LoopbackDns, mx_cert: tuple[ssl.SSLContext, bytes], ca_file: Path,
        log_lines: io.StringIO) -> None:
    ctx, der = mx_cert

    async def go() -> None:
        # "verify" with our CA could never accept this certificate: DANE does.
        result, sink = await deliver(dns, ctx, [(3, 1, 1, association(der, 1, 1))],
                                     tls="verify", ca_file=ca_file)
        assert result.status is DELIVERED, result
        assert sink.tls == [True]
        names = [e["event"] for e in events(log_lines)]
        assert "dane_verified" in names
        assert next(e for e in events(log_lines) if e["event"] == "tls")["verified"] is True

    run(go())


def test_mismatching_tlsa_is_deferred(dns: LoopbackDns,
                                      mx_cert: tuple[ssl.SSLContext, bytes]) -> None:
    async def go() -> None:
        result, sink = await deliver(dns, mx_cert[0], [(3, 1, 1, bytes(32))], tls="none")
        assert result.status is DEFERRED and result.dsn == "4.7.5", result
        assert "DANE" in result.text and sink.envelopes == []

    run(go())


def test_tlsa_requires_starttls(dns: LoopbackDns, mx_cert: tuple[ssl.SSLContext, bytes]
                                ) -> None:
    async def go() -> None:
        result, sink = await deliver(dns, None, [(3, 1, 1, association(mx_cert[1], 1, 1))])
        assert result.status is DEFERRED and result.dsn == "4.7.5"
        assert "TLS is required" in result.text and sink.envelopes == []

    run(go())


@pytest.mark.parametrize("insecure", ["mx", "address", "tlsa"])
def test_without_the_ad_bit_dane_is_ignored(dns: LoopbackDns,
                                            mx_cert: tuple[ssl.SSLContext, bytes],
                                            insecure: str) -> None:
    async def go() -> None:
        if insecure == "mx":
            dns.signed.discard(DOMAIN)
        elif insecure == "address":
            dns.signed.discard(MX_HOST)
        # A mismatching record that would defer if it were used.
        result, sink = await deliver(dns, mx_cert[0], [(3, 1, 1, bytes(32))],
                                     signed_tlsa=insecure != "tlsa")
        assert result.status is DELIVERED and sink.tls == [True]
        if insecure != "tlsa":  # not even asked
            assert not any(t == "TLSA" for _, t in dns.queries)

    run(go())


def test_tlsa_servfail_is_deferred(dns: LoopbackDns,
                                   mx_cert: tuple[ssl.SSLContext, bytes]) -> None:
    async def go() -> None:
        result, sink = await deliver(dns, mx_cert[0], "SERVFAIL")
        assert result.status is DEFERRED and result.dsn == "4.7.5"
        assert "TLSA lookup error" in result.text and sink.envelopes == []

    run(go())


def test_unusable_tlsa_means_unauthenticated_mandatory_tls(
        dns: LoopbackDns, mx_cert: tuple[ssl.SSLContext, bytes]) -> None:
    async def go() -> None:
        pkix_ee = [(1, 1, 1, bytes(32))]
        result, sink = await deliver(dns, mx_cert[0], pkix_ee, tls="none")
        assert result.status is DELIVERED and sink.tls == [True]
        result, _ = await deliver(dns, None, pkix_ee)
        assert result.status is DEFERRED and result.dsn == "4.7.5"

    run(go())


def test_no_tlsa_keeps_the_configured_policy(dns: LoopbackDns,
                                             mx_cert: tuple[ssl.SSLContext, bytes]) -> None:
    async def go() -> None:
        result, sink = await deliver(dns, mx_cert[0], None, tls="none")
        assert result.status is DELIVERED and sink.tls == [False]

    run(go())


@pytest.mark.parametrize(("cert_name", "status"), [(MX_HOST, DELIVERED),
                                                   ("other.example.org", DEFERRED)])
def test_dane_ta_over_the_presented_chain(dns: LoopbackDns, cert_name: str,
                                          status: DeliveryStatus) -> None:
    intermediate = trustme.CA().create_child_ca()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    leaf = intermediate.issue_cert(cert_name)
    leaf.configure_cert(ctx)
    ta = der_of(leaf.cert_chain_pems[1].bytes())

    async def go() -> None:
        result, _ = await deliver(dns, ctx, [(2, 0, 1, hashlib.sha256(ta).digest())])
        assert result.status is status, result
        if status is DEFERRED:
            assert result.dsn == "4.7.5" and "do not match" in result.text

    run(go())
