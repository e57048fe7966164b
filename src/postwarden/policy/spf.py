"""SPF (RFC 7208): may this client IP send mail for this domain?

:func:`check_host` is RFC 7208's ``check_host()`` function: it fetches the
domain's SPF record, evaluates its mechanisms and modifiers against the
client's IP address and returns an :class:`SpfResult` (pass, fail, softfail,
neutral, none, permerror, temperror) with the matching mechanism, a comment
for the log and Authentication-Results, and for "fail" the explanation
(``exp=``, RFC 7208 6.2).  :func:`check_mail_from` and :func:`check_helo`
choose the identity as RFC 7208 2.3 and 2.4 say.

Why hand-written: pyspf is synchronous (it would block the event loop for
the whole evaluation, seconds when a nameserver is slow) and brings its own
DNS layer.  Here every lookup is an ``await`` on the shared resolver
(:class:`postwarden.delivery.dns.Resolver`, or anything with its ``query``),
so thousands of sessions can evaluate SPF at once, and the whole evaluation
is bounded by count (RFC 7208 4.6.4) and by time (``timeout``, 20 s by
default, then "temperror").  When the resolver can say what it has cached
(``Resolver.cached``), the evaluation is first tried from the cache alone:
nothing waits, so it runs to its end at once without a timer; the first
answer that is not cached hands over to the evaluation that queries.

Security exposure: the records evaluated are published by whoever controls
the sender's domain, i.e. by the attacker.  They can make us send DNS
queries to third parties (SPF as a DNS amplifier, RFC 7208 11.1), so the
limits of RFC 7208 4.6.4 are enforced: at most 10 terms that query DNS
(include, a, mx, ptr, exists, redirect) per evaluation, at most 2 of them
"void" (no records), at most 10 MX and 10 PTR names per term; the
explanation lookup is done once, after the result.  Records are
syntax-checked in full before anything is evaluated.  Text that reaches us
(explanations, names in comments) is untrusted: it is reduced to printable
ASCII and shortened before it can reach an SMTP reply or a log line.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import time
import urllib.parse
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar, cast

import dns.exception
import dns.name
import dns.rdata
import dns.rdtypes.ANY.MX
import dns.rdtypes.ANY.PTR
import dns.rdtypes.ANY.TXT
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.reversename

from postwarden.delivery.dns import CachedAnswer, DnsError, DnsPermanent, DnsTemporary
from postwarden.netaddr import client_address

Result = Literal["pass", "fail", "softfail", "neutral", "none", "permerror", "temperror"]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# RFC 7208 4.6.4: terms that cause DNS queries, per evaluation.
MAX_DNS_TERMS = 10
# RFC 7208 4.6.4: "void lookups" (NOERROR without records, or NXDOMAIN).
MAX_VOID_LOOKUPS = 2
# RFC 7208 4.6.4: address lookups per "mx" term (more MX names: permerror).
MAX_MX_NAMES = 10
# RFC 7208 4.6.4: PTR names looked at per "ptr" term or "p" macro (the rest ignored).
MAX_PTR_NAMES = 10
# RFC 7208 4.6.4: "such a limit SHOULD allow at least 20 seconds".
DEFAULT_TIMEOUT = 20.0
# RFC 7208 7.3: an expanded domain name longer than this loses labels on the left.
MAX_DOMAIN_LENGTH = 253
# An explanation goes into an SMTP reply line (RFC 5321 4.5.3.1.5: 512 octets).
MAX_EXPLANATION = 400
MAX_COMMENT = 300

QUALIFIERS: dict[str, Result] = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}


@dataclass(frozen=True, slots=True)
class SpfLimits:
    """The processing limits of RFC 7208 4.6.4 (the defaults are the RFC's)."""

    dns_terms: int = MAX_DNS_TERMS
    void_lookups: int = MAX_VOID_LOOKUPS
    mx_names: int = MAX_MX_NAMES
    ptr_names: int = MAX_PTR_NAMES


DEFAULT_LIMITS = SpfLimits()


@dataclass(frozen=True, slots=True)
class SpfResult:
    """The outcome of one ``check_host()``.

    ``mechanism`` is the term that matched, as written (``"-all"``,
    ``"include:_spf.example.com"``), empty when none did; ``explanation``
    is set for "fail" only (the domain's ``exp=`` text, or
    :func:`default_explanation`); ``comment`` says why, for the log and the
    comment of an Authentication-Results entry; ``domain`` is the domain
    checked; ``dns_terms`` the DNS-querying terms evaluated."""

    result: Result
    explanation: str = ""
    mechanism: str = ""
    comment: str = ""
    domain: str = ""
    dns_terms: int = 0


class DnsQuery(Protocol):
    """The part of :class:`postwarden.delivery.dns.Resolver` SPF uses: one
    lookup, ``None`` for "no such records", :class:`DnsPermanent` for
    NXDOMAIN, :class:`DnsTemporary` for timeouts and server failures."""

    async def query(self, name: str, rdtype: str) -> Iterable[dns.rdata.Rdata] | None: ...


def default_explanation(domain: str, ip: str) -> str:
    """The explanation of a "fail" when the domain gives none (RFC 7208 6.2:
    "a locally configured default")."""
    return _printable(f"{domain} does not designate {_client_ip(ip)} as a permitted sender",
                      MAX_EXPLANATION)


async def check_mail_from(ip: str, mail_from: str, helo: str, resolver: DnsQuery, *,
                          limits: SpfLimits = DEFAULT_LIMITS,
                          timeout: float = DEFAULT_TIMEOUT, receiver: str = "unknown",
                          clock: Callable[[], float] = time.time,
                          cached_first: bool = True) -> SpfResult:
    """SPF for the MAIL FROM identity (RFC 7208 2.4): its domain, or for the
    null reverse-path ``<>`` the HELO name, as ``postmaster@<helo>``.  The
    options are those of :func:`check_host`."""
    if not mail_from:
        return await check_helo(ip, helo, resolver, limits=limits, timeout=timeout,
                                receiver=receiver, clock=clock, cached_first=cached_first)
    domain = mail_from.rpartition("@")[2]
    return await check_host(ip, domain, mail_from, helo, resolver, limits=limits,
                            timeout=timeout, receiver=receiver, clock=clock,
                            cached_first=cached_first)


async def check_helo(ip: str, helo: str, resolver: DnsQuery, *,
                     limits: SpfLimits = DEFAULT_LIMITS, timeout: float = DEFAULT_TIMEOUT,
                     receiver: str = "unknown", clock: Callable[[], float] = time.time,
                     cached_first: bool = True) -> SpfResult:
    """SPF for the HELO identity (RFC 7208 2.3): ``postmaster@<helo>``.  A
    HELO that is an address literal or not a domain name gives "none"."""
    return await check_host(ip, helo, f"postmaster@{helo}", helo, resolver, limits=limits,
                            timeout=timeout, receiver=receiver, clock=clock,
                            cached_first=cached_first)


async def check_host(ip: str, domain: str, sender: str, helo: str, resolver: DnsQuery, *,
                     limits: SpfLimits = DEFAULT_LIMITS, timeout: float = DEFAULT_TIMEOUT,
                     receiver: str = "unknown", clock: Callable[[], float] = time.time,
                     cached_first: bool = True) -> SpfResult:
    """RFC 7208 4 ``check_host(<ip>, <domain>, <sender>)``.

    ``helo`` is for the ``%{h}`` macro, ``receiver`` (our host name) for
    ``%{r}``, ``clock`` for ``%{t}``.  Raises :class:`ValueError` when ``ip``
    is not an IP address; every other problem is a result.
    ``cached_first=False``: the caller has just tried
    :func:`check_host_cached` and got None; go straight to the lookups.
    """
    addr = _client_ip(ip)
    name = _initial_domain(domain)
    if cached_first or name is None:
        done = check_host_cached(ip, domain, sender, helo, resolver, limits=limits,
                                 timeout=timeout, receiver=receiver, clock=clock)
        if done is not None:
            return done
    assert name is not None  # check_host_cached answered the invalid ones
    local, sender_domain = _sender_parts(sender)
    ev = _Evaluator(addr, local, sender_domain, helo, resolver, limits, receiver, clock)
    deadline = asyncio.get_running_loop().time() + timeout
    return await _evaluate(ev, name, ip, timeout, deadline)


def check_host_cached(ip: str, domain: str, sender: str, helo: str, resolver: DnsQuery, *,
                      limits: SpfLimits = DEFAULT_LIMITS, timeout: float = DEFAULT_TIMEOUT,
                      receiver: str = "unknown",
                      clock: Callable[[], float] = time.time) -> SpfResult | None:
    """:func:`check_host` when it can answer at once: an invalid domain, or
    every answer already in the resolver's cache (the same senders keep
    coming).  The same evaluation, run to its end now, with no timer to arm;
    None when some answer is not cached (then :func:`check_host` queries)."""
    addr = _client_ip(ip)
    name = _initial_domain(domain)
    if name is None:
        # RFC 7208 4.3: a malformed or single-label domain gives "none".
        return SpfResult("none", comment=_printable(f"not a valid domain: {domain!r}"),
                         domain=_printable(domain))
    cached: Callable[[str, str], CachedAnswer | None] | None = getattr(resolver, "cached",
                                                                        None)
    if cached is None:
        return None
    key = (resolver, ip, name, sender, helo, receiver, limits)
    now = time.monotonic()
    known = _results.get(key)
    if known is not None and now < known[0]:
        return known[1]
    # The evaluation's result holds as long as every answer it read does.
    expires = [float("inf")]

    def tracked(qname: str, rdtype: str) -> CachedAnswer | None:
        hit = cached(qname, rdtype)
        if hit is not None and hit.expires < expires[0]:
            expires[0] = hit.expires
        return hit

    local, sender_domain = _sender_parts(sender)
    try:
        result = _run_at_once(_evaluate(
            _Evaluator(addr, local, sender_domain, helo, resolver, limits,
                       receiver, clock, cached=tracked), name, ip, timeout, None))
    except _NotCached:
        return None  # some answer is not cached: the evaluation that waits
    # A "fail" is not kept: its explanation may carry the time (%{t}, RFC
    # 7208 7.3).
    if result.result != "fail" and now < expires[0] < float("inf"):
        if len(_results) >= RESULTS_MAX:
            _results.clear()
        _results[key] = (expires[0], result)
    return result


# check_host_cached's results, kept until the first of the DNS answers that
# made them expires: the same sender from the same address keeps coming
# (mailing lists, bulk senders), and each evaluation otherwise runs again.
RESULTS_MAX = 10_000
_results: dict[tuple[object, ...], tuple[float, SpfResult]] = {}


def check_mail_from_cached(ip: str, mail_from: str, helo: str, resolver: DnsQuery, *,
                           receiver: str = "unknown") -> SpfResult | None:
    """:func:`check_mail_from` when it can answer at once (see
    :func:`check_host_cached`), else None."""
    if not mail_from:
        return check_helo_cached(ip, helo, resolver, receiver=receiver)
    return check_host_cached(ip, mail_from.rpartition("@")[2], mail_from, helo, resolver,
                             receiver=receiver)


def check_helo_cached(ip: str, helo: str, resolver: DnsQuery, *,
                      receiver: str = "unknown") -> SpfResult | None:
    """:func:`check_helo` when it can answer at once, else None."""
    return check_host_cached(ip, helo, f"postmaster@{helo}", helo, resolver,
                             receiver=receiver)


def _sender_parts(sender: str) -> tuple[str, str]:
    """(local-part, domain) of ``sender``; RFC 7208 4.3: a sender without a
    local-part is "postmaster@domain"."""
    local, at, sender_domain = sender.rpartition("@")
    if not at:
        sender_domain = sender
    return local or "postmaster", sender_domain


async def _evaluate(ev: _Evaluator, name: str, ip: str, timeout: float,
                    deadline: float | None) -> SpfResult:
    """check_host() of ``name`` once the arguments are checked: the result,
    and the explanation of a "fail" (RFC 7208 6.2).  ``deadline`` (loop
    time) bounds the lookups; None for a cached-only evaluator, which never
    waits."""
    try:
        if deadline is None:
            outcome = await ev.check(name)
        else:
            async with asyncio.timeout_at(deadline):
                outcome = await ev.check(name)
    except TimeoutError:
        return ev.result("temperror", name, f"no result within {timeout:g} s")
    except _TempError as exc:
        return ev.result("temperror", name, str(exc))
    except _PermError as exc:
        return ev.result("permerror", name, str(exc))
    explanation = ""
    if outcome.result == "fail":
        explanation = default_explanation(name, ip)
        if outcome.exp is not None:
            try:
                if deadline is None:
                    explanation = await ev.explain(outcome.exp, outcome.domain) or explanation
                else:
                    async with asyncio.timeout_at(deadline):
                        explanation = (await ev.explain(outcome.exp, outcome.domain)
                                       or explanation)
            except TimeoutError:
                pass
    return ev.result(outcome.result, name, outcome.comment, mechanism=outcome.mechanism,
                     explanation=explanation)


_T = TypeVar("_T")


def _run_at_once(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run a coroutine that never waits (a cached-only evaluation) to its
    end, now.  Raises :class:`_NotCached` if it would wait after all."""
    try:
        coro.send(None)
    except StopIteration as done:
        return cast(_T, done.value)
    coro.close()
    raise _NotCached("the evaluation waited")


# --- Errors that end the evaluation ------------------------------------------

class _PermError(Exception):
    """A syntax error or an exceeded limit: "permerror" (RFC 7208 2.6.7)."""


class _TempError(Exception):
    """A DNS timeout or server failure: "temperror" (RFC 7208 2.6.6)."""


class _NotCached(Exception):
    """A cached-only evaluation needs an answer that is not cached: it
    stops, and the evaluation is done again with lookups."""


# --- Macro strings (RFC 7208 7) ------------------------------------------------

DOMAIN_LETTERS = frozenset("slodiphv")
# RFC 7208 7.2: c, r and t are only for explanation text.
EXP_LETTERS = DOMAIN_LETTERS | frozenset("crt")
_MACRO = re.compile(r"%\{([a-zA-Z])(\d{0,3})([rR]?)([.\-+,/_=]*)\}")
_TOPLABEL = re.compile(
    r"\.(?:[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+-[A-Za-z0-9-]*[A-Za-z0-9])\.?\Z")
_ESCAPES = {"%": "%", "_": " ", "-": "%20"}


@dataclass(frozen=True, slots=True)
class _Macro:
    letter: str  # lower case
    digits: int  # keep this many right-hand parts; 0: all
    reverse: bool
    delimiters: str
    url_escape: bool  # an upper-case letter


@dataclass(frozen=True, slots=True)
class _MacroString:
    tokens: tuple[str | _Macro, ...]
    ends_with_expand: bool
    tail: str  # the literal text after the last macro-expand

    @property
    def uses_p(self) -> bool:
        return any(isinstance(t, _Macro) and t.letter == "p" for t in self.tokens)


def _parse_macro_string(text: str, letters: frozenset[str], *,
                        spaces: bool = False) -> _MacroString:
    """RFC 7208 7.1 ``macro-string`` (``explain-string`` with ``spaces``).
    Raises :class:`_PermError`."""
    tokens: list[str | _Macro] = []
    literal: list[str] = []
    tail_start = 0
    ends_with_expand = False
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "%":
            # macro-literal = %x21-24 / %x26-7E
            if not ("!" <= ch <= "~" or (spaces and ch == " ")):
                raise _PermError(f"invalid character {ch!r} in {text!r}")
            literal.append(ch)
            i += 1
            ends_with_expand = False
            continue
        nxt = text[i + 1:i + 2]
        if nxt in _ESCAPES:
            literal.append(_ESCAPES[nxt])
            i += 2
        else:
            m = _MACRO.match(text, i)
            if m is None:
                raise _PermError(f"invalid macro at {text[i:i + 8]!r}")
            letter, digits, reverse, delimiters = m.groups()
            if letter.lower() not in letters:
                raise _PermError(f"macro letter {letter!r} not allowed here")
            if digits and int(digits) == 0:
                raise _PermError("macro transformer of zero parts")
            if literal:
                tokens.append("".join(literal))
                literal = []
            tokens.append(_Macro(letter.lower(), int(digits or 0), bool(reverse),
                                 delimiters, letter.isupper()))
            i = m.end()
        ends_with_expand = True
        tail_start = i
    if literal:
        tokens.append("".join(literal))
    return _MacroString(tuple(tokens), ends_with_expand, text[tail_start:])


def _parse_domain_spec(text: str) -> _MacroString:
    """RFC 7208 7.1 ``domain-spec = macro-string domain-end``."""
    spec = _parse_macro_string(text, DOMAIN_LETTERS)
    if not text:
        raise _PermError("empty domain-spec")
    # domain-end = ( "." toplabel [ "." ] ) / macro-expand
    if not (spec.ends_with_expand or _TOPLABEL.search(spec.tail)):
        raise _PermError(f"invalid domain-spec {text!r}")
    return spec


# --- Records (RFC 7208 4.5, 4.6, 5, 6) -------------------------------------------

@dataclass(frozen=True, slots=True)
class _Directive:
    text: str  # as written, for SpfResult.mechanism
    qualifier: str
    kind: str  # all include a mx ptr ip4 ip6 exists
    domain: _MacroString | None = None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    cidr4: int = 32
    cidr6: int = 128


@dataclass(frozen=True, slots=True)
class _Record:
    directives: tuple[_Directive, ...]
    redirect: _MacroString | None
    exp: _MacroString | None


_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9_.\-]*)=(.*)\Z", re.S)
_MECHANISM = re.compile(r"([+\-~?]?)([A-Za-z][A-Za-z0-9]*)(.*)\Z", re.S)
_DUAL_CIDR = re.compile(r"(?::(.*?))?(?:/(\d+))?(?://(\d+))?\Z", re.S)
_IP_CIDR = re.compile(r":([^/]+)(?:/(\d+))?\Z", re.S)


def _cidr(digits: str | None, maximum: int, default: int) -> int:
    if digits is None:
        return default
    # RFC 7208 5.6: ip4-cidr-length = "/" ("0" / %x31-39 0*1DIGIT): no leading zeros.
    if len(digits) > 3 or digits != str(int(digits)) or int(digits) > maximum:
        raise _PermError(f"invalid CIDR length /{digits}")
    return int(digits)


@functools.lru_cache(maxsize=1024)
def _parse_record(text: str) -> _Record:
    """Check the whole record (RFC 7208 4.6: syntax errors anywhere are a
    permerror, before anything is evaluated).  ``text`` starts "v=spf1".
    Records are immutable once parsed, so the parse of a record seen again
    (the same senders keep coming) is reused; a bad record raises again."""
    directives: list[_Directive] = []
    modifiers: dict[str, _MacroString] = {}
    # RFC 7208 4.6.1: terms are separated by one or more spaces, nothing else.
    for term in text[6:].split(" "):
        if not term:
            continue
        mod = _MODIFIER.match(term)
        if mod is not None:
            name, value = mod.group(1).lower(), mod.group(2)
            if name in ("redirect", "exp"):
                # RFC 7208 6: each at most once.
                if name in modifiers:
                    raise _PermError(f"{name}= given twice")
                modifiers[name] = _parse_domain_spec(value)
            else:
                # RFC 7208 6: unknown modifiers are ignored, but must parse.
                _parse_macro_string(value, EXP_LETTERS)
            continue
        directives.append(_parse_directive(term))
    return _Record(tuple(directives), modifiers.get("redirect"), modifiers.get("exp"))


def _parse_directive(term: str) -> _Directive:
    m = _MECHANISM.match(term)
    if m is None:
        raise _PermError(f"invalid term {term!r}")
    qualifier, kind, rest = m.group(1) or "+", m.group(2).lower(), m.group(3)
    if kind == "all":
        if rest:
            raise _PermError(f"invalid term {term!r}")
        return _Directive(term, qualifier, kind)
    if kind in ("include", "exists"):
        if not rest.startswith(":"):
            raise _PermError(f"{kind} needs a domain: {term!r}")
        return _Directive(term, qualifier, kind, domain=_parse_domain_spec(rest[1:]))
    if kind == "ptr":
        if rest and not rest.startswith(":"):
            raise _PermError(f"invalid term {term!r}")
        spec = _parse_domain_spec(rest[1:]) if rest else None
        return _Directive(term, qualifier, kind, domain=spec)
    if kind in ("a", "mx"):
        dual = _DUAL_CIDR.match(rest)
        if dual is None:
            raise _PermError(f"invalid term {term!r}")
        spec_text, c4, c6 = dual.groups()
        spec = _parse_domain_spec(spec_text) if spec_text is not None else None
        return _Directive(term, qualifier, kind, domain=spec, cidr4=_cidr(c4, 32, 32),
                          cidr6=_cidr(c6, 128, 128))
    if kind in ("ip4", "ip6"):
        ipm = _IP_CIDR.match(rest)
        if ipm is None or "%" in ipm.group(1):
            raise _PermError(f"invalid term {term!r}")
        try:
            if kind == "ip4":
                net: ipaddress.IPv4Network | ipaddress.IPv6Network = ipaddress.IPv4Network(
                    (ipaddress.IPv4Address(ipm.group(1)), _cidr(ipm.group(2), 32, 32)),
                    strict=False)
            else:
                net = ipaddress.IPv6Network(
                    (ipaddress.IPv6Address(ipm.group(1)), _cidr(ipm.group(2), 128, 128)),
                    strict=False)
        except ValueError:
            raise _PermError(f"invalid address in {term!r}") from None
        return _Directive(term, qualifier, kind, network=net)
    raise _PermError(f"unknown mechanism {term!r}")


def _is_spf_record(text: bytes) -> bool:
    # RFC 7208 4.5: "v=spf1" (any case) followed by a space or the end.
    return text[:6].lower() == b"v=spf1" and text[6:7] in (b"", b" ")


# --- Names and addresses ------------------------------------------------------------

def _client_ip(ip: str) -> IPAddress:
    # RFC 7208 5: an IPv4-mapped IPv6 address is an IPv4 client.
    addr = client_address(ip)
    if addr is None:
        raise ValueError(f"{ip!r} is not an IP address")
    return addr


def _valid_name(name: str) -> bool:
    labels = name.split(".")
    return (name.isascii() and len(name) <= MAX_DOMAIN_LENGTH
            and all(0 < len(label) <= 63 for label in labels))


_NOT_DOMAIN_CHAR = re.compile(r"[^!-~]|\\")  # visible ASCII but the backslash
_NOT_PRINTABLE = re.compile(r"[^ -~]")


@functools.lru_cache(maxsize=1024)
def _initial_domain(domain: str) -> str | None:
    """RFC 7208 4.3: the <domain> of check_host, or None when it is
    malformed, not multi-label, or an address literal.  Remembered for the
    last domains seen (MAIL FROM and HELO domains repeat; the answer
    depends on the text alone)."""
    name = domain[:-1] if domain.endswith(".") else domain
    if not name.isascii():
        try:
            name = dns.name.from_unicode(name).to_text(omit_final_dot=True)
        except (dns.exception.DNSException, ValueError):
            return None
    if (name.startswith("[") or "." not in name or not _valid_name(name)
            or _NOT_DOMAIN_CHAR.search(name)):
        return None
    return name


def _target_name(expanded: str) -> str | None:
    """An expanded domain-spec as a query name (RFC 7208 7.3: a trailing
    dot is dropped, too long a name loses labels on the left), or None when
    no query can be made of it (empty or over-long labels)."""
    name = expanded[:-1] if expanded.endswith(".") else expanded
    if len(name) > MAX_DOMAIN_LENGTH:
        # The longest suffix that starts after a dot and fits.
        dot = name.find(".", len(name) - MAX_DOMAIN_LENGTH - 1)
        name = name[dot + 1:] if dot >= 0 else ""
    return name if name and _valid_name(name) else None


def _query_text(name: str) -> str:
    # A backslash from a macro value is a character, not an escape for dnspython.
    return name.replace("\\", "\\\\")


def _in_subdomain(name: str, domain: str) -> bool:
    name, domain = name.lower().rstrip("."), domain.lower().rstrip(".")
    return name == domain or name.endswith("." + domain)


def _printable(text: str, limit: int = MAX_COMMENT) -> str:
    # Printable ASCII already (the usual case): nothing to replace.
    clean = (text if text.isascii() and text.isprintable()
             else _NOT_PRINTABLE.sub("?", text))
    return clean if len(clean) <= limit else clean[:limit - 3] + "..."


# --- Evaluation (RFC 7208 4.6, 5, 6) ---------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Outcome:
    result: Result
    comment: str
    mechanism: str = ""
    exp: _MacroString | None = None
    domain: str = ""  # the domain whose record gave the result (for exp=)


class _Evaluator:
    """The state of one check_host() and the recursions it makes."""

    def __init__(self, ip: IPAddress, local: str, sender_domain: str, helo: str,
                 resolver: DnsQuery, limits: SpfLimits, receiver: str,
                 clock: Callable[[], float], *,
                 cached: Callable[[str, str], CachedAnswer | None] | None = None) -> None:
        self.ip = ip
        self.local = local
        self.sender_domain = sender_domain
        self.helo = helo
        self.resolver = resolver
        self.limits = limits
        self.receiver = receiver
        self.clock = clock
        self.dns_terms = 0
        self.voids = 0
        self._validated: list[str] | None = None
        # Cached-only: answers come from the resolver's cache (its
        # ``cached``), a missing one raises _NotCached, nothing waits.
        self.cached = cached

    def result(self, result: Result, domain: str, comment: str, *, mechanism: str = "",
               explanation: str = "") -> SpfResult:
        # (Most results have no explanation or mechanism: "" stays "".)
        return SpfResult(result, _printable(explanation, MAX_EXPLANATION) if explanation else "",
                         _printable(mechanism) if mechanism else "",
                         _printable(f"{domain}: {comment}"), domain, self.dns_terms)

    # DNS ------------------------------------------------------------------------

    async def _lookup(self, name: str | dns.name.Name, rdtype: str
                      ) -> list[dns.rdata.Rdata] | None:
        """Records, or None when there are none (NXDOMAIN, NOERROR without
        records).  A timeout or server failure raises :class:`_TempError`."""
        text = name.to_text() if isinstance(name, dns.name.Name) else _query_text(name)
        answer: Iterable[dns.rdata.Rdata] | None
        if self.cached is not None:
            # What the resolver's query would answer from its cache.
            hit = self.cached(text, rdtype)
            if hit is None:
                raise _NotCached(f"{rdtype} of {text}")
            answer = None if hit.nxdomain else hit.answer
        else:
            try:
                answer = await self.resolver.query(text, rdtype)
            except DnsPermanent:
                return None
            except DnsTemporary as exc:
                raise _TempError(exc.text) from None
        records = list(answer) if answer is not None else []
        return records or None

    async def _lookup_term(self, name: str | dns.name.Name | None, rdtype: str
                           ) -> list[dns.rdata.Rdata]:
        """The lookup of a mechanism, counted against the void limit (RFC
        7208 4.6.4).  ``None``, a name no query can be made of, is treated
        as a name that does not exist."""
        records = await self._lookup(name, rdtype) if name is not None else None
        if records is None:
            self.voids += 1
            if self.voids > self.limits.void_lookups:
                raise _PermError(f"more than {self.limits.void_lookups} void lookups "
                                 "(RFC 7208 4.6.4)")
            return []
        return records

    def _count_dns_term(self) -> None:
        self.dns_terms += 1
        if self.dns_terms > self.limits.dns_terms:
            raise _PermError(f"more than {self.limits.dns_terms} DNS-querying terms "
                             "(RFC 7208 4.6.4)")

    async def _addresses(self, host: str | dns.name.Name) -> list[IPAddress]:
        """The addresses of ``host`` in the client's family (RFC 7208 5.3)."""
        rdtype = "A" if self.ip.version == 4 else "AAAA"
        records = await self._lookup(host, rdtype) or []
        return [ipaddress.ip_address(rr.address) for rr in records
                if isinstance(rr, dns.rdtypes.IN.A.A | dns.rdtypes.IN.AAAA.AAAA)]

    def _matches(self, addresses: Iterable[IPAddress], cidr4: int, cidr6: int) -> bool:
        prefix = cidr4 if self.ip.version == 4 else cidr6
        for addr in addresses:
            if addr.version == self.ip.version and self.ip in ipaddress.ip_network(
                    (addr, prefix), strict=False):
                return True
        return False

    async def _each_addresses(self, hosts: list[dns.name.Name]
                              ) -> list[list[IPAddress] | BaseException]:
        """:meth:`_addresses` of every host, concurrently, a failure in
        place of its list; one after the other when cached-only (no lookup
        waits, and no task may outlive a stopped evaluation)."""
        if self.cached is None:
            return await asyncio.gather(*(self._addresses(h) for h in hosts),
                                        return_exceptions=True)
        found: list[list[IPAddress] | BaseException] = []
        for host in hosts:
            try:
                found.append(await self._addresses(host))
            except _NotCached:
                raise
            except Exception as exc:
                found.append(exc)
        return found

    async def _ptr_names(self) -> list[dns.name.Name]:
        """The first names the client's address maps back to (RFC 7208
        4.6.4: at most 10); a DNS error means none (5.5)."""
        try:
            records = await self._lookup(dns.reversename.from_address(str(self.ip)), "PTR")
        except _TempError:
            return []
        names = [rr.target for rr in records or []
                 if isinstance(rr, dns.rdtypes.ANY.PTR.PTR)]
        return names[:self.limits.ptr_names]

    async def _validate(self, names: list[dns.name.Name]) -> list[str]:
        """RFC 7208 5.5: the names whose addresses include the client's; a
        name whose lookup fails is skipped."""
        found = await self._each_addresses(names)
        valid = []
        for name, addresses in zip(names, found, strict=True):
            if isinstance(addresses, _TempError):
                continue
            if isinstance(addresses, BaseException):
                raise addresses
            if self.ip in addresses:
                valid.append(name.to_text(omit_final_dot=True))
        return valid

    # Record -----------------------------------------------------------------------

    async def _record(self, domain: str) -> str | None:
        """RFC 7208 4.4, 4.5: the one SPF record of ``domain`` (TXT only:
        type SPF is not consulted, 3.1), or None."""
        records = await self._lookup(domain, "TXT")
        texts = [b"".join(rr.strings) for rr in records or []
                 if isinstance(rr, dns.rdtypes.ANY.TXT.TXT)]
        spf = [t for t in texts if _is_spf_record(t)]
        if not spf:
            return None
        if len(spf) > 1:
            raise _PermError(f"{len(spf)} SPF records at {domain} (RFC 7208 4.5)")
        if not spf[0].isascii():
            raise _PermError(f"SPF record of {domain} is not ASCII (RFC 7208 3.1)")
        return spf[0].decode("ascii")

    async def check(self, domain: str) -> _Outcome:
        """check_host() for ``domain`` (also for include and redirect)."""
        text = await self._record(domain)
        if text is None:
            return _Outcome("none", "no SPF record")
        record = _parse_record(text)
        for directive in record.directives:
            if await self._match(directive, domain):
                result = QUALIFIERS[directive.qualifier]
                return _Outcome(result, f"{self.ip} {result} by {directive.text}",
                                directive.text, record.exp, domain)
        if record.redirect is not None:
            # RFC 7208 6.1: only when no mechanism matched; it counts as a DNS term.
            self._count_dns_term()
            target = _target_name(await self._expand(record.redirect, domain))
            outcome = await self.check(target) if target is not None else None
            if outcome is None or outcome.result == "none":
                raise _PermError(f"redirect of {domain}: no SPF record at {target}")
            return outcome
        # RFC 7208 4.7: no match, no redirect: neutral.
        return _Outcome("neutral", f"no mechanism matched {self.ip}", "", record.exp, domain)

    async def _match(self, d: _Directive, domain: str) -> bool:
        if d.kind == "all":
            return True
        if d.network is not None:
            # RFC 7208 5.6: ip4 matches IPv4 clients only, ip6 IPv6 ones.
            return self.ip.version == d.network.version and self.ip in d.network
        self._count_dns_term()
        target = (_target_name(await self._expand(d.domain, domain)) if d.domain is not None
                  else domain)
        if d.kind == "include":
            # RFC 7208 5.2: pass matches; fail, softfail, neutral do not;
            # none is a permerror; errors propagate.
            outcome = await self.check(target) if target is not None else None
            if outcome is None or outcome.result == "none":
                raise _PermError(f"include of {target or d.text}: no SPF record")
            return outcome.result == "pass"
        if d.kind == "a":
            rdtype = "A" if self.ip.version == 4 else "AAAA"
            records = await self._lookup_term(target, rdtype)
            return self._matches(
                (ipaddress.ip_address(rr.address) for rr in records
                 if isinstance(rr, dns.rdtypes.IN.A.A | dns.rdtypes.IN.AAAA.AAAA)),
                d.cidr4, d.cidr6)
        if d.kind == "mx":
            return await self._match_mx(target, d)
        if d.kind == "exists":
            # RFC 7208 5.7: an A lookup, whatever the client's family.
            return bool(await self._lookup_term(target, "A"))
        return await self._match_ptr(target)

    async def _match_mx(self, target: str | None, d: _Directive) -> bool:
        records = await self._lookup_term(target, "MX")
        if len(records) > self.limits.mx_names:
            raise _PermError(f"{target} has more than {self.limits.mx_names} MX records "
                             "(RFC 7208 4.6.4)")
        hosts = [rr.exchange for rr in records if isinstance(rr, dns.rdtypes.ANY.MX.MX)
                 and rr.exchange != dns.name.root]  # a null MX (RFC 7505) has no address
        found = await self._each_addresses(hosts)
        error: BaseException | None = None
        for addresses in found:
            if isinstance(addresses, BaseException):
                error = error or addresses
            elif self._matches(addresses, d.cidr4, d.cidr6):
                return True
        if error is not None:
            raise error
        return False

    async def _match_ptr(self, target: str | None) -> bool:
        if target is None:
            return False
        try:
            records = await self._lookup_term(dns.reversename.from_address(str(self.ip)),
                                              "PTR")
        except _TempError:
            return False  # RFC 7208 5.5: a DNS error: no match
        names = [rr.target for rr in records if isinstance(rr, dns.rdtypes.ANY.PTR.PTR)]
        names = names[:self.limits.ptr_names]
        # Only names in the target domain can match: validate just those.
        candidates = [n for n in names if _in_subdomain(n.to_text(), target)]
        return bool(await self._validate(candidates))

    # Macros ---------------------------------------------------------------------------

    async def _p_macro(self, domain: str) -> str:
        """RFC 7208 7.3 "p": a validated name of the client, preferably in
        ``domain``; "unknown" when there is none."""
        if self._validated is None:
            try:
                self._validated = await self._validate(await self._ptr_names())
            except _TempError:
                self._validated = []
        for name in self._validated:
            if _in_subdomain(name, domain):
                return name
        return self._validated[0] if self._validated else "unknown"

    def _value(self, letter: str, domain: str, p: str) -> str:
        ip = self.ip
        if letter == "s":
            return f"{self.local}@{self.sender_domain}"
        if letter == "l":
            return self.local
        if letter == "o":
            return self.sender_domain
        if letter == "d":
            return domain
        if letter == "i":
            # IPv6: dot-separated nibbles, for %{ir}.%{v}.arpa.  Upper-case hex,
            # as pyspf and the OpenSPF suite's explanations; DNS ignores case
            # (RFC 7208 7.4's examples are lower case).
            return str(ip) if ip.version == 4 else ".".join(f"{int(ip):032X}")
        if letter == "p":
            return p
        if letter == "v":
            return "in-addr" if ip.version == 4 else "ip6"
        if letter == "h":
            return self.helo
        if letter == "c":
            return str(ip)
        if letter == "r":
            return self.receiver
        return str(int(self.clock()))  # "t"

    async def _expand(self, spec: _MacroString, domain: str) -> str:
        """RFC 7208 7.3, 7.4: the macro string with its macros replaced."""
        p = await self._p_macro(domain) if spec.uses_p else "unknown"
        out: list[str] = []
        for tok in spec.tokens:
            if isinstance(tok, str):
                out.append(tok)
                continue
            value = self._value(tok.letter, domain, p)
            if tok.digits or tok.reverse or tok.delimiters:
                parts = re.split("[" + re.escape(tok.delimiters or ".") + "]", value)
                if tok.reverse:
                    parts.reverse()
                if tok.digits:
                    parts = parts[-tok.digits:]
                value = ".".join(parts)
            if tok.url_escape:
                value = urllib.parse.quote(value, safe="-._~")
            out.append(value)
        return "".join(out)

    async def explain(self, exp: _MacroString, domain: str) -> str:
        """RFC 7208 6.2: the expanded TXT record at the exp= target, or ""
        when there is no usable one (lookup error, none or several records,
        not ASCII, bad macro syntax)."""
        try:
            target = _target_name(await self._expand(exp, domain))
            records = await self._lookup(target, "TXT") if target is not None else None
            texts = [b"".join(rr.strings) for rr in records or []
                     if isinstance(rr, dns.rdtypes.ANY.TXT.TXT)]
            if len(texts) != 1 or not texts[0].isascii():
                return ""
            text = _parse_macro_string(texts[0].decode("ascii"), EXP_LETTERS, spaces=True)
            return await self._expand(text, domain)
        except (_PermError, _TempError, DnsError):
            return ""
