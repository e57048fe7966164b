"""Built-in spam rules: a score from cheap checks that need nothing installed.

Owns the ``rules`` filter.  Each rule that fires adds its score; the total
is compared with the thresholds of ``[filters.rules]``: at ``tag`` the
message gets ``X-Spam-Flag``/``X-Spam-Score``/``X-Spam-Rules`` headers, at
``quarantine`` it is held for review, at ``reject`` it is refused (554
5.7.1).  A threshold of 0 turns that step off.

Rules (names as they appear in headers and logs):

- header sanity: ``MISSING_DATE``, ``MISSING_MESSAGE_ID``, ``MISSING_FROM``,
  ``MALFORMED_FROM``, ``MULTIPLE_FROM`` (RFC 5322 3.6: one From, one Date);
- ``GTUBE``: the Generic Test for Unsolicited Bulk Email string;
- sender authentication, read from the Authentication-Results this server
  added: ``SPF_FAIL``, ``SPF_SOFTFAIL``, ``DKIM_FAIL``, ``DMARC_FAIL``;
- ``DNSBL``: the client's DNSBL score from the connect stage (when DNSBLs
  are configured), times ``dnsbl_points``;
- custom rules: a regular expression searched in one header field, all
  header fields, or the body, with a score of its own.

Cost: the header block is parsed once with :mod:`postwarden.message.rawheaders`
and its fields are looked up by name;
the body is searched only for GTUBE (one substring search) and only read
further when a custom body rule exists; the Authentication-Results are
parsed only when they contain "fail"; the verdict when nothing fires is
decided once, when the filter is built.

Security exposure: runs patterns over untrusted content.  Custom patterns
are the administrator's; each is searched over at most
:data:`BODY_SCAN_MAX` bytes.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from postwarden.filter.verdict import (
    SPAM_REJECTED,
    Action,
    FilterMessage,
    FilterVerdict,
)

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
BODY_SCAN_MAX = 1024 * 1024

DEFAULT_SCORES: dict[str, float] = {
    "MISSING_DATE": 1.0,
    "MISSING_MESSAGE_ID": 1.0,
    "MISSING_FROM": 3.0,
    "MALFORMED_FROM": 2.5,
    "MULTIPLE_FROM": 2.5,
    "GTUBE": 1000.0,
    "SPF_FAIL": 3.0,
    "SPF_SOFTFAIL": 1.0,
    "DKIM_FAIL": 2.0,
    "DMARC_FAIL": 4.0,
}

# RFC 5322 3.4: an address with a domain: local@domain, optionally in <>.
_ADDR = re.compile(rb"[^\s<>@,;:\"]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?"
                   rb"|\"[^\"]*\"@[A-Za-z0-9.-]+|[^\s<>@]+@\[[0-9A-Fa-f:.IPv]+\]")
_AUTH = re.compile(rb"\b(spf|dkim|dmarc)=([a-z]+)")


@dataclass(frozen=True, slots=True)
class CustomRule:
    name: str
    pattern: re.Pattern[bytes]
    score: float
    where: str  # "body", "headers", or a header field name (lower case)


@dataclass(frozen=True, slots=True)
class RulesSettings:
    tag: float = 5.0
    quarantine: float = 0.0
    reject: float = 15.0
    scores: tuple[tuple[str, float], ...] = ()  # overrides of DEFAULT_SCORES
    dnsbl_points: float = 2.0
    custom: tuple[CustomRule, ...] = ()


class RulesFilter:
    name = "rules"

    def __init__(self, settings: RulesSettings,
                 dnsbl_score: Callable[[str], Awaitable[int]] | None = None) -> None:
        self.settings = settings
        self.scores = dict(DEFAULT_SCORES)
        self.scores.update(settings.scores)
        self.dnsbl_score = dnsbl_score
        # Custom header rules with the field name each searches (None for
        # all header fields), encoded once here rather than per message.
        self._header_rules = [(r, None if r.where == "headers"
                               else r.where.encode("ascii", "replace"))
                              for r in settings.custom if r.where != "body"]
        self._body_rules = [r for r in settings.custom if r.where == "body"]
        # The verdict when no rule fires (most mail): it depends only on
        # the settings, so it is decided once.
        self._none_fired = self._decide([])

    def check(self, message: FilterMessage) -> FilterVerdict | Awaitable[FilterVerdict]:
        fired = self.fired(message)
        if self.dnsbl_score is not None and message.direction == "inbound":
            return self._with_dnsbl(message, fired)
        return self.decide(fired)

    async def _with_dnsbl(self, message: FilterMessage, fired: list[tuple[str, float]]
                          ) -> FilterVerdict:
        assert self.dnsbl_score is not None
        listed = await self.dnsbl_score(message.client_ip)
        if listed > 0:
            fired.append(("DNSBL", listed * self.settings.dnsbl_points))
        return self.decide(fired)

    def fired(self, message: FilterMessage) -> list[tuple[str, float]]:
        """(rule, score) of every rule that matches."""
        data = message.data
        head = message.header
        scores = self.scores
        by_name = head.by_name
        fired: list[tuple[str, float]] = []
        if b"date" not in by_name:
            fired.append(("MISSING_DATE", scores["MISSING_DATE"]))
        if b"message-id" not in by_name:
            fired.append(("MISSING_MESSAGE_ID", scores["MISSING_MESSAGE_ID"]))
        froms = by_name.get(b"from")
        if not froms:
            fired.append(("MISSING_FROM", scores["MISSING_FROM"]))
        else:
            if len(froms) > 1:
                fired.append(("MULTIPLE_FROM", scores["MULTIPLE_FROM"]))
            if _ADDR.search(froms[0].value(data)) is None:
                fired.append(("MALFORMED_FROM", scores["MALFORMED_FROM"]))
        if data.find(GTUBE, head.body_start, head.body_start + BODY_SCAN_MAX) >= 0:
            fired.append(("GTUBE", scores["GTUBE"]))
        # Every sender-authentication rule needs a result of "fail" or
        # "softfail": without that word none can fire.
        if b"fail" in message.auth_results:
            seen = set()
            for method, result in _AUTH.findall(message.auth_results):
                name = _auth_rule(method, result)
                if name and name not in seen:
                    seen.add(name)
                    fired.append((name, scores[name]))
        for rule, field_name in self._header_rules:
            if field_name is None:
                hit = rule.pattern.search(data, 0, head.end) is not None
            else:
                hit = any(rule.pattern.search(f.value(data))
                          for f in by_name.get(field_name, ()))
            if hit:
                fired.append((rule.name, rule.score))
        if self._body_rules:
            body = data[head.body_start:head.body_start + BODY_SCAN_MAX]
            for rule in self._body_rules:
                if rule.pattern.search(body):
                    fired.append((rule.name, rule.score))
        return fired

    def decide(self, fired: list[tuple[str, float]]) -> FilterVerdict:
        """The verdict for the rules that fired, against the thresholds."""
        if not fired:
            return self._none_fired
        return self._decide(fired)

    def _decide(self, fired: list[tuple[str, float]]) -> FilterVerdict:
        s = self.settings
        total = round(sum(score for _, score in fired), 2)
        names = tuple(name for name, _ in fired)
        reason = f"score {total}" + (f" ({', '.join(names)})" if names else "")
        if s.reject and total >= s.reject:
            return FilterVerdict(Action.REJECT, reason, SPAM_REJECTED, rules=names, score=total)
        if s.quarantine and total >= s.quarantine:
            return FilterVerdict(Action.QUARANTINE, reason, rules=names, score=total,
                                 headers=self._headers(total, fired, True))
        if s.tag and total >= s.tag:
            return FilterVerdict(Action.HEADERS, reason, rules=names, score=total,
                                 headers=self._headers(total, fired, True))
        return FilterVerdict(Action.ACCEPT, reason, rules=names, score=total)

    def _headers(self, total: float, fired: list[tuple[str, float]], spam: bool
                 ) -> tuple[tuple[str, str], ...]:
        rules = ", ".join(f"{name}={score:g}" for name, score in fired)
        return (("X-Spam-Flag", "YES" if spam else "NO"),
                ("X-Spam-Score", f"{total:g} / {self.settings.tag:g}"),
                ("X-Spam-Rules", rules or "none"))


def _auth_rule(method: bytes, result: bytes) -> str:
    if method == b"spf":
        return "SPF_FAIL" if result == b"fail" else "SPF_SOFTFAIL" if result == b"softfail" else ""
    if method == b"dkim":
        return "DKIM_FAIL" if result == b"fail" else ""
    if method == b"dmarc":
        return "DMARC_FAIL" if result == b"fail" else ""
    return ""
