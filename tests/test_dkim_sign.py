"""DKIM signing, checked by an independent verifier: OpenDKIM.

``opendkim -t FILE`` (Debian package ``opendkim``) verifies a message the
way the milter does, with libopendkim, and fetches the public keys over
real DNS through libunbound.  The unbound configuration forwards every
query to a :class:`LoopbackDns` that serves our keys, so nothing leaves
the machine.  (``opendkim-testmsg`` from ``opendkim-tools`` verifies too,
but only through the system resolver, which cannot be pointed at another
port.)
"""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import REQUIRE_ALL
from tests.peers import find_tool

from dns_server import LoopbackDns
from postwarden.dkim_keys import Key, KeyStore, public_record
from postwarden.message import dkim_sign

DOMAIN = "example.test"
MESSAGE = (
    b"From: Alice Example <alice@example.test>\r\n"
    b"To: Bob <bob@example.org>\r\n"
    b"Cc: carol@example.org\r\n"
    b"Subject: DKIM test\r\n"
    b"Date: Thu, 26 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <1234@example.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Received: from somewhere by mail.example.test\r\n"
    b"X-Mailer: test\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b"\r\n"
    b"this is signed.\r\n"
)
_RESULT = re.compile(r"\bdkim=(\w+)\b.*?header\.s=([\w.-]+)")  # one result a line


class OpenDkim:
    """Runs ``opendkim -t`` against the keys published in ``dns``."""

    def __init__(self, binary: str, directory: Path, dns: LoopbackDns) -> None:
        self.binary = binary
        self.directory = directory
        unbound = directory / "unbound.conf"
        # "test." is one of unbound's default local zones (RFC 6761 names,
        # answered NXDOMAIN locally): let it through to the loopback server.
        unbound.write_text(
            "server:\n"
            "  do-not-query-localhost: no\n"
            '  local-zone: "test." nodefault\n'
            "forward-zone:\n"
            '  name: "."\n'
            f"  forward-addr: {dns.address}@{dns.port}\n")
        self.conf = directory / "opendkim.conf"
        self.conf.write_text(f"Mode v\nSyslog no\nResolverConfiguration {unbound}\n")

    def verify(self, message: bytes) -> dict[str, str]:
        """``{selector: result}`` for every signature (pass, fail, ...)."""
        path = self.directory / "message.eml"
        path.write_bytes(message)
        proc = subprocess.run([self.binary, "-x", str(self.conf), "-vvv", "-t", str(path)],
                              capture_output=True, text=True, timeout=60, check=False)
        # -vvv prints the Authentication-Results field it would add.
        results = {sel: res for res, sel in _RESULT.findall(proc.stdout)}
        assert results, f"no DKIM result from opendkim:\n{proc.stdout}\n{proc.stderr}"
        return results


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore(tmp_path / "dkim")


@pytest.fixture
def dns() -> Iterator[LoopbackDns]:
    with LoopbackDns() as server:
        yield server


@pytest.fixture
def opendkim(tmp_path: Path, dns: LoopbackDns) -> OpenDkim:
    binary = find_tool("opendkim")
    if binary is None:
        msg = "opendkim is not installed (Debian package opendkim)"
        if REQUIRE_ALL:
            pytest.fail(msg + " and POSTWARDEN_REQUIRE_ALL=1")
        pytest.skip(msg)
    work = tmp_path / "opendkim"
    work.mkdir()
    return OpenDkim(binary, work, dns)


def publish(dns: LoopbackDns, *keys: Key) -> None:
    for key in keys:
        dns.set(key.dns_name, {"TXT": [public_record(key)]})


def signed(message: bytes, keys: list[Key]) -> bytes:
    return dkim_sign.sign(message, DOMAIN, keys) + message


def tag(header: bytes, name: str) -> str:
    unfolded = re.sub(rb"\r\n[ \t]+", b" ", header).decode()
    m = re.search(rf"(?:^|;)\s*{name}=([^;]*)", unfolded.split(":", 1)[1])
    assert m, f"no {name}= in {unfolded}"
    return re.sub(r"\s+", "", m.group(1))


# --- verified by OpenDKIM ---------------------------------------------------


def test_rsa_signature_verifies(store: KeyStore, dns: LoopbackDns, opendkim: OpenDkim) -> None:
    key = store.generate(DOMAIN, "sel1", activate=True)
    publish(dns, key)
    assert opendkim.verify(signed(MESSAGE, [key])) == {"sel1": "pass"}
    assert ("sel1._domainkey.example.test", "TXT") in dns.queries


