"""The filters' header lookups by index and the attachments filter's quick
accept, held to the scans they replace (filter/verdict.py, rules.py,
attachments.py): the same field values, the same rules fired, the same
verdicts, for any header the generator can build."""

from __future__ import annotations

import base64
import re
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postwarden.filter.attachments import AttachmentSettings, AttachmentsFilter
from postwarden.filter.rules import (
    _ADDR,
    BODY_SCAN_MAX,
    GTUBE,
    CustomRule,
    RulesFilter,
    RulesSettings,
    _auth_rule,
)
from postwarden.filter.service import FilterService
from postwarden.filter.settings import FilterSettings
from postwarden.filter.verdict import Action, FilterMessage, FilterVerdict
from postwarden.storage.base import BodyWriter, QueueStore
from postwarden.storage.sqlite_quarantine import QuarantineStore

_FIELDS = st.sampled_from([
    b"From: Alice <alice@example.org>\r\n", b"FROM: nobody\r\n", b"from : b@example.net\r\n",
    b"Date: Thu, 26 Nov 2026 10:00:00 +0000\r\n", b"DATE: x\r\n",
    b"Message-ID: <1@example.org>\r\n", b"message-id: <2@x>\r\n",
    b"Subject: hello lottery\r\n", b"Subject: plain\r\n", b"X-Tag: spammy\r\n",
    b"  folded lottery\r\n", b"\tfolded\r\n", b"not a field\r\n",
    b"Content-Type: text/plain\r\n", b"Content-Type: TEXT/HTML; charset=utf-8\r\n",
    b"Content-Type: application/octet-stream\r\n", b"content-type: image/png\r\n",
    b"Content-Type: text/plain; name=\"a.exe\"\r\n", b"Content-Type: Multipart/Mixed;\r\n",
    b"Content-Type: multipart/mixed; boundary=\"b1\"\r\n", b"Content-Type:\r\n",
    b"Content-Disposition: attachment; filename=\"run.js\"\r\n",
    b"Content-Disposition: inline\r\n", b"CONTENT-DISPOSITION: attachment; FILENAME=x\r\n",
    b"Content-Transfer-Encoding: base64\r\n",
])
_BODIES = st.sampled_from([
    b"hello\r\n", b"MZ\x90\x00 executable\r\n", b"#!/bin/sh\r\necho hi\r\n", GTUBE + b"\r\n",
    base64.b64encode(b"MZ\x90\x00binary") + b"\r\n",
    b"--b1\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b1\r\nContent-Type: application/x-sh;"
    b" name=\"x.sh\"\r\n\r\n#!/bin/sh\r\n--b1--\r\n",
])
_MESSAGES = st.tuples(st.lists(_FIELDS, max_size=10).map(b"".join), _BODIES,
                      st.booleans()).map(
    lambda t: t[0] + b"\r\n" + t[1] if t[2] else t[0])
_NAMES = (b"from", b"From", b"DATE", b"message-id", b"subject", b"content-type",
          b"Content-Disposition", b"content-transfer-encoding", b"x-tag", b"missing")


def scan_value(message: FilterMessage, name: bytes) -> bytes | None:
    """The first field called ``name`` by scanning every field."""
    for f in message.header.fields:
        if f.name.lower() == name.lower():
            return f.value(message.data).strip()
    return None


def scan_quick_accept(flt: AttachmentsFilter, message: FilterMessage) -> bool:
    """Whether the attachments filter accepts without walking the parts,
    decided as it was with a scan per lookup."""
    ctype = scan_value(message, b"content-type")
    if ctype is not None and ctype[:10].lower() == b"multipart/":
        return False
    for name in (b"content-type", b"content-disposition"):
        value = scan_value(message, name)
        if value is not None and b"name" in value.lower():
            return False
    return not flt.kinds or ctype is None or ctype[:5].lower() == b"text/"


def scan_fired(flt: RulesFilter, message: FilterMessage) -> list[tuple[str, float]]:
    """The rules that fire, found by scanning every field."""
    data, head, scores = message.data, message.header, flt.scores
    fired: list[tuple[str, float]] = []
    date = mid = 0
    froms: list[bytes] = []
    for f in head.fields:
        ln = f.name.lower()
        if ln == b"date":
            date += 1
        elif ln == b"message-id":
            mid += 1
        elif ln == b"from":
            froms.append(f.value(data))
    if not date:
        fired.append(("MISSING_DATE", scores["MISSING_DATE"]))
    if not mid:
        fired.append(("MISSING_MESSAGE_ID", scores["MISSING_MESSAGE_ID"]))
    if not froms:
        fired.append(("MISSING_FROM", scores["MISSING_FROM"]))
    else:
        if len(froms) > 1:
            fired.append(("MULTIPLE_FROM", scores["MULTIPLE_FROM"]))
        if _ADDR.search(froms[0]) is None:
            fired.append(("MALFORMED_FROM", scores["MALFORMED_FROM"]))
    if data.find(GTUBE, head.body_start, head.body_start + BODY_SCAN_MAX) >= 0:
        fired.append(("GTUBE", scores["GTUBE"]))
    seen = set()
    for method, result in re.findall(rb"\b(spf|dkim|dmarc)=([a-z]+)", message.auth_results):
        name = _auth_rule(method, result)
        if name and name not in seen:
            seen.add(name)
            fired.append((name, scores[name]))
    for rule in flt.settings.custom:
        if rule.where == "body":
            continue
        if rule.where == "headers":
            hit = rule.pattern.search(data, 0, head.end) is not None
        else:
            wanted = rule.where.encode("ascii", "replace")
            hit = any(rule.pattern.search(f.value(data)) for f in head.fields
                      if f.name.lower() == wanted)
        if hit:
            fired.append((rule.name, rule.score))
    body = data[head.body_start:head.body_start + BODY_SCAN_MAX]
    for rule in flt.settings.custom:
        if rule.where == "body" and rule.pattern.search(body):
            fired.append((rule.name, rule.score))
    return fired


