"""DKIM verification against keys served by a real DNS server on loopback."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import time
from collections.abc import Iterator
from typing import Any

import dkim  # type: ignore[import-untyped]
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.dns_server import LoopbackDns

from postwarden.config import DnsConfig
from postwarden.delivery.dns import Resolver
from postwarden.message.dkim_verify import (
    DkimReport,
    KeyPermError,
    key_name,
    parse_key,
    verify_dkim,
)

# RFC 8463 Appendix A.3: the RFC 6376 example message signed with both keys.
RFC8463_MESSAGE = b"""\
DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;
 d=football.example.com; i=@football.example.com;
 q=dns/txt; s=brisbane; t=1528637909; h=from : to :
 subject : date : message-id : from : subject : date;
 bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;
 b=/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11Bus
 Fa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw==
DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;
 d=football.example.com; i=@football.example.com;
 q=dns/txt; s=test; t=1528637909; h=from : to : subject :
 date : message-id : from : subject : date;
 bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;
 b=F45dVWDfMbQDGHJFlXUNB2HKfbCeLRyhDXgFpEL8GwpsRe0IeIixNTe3
 DhCVlUrSjV4BwcVcOF6+FF3Zo9Rpo1tFOeS9mPYQTnGdaSGsgeefOsk2Jz
 dA+L10TeYt9BgDfQNZtKdN1WO//KgIqXP7OdEFE4LjFYNcUxZQ4FADY+8=
From: Joe SixPack <joe@football.example.com>
To: Suzie Q <suzie@shopping.example.net>
Subject: Is dinner ready?
Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)
Message-ID: <20030712040037.46341.5F8J@football.example.com>

Hi.

We lost the game.  Are you hungry yet?

