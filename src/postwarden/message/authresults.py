"""The ``Authentication-Results:`` header of a received message (RFC 8601).

Owns three things:

* :func:`build`: one field, with our host name as authserv-id, holding the
  results of SPF (RFC 7208 9.1: ``smtp.mailfrom``, or ``smtp.helo`` for the
  null sender), DKIM (one entry per signature, ``header.d``, ``header.s``,
  ``header.b``: RFC 6376 7.2, RFC 6008), DMARC (RFC 7489 11.2:
  ``header.from``, the policy in a comment) and ARC (RFC 8617 10.1:
  ``smtp.remote-ip``);
* :func:`remove_forged`: RFC 8601 5 requires a border MTA to delete fields
  that carry its own authserv-id, since a sender could otherwise forge our
  verdicts for the filters and readers downstream; fields of other
  authserv-ids are kept, and every other byte stays as it was;
* :func:`authenticate`: what a session calls at the end of DATA.  It runs
  DKIM and ARC (concurrently) and then DMARC, and builds the field.

Security exposure: most values come from the sender (MAIL FROM, HELO, the
d=/s=/b= of signatures, dkimpy's reasons quoting them).  Every value is
written as an RFC 2045 token or a domain when it is one, otherwise as a
quoted-string; comments are escaped; control characters (so CR and LF) are
dropped and lengths capped, so no value can end the field or add another.
The authserv-id parser of :func:`remove_forged` skips comments and folding
whitespace and compares without case, so ``(x) MAIL.Example.TEST.;`` is ours
too.
"""

from __future__ import annotations

import asyncio
import functools
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from postwarden.message.arc import ARC_FIELDS, NO_ARC, ArcResult, verify_arc
from postwarden.message.dkim_verify import DkimReport, DkimResult, TxtResolver, verify_dkim
from postwarden.message.rawheaders import parse_header, unfold
from postwarden.policy.dmarc import DmarcResult, check_message

FIELD = b"Authentication-Results"
# Preferred line length (RFC 5322 2.1.1); values are capped well below 998.
LINE_LENGTH = 78
MAX_VALUE = 256
MAX_REASON = 120

_CTL = re.compile(r"[\x00-\x1f\x7f]")
# RFC 2045 5.1 token: no space, CTLs or tspecials.
_TOKEN = re.compile(r'^[^\x00-\x20\x7f()<>@,;:\\"/\[\]?=]+$')
_DOMAIN = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?$")
# RFC 5322 3.2.3 dot-atom (ASCII atext).
_DOT_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")


def _clean(text: str, limit: int) -> str:
    if text.isprintable():  # no control character (the usual case): no regex
        return text[:limit]
    return _CTL.sub("", text)[:limit]


def quote(text: str) -> str:
    """An RFC 5322 quoted-string."""
    escaped = _clean(text, MAX_VALUE).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


@functools.lru_cache(maxsize=256)
def value(text: str) -> str:
    """A property value (RFC 8601 2.2 pvalue): a token or a domain as is,
    ``local-part@domain`` as is when the local part is a dot-atom,
    otherwise a quoted-string.  The last values written are remembered
    (senders, From domains and client addresses repeat)."""
    text = _clean(text, MAX_VALUE)
    if not text.isascii():  # RFC 6532 3.2: UTF-8 only inside quoted-strings
        return quote(text)
    # A domain is a token too (its characters are not tspecials).
    if _TOKEN.match(text):
        return text
    local, at, domain = text.rpartition("@")
    if at and _DOT_ATOM.match(local) and _DOMAIN.match(domain):
        return text
    return quote(text)


def comment(text: str) -> str:
    """An RFC 5322 comment."""
    body = _clean(text, MAX_REASON).replace("\\", "\\\\")
    return "(" + body.replace("(", "\\(").replace(")", "\\)") + ")"


@dataclass(frozen=True, slots=True)
class SpfOutcome:
    """The SPF check of the session (RFC 7208 2.6 result); ``mail_from`` is
    the reverse-path without brackets (empty for ``<>``)."""

    result: str
    mail_from: str = ""
    helo: str = ""
    comment: str = ""

    @property
    def domain(self) -> str:
        """The identity SPF authenticated (RFC 7208 2.4; DMARC 3.1.2)."""
        return self.mail_from.rpartition("@")[2] if self.mail_from else self.helo