RULES = RulesFilter(RulesSettings(custom=(
    CustomRule("SUBJ", re.compile(rb"(?i)lottery"), 2.0, "subject"),
    CustomRule("ANY", re.compile(rb"spammy"), 1.5, "headers"),
    CustomRule("TAG", re.compile(rb"spam"), 1.0, "x-tag"),
    CustomRule("ODD", re.compile(rb"."), 1.0, "X-Tag"),  # not lower case: never matches
    CustomRule("BODY", re.compile(rb"echo"), 0.5, "body"),
)))
ATTACHMENTS = (AttachmentsFilter(AttachmentSettings()),
               AttachmentsFilter(AttachmentSettings(kinds=())))
AUTH = st.sampled_from([
    b"", b"spf=fail dkim=fail dmarc=pass", b"spf=softfail spf=fail", b"spf=pass dkim=none",
    b"dmarc=fail", b"spf=failed dkim=fail2", b"SPF=FAIL", b"spf=dkim=fail", b"x; dkim=softfail",
    b"Authentication-Results: mx; spf=none smtp.mailfrom=fail.example; dmarc=none"])


@settings(max_examples=1500, deadline=None)
@given(_MESSAGES, AUTH)
def test_lookups_rules_and_quick_accept_match_the_scans(data: bytes, auth: bytes) -> None:
    message = FilterMessage(data, "inbound", auth_results=auth)
    for name in _NAMES:
        assert message.field_value(name) == scan_value(message, name)
    assert message.multipart == (scan_value(message, b"content-type") or b"")[:10].lower() \
        .startswith(b"multipart/")
    assert RULES.fired(message) == scan_fired(RULES, message)
    for flt in ATTACHMENTS:
        expected = (FilterVerdict(Action.ACCEPT) if scan_quick_accept(flt, message)
                    else flt.check_parts(message))
        assert flt.check(message) == expected


_THRESHOLDS = st.sampled_from([0.0, 5.0, 15.0, -1.0])


@settings(max_examples=300, deadline=None)
@given(_THRESHOLDS, _THRESHOLDS, _THRESHOLDS)
def test_the_verdict_when_no_rule_fires_is_the_general_one(tag: float, quarantine: float,
                                                           reject: float) -> None:
    """The rules filter decides the no-rule verdict once, at start."""
    flt = RulesFilter(RulesSettings(tag=tag, quarantine=quarantine, reject=reject))
    assert flt.decide([]) == flt._decide([])
    assert flt.decide([("X", 1.0)]) == flt._decide([("X", 1.0)])


class _Body:
    def __init__(self) -> None:
        self.data = b""
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.data += data

    def abort(self) -> None:
        self.aborted = True


class _Queue:
    def new_body(self) -> _Body:
        return _Body()


@pytest.mark.parametrize(("message", "rewritten"), [
    (b"From: a@example.org\r\nsubject: old\r\n  folded\r\nTo: b@example.test\r\n\r\nhi\r\n",
     b"From: a@example.org\r\nSubject: *** SPAM *** old\r\nTo: b@example.test\r\n\r\nhi\r\n"),
    (b"Subject: one\r\nSubject: two\r\n\r\nhi\r\n",
     b"Subject: *** SPAM *** old\r\nSubject: two\r\n\r\nhi\r\n"),
    (b"From: a@example.org\r\n\r\nSubject: in the body\r\n",
     b"Subject: *** SPAM *** old\r\nFrom: a@example.org\r\n\r\nSubject: in the body\r\n"),
])
def test_the_subject_rewrite_replaces_the_first_subject(message: bytes, rewritten: bytes
                                                        ) -> None:
    service = FilterService(FilterSettings(), hostname="mx.example.test",
                            queue=cast(QueueStore, _Queue()),
                            quarantine=cast(QuarantineStore, None),
                            postmaster="postmaster@example.test")
    old = _Body()
    new = service._rewrite_subject(message, "*** SPAM *** old", cast(BodyWriter, old))
    assert isinstance(new, _Body) and new.data == rewritten and old.aborted