def test_changed_body_fails(store: KeyStore, dns: LoopbackDns, opendkim: OpenDkim) -> None:
    key = store.generate(DOMAIN, "sel1", activate=True)
    publish(dns, key)
    message = signed(MESSAGE, [key]).replace(b"this is signed.", b"this is forged.")
    assert opendkim.verify(message) == {"sel1": "fail"}


@pytest.mark.parametrize("where", ["top", "after"])
def test_added_from_fails(store: KeyStore, dns: LoopbackDns, opendkim: OpenDkim,
                          where: str) -> None:
    """From is signed once more than it occurs (RFC 6376 8.15), so a second
    From anywhere in the header breaks the signature."""
    key = store.generate(DOMAIN, "sel1", activate=True)
    publish(dns, key)
    message = signed(MESSAGE, [key])
    evil = b"From: Mallory <ceo@example.test>\r\n"
    if where == "top":
        message = evil + message
    else:
        message = message.replace(b"To: Bob", evil + b"To: Bob", 1)
    assert opendkim.verify(message) == {"sel1": "fail"}


def test_control_without_oversigning_an_added_from_passes(
        store: KeyStore, dns: LoopbackDns, opendkim: OpenDkim) -> None:
    """The control for test_added_from_fails[top]: with From signed only as
    often as it occurs, OpenDKIM accepts a From added on top."""
    import dkim  # type: ignore[import-untyped]
    from cryptography.hazmat.primitives import serialization

    key = store.generate(DOMAIN, "sel1", activate=True)
    publish(dns, key)
    pem = key.private_key().private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.TraditionalOpenSSL,
                                          serialization.NoEncryption())
    header = dkim.sign(MESSAGE, b"sel1", DOMAIN.encode(), pem,
                       canonicalize=(b"relaxed", b"relaxed"), include_headers=[b"from", b"to"])
    evil = b"From: Mallory <ceo@example.test>\r\n"
    assert opendkim.verify(evil + header + MESSAGE) == {"sel1": "pass"}


def test_dual_signing_rsa_and_ed25519(store: KeyStore, dns: LoopbackDns,
                                      opendkim: OpenDkim) -> None:
    rsa_key = store.generate(DOMAIN, "r1", "rsa", activate=True)
    ed_key = store.generate(DOMAIN, "e1", "ed25519", activate=True)
    publish(dns, rsa_key, ed_key)
    header = dkim_sign.sign(MESSAGE, DOMAIN, store.active(DOMAIN))
    sigs = re.findall(rb"DKIM-Signature:.*?(?=\r\nDKIM-Signature:|\r\n\Z)", header, re.S)
    assert [tag(s, "a") for s in sigs] == ["rsa-sha256", "ed25519-sha256"]
    assert opendkim.verify(header + MESSAGE) == {"r1": "pass", "e1": "pass"}
    broken = (header + MESSAGE).replace(b"Subject: DKIM test", b"Subject: DKIM text")
    assert opendkim.verify(broken) == {"r1": "fail", "e1": "fail"}


def test_relaxed_canonicalisation_survives_whitespace(store: KeyStore, dns: LoopbackDns,
                                                      opendkim: OpenDkim) -> None:
    key = store.generate(DOMAIN, "sel1", activate=True)
    ed = store.generate(DOMAIN, "sel2", "ed25519", activate=True)
    publish(dns, key, ed)
    message = signed(MESSAGE, [key, ed])
    mangled = (message
               .replace(b"Subject: DKIM test", b"subject:   DKIM \r\n\t  test   ")
               .replace(b"To: Bob <bob@example.org>", b"TO:Bob    <bob@example.org>\t")
               .replace(b"this is signed.", b"this   is \t signed.   "))
    assert mangled != message
    assert opendkim.verify(mangled) == {"sel1": "pass", "sel2": "pass"}


def test_sign_message_picks_domain_and_verifies(store: KeyStore, dns: LoopbackDns,
                                                opendkim: OpenDkim) -> None:
    key = store.generate(DOMAIN, "sel1", activate=True)
    publish(dns, key)
    header = dkim_sign.sign_message(MESSAGE, "alice@example.test", store,
                                    lambda d: d == DOMAIN)
    assert tag(header, "d") == DOMAIN
    assert opendkim.verify(header + MESSAGE) == {"sel1": "pass"}


# --- units ------------------------------------------------------------------