Joe.
""".replace(b"\n", b"\r\n")

# RFC 8463 Appendix A.2: the key records (the RSA one in four strings).
RFC8463_ZONES: dict[str, Any] = {
    "brisbane._domainkey.football.example.com": {
        "TXT": ["v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="]},
    "test._domainkey.football.example.com": {"TXT": [(
        "v=DKIM1; k=rsa; p=MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDkHlOQoBTzWR",
        "iGs5V6NpP3idY6Wk08a5qhdR6wy5bdOKb2jLQiY/J16JYi0Qvx/byYzCNb3W91y3FutAC",
        "DfzwQ/BC/e/8uBsCR+yz1Lxj+PL6lHvqMKrM3rG4hstT5QjvHO9PzoxZyVYLzBfO2EeC3",
        "Ip3G+2kryOTIKT+l/K4w3QIDAQAB")]},
}

MESSAGE = (b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\n"
           b"Subject: hello\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
           b"Message-ID: <1@example.org>\r\n\r\nHello Bob.\r\n")


@pytest.fixture
def dns() -> Iterator[LoopbackDns]:
    with LoopbackDns(RFC8463_ZONES) as server:
        yield server


def resolver_for(dns: LoopbackDns, timeout: float = 2.0) -> Resolver:
    return Resolver(DnsConfig(nameservers=dns.nameservers, timeout=timeout))


def verify(dns: LoopbackDns, message: bytes, **kw: Any) -> DkimReport:
    return asyncio.run(verify_dkim(message, resolver_for(dns), **kw))


def summary(report: DkimReport) -> list[tuple[str, str]]:
    return [(r.selector, r.result) for r in report.results]


# --- keys and signing helpers -------------------------------------------------


def _probable_prime(bits: int, rng: random.Random) -> int:
    """A prime for a deliberately weak test key (Miller-Rabin, 40 rounds)."""
    while True:
        n = rng.getrandbits(bits) | (3 << (bits - 2)) | 1
        if any(n % p == 0 for p in (3, 5, 7, 11, 13)) or (n - 1) % 65537 == 0:
            continue
        d, s = n - 1, 0
        while d % 2 == 0:
            d, s = d // 2, s + 1
        for _ in range(40):
            x = pow(rng.randrange(2, n - 1), d, n)
            if x in (1, n - 1):
                continue
            for _ in range(s - 1):
                x = pow(x, 2, n)
                if x == n - 1:
                    break
            else:
                break
        else:
            return n


def weak_rsa_key(bits: int) -> rsa.RSAPrivateKey:
    """An RSA key below the 1024 bits ``cryptography`` will generate."""
    rng = random.Random(bits)
    p, q = _probable_prime(bits // 2, rng), _probable_prime(bits // 2, rng)
    e = 65537
    d = pow(e, -1, (p - 1) * (q - 1))
    return rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p),
                                 rsa.RSAPublicNumbers(e, p * q)).private_key()


def rsa_key(bits: int = 2048) -> tuple[bytes, str]:
    """(PEM private key for dkimpy, p= value)."""
    key = (rsa.generate_private_key(public_exponent=65537, key_size=bits) if bits >= 1024
           else weak_rsa_key(bits))
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, base64.b64encode(der).decode()


@pytest.fixture(scope="module")
def key2048() -> tuple[bytes, str]:
    return rsa_key(2048)


def sign(message: bytes, pem: bytes, selector: bytes = b"sel", domain: bytes = b"example.org",
         **kw: Any) -> bytes:
    kw.setdefault("include_headers", [b"from", b"to", b"subject", b"date"])
    header: bytes = dkim.sign(message, selector, domain, pem, **kw)
    return header + message


def publish(dns: LoopbackDns, p: str, selector: str = "sel", domain: str = "example.org",
            extra: str = "") -> None:
    dns.set(f"{selector}._domainkey.{domain}", {"TXT": [f"v=DKIM1; k=rsa; {extra}p={p}"]})


# --- RFC 8463 -------------------------------------------------------------------


def test_rfc8463_example_verifies(dns: LoopbackDns) -> None:
    report = verify(dns, RFC8463_MESSAGE)
    assert summary(report) == [("brisbane", "pass"), ("test", "pass")]
    ed, rs = report.results
    assert (ed.domain, ed.algorithm, ed.header_b) == (
        "football.example.com", "ed25519-sha256", "/gCrinpc")
    assert (rs.algorithm, rs.header_b) == ("rsa-sha256", "F45dVWDf")
    assert report.passing_domains() == ["football.example.com"] * 2


def test_rfc8463_changed_header_fails_both(dns: LoopbackDns) -> None:
    report = verify(dns, RFC8463_MESSAGE.replace(b"Is dinner ready?", b"Is lunch ready?"))
    assert summary(report) == [("brisbane", "fail"), ("test", "fail")]
    assert {r.reason for r in report.results} == {"signature did not verify"}


def test_rfc8463_changed_body_fails_both(dns: LoopbackDns) -> None:
    report = verify(dns, RFC8463_MESSAGE.replace(b"hungry", b"thirsty"))
    assert summary(report) == [("brisbane", "fail"), ("test", "fail")]
    assert {r.reason for r in report.results} == {"body hash did not verify"}


def test_ed25519_key_with_rsa_signature_is_permerror(dns: LoopbackDns) -> None:
    # The RSA signature's selector now points at the ed25519 key.
    dns.set("test._domainkey.football.example.com",
            RFC8463_ZONES["brisbane._domainkey.football.example.com"])
    report = verify(dns, RFC8463_MESSAGE)
    assert summary(report) == [("brisbane", "pass"), ("test", "permerror")]
    assert report.results[1].reason == "inappropriate key algorithm"


# --- generated keys -------------------------------------------------------------


def test_own_key_passes_and_body_change_fails(dns: LoopbackDns,
                                              key2048: tuple[bytes, str]) -> None:
    pem, p = key2048
    publish(dns, p)
    signed = sign(MESSAGE, pem)
    assert summary(verify(dns, signed)) == [("sel", "pass")]
    tampered = signed.replace(b"Hello Bob.", b"Hello Eve.")
    report = verify(dns, tampered)
    assert summary(report) == [("sel", "fail")]
    assert report.results[0].reason == "body hash did not verify"
    assert summary(verify(dns, signed.replace(b"Subject: hello", b"Subject: pay"))) == [
        ("sel", "fail")]


def test_bare_lf_message_verifies(dns: LoopbackDns, key2048: tuple[bytes, str]) -> None:
    pem, p = key2048
    publish(dns, p)
    assert summary(verify(dns, sign(MESSAGE, pem).replace(b"\r\n", b"\n"))) == [
        ("sel", "pass")]


@pytest.mark.parametrize(("record_extra", "result", "reason"), [
    ("", "pass", ""),
    ("t=y; ", "pass", ""),
    ("h=sha1; ", "permerror", "inappropriate hash algorithm"),
    ("h=sha1:sha256; ", "pass", ""),
    ("s=tlsrpt; ", "permerror", "key is not for email (s=)"),
    ("s=email; ", "pass", ""),
    ("t=s; ", "pass", ""),
])
def test_key_record_tags(dns: LoopbackDns, key2048: tuple[bytes, str], record_extra: str,
                         result: str, reason: str) -> None:
    pem, p = key2048
    publish(dns, p, extra=record_extra)
    report = verify(dns, sign(MESSAGE, pem))
    assert (report.results[0].result, report.results[0].reason) == (result, reason)
    assert report.results[0].testing == ("t=y" in record_extra)


def test_strict_key_refuses_subdomain_identity(dns: LoopbackDns,
                                               key2048: tuple[bytes, str]) -> None:
    pem, p = key2048
    publish(dns, p, extra="t=s; ")
    report = verify(dns, sign(MESSAGE, pem, identity=b"@sub.example.org"))
    assert report.results[0].result == "permerror"


@pytest.mark.parametrize(("zone", "result", "reason_part"), [
    (None, "permerror", "no key for signature"),  # NXDOMAIN
    ({"A": ["192.0.2.1"]}, "permerror", "no key for signature"),  # no TXT
    ({"TXT": ["v=DKIM1; k=rsa; p="]}, "permerror", "key revoked"),
    ({"TXT": ["v=DKIM1; k=rsa; p=!!!"]}, "permerror", "not valid base64"),
    ({"TXT": ["v=DKIM1; k=rsa; p=AAAA"]}, "permerror", "unparsable RSA key"),
    ({"TXT": ["v=DKIM2; p=AAAA"]}, "permerror", "version"),
    ({"TXT": ["garbage"]}, "permerror", "key syntax error"),
    ({"TXT": ["v=DKIM1; k=dsa; p=AAAA"]}, "permerror", "unknown key type"),
    ("SERVFAIL", "temperror", "key unavailable"),
])
def test_key_lookup_outcomes(dns: LoopbackDns, key2048: tuple[bytes, str], zone: Any,
                             result: str, reason_part: str) -> None:
    pem, _ = key2048
    if zone is not None:
        dns.set("sel._domainkey.example.org", zone)
    report = verify(dns, sign(MESSAGE, pem))
    assert report.results[0].result == result
    assert reason_part in report.results[0].reason


def test_dns_timeout_is_temperror_within_bounded_time(dns: LoopbackDns,
                                                      key2048: tuple[bytes, str]) -> None:
    pem, _ = key2048
    dns.set("sel._domainkey.example.org", "DROP")
    start = time.monotonic()
    report = asyncio.run(verify_dkim(sign(MESSAGE, pem), resolver_for(dns, timeout=5.0),
                                     dns_timeout=0.5))
    elapsed = time.monotonic() - start
    assert report.results[0].result == "temperror"
    assert "timed out" in report.results[0].reason
    assert elapsed < 2.5


def test_resolver_timeout_is_temperror(dns: LoopbackDns, key2048: tuple[bytes, str]) -> None:
    pem, _ = key2048
    dns.set("sel._domainkey.example.org", "DROP")
    start = time.monotonic()
    report = asyncio.run(verify_dkim(sign(MESSAGE, pem), resolver_for(dns, timeout=0.3)))
    assert report.results[0].result == "temperror"
    assert time.monotonic() - start < 2.5


def test_signature_limit(dns: LoopbackDns, key2048: tuple[bytes, str]) -> None:
    pem, p = key2048
    message = MESSAGE
    for n in range(12):
        publish(dns, p, selector=f"s{n}")
        message = sign(message, pem, selector=f"s{n}".encode())
    dns.queries.clear()
    report = verify(dns, message, max_signatures=10)
    assert len(report.results) == 10 and report.skipped == 2
    assert {r.result for r in report.results} == {"pass"}
    # The newest signature is on top: s11 first.
    assert [r.selector for r in report.results] == [f"s{n}" for n in range(11, 1, -1)]
    assert len({q for q in dns.queries if q[1] == "TXT"}) == 10


def test_same_key_fetched_once(dns: LoopbackDns, key2048: tuple[bytes, str]) -> None:
    pem, p = key2048
    publish(dns, p)
    message = sign(sign(MESSAGE, pem), pem)
    dns.queries.clear()
    assert summary(verify(dns, message)) == [("sel", "pass"), ("sel", "pass")]
    assert dns.queries.count(("sel._domainkey.example.org", "TXT")) == 1


# --- local policy ---------------------------------------------------------------


def test_rsa_sha1_is_policy(dns: LoopbackDns, key2048: tuple[bytes, str]) -> None:
    pem, p = key2048
    publish(dns, p)
    report = verify(dns, sign(MESSAGE, pem, signature_algorithm=b"rsa-sha1"))
    assert (report.results[0].result, report.results[0].reason) == (
        "policy", "rsa-sha1 is not accepted")


def test_short_rsa_key_is_policy(dns: LoopbackDns) -> None:
    pem, p = rsa_key(768)
    publish(dns, p)
    report = verify(dns, sign(MESSAGE, pem))
    assert report.results[0].result == "policy"


def test_length_tag(dns: LoopbackDns, key2048: tuple[bytes, str]) -> None:
    pem, p = key2048
    publish(dns, p)
    signed = sign(MESSAGE, pem, length=True)
    assert summary(verify(dns, signed)) == [("sel", "pass")]
    report = verify(dns, signed + b"Click here: http://evil.example/\r\n")
    assert (report.results[0].result, report.results[0].reason) == (
        "policy", "body only partly signed (l=)")


# --- malformed input ------------------------------------------------------------


@pytest.mark.parametrize("signature", [
    b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=sel; h=from; bh=AAAA\r\n",
    b"DKIM-Signature: garbage\r\n",
    b"DKIM-Signature: v=1; a=rsa-sha512; d=example.org; s=sel; h=from; bh=AAAA; b=AAAA\r\n",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=sel; h=to; bh=AAAA; b=AAAA\r\n",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=exa mple.org; s=sel; h=from; bh=AAAA; b=AAAA\r\n",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=se/l; h=from; bh=AAAA; b=AAAA\r\n",
    # dkimpy raises IndexError (not a DKIMException) for i= equal to d=.
    b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; i=example.org; s=sel; h=from; "
    b"bh=AAAA; b=AAAA\r\n",
])
def test_malformed_signature_is_permerror(dns: LoopbackDns, signature: bytes) -> None:
    dns.queries.clear()
    report = verify(dns, signature + MESSAGE)
    assert [r.result for r in report.results] == ["permerror"]
    assert dns.queries == []  # an invalid signature costs no DNS query


def test_malformed_header_section_is_permerror(dns: LoopbackDns) -> None:
    report = verify(dns, RFC8463_MESSAGE.replace(b"To: Suzie", b"To Suzie"))
    assert [r.result for r in report.results] == ["permerror", "permerror"]
    assert "malformed message header" in report.results[0].reason


def test_leading_continuation_line_is_permerror(dns: LoopbackDns) -> None:
    # dkimpy's parser raises IndexError (not a DKIMException) for this.
    report = verify(dns, b" folded\r\n" + RFC8463_MESSAGE)
    assert [r.result for r in report.results] == ["permerror", "permerror"]


def test_unsigned_message(dns: LoopbackDns) -> None:
    dns.queries.clear()
    assert verify(dns, MESSAGE) == DkimReport()
    assert dns.queries == []


def test_key_name_validation() -> None:
    assert key_name(b"sel", b"Example.ORG") == "sel._domainkey.example.org"
    assert key_name("a.b", "example.org") == "a.b._domainkey.example.org"
    assert key_name("sel", "bücher.example") == "sel._domainkey.xn--bcher-kva.example"
    bad: list[tuple[str | bytes, str]] = [
        ("", "example.org"), ("sel", ""), ("sel", "a..b"), ("sel", "x" * 64 + ".org"),
        ("s l", "example.org"), ("sel", "-bad.org"), (b"\xff", "example.org")]
    for selector, domain in bad:
        assert key_name(selector, domain) is None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_parse_key_fuzz(record: bytes) -> None:
    with contextlib.suppress(KeyPermError):
        parse_key(record)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=400))
def test_verify_fuzz_never_raises(tail: bytes) -> None:
    class NoDns:
        async def query(self, name: str, rdtype: str) -> None:
            return None

    message = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=x; " + tail
    report = asyncio.run(verify_dkim(message, NoDns()))
    assert all(r.result in ("permerror", "fail", "neutral") for r in report.results)


HOSTILE_LINES = [
    b" folded\r\n", b"garbage\r\n", b"\r\n", b"From: a@example.org\r\n", b"From : b@x.example\r\n",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=x; h=from; bh=AAAA; b=AAAA\r\n",
    b"DKIM-Signature: v=1; a=ed25519-sha256; d=example.org; i=example.org; s=x; h=from; "
    b"bh=AAAA; b=AAAA\r\n",
    b"DKIM-Signature: d=; s=; ;;\r\n",
    b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=example.org; s=x; b=AAAA\r\n",
    b"ARC-Seal: i=2; cv=pass; d=example.org; s=x; b=AAAA; h=from\r\n",
    b"ARC-Message-Signature: i=1; a=rsa-sha256; d=example.org; s=x; h=from; bh=AAAA; "
    b"b=AAAA\r\n",
    b"ARC-Message-Signature: i=0; d=example.org\r\n",
    b"ARC-Authentication-Results: i=1; example.org; none\r\n",
    b"ARC-Authentication-Results: i=99999999999; x\r\n",
    b"\xff\xfe: \x00\r\n",
]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(HOSTILE_LINES), max_size=10), st.binary(max_size=40))
def test_hostile_headers_never_raise(lines: list[bytes], tail: bytes) -> None:
    from postwarden.message.arc import verify_arc

    class NoKeys:
        async def query(self, name: str, rdtype: str) -> Any:
            return None

    message = b"".join(lines) + tail
    report = asyncio.run(verify_dkim(message, NoKeys()))
    assert all(r.result != "pass" for r in report.results)
    assert asyncio.run(verify_arc(message, NoKeys())).cv in ("none", "fail")