def _resinfo(method: str, result: str, props: Sequence[tuple[str, str]],
             reason: str = "", note: str = "") -> list[str]:
    """The words of one resinfo (RFC 8601 2.2), for folding."""
    words = [f"{method}={result}"]
    if note:
        words.append(comment(note))
    if reason:
        words.append(f"reason={quote(_clean(reason, MAX_REASON))}")
    for name, v in props:
        if v:
            words.append(f"{name}={value(v)}")
    return words


def _spf(spf: SpfOutcome) -> list[str]:
    props = ([("smtp.mailfrom", spf.mail_from)] if spf.mail_from
             else [("smtp.helo", spf.helo)])
    return _resinfo("spf", spf.result.lower(), props, note=spf.comment)


def _dkim(r: DkimResult) -> list[str]:
    props = [("header.d", r.domain), ("header.s", r.selector), ("header.b", r.header_b)]
    note = "test mode" if r.testing else ""
    return _resinfo("dkim", r.result, props, r.reason, note)


def _dmarc(d: DmarcResult) -> list[str]:
    note = ""
    if d.record is not None:
        sp = d.record.sp or d.record.p
        note = f"p={d.record.p} sp={sp} dis={d.disposition}"
    elif d.result == "permerror":
        note = f"dis={d.disposition}"
    reason = d.reason if d.result not in ("pass", "none") else ""
    return _resinfo("dmarc", d.result, [("header.from", d.from_domain)], reason, note)


def _arc(a: ArcResult, remote_ip: str) -> list[str]:
    note = f"i={a.instance} as.d={a.domain}" if a.instance else ""
    reason = a.reason if a.cv == "fail" else ""
    return _resinfo("arc", a.cv, [("smtp.remote-ip", remote_ip)], reason, note)


def _fold(first: str, entries: list[list[str]]) -> bytes:
    """``first;`` then each entry on its own line, words wrapped at
    ``LINE_LENGTH`` with deeper indentation (RFC 5322 2.2.3 folding)."""
    lines = [first + (";" if entries else "; none")]
    for n, words in enumerate(entries):
        line = "\t" + " ".join(words)
        if len(line) <= LINE_LENGTH:  # fits on one line: nothing to wrap
            lines.append(line + (";" if n < len(entries) - 1 else ""))
            continue
        line = "\t" + words[0]
        for word in words[1:]:
            if len(line) + 1 + len(word) > LINE_LENGTH:
                lines.append(line)
                line = "\t  " + word
            else:
                line += " " + word
        lines.append(line + (";" if n < len(entries) - 1 else ""))
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def build(authserv_id: str, *, spf: SpfOutcome | None = None,
          dkim: DkimReport | Sequence[DkimResult] | None = None,
          dmarc: DmarcResult | None = None, arc: ArcResult | None = None,
          remote_ip: str = "", spf_helo: SpfOutcome | None = None) -> bytes:
    """The whole field, CRLF-terminated.  ``dkim`` given but empty (an
    unsigned message) is ``dkim=none``; a part that is None is left out;
    with nothing at all the field says ``none`` (RFC 8601 2.2)."""
    entries: list[list[str]] = []
    if spf is not None:
        entries.append(_spf(spf))
    if spf_helo is not None and spf_helo.result.lower() != "none":
        # RFC 7208 2.3: the HELO identity checked on its own.
        entries.append(_resinfo("spf", spf_helo.result.lower(),
                                [("smtp.helo", spf_helo.helo)], note=spf_helo.comment))
    if dkim is not None:
        results = dkim.results if isinstance(dkim, DkimReport) else tuple(dkim)
        if results:
            entries += [_dkim(r) for r in results]
        else:
            entries.append(["dkim=none"])
    if dmarc is not None:
        entries.append(_dmarc(dmarc))
    if arc is not None:
        entries.append(_arc(arc, remote_ip))
    return _fold(_first_words(authserv_id), entries)


@functools.lru_cache(maxsize=8)
def _first_words(authserv_id: str) -> str:
    """``Authentication-Results: <authserv-id>``: the same for every message
    (the id is our host name)."""
    return f"{FIELD.decode()}: {value(authserv_id)}"


# --- forged fields (RFC 8601 5) ---------------------------------------------


