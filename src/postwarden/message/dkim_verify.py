"""Inbound DKIM verification (RFC 6376; ed25519-sha256 per RFC 8463).

Owns the checking of every ``DKIM-Signature`` of a received message, and the
key machinery that :mod:`postwarden.message.arc` reuses:

1. the signatures' ``d=``/``s=`` tags are read on the event loop and every
   ``<s>._domainkey.<d>`` TXT record is fetched through the asynchronous
   :class:`~postwarden.delivery.dns.Resolver`, concurrently, under one
   deadline (:func:`fetch_keys`);
2. dkimpy then verifies in a worker thread (``asyncio.to_thread``): its
   canonicalization and hashing are used as they are, but the key comes from
   the prefetched records (``verify_sig`` is overridden, so dkimpy never does
   DNS) and ed25519 is checked with ``cryptography``, so PyNaCl is not needed.

Each signature gets one RFC 8601 2.7.1 result: ``pass``, ``fail`` (the
signature or body hash does not verify), ``neutral``, ``temperror`` (the key
could not be fetched now), ``permerror`` (malformed signature, no key, bad
key: RFC 6376 6.1 PERMFAIL) or ``policy`` (valid, but refused here: RFC 8301
rsa-sha1 or an RSA key under 1024 bits, or an ``l=`` that leaves part of the
body unsigned).  Only ``pass`` counts for DMARC.

Security exposure: signatures, selectors and domains are the sender's, and
the key records come from DNS servers the sender may run.  Work is bounded:
at most ``MAX_SIGNATURES`` signatures are verified (RFC 6376 6.1 lets a
verifier limit them; the rest are counted in ``skipped``), key lookups share
one ``DNS_TIMEOUT``, at most ``MAX_KEY_RECORDS`` TXT records are looked at
per name, RSA keys above ``MAX_RSA_BITS`` bits or with an exponent above
2**32 are refused (a huge exponent would make one verification cost
seconds), and names that are not valid DNS names are never queried.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import dkim  # type: ignore[import-untyped]
import dkim.crypto  # type: ignore[import-untyped]
import dkim.util  # type: ignore[import-untyped]
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from postwarden.delivery.dns import DnsPermanent, DnsTemporary
from postwarden.message.rawheaders import parse_header, unfold

# RFC 6376 6.1: verifiers MAY limit the number of signatures they try.
MAX_SIGNATURES = 10
# One deadline for all key lookups of one message (seconds).
DNS_TIMEOUT = 10.0
# TXT records looked at for one key name (RFC 6376 3.6.2.2: there should be one).
MAX_KEY_RECORDS = 5
# RFC 8301 3.2: verifiers MUST NOT accept RSA keys under 1024 bits.
MIN_RSA_BITS = 1024
# Larger keys are refused: verification cost grows with the square of the size.
MAX_RSA_BITS = 8192
MAX_RSA_EXPONENT = 2**32
# Characters of b= reported as header.b (RFC 6008 4: at least 8).
HEADER_B_LENGTH = 8

Result = Literal["pass", "fail", "neutral", "temperror", "permerror", "policy"]

# dkimpy logs every failure at ERROR level; these are the sender's problems,
# reported in the results, so its log lines go nowhere.
_dkimpy_log = logging.getLogger("postwarden.dkimpy")
_dkimpy_log.addHandler(logging.NullHandler())
_dkimpy_log.propagate = False

_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


class TxtResolver(Protocol):
    """What verification needs of :class:`postwarden.delivery.dns.Resolver`."""

    async def query(self, name: str, rdtype: str) -> Any: ...


@dataclass(frozen=True, slots=True)
class DkimResult:
    """The outcome of one DKIM-Signature; ``header_b`` is the first
    ``HEADER_B_LENGTH`` characters of b= (RFC 6008) for Authentication-Results."""

    domain: str
    selector: str
    result: Result
    reason: str = ""
    algorithm: str = ""
    header_b: str = ""
    identity: str = ""
    # RFC 6376 3.6.1 t=y: the domain is testing DKIM.
    testing: bool = False


@dataclass(frozen=True, slots=True)
class DkimReport:
    """Every verified signature in header order; ``skipped`` signatures
    beyond ``MAX_SIGNATURES`` were not looked at."""

    results: tuple[DkimResult, ...] = ()
    skipped: int = 0

    def passing_domains(self) -> list[str]:
        return [r.domain for r in self.results if r.result == "pass"]


# --- key lookup -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyLookup:
    """What DNS said about one key name: ``ok`` with the TXT records (the
    character-strings of each joined, RFC 6376 3.6.2.2), ``missing``
    (NXDOMAIN or no TXT record), or ``temperror``."""

    status: Literal["ok", "missing", "temperror"]
    records: tuple[bytes, ...] = ()
    error: str = ""


def _domain_ascii(value: str) -> str | None:
    """``value`` as a lower-case ASCII DNS name, or None when it is not one."""
    value = value.strip().lower()
    if not value.isascii():
        try:
            value = value.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    labels = value.split(".")
    if not value or len(value) > 253 or not all(_LABEL.match(lb) for lb in labels):
        return None
    return value


def key_name(selector: bytes | str, domain: bytes | str) -> str | None:
    """``<selector>._domainkey.<domain>`` (RFC 6376 3.6.2.1), or None when
    the tags do not make a valid DNS name (never queried)."""
    try:
        s = selector.decode("utf-8") if isinstance(selector, bytes) else selector
        d = domain.decode("utf-8") if isinstance(domain, bytes) else domain
    except UnicodeDecodeError:
        return None
    sel, dom = _domain_ascii(s), _domain_ascii(d)
    if sel is None or dom is None:
        return None
    name = f"{sel}._domainkey.{dom}"
    return name if len(name) <= 253 else None


async def _fetch_one(resolver: TxtResolver, name: str) -> KeyLookup:
    try:
        answer = await resolver.query(name, "TXT")
    except DnsPermanent:
        return KeyLookup("missing", error="no key record (NXDOMAIN)")
    except DnsTemporary as exc:
        return KeyLookup("temperror", error=exc.text)
    if answer is None:
        return KeyLookup("missing", error="no key record")
    records = tuple(b"".join(getattr(rr, "strings", ())) for rr in list(answer)[:MAX_KEY_RECORDS])
    return KeyLookup("ok", records) if records else KeyLookup("missing", error="no key record")


async def fetch_keys(resolver: TxtResolver, names: Iterable[str],
                     timeout: float = DNS_TIMEOUT) -> dict[str, KeyLookup]:
    """Look every key name up concurrently; a lookup not finished within
    ``timeout`` seconds (all lookups together) is a ``temperror``."""
    unique = list(dict.fromkeys(names))
    if not unique:
        return {}
    tasks = {name: asyncio.ensure_future(_fetch_one(resolver, name)) for name in unique}
    _done, pending = await asyncio.wait(tasks.values(), timeout=timeout)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    out: dict[str, KeyLookup] = {}
    for name, task in tasks.items():
        if task in pending:
            out[name] = KeyLookup("temperror", error="key lookup timed out")
        elif task.exception() is not None:
            exc = task.exception()
            out[name] = KeyLookup("temperror", error=f"key lookup failed: {type(exc).__name__}")
        else:
            out[name] = task.result()
    return out


# --- key records (RFC 6376 3.6.1) -------------------------------------------


@dataclass(frozen=True, slots=True)
class PublicKey:
    ktype: str  # "rsa" | "ed25519"
    key: Any  # dkimpy's RSA dict, or an Ed25519PublicKey
    bits: int
    hashes: frozenset[str] | None  # h=: acceptable hash algorithms; None: any
    testing: bool  # t=y
    strict: bool  # t=s: i= must be in exactly d=


class KeyTempError(dkim.DKIMException):  # type: ignore[misc]
    """The key could not be fetched now (RFC 6376 6.1.2 TEMPFAIL)."""


class KeyPermError(dkim.DKIMException):  # type: ignore[misc]
    """No usable key (RFC 6376 6.1.2 PERMFAIL)."""


def _tags(record: bytes) -> dict[bytes, bytes]:
    try:
        tags: dict[bytes, bytes] = dkim.util.parse_tag_value(unfold(record))
    except dkim.util.InvalidTagValueList as exc:
        raise KeyPermError(f"key syntax error: {exc}") from None
    return tags


def parse_key(record: bytes) -> PublicKey:
    """A key record, or :class:`KeyPermError` explaining what is wrong."""
    tags = _tags(record)
    if tags.get(b"v", b"DKIM1") != b"DKIM1":
        raise KeyPermError("key record version is not DKIM1")
    services = {s.strip() for s in tags.get(b"s", b"*").split(b":")}
    if not services & {b"*", b"email"}:
        raise KeyPermError("key is not for email (s=)")
    flags = {f.strip() for f in tags.get(b"t", b"").split(b":")}
    hashes = (frozenset(h.strip().decode("ascii", "replace").lower()
                        for h in tags[b"h"].split(b":")) if b"h" in tags else None)
    ktype = tags.get(b"k", b"rsa").strip().lower()
    p = re.sub(rb"\s+", b"", tags.get(b"p", b""))
    if not p:
        raise KeyPermError("key revoked (empty p=)")  # RFC 6376 3.6.1
    try:
        der = base64.b64decode(p, validate=True)
    except binascii.Error:
        raise KeyPermError("key p= is not valid base64") from None
    key: Any
    if ktype == b"rsa":
        try:
            key = dkim.crypto.parse_public_key(der)
        except Exception:  # dkimpy's ASN.1 parser raises several types
            raise KeyPermError("unparsable RSA key") from None
        bits = int(key["modulus"]).bit_length()
        if bits > MAX_RSA_BITS or int(key["publicExponent"]) > MAX_RSA_EXPONENT:
            raise KeyPermError("RSA key too large")
    elif ktype == b"ed25519":  # RFC 8463 4: p= is the raw 32-octet key
        try:
            key = Ed25519PublicKey.from_public_bytes(der)
        except ValueError:
            raise KeyPermError("unparsable ed25519 key") from None
        bits = 256
    else:
        raise KeyPermError(f"unknown key type k={ktype.decode('ascii', 'replace')}")
    return PublicKey(ktype.decode("ascii"), key, bits, hashes, b"y" in flags, b"s" in flags)


def choose_key(lookup: KeyLookup | None) -> PublicKey:
    """The first usable key of a lookup (RFC 6376 3.6.2.2 leaves several
    records undefined; this picks deterministically in answer order)."""
    if lookup is None:
        raise KeyTempError("key was not fetched")
    if lookup.status == "temperror":
        raise KeyTempError(f"key unavailable: {lookup.error}")
    if lookup.status == "missing":
        raise KeyPermError(f"no key for signature: {lookup.error}")
    first: KeyPermError | None = None
    for record in lookup.records:
        try:
            return parse_key(record)
        except KeyPermError as exc:
            first = first or exc
    raise first or KeyPermError("no key for signature")


class _Ed25519Check:
    """Stands in for PyNaCl's VerifyKey in dkimpy's ed25519 branch.  dkimpy
    calls ``verify(digest, signature)`` and treats a return as success, so the
    outcome is recorded in ``valid`` and read after dkimpy returns."""

    def __init__(self, key: Ed25519PublicKey) -> None:
        self.key = key
        self.valid = False

    def verify(self, data: bytes, signature: bytes) -> None:
        try:
            # RFC 8463 3: the Ed25519 input is the SHA-256 hash of the data.
            self.key.verify(bytes(signature), bytes(data))
        except InvalidSignature:
            self.valid = False
        else:
            self.valid = True


class PrefetchedKeys:
    """Mixin for dkimpy's ``DKIM`` and ``ARC``: ``verify_sig`` takes the key
    from ``self.keys`` (filled by :func:`fetch_keys`), applies the key
    record's own rules (RFC 6376 3.6.1 h=, k=, t=s) and runs dkimpy's
    hashing and checking."""

    keys: Mapping[str, KeyLookup] = {}
    check_identity = True  # ARC's i= is an instance number, not an identity
    last_key: PublicKey | None = None

    def verify_sig(self, sig: dict[bytes, bytes], include_headers: list[bytes],
                   sig_header: tuple[bytes, bytes], dnsfunc: Any) -> bool:
        self.last_key = None
        name = key_name(sig[b"s"], sig[b"d"])
        if name is None:
            raise KeyPermError("d= or s= is not a valid domain name")
        key = choose_key(self.keys.get(name))
        alg = sig.get(b"a", b"").decode("ascii", "replace").lower()
        ktype, _, hash_alg = alg.partition("-")
        if ktype != key.ktype:  # RFC 6376 6.1.2 step 6
            raise KeyPermError("inappropriate key algorithm")
        if key.hashes is not None and hash_alg not in key.hashes:
            raise KeyPermError("inappropriate hash algorithm")  # RFC 6376 3.6.1 h=
        if self.check_identity and key.strict and b"i" in sig:
            idom = sig[b"i"].rpartition(b"@")[2].lower()
            if idom != sig[b"d"].lower():
                raise KeyPermError("i= domain is not d= and the key has t=s")
        self.last_key = key
        check: _Ed25519Check | None = None
        if key.ktype == "ed25519":
            check = _Ed25519Check(key.key)
            pk: Any = check
        else:
            pk = key.key
        # The attributes dkimpy's verify_sig_process reads.
        self.pk, self.keysize, self.ktag, self.seqtlsrpt = (
            pk, key.bits, key.ktype.encode(), False)
        ok = bool(self.verify_sig_process(  # type: ignore[attr-defined]
            sig, include_headers, sig_header, dnsfunc))
        return ok and (check is None or check.valid)


class _Dkim(PrefetchedKeys, dkim.DKIM):  # type: ignore[misc]
    pass


# --- verification -----------------------------------------------------------


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace")


def _describe(raw_value: bytes) -> DkimResult:
    """The tags the result reports, from a signature that may be malformed."""
    try:
        tags: dict[bytes, bytes] = dkim.util.parse_tag_value(unfold(raw_value))
    except dkim.util.InvalidTagValueList:
        tags = {}
    b = re.sub(rb"\s+", b"", tags.get(b"b", b""))
    return DkimResult(
        domain=_text(tags.get(b"d", b"")).strip().lower(),
        selector=_text(tags.get(b"s", b"")).strip(),
        result="neutral",
        algorithm=_text(tags.get(b"a", b"")).strip().lower(),
        header_b=_text(b[:HEADER_B_LENGTH]),
        identity=_text(tags.get(b"i", b"")).strip(),
    )


def _with(base: DkimResult, result: Result, reason: str = "",
          testing: bool = False) -> DkimResult:
    return DkimResult(base.domain, base.selector, result, reason, base.algorithm,
                      base.header_b, base.identity, testing)


def _verify_one(verifier: _Dkim, idx: int, raw_value: bytes) -> DkimResult:
    base = _describe(raw_value)
    try:
        prep = verifier.verify_headerprep(idx)
    except dkim.DKIMException as exc:  # RFC 6376 6.1.1: PERMFAIL
        return _with(base, "permerror", f"signature syntax: {exc}")
    except Exception as exc:  # e.g. IndexError for i= equal to d= without "@"
        return _with(base, "permerror", f"signature syntax: {type(exc).__name__}")
    if not prep:
        return _with(base, "permerror", "signature not found")
    sig, include_headers, sigheaders = prep
    if b"from" not in include_headers:  # RFC 6376 6.1.1: From MUST be signed
        return _with(base, "permerror", "From field not signed")
    try:
        ok = verifier.verify_sig(sig, include_headers, sigheaders[idx], None)
    except KeyTempError as exc:
        return _with(base, "temperror", str(exc))
    except KeyPermError as exc:
        return _with(base, "permerror", str(exc))
    except dkim.ValidationError as exc:
        if "body hash mismatch" in str(exc):
            return _with(base, "fail", "body hash did not verify")
        return _with(base, "permerror", str(exc))
    except dkim.KeyFormatError as exc:
        if "too small" in str(exc):  # RFC 8301 3.2
            return _with(base, "policy", "RSA key shorter than 1024 bits")
        return _with(base, "permerror", str(exc))
    except dkim.DKIMException as exc:
        return _with(base, "permerror", str(exc))
    except Exception as exc:  # dkimpy on hostile input; never a pass
        return _with(base, "permerror", f"unverifiable signature: {type(exc).__name__}")
    key = verifier.last_key
    testing = bool(key and key.testing)
    if not ok:
        return _with(base, "fail", "signature did not verify", testing)
    if sig[b"a"].lower() == b"rsa-sha1":  # RFC 8301 3.1
        return _with(base, "policy", "rsa-sha1 is not accepted", testing)
    if b"l" in sig:  # dkimpy checked that l= is a decimal number
        canon = dkim.CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
        if int(sig[b"l"]) < len(canon.canonicalize_body(verifier.body)):
            # RFC 6376 8.2: content appended after l= is not signed.
            return _with(base, "policy", "body only partly signed (l=)", testing)
    return _with(base, "pass", "", testing)


def _verify_all(message: bytes, keys: Mapping[str, KeyLookup], limit: int) -> list[DkimResult]:
    try:
        verifier = _Dkim(message, logger=_dkimpy_log, minkey=MIN_RSA_BITS)
    except Exception as exc:  # MessageFormatError, or IndexError for a leading fold
        detail = str(exc) if isinstance(exc, dkim.DKIMException) else type(exc).__name__
        reason = f"malformed message header: {detail}"
        block = parse_header(message)
        return [_with(_describe(f.value(message)), "permerror", reason)
                for f in block.named(b"dkim-signature")[:limit]]
    verifier.keys = keys
    sigs = [v for n, v in verifier.headers if n.lower() == b"dkim-signature"]
    return [_verify_one(verifier, i, sigs[i]) for i in range(min(len(sigs), limit))]


def _wanted_key(value: bytes) -> str | None:
    """The key name of a signature worth a lookup: one whose tags are valid
    (RFC 6376 6.1.1); the others are permerror without any DNS query."""
    try:
        tags = dkim.util.parse_tag_value(value)
        dkim.validate_signature_fields(tags)
    except Exception:  # dkimpy raises more than DKIMException on bad tags
        return None
    if b"from" not in [h.strip().lower() for h in tags[b"h"].split(b":")]:
        return None
    return key_name(tags[b"s"], tags[b"d"])


async def verify_dkim(message: bytes, resolver: TxtResolver, *,
                      max_signatures: int = MAX_SIGNATURES,
                      dns_timeout: float = DNS_TIMEOUT) -> DkimReport:
    """Verify the DKIM signatures of ``message`` (the raw message as
    received, before any header is added or removed)."""
    block = parse_header(message)
    sig_fields = block.named(b"dkim-signature")
    if not sig_fields:  # unsigned: nothing to look up or verify
        return DkimReport()
    names: list[str] = []
    for f in sig_fields[:max_signatures]:
        name = _wanted_key(f.value(message))
        if name is not None:
            names.append(name)
    keys = await fetch_keys(resolver, names, dns_timeout)
    results = await asyncio.to_thread(_verify_all, message, keys, max_signatures)
    return DkimReport(tuple(results), max(0, len(sig_fields) - max_signatures))
