"""Inbound ARC chain validation (RFC 8617 5.2).

Owns the chain validation status (``cv``) of a received message: ``none``
(no ARC sets), ``pass`` (every ARC-Seal validates, the newest
ARC-Message-Signature validates, and the cv= values are consistent) or
``fail``.  dkimpy's ``ARC`` class does the validation; as for DKIM
(:mod:`postwarden.message.dkim_verify`) the keys of every ARC-Seal and
ARC-Message-Signature are fetched first through the asynchronous resolver,
and dkimpy runs in a worker thread with those records only.

A chain whose newest seal says ``cv=fail`` is reported as ``fail``: dkimpy
calls it "terminated" (no status), RFC 8617 5.2 step 2 says the chain
validation status is fail.  A key that cannot be fetched now makes its
signature invalid and the chain ``fail`` with ``temperror`` set, so that a
caller may choose to defer rather than trust the failure; RFC 8617 defines
no temporary result for ``arc=``.

Security exposure: ARC headers and key records are attacker-controlled.
Work is bounded: more than ``MAX_INSTANCES`` (RFC 8617 4.2.1: 50) ARC sets
fail at once without any lookup, at most ``MAX_KEYS`` distinct keys are
fetched (a signature whose key was not fetched does not validate), and all
lookups share one deadline.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Literal

import dkim  # type: ignore[import-untyped]
import dkim.util  # type: ignore[import-untyped]

from postwarden.message.dkim_verify import (
    DNS_TIMEOUT,
    MIN_RSA_BITS,
    KeyLookup,
    PrefetchedKeys,
    TxtResolver,
    fetch_keys,
    key_name,
)
from postwarden.message.dkim_verify import _dkimpy_log as _log
from postwarden.message.rawheaders import parse_header

# RFC 8617 4.2.1: i= ranges from 1 to 50.
MAX_INSTANCES = 50
# Distinct keys fetched for one chain (each hop usually uses one key for both
# its seal and its message signature).
MAX_KEYS = 16

Cv = Literal["none", "pass", "fail"]

_ARC_SIGNED = (b"arc-seal", b"arc-message-signature")
_ARC_ALL = (*_ARC_SIGNED, b"arc-authentication-results")
# The (lower-case) names of the fields of an ARC set.
ARC_FIELDS = frozenset(_ARC_ALL)
_INSTANCE = re.compile(rb"(?:^|;)\s*i\s*=\s*(\d+)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class ArcResult:
    """``cv`` for Authentication-Results ``arc=``; ``instance`` is the
    highest i= seen; ``domain`` the d= of the newest ARC-Seal."""

    cv: Cv
    reason: str = ""
    instance: int = 0
    domain: str = ""
    temperror: bool = False


# The result for a message without any ARC header field (most of them).
NO_ARC = ArcResult("none", "no ARC sets", 0, "")


class _Arc(PrefetchedKeys, dkim.ARC):  # type: ignore[misc]
    check_identity = False


def _chain_names(message: bytes) -> tuple[int, list[str], str]:
    """(highest i=, key names to fetch, d= of the newest seal)."""
    block = parse_header(message)
    highest = 0
    names: list[str] = []
    newest_seal: tuple[int, str] = (0, "")
    for f in block.fields:
        if f.lname not in _ARC_ALL:
            continue
        value = f.value(message)
        m = _INSTANCE.search(value)
        instance = int(m.group(1)[:6]) if m else 0
        highest = max(highest, instance)
        if f.lname not in _ARC_SIGNED:
            continue
        try:
            tags = dkim.util.parse_tag_value(value)
        except dkim.util.InvalidTagValueList:
            continue
        name = key_name(tags.get(b"s", b""), tags.get(b"d", b""))
        if name is not None and name not in names:
            names.append(name)
        if f.lname == b"arc-seal" and instance >= newest_seal[0]:
            newest_seal = (instance, tags.get(b"d", b"").decode("utf-8", "replace").lower())
    return highest, names, newest_seal[1]


def _validate(message: bytes, keys: dict[str, KeyLookup]) -> tuple[Cv, str]:
    try:
        verifier = _Arc(message, logger=_log, minkey=MIN_RSA_BITS)
    except Exception as exc:  # MessageFormatError, or IndexError for a leading fold
        return "fail", f"malformed message header: {type(exc).__name__}"
    verifier.keys = keys
    try:
        cv, _results, reason = verifier.verify()
    except dkim.DKIMException as exc:
        return "fail", str(exc)
    except Exception as exc:  # dkimpy on hostile input: never a pass
        return "fail", f"unverifiable ARC set: {type(exc).__name__}"
    if cv == dkim.CV_Pass:
        return "pass", str(reason)
    if cv == dkim.CV_None:
        return "none", str(reason)
    # dkimpy's None: the newest seal reported cv=fail (RFC 8617 5.2 step 2).
    return "fail", str(reason)


async def verify_arc(message: bytes, resolver: TxtResolver, *,
                     dns_timeout: float = DNS_TIMEOUT, max_keys: int = MAX_KEYS) -> ArcResult:
    """Validate the ARC chain of ``message`` (the raw message as received)."""
    if not any(f.lname in _ARC_ALL for f in parse_header(message).fields):
        # No ARC set at all (RFC 8617 5.2): cv=none, no worker thread.
        return NO_ARC
    highest, names, domain = _chain_names(message)
    if highest > MAX_INSTANCES:
        return ArcResult("fail", f"more than {MAX_INSTANCES} ARC sets", highest, domain)
    keys = await fetch_keys(resolver, names[:max_keys], dns_timeout)
    cv, reason = await asyncio.to_thread(_validate, message, keys)
    temp = any(k.status == "temperror" for k in keys.values())
    if cv == "fail" and temp:
        reason += " (a key lookup failed temporarily)"
    elif cv == "fail" and len(names) > max_keys:
        reason += f" (only {max_keys} keys were fetched)"
    if cv == "none":
        return ArcResult("none", reason)
    return ArcResult(cv, reason, highest, domain, cv == "fail" and temp)
