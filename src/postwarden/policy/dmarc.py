"""DMARC evaluation of a received message (RFC 7489; ``np`` from RFC 9091).

Owns, for one message:

* the RFC5322.From domain (:func:`from_domain`, RFC 7489 6.6.1);
* policy discovery (6.6.3): the TXT record at ``_dmarc.<From domain>``, else
  at ``_dmarc.<Organizational Domain>``, found with the Public Suffix List
  that the ``publicsuffixlist`` package ships (offline, never updated at run
  time);
* record parsing (6.3, :func:`parse_record`);
* identifier alignment (3.1) of the From domain with the SPF-authenticated
  domain and with the d= of each passing DKIM signature;
* the result (``pass``/``fail``/``none``/``temperror``/``permerror``) and
  the disposition after ``pct`` sampling (6.6.4).

Choices where the RFC leaves room (documented here, tested in
tests/test_dmarc.py):

* From (6.6.1): exactly one From field is required and all its addresses
  must share one domain.  No From, several From fields, addresses in
  different domains, or a From that does not parse are ``permerror`` with
  disposition ``reject``: a message whose author domain cannot be
  determined unambiguously is the classic way to show one domain to the
  reader and have another checked, so it is treated as failing with the
  strictest policy.
* Records (6.6.3): only TXT records starting with ``v=DMARC1`` count; two
  or more at one name mean no policy (step 5); a record with a bad or
  missing ``p``/``sp``/``np`` counts as ``p=none`` when it has a valid
  ``rua`` (step 6), otherwise, like a record with any other malformed
  tag value, it is ignored and discovery goes on to the Organizational
  Domain.  Unknown tags are ignored (6.3).
* A failure where an aligned SPF or DKIM check had a temporary error is
  ``temperror`` (disposition ``none``): a caller may defer such a message
  instead of rejecting it for a DNS hiccup.  A DNS failure during policy
  discovery is ``temperror`` too.
* ``np`` (RFC 9091 4) applies when the policy came from the Organizational
  Domain and the From domain itself does not exist (NXDOMAIN).

Security exposure: the From field, the DKIM d= values and the DMARC records
are attacker-controlled.  The address parser is a small tokenizer (no
backtracking regular expressions); at most three DNS queries are made per
message; only syntactically valid domain names are queried.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from publicsuffixlist import PublicSuffixList

from postwarden.delivery.dns import CachedAnswer, DnsPermanent, DnsTemporary
from postwarden.message.dkim_verify import DkimResult, TxtResolver
from postwarden.message.rawheaders import parse_header

Result = Literal["pass", "fail", "none", "temperror", "permerror"]
Policy = Literal["none", "quarantine", "reject"]

POLICIES: tuple[Policy, ...] = ("none", "quarantine", "reject")
# RFC 7489 6.6.4: a message not sampled by pct gets the next less strict policy.
_LESS_STRICT: dict[Policy, Policy] = {"reject": "quarantine", "quarantine": "none",
                                      "none": "none"}
# Addresses taken from one From field (RFC 5322 allows a list).
MAX_FROM_ADDRESSES = 20
# TXT records looked at per _dmarc name.
MAX_RECORDS = 10

_VERSION_EXACT = re.compile(r"^\s*[vV]\s*=\s*DMARC1\s*(;|$)")  # %x44.4d.41.52.43.31
_TAG = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:[^\s,;]+$")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


@functools.cache
def default_psl() -> PublicSuffixList:
    """The list bundled with ``publicsuffixlist`` (read once, no network)."""
    return PublicSuffixList()


async def _loaded_psl(psl: PublicSuffixList | None) -> PublicSuffixList:
    """``psl``, or the default list, read in a worker thread the first time
    (parsing it takes a fifth of a second: not on the event loop)."""
    global _default_psl
    if psl is not None:
        return psl
    if _default_psl is None:
        if default_psl.cache_info().currsize:
            _default_psl = default_psl()
        else:
            _default_psl = await asyncio.to_thread(default_psl)
    return _default_psl


# default_psl() once it is known to be read (no cache_info() per message).
_default_psl: PublicSuffixList | None = None


@functools.lru_cache(maxsize=1024)
def normalize_domain(value: str) -> str | None:
    """A lower-case ASCII (A-label) domain name, or None when not one.
    Remembered for the last names seen: the same authors and signers keep
    coming, and the answer depends on the text alone."""
    value = value.strip().lower()
    if not value.isascii():
        try:
            value = value.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    labels = value.split(".")
    if len(value) > 253 or len(labels) < 1 or not all(_LABEL.match(lb) for lb in labels):
        return None
    return value


def organizational_domain(domain: str, psl: PublicSuffixList | None = None) -> str:
    """RFC 7489 3.2: the public suffix plus one label (the domain itself
    when it is a public suffix)."""
    return _organizational_domain(domain, psl or default_psl())


@functools.lru_cache(maxsize=1024)
def _organizational_domain(domain: str, psl: PublicSuffixList) -> str:
    # Remembered per list (the list is never changed once read).
    found = psl.privatesuffix(domain)
    return str(found) if found else domain


def aligned(author: str, other: str, mode: str, psl: PublicSuffixList | None = None) -> bool:
    """RFC 7489 3.1.1/3.1.2: strict is equality, relaxed compares the
    Organizational Domains."""
    a, b = normalize_domain(author), normalize_domain(other)
    if a is None or b is None:
        return False
    if mode == "s":
        return a == b
    return organizational_domain(a, psl) == organizational_domain(b, psl)


# --- the From domain (RFC 7489 6.6.1) ---------------------------------------


class FromError(ValueError):
    """The author domain cannot be determined unambiguously."""


def _lex(text: str) -> list[tuple[str, str]]:
    """RFC 5322 3.2 lexemes: ("q", quoted), ("l", [literal]), ("s", special)
    or ("a", atom run); comments and whitespace are dropped."""
    out: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t":
            i += 1
        elif c == "(":
            depth = 0
            while i < n:
                if text[i] == "\\":
                    i += 2
                    continue
                if text[i] == "(":
                    depth += 1
                elif text[i] == ")":
                    depth -= 1
                    if depth == 0:
                        break
                i += 1
            if i >= n:
                raise FromError("unterminated comment in From")
            i += 1
        elif c == '"':
            j, buf = i + 1, []
            while j < n and text[j] != '"':
                if text[j] == "\\" and j + 1 < n:
                    j += 1
                buf.append(text[j])
                j += 1
            if j >= n:
                raise FromError("unterminated quoted string in From")
            out.append(("q", "".join(buf)))
            i = j + 1
        elif c == "[":
            j = text.find("]", i)
            if j < 0:
                raise FromError("unterminated domain literal in From")
            out.append(("l", text[i:j + 1]))
            i = j + 1
        elif c in ",:;<>@\\)]":
            out.append(("s", c))
            i += 1
        else:
            j = i
            while j < n and text[j] not in ' \t()",:;<>@[]\\':
                j += 1
            out.append(("a", text[i:j]))
            i = j
    return out


def _dotted(words: list[tuple[str, str]]) -> bool:
    """RFC 5322 4.4 obs-local-part / obs-domain: CFWS may separate the words
    of an address only around its dots (``a . b``, never ``a b``)."""
    return all((ka == "a" and a.endswith(".")) or (kb == "a" and b.startswith("."))
               for (ka, a), (kb, b) in itertools.pairwise(words))


def _addr_domain(lexemes: list[tuple[str, str]]) -> str:
    """The domain of an addr-spec: ``local-part "@" domain``."""
    ats = [k for k, lx in enumerate(lexemes) if lx == ("s", "@")]
    if len(ats) != 1 or ats[0] == 0:
        raise FromError("From address is not local@domain")
    domain_lex = lexemes[ats[0] + 1:]
    if not domain_lex or any(kind != "a" for kind, _ in domain_lex):
        raise FromError("From domain is not a domain name")  # literal, specials
    local = lexemes[:ats[0]]
    if any(kind not in ("a", "q") for kind, _ in local) or not _dotted(local):
        raise FromError("malformed local part in From")
    if not _dotted(domain_lex):
        raise FromError("From domain is not a domain name")
    domain = normalize_domain("".join(v for _, v in domain_lex))
    if domain is None:
        raise FromError("From domain is not a valid domain name")
    return domain


def _mailbox_domain(lexemes: list[tuple[str, str]]) -> str:
    opens = [k for k, lx in enumerate(lexemes) if lx == ("s", "<")]
    if not opens:
        return _addr_domain(lexemes)
    closes = [k for k, lx in enumerate(lexemes) if lx == ("s", ">")]
    if len(opens) != 1 or len(closes) != 1 or closes[0] != len(lexemes) - 1:
        raise FromError("malformed angle address in From")
    if any(kind not in ("a", "q") for kind, _ in lexemes[:opens[0]]):
        raise FromError("malformed display name in From")
    inner = lexemes[opens[0] + 1:closes[0]]
    colons = [k for k, lx in enumerate(inner) if lx == ("s", ":")]
    if colons:  # RFC 5322 4.4 obs-route "@a,@b:" before the address
        inner = inner[colons[-1] + 1:]
    return _addr_domain(inner)


# The common From forms, "local@domain" and "Display Name <local@domain>",
# with nothing the lexer treats specially (no comments, quotes, groups,
# literals or routes): their domain is found without lexing.  Anything else
# takes the full path; both give the same answer (tests/test_dmarc.py).
_SIMPLE_FROM = re.compile(
    r"[ \t]*(?:([A-Za-z0-9 \t.'-]*)<)?[^\s()<>\[\]:;@\\,\"]+@([A-Za-z0-9.-]+)(>?)[ \t]*\Z")


def address_domains(value: str) -> list[str]:
    """The domain of every mailbox in a From field value (groups allowed)."""
    m = _SIMPLE_FROM.match(value)
    if m is not None and (m.group(1) is None) == (m.group(3) == ""):
        domain = normalize_domain(m.group(2))
        if domain is None:
            raise FromError("From domain is not a valid domain name")
        return [domain]
    return _lexed_address_domains(value)


def _lexed_address_domains(value: str) -> list[str]:
    lexemes = _lex(value)
    domains: list[str] = []
    segment: list[tuple[str, str]] = []
    depth = 0
    for lx in [*lexemes, ("s", ",")]:
        if lx == ("s", "<"):
            depth += 1
        elif lx == ("s", ">"):
            depth -= 1
        if depth == 0 and lx[0] == "s" and lx[1] in ",;:":
            if lx[1] == ":":  # a group's display name (RFC 5322 3.4)
                if any(kind not in ("a", "q") for kind, _ in segment):
                    raise FromError("malformed group in From")
            elif segment:
                domains.append(_mailbox_domain(segment))
            segment = []
            if len(domains) > MAX_FROM_ADDRESSES:
                raise FromError("too many From addresses")
            continue
        if depth < 0 or depth > 1:
            raise FromError("unbalanced angle brackets in From")
        segment.append(lx)
    return domains


def from_domain(message: bytes) -> str:
    """The single author domain of ``message`` (header block or whole
    message), or :class:`FromError` (see the module docstring)."""
    fields = [f for f in parse_header(message).fields if f.name.lower() == b"from"]
    if not fields:
        raise FromError("no From field")
    if len(fields) > 1:
        raise FromError("multiple From fields")
    try:
        value = fields[0].value(message).decode("utf-8")  # RFC 6532 allows UTF-8
    except UnicodeDecodeError:
        raise FromError("From is not valid UTF-8") from None
    domains = address_domains(value)
    if not domains:
        raise FromError("no address in From")
    if len(set(domains)) > 1:
        raise FromError("From addresses in different domains")
    return domains[0]


# --- records (RFC 7489 6.3) -------------------------------------------------


class RecordError(ValueError):
    """A DMARC record that must be treated as absent."""


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    p: Policy
    sp: Policy | None = None
    np: Policy | None = None
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100
    rua: tuple[str, ...] = ()
    ruf: tuple[str, ...] = ()
    fo: str = "0"


def _uris(value: str) -> tuple[str, ...]:
    return tuple(u.strip() for u in value.split(",") if _URI.match(u.strip()))


def is_dmarc_record(text: str) -> bool:
    """6.6.3 step 2: records not starting with ``v=DMARC1`` are discarded."""
    return _VERSION_EXACT.match(text) is not None


def parse_record(text: str) -> DmarcRecord:
    """Parse one record; :class:`RecordError` when it must be ignored."""
    if not is_dmarc_record(text):
        raise RecordError("not a DMARC1 record")
    tags: dict[str, str] = {}
    for part in text.split(";")[1:]:
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        name, value = name.strip().lower(), value.strip()
        if not sep or not _TAG.match(name):
            raise RecordError(f"malformed tag {part.strip()[:40]!r}")
        if name in tags:
            raise RecordError(f"duplicate tag {name}")
        tags[name] = value
    rua, ruf = _uris(tags.get("rua", "")), _uris(tags.get("ruf", ""))

    def policy(tag: str) -> Policy | None:
        value = tags.get(tag, "").lower()
        for p in POLICIES:
            if value == p:
                return p
        return None

    p, sp, np = policy("p"), policy("sp"), policy("np")
    bad_policy = (p is None or ("sp" in tags and sp is None) or ("np" in tags and np is None))
    if bad_policy:
        if not rua:  # 6.6.3 step 6
            raise RecordError("missing or invalid p=, sp= or np=")
        p, sp, np = "none", None, None
    assert p is not None
    adkim, aspf = tags.get("adkim", "r").lower(), tags.get("aspf", "r").lower()
    if adkim not in ("r", "s") or aspf not in ("r", "s"):
        raise RecordError("invalid adkim= or aspf=")
    pct_text = tags.get("pct", "100")
    if not pct_text.isdigit() or int(pct_text) > 100:
        raise RecordError("invalid pct=")
    return DmarcRecord(p, sp, np, adkim, aspf, int(pct_text), rua, ruf, tags.get("fo", "0"))


# --- discovery and evaluation -----------------------------------------------


@dataclass(frozen=True, slots=True)
class DmarcResult:
    """``policy`` is the domain's requested policy for this message (p=, sp=
    or np=); ``disposition`` what to apply after pct sampling: ``none``,
    ``quarantine`` or ``reject``."""

    result: Result
    from_domain: str = ""
    policy: Policy = "none"
    disposition: Policy = "none"
    record: DmarcRecord | None = None
    record_domain: str = ""
    spf_aligned: bool = False
    dkim_aligned: bool = False
    reason: str = ""


async def _records_at(resolver: TxtResolver, domain: str) -> list[str]:
    """The v=DMARC1 TXT records at ``_dmarc.<domain>`` (DnsTemporary passes)."""
    name = f"_dmarc.{domain}"
    cached: Callable[[str, str], CachedAnswer | None] | None = getattr(resolver, "cached",
                                                                        None)
    hit = cached(name, "TXT") if cached is not None else None
    if hit is not None:
        # What query() would answer from the resolver's cache, without the
        # NXDOMAIN exception (most _dmarc names do not exist).
        answer = None if hit.nxdomain else hit.answer
    else:
        try:
            answer = await resolver.query(name, "TXT")
        except DnsPermanent:
            return []
    if answer is None:
        return []
    texts = [b"".join(getattr(rr, "strings", ())).decode("utf-8", "replace")
             for rr in list(answer)[:MAX_RECORDS]]
    return [t for t in texts if is_dmarc_record(t)]


async def discover(resolver: TxtResolver, domain: str, psl: PublicSuffixList | None = None
                   ) -> tuple[DmarcRecord | None, str, str]:
    """RFC 7489 6.6.3: (record, domain it was found at, note).  Raises
    :class:`DnsTemporary` when a lookup fails temporarily."""
    org = organizational_domain(domain, psl)
    notes: list[str] = []
    for candidate in dict.fromkeys((domain, org)):
        records = await _records_at(resolver, candidate)
        if len(records) > 1:  # step 5: multiple records, no policy
            return None, candidate, f"multiple DMARC records at _dmarc.{candidate}"
        if records:
            try:
                return parse_record(records[0]), candidate, ""
            except RecordError as exc:
                notes.append(f"ignored record at _dmarc.{candidate}: {exc}")
    return None, "", "; ".join(notes) or "no DMARC record"


async def _exists(resolver: TxtResolver, domain: str) -> bool:
    """RFC 9091 2.7 "non-existent": NXDOMAIN.  Doubt means it exists."""
    try:
        await resolver.query(domain, "A")
    except DnsPermanent:
        return False
    except DnsTemporary:
        return True
    return True


async def evaluate(resolver: TxtResolver, author_domain: str, *, spf_result: str,
                   spf_domain: str, dkim: Sequence[DkimResult],
                   rng: random.Random | None = None,
                   psl: PublicSuffixList | None = None) -> DmarcResult:
    """DMARC for a message whose From domain is ``author_domain``.

    ``spf_result``/``spf_domain``: the SPF result and the domain SPF checked
    (the MAIL FROM domain, or the HELO name for the null sender, RFC 7489
    3.1.2 / RFC 7208 2.4).  ``dkim``: the results of every signature; only
    ``pass`` ones can align.  ``rng`` decides pct sampling (6.6.4).
    """
    psl = await _loaded_psl(psl)
    domain = normalize_domain(author_domain)
    if domain is None:
        return DmarcResult("permerror", author_domain, "reject", "reject",
                           reason="From domain is not a valid domain name")
    try:
        record, where, note = await discover(resolver, domain, psl)
    except DnsTemporary as exc:
        return DmarcResult("temperror", domain, reason=f"policy lookup failed: {exc.text}")
    if record is None:
        return DmarcResult("none", domain, reason=note)
    policy: Policy = record.p
    if where != domain:  # the Organizational Domain's record (6.6.3 step 3)
        policy = record.sp or record.p
        if record.np is not None and not await _exists(resolver, domain):
            policy = record.np
    spf_ok = spf_result.lower() == "pass" and aligned(domain, spf_domain, record.aspf, psl)
    dkim_ok = any(r.result == "pass" and aligned(domain, r.domain, record.adkim, psl)
                  for r in dkim)
    result = DmarcResult("fail", domain, policy, policy, record, where, spf_ok, dkim_ok)
    if spf_ok or dkim_ok:
        return replace(result, result="pass", disposition="none")
    temp = ((spf_result.lower() == "temperror"
             and aligned(domain, spf_domain, record.aspf, psl))
            or any(r.result == "temperror" and aligned(domain, r.domain, record.adkim, psl)
                   for r in dkim))
    if temp:
        return replace(result, result="temperror", disposition="none",
                       reason="an aligned check failed temporarily")
    if (rng or random.SystemRandom()).randrange(100) >= record.pct:
        # 6.6.4: not sampled, so the next less strict policy applies.
        return replace(result, disposition=_LESS_STRICT[policy],
                       reason=f"not sampled (pct={record.pct})")
    return result


async def check_message(resolver: TxtResolver, message: bytes, *, spf_result: str,
                        spf_domain: str, dkim: Sequence[DkimResult],
                        rng: random.Random | None = None,
                        psl: PublicSuffixList | None = None) -> DmarcResult:
    """:func:`from_domain` then :func:`evaluate`; a From that cannot be used
    is ``permerror`` with disposition ``reject`` (module docstring)."""
    try:
        domain = from_domain(message)
    except FromError as exc:
        return DmarcResult("permerror", "", "reject", "reject", reason=str(exc))
    return await evaluate(resolver, domain, spf_result=spf_result, spf_domain=spf_domain,
                          dkim=dkim, rng=rng, psl=psl)