def _skip_cfws(text: str, i: int) -> int:
    while i < len(text):
        if text[i] in " \t\r\n":
            i += 1
        elif text[i] == "(":
            depth = 0
            while i < len(text):
                if text[i] == "\\":
                    i += 2
                    continue
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
                if depth == 0:
                    break
        else:
            break
    return i


def parse_authserv_id(field_value: bytes) -> str | None:
    """The authserv-id (RFC 8601 2.2: a token or quoted-string after
    optional CFWS) of an Authentication-Results value, lower-cased, without
    a final dot; None when there is none."""
    text = unfold(field_value).decode("utf-8", "replace")
    i = _skip_cfws(text, 0)
    if i < len(text) and text[i] == '"':
        out, i = [], i + 1
        while i < len(text) and text[i] != '"':
            if text[i] == "\\" and i + 1 < len(text):
                i += 1
            out.append(text[i])
            i += 1
        found = "".join(out)
    else:
        j = i
        while j < len(text) and text[j] not in ' \t;()"':
            j += 1
        found = text[i:j]
    found = found.strip().lower().rstrip(".")
    return found or None


# remove_forged looks for the field name in a header block up to this size
# before splitting it into fields (a bigger one is split at once).
_QUICK_SCAN = 1 << 16
_FIELD_LOWER = FIELD.lower()


def remove_forged(header_block: bytes, our_id: str) -> tuple[bytes, int]:
    """``header_block`` (or a whole message: the body is kept as it is)
    without the Authentication-Results fields whose authserv-id is
    ``our_id``, and how many were removed."""
    ours = our_id.strip().lower().rstrip(".")
    if len(header_block) <= _QUICK_SCAN and _FIELD_LOWER not in header_block.lower():
        # No field of that name can be there: no need to split the header.
        return header_block, 0
    block = parse_header(header_block)
    drop = [f for f in block.named(FIELD)
            if parse_authserv_id(header_block[f.value_start:f.end]) == ours]
    if not drop:
        return header_block, 0
    parts: list[bytes] = []
    pos = 0
    for f in drop:
        parts.append(header_block[pos:f.start])
        pos = f.end
    parts.append(header_block[pos:])
    return b"".join(parts), len(drop)


# --- end of DATA ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuthOutcome:
    """``header``: the field to prepend; the results, for policy and logs."""

    header: bytes
    dkim: DkimReport
    arc: ArcResult
    dmarc: DmarcResult


async def authenticate(message: bytes, resolver: TxtResolver, *, authserv_id: str,
                       client_ip: str, helo: str, mail_from: str, spf_result: str,
                       spf_domain: str | None = None, spf_comment: str = "",
                       rng: random.Random | None = None,
                       spf_helo: SpfOutcome | None = None) -> AuthOutcome:
    """DKIM, ARC and DMARC for ``message`` (the raw message as received,
    before anything is added or removed), given the session's SPF result.

    ``spf_domain``: the domain SPF checked (``SpfResult.domain``), by
    default that of ``mail_from``, or ``helo`` for the null sender.
    """
    spf = SpfOutcome(spf_result, mail_from, helo, spf_comment)
    names = {f.name.lower() for f in parse_header(message).fields}  # Field.lname
    signed = b"dkim-signature" in names
    if signed and any(n.startswith(b"arc-") for n in names):
        # Both look up keys: at the same time.
        dkim_report, arc_result = await asyncio.gather(verify_dkim(message, resolver),
                                                       verify_arc(message, resolver))
    else:  # at most one of them has DNS work: no tasks needed
        # Without their fields the answers are known: dkim=none, arc=none.
        dkim_report = await verify_dkim(message, resolver) if signed else DkimReport()
        arc_result = (await verify_arc(message, resolver) if not names.isdisjoint(ARC_FIELDS)
                      else NO_ARC)
    dmarc_result = await check_message(
        resolver, message, spf_result=spf_result,
        spf_domain=spf_domain if spf_domain is not None else spf.domain,
        dkim=dkim_report.results, rng=rng)
    header = build(authserv_id, spf=spf, dkim=dkim_report, dmarc=dmarc_result,
                   arc=arc_result, remote_ip=client_ip,
                   spf_helo=spf_helo if mail_from else None)
    return AuthOutcome(header, dkim_report, arc_result, dmarc_result)
