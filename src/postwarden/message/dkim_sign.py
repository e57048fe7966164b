"""DKIM signatures for outgoing mail (RFC 6376, Ed25519 per RFC 8463).

:func:`sign` returns the ``DKIM-Signature:`` header lines to prepend to a
message, one for each active key of the signing domain, so a domain with an
RSA and an Ed25519 key signs twice (RFC 8463 3).  :func:`signing_domain`
picks the domain: the From header's domain when it is ours and has an
active key, else the envelope sender's under the same condition, else none
(the message goes out unsigned).  :func:`sign_message` puts both together.

Choices, all fixed:

* ``c=relaxed/relaxed``: survives the header refolding and trailing
  whitespace changes that relays do (RFC 6376 3.4.2, 3.4.4);
* signed fields (``h=``): From, To, Cc, Subject, Date, Message-ID,
  Reply-To, In-Reply-To, References, MIME-Version, Content-Type,
  Content-Transfer-Encoding, each as many times as it occurs; From is
  listed once more than it occurs, so a From added later breaks the
  signature (RFC 6376 5.4.2 and 8.15, "over-signing");
* no ``l=`` (a body length tag lets anyone append content, RFC 6376 8.2).

The canonicalisation, hashing and header folding are dkimpy's.  dkimpy signs
Ed25519 through PyNaCl, which is not a dependency here, so an Ed25519
signature is computed with ``cryptography`` over the digest that dkimpy
prepares (:class:`_Signer`); the result is the same ``ed25519-sha256``
signature.

Security exposure: the message is the user's (authenticated submission) and
is parsed only to find header fields; the private keys are read from the key
store for each message and never leave this module.  Signing costs a few
milliseconds of CPU per key and message-sized memory, hence
:func:`sign_async`, which keeps it off the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable, Sequence
from email.utils import getaddresses

import dkim  # type: ignore[import-untyped]
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from postwarden.dkim_keys import DkimKeyError, Key, KeyStore

# RFC 6376 5.4.1 recommends these (the ones a MUA sets); lower case.
SIGNED_HEADERS = (
    "from", "to", "cc", "subject", "date", "message-id", "reply-to", "in-reply-to",
    "references", "mime-version", "content-type", "content-transfer-encoding",
)
# Listed one time more than they occur (RFC 6376 8.15).
OVERSIGNED_HEADERS = ("from",)
CANONICALIZATION = (b"relaxed", b"relaxed")
# Only the header section is read to find From; a longer one is not a
# message a client composed.
HEADER_SCAN_MAX = 1024 * 1024


class DkimSignError(Exception):
    """The message could not be signed (bad key file, unparsable header)."""


def header_fields(message: bytes) -> list[tuple[str, str]]:
    """The header fields of ``message`` as (lower-case name, unfolded value)."""
    end = message.find(b"\r\n\r\n", 0, HEADER_SCAN_MAX)
    head = message[:end if end >= 0 else HEADER_SCAN_MAX]
    fields: list[tuple[str, str]] = []
    for raw in head.split(b"\r\n"):
        line = raw.decode("utf-8", errors="replace")
        if line[:1] in (" ", "\t"):
            if fields:  # a continuation line (RFC 5322 2.2.3)
                fields[-1] = (fields[-1][0], fields[-1][1] + line)
            continue
        name, sep, value = line.partition(":")
        if sep and name and name == name.strip():
            fields.append((name.lower(), value.strip()))
    return fields


def from_domain(message: bytes) -> str | None:
    """The domain of the From header when there is exactly one From field
    and all its addresses share one domain (RFC 5322 3.6.2 allows several
    authors); else ``None``."""
    froms = [v for n, v in header_fields(message) if n == "from"]
    if len(froms) != 1:
        return None
    domains = {addr.rpartition("@")[2].lower().rstrip(".")
               for _name, addr in getaddresses(froms) if "@" in addr}
    if len(domains) != 1:
        return None
    domain = domains.pop()
    return domain or None


def signing_domain(message: bytes, sender: str, store: KeyStore,
                   is_local: Callable[[str], bool]) -> str | None:
    """The d= domain for ``message`` (see the module docstring);
    ``sender`` is the envelope sender (``""`` for the null sender)."""
    candidates = [from_domain(message)]
    if "@" in sender:
        candidates.append(sender.rpartition("@")[2].lower().rstrip("."))
    for domain in candidates:
        if not domain:
            continue
        try:
            if is_local(domain) and store.active(domain):
                return domain
        except DkimKeyError:
            continue  # not a valid key directory name: not a domain we sign for
    return None


def include_headers(message: bytes) -> list[bytes]:
    """The ``h=`` list: every occurrence of the signed fields present, plus
    one more From (RFC 6376 8.15)."""
    names = [n for n, _v in header_fields(message)]
    out: list[bytes] = []
    for name in SIGNED_HEADERS:
        count = names.count(name)
        if name in OVERSIGNED_HEADERS:
            count += 1
        out += [name.encode("ascii")] * count
    return out


class _SignedBytes:
    """What dkimpy's ``gen_header`` expects back from an Ed25519 key."""

    def __init__(self, signature: bytes) -> None:
        self.signature = signature