def test_signed_header_list(store: KeyStore) -> None:
    key = store.generate(DOMAIN, "sel1", activate=True)
    message = MESSAGE.replace(b"Cc: carol@example.org\r\n",
                              b"Cc: carol@example.org\r\nCc: dave@example.org\r\n")
    header = dkim_sign.sign(message, DOMAIN, [key])
    assert header.endswith(b"\r\n") and header.count(b"DKIM-Signature:") == 1
    h = tag(header, "h").split(":")
    # Present fields only, each as often as it occurs, From one extra time;
    # never Received or unknown X- fields.
    assert sorted(h) == sorted(["from", "from", "to", "cc", "cc", "subject", "date",
                                "message-id", "mime-version", "content-type"])
    assert tag(header, "c") == "relaxed/relaxed"
    assert tag(header, "d") == DOMAIN and tag(header, "s") == "sel1"
    assert "l=" not in header.decode().replace("\r\n", "")


def test_no_keys_no_signature() -> None:
    assert dkim_sign.sign(MESSAGE, DOMAIN, []) == b""


def test_message_without_from_is_refused(store: KeyStore) -> None:
    key = store.generate(DOMAIN, "sel1", activate=True)
    with pytest.raises(dkim_sign.DkimSignError, match="From"):
        dkim_sign.sign(b"To: b@example.org\r\n\r\nbody\r\n", DOMAIN, [key])


def test_key_of_another_domain_is_refused(store: KeyStore) -> None:
    key = store.generate("other.test", "sel1", activate=True)
    with pytest.raises(dkim_sign.DkimSignError, match=r"other\.test"):
        dkim_sign.sign(MESSAGE, DOMAIN, [key])


def test_unreadable_key_is_a_sign_error(store: KeyStore) -> None:
    key = store.generate(DOMAIN, "sel1", activate=True)
    key.path.write_bytes(b"not a key")
    with pytest.raises(dkim_sign.DkimSignError, match="PEM"):
        dkim_sign.sign(MESSAGE, DOMAIN, [key])


@pytest.mark.parametrize(("headers", "expected"), [
    (b"From: a@example.test\r\n", "example.test"),
    (b"From: \"A, B\" <a@Example.TEST>\r\n", "example.test"),
    (b"From: a@example.test,\r\n b@example.test\r\n", "example.test"),
    (b"From: a@example.test, b@other.test\r\n", None),
    (b"From: a@example.test\r\nFrom: b@example.test\r\n", None),
    (b"From: undisclosed\r\n", None),
    (b"To: a@example.test\r\n", None),
])
def test_from_domain(headers: bytes, expected: str | None) -> None:
    assert dkim_sign.from_domain(headers + b"\r\nFrom: body@ignored.test\r\n") == expected


def test_signing_domain_choice(store: KeyStore) -> None:
    store.generate(DOMAIN, "sel1", activate=True)
    store.generate("nokey.test", "sel1")  # a key, but not active
    local = {DOMAIN, "nokey.test", "other.test"}

    def choose(from_: str, sender: str) -> str | None:
        message = f"From: {from_}\r\nTo: x@example.org\r\n\r\nbody\r\n".encode()
        return dkim_sign.signing_domain(message, sender, store, local.__contains__)

    assert choose("a@example.test", "bounce@other.test") == DOMAIN
    # From is foreign or has no active key: the envelope sender's domain.
    assert choose("a@foreign.example", "a@example.test") == DOMAIN
    assert choose("a@nokey.test", "a@example.test") == DOMAIN
    # Neither is ours with an active key: no signature.
    assert choose("a@foreign.example", "a@foreign.example") is None
    assert choose("a@nokey.test", "") is None
    # Not a local domain any more: keys on disk are not enough.
    assert dkim_sign.signing_domain(b"From: a@example.test\r\n\r\n", "", store,
                                    lambda d: False) is None
    assert dkim_sign.sign_message(b"From: a@foreign.example\r\n\r\nx\r\n", "", store,
                                  local.__contains__) == b""


def test_sign_async(store: KeyStore) -> None:
    key = store.generate(DOMAIN, "sel1", activate=True)
    header = asyncio.run(dkim_sign.sign_async(MESSAGE, DOMAIN, [key]))
    assert header.startswith(b"DKIM-Signature: ") and tag(header, "s") == "sel1"
    both = asyncio.run(dkim_sign.sign_message_async(MESSAGE, "", store, lambda d: True))
    assert tag(both, "s") == "sel1"