class _Ed25519Adapter:
    """The ``sign`` dkimpy calls on a PyNaCl ``SigningKey``, on
    ``cryptography``'s key: PureEdDSA over the SHA-256 digest of the
    canonicalised header data (RFC 8463 3)."""

    def __init__(self, key: ed25519.Ed25519PrivateKey) -> None:
        self._key = key

    def sign(self, data: bytes) -> _SignedBytes:
        return _SignedBytes(self._key.sign(data))


class _Signer(dkim.DKIM):  # type: ignore[misc]
    def sign_ed25519(self, selector: bytes, domain: bytes, key: ed25519.Ed25519PrivateKey,
                     headers: Sequence[bytes]) -> bytes:
        """dkimpy's ``DKIM.sign`` for ``ed25519-sha256``, with the key
        operation done by ``cryptography``: the same fields in the same
        order, the same canonicalisation and folding."""
        self.signature_algorithm = b"ed25519-sha256"
        self.hasher = dkim.HASH_ALGORITHMS[self.signature_algorithm]
        self.include_headers = tuple(headers)
        policy = dkim.CanonicalizationPolicy.from_c_value(b"/".join(CANONICALIZATION))
        h = self.hasher()
        h.update(policy.canonicalize_body(self.body))
        fields = [
            (b"v", b"1"),
            (b"a", self.signature_algorithm),
            (b"c", policy.to_c_value()),
            (b"d", domain),
            (b"i", b"@" + domain),
            (b"q", b"dns/txt"),
            (b"s", selector),
            (b"t", str(int(time.time())).encode("ascii")),
            (b"h", b" : ".join(headers)),
            (b"bh", base64.b64encode(h.digest())),
            (b"b", b"0" * 60),  # folds b= onto its own line, as dkimpy does
        ]
        value: bytes = self.gen_header(fields, self.include_headers, policy,
                                       b"DKIM-Signature", _Ed25519Adapter(key))
        self.domain, self.selector = domain, selector
        return b"DKIM-Signature: " + value


def _sign_one(message: bytes, key: Key, headers: list[bytes]) -> bytes:
    private = key.private_key()
    signer = _Signer(message, signature_algorithm=key.signature_algorithm.encode("ascii"))
    selector, domain = key.selector.encode("ascii"), key.domain.encode("ascii")
    if isinstance(private, rsa.RSAPrivateKey):
        # dkimpy reads PKCS#1 ("RSA PRIVATE KEY"); the file is PKCS#8.
        pem = private.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
        result: bytes = signer.sign(selector, domain, pem, canonicalize=CANONICALIZATION,
                                    include_headers=headers)
        return result
    return signer.sign_ed25519(selector, domain, private, headers)


def sign(message: bytes, domain: str, keys: Sequence[Key]) -> bytes:
    """The DKIM-Signature header lines (CRLF-terminated) that sign
    ``message`` (CRLF line ends) for ``domain``, one per key; ``b""``
    without keys.  Raises :class:`DkimSignError`."""
    domain = domain.lower().rstrip(".")
    for key in keys:
        if key.domain != domain:
            raise DkimSignError(f"DKIM key {key.selector} is for {key.domain}, not {domain}")
    if not keys:
        return b""
    if not any(name == "from" for name, _value in header_fields(message)):
        # RFC 6376 5.4: "The From header field MUST be signed".
        raise DkimSignError("the message has no From header field")
    headers = include_headers(message)
    out = []
    for key in keys:
        try:
            out.append(_sign_one(message, key, headers))
        except DkimKeyError as exc:
            raise DkimSignError(str(exc)) from None
        except dkim.DKIMException as exc:
            raise DkimSignError(f"DKIM signing with {key.selector} failed: {exc}") from None
    return b"".join(out)


async def sign_async(message: bytes, domain: str, keys: Sequence[Key]) -> bytes:
    """:func:`sign` in a worker thread (it is CPU work on the whole message)."""
    return await asyncio.to_thread(sign, message, domain, keys)


def sign_message(message: bytes, sender: str, store: KeyStore,
                 is_local: Callable[[str], bool]) -> bytes:
    """Choose the signing domain and sign with its active keys; ``b""``
    when no domain of ours applies."""
    domain = signing_domain(message, sender, store, is_local)
    if domain is None:
        return b""
    try:
        keys = store.active(domain)
    except DkimKeyError as exc:
        raise DkimSignError(str(exc)) from None
    return sign(message, domain, keys)


async def sign_message_async(message: bytes, sender: str, store: KeyStore,
                             is_local: Callable[[str], bool]) -> bytes:
    """:func:`sign_message` in a worker thread (it also reads key files)."""
    return await asyncio.to_thread(sign_message, message, sender, store, is_local)
