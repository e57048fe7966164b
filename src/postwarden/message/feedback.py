"""Feedback reports (ARF, RFC 5965; their use, RFC 6650): recognising one,
and reading what it says about the message it reports.

A feedback report is a ``multipart/report; report-type=feedback-report``
(RFC 5965 2) of three parts: a text for people, a
``message/feedback-report`` with the machine-readable fields
(``Feedback-Type``, required, RFC 5965 3.1; ``Original-Rcpt-To``,
``User-Agent``, ...), and the reported message, whole (``message/rfc822``)
or its header only (``text/rfc822-headers``, RFC 5965 2 (d)).

:func:`is_report` looks at a header block only (the session has it in
memory); :func:`parse` reads a whole report into a :class:`Report`: the
feedback type, the complaining recipient (``Original-Rcpt-To``, else the
original's ``To``), the original's Message-ID and the queue ids that
postwarden's own ``Received`` fields in it name.

Security exposure: the input is anybody's message.  At most
:data:`REPORT_MAX` bytes are parsed (the parts that matter come first; a
cut report parses leniently), values are bounded and unfolded, and
:func:`parse` never raises: a malformed report is ``None``.  What a report
claims proves nothing; :mod:`postwarden.web.complaints` believes it only
about a message the server's history shows it sent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email import policy
from email.message import Message
from email.parser import BytesHeaderParser, BytesParser, HeaderParser
from email.utils import getaddresses

# Bytes of a report that are parsed (the original's body is not needed).
REPORT_MAX = 256 * 1024
VALUE_MAX = 300
# RFC 5965 3.1: Feedback-Type is a token (abuse, fraud, virus, other,
# not-spam; auth-failure, RFC 6591).
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
_MESSAGE_ID = re.compile(r"<[^<>\s]{1,250}>")
# Our Received field (message/cleanup.received_header):
# "by HOST (postwarden) with ESMTPSA id QUEUEID"; a queue id (postwarden.ids)
# of 25 characters, or of 16 in mail sent before ids began with the time.
_OUR_RECEIVED = re.compile(
    r"\(postwarden\)\s+with\s+\S+\s+id\s+([0-9A-Z]{25}|[A-Z2-7]{16})\b")
_ORIGINAL = ("message/rfc822", "text/rfc822-headers", "message/rfc822-headers")


@dataclass(frozen=True, slots=True)
class Report:
    feedback_type: str  # lower case
    recipient: str  # who complained ("" when the report does not say)
    message_id: str  # the original's Message-ID, "<...>" ("" when absent)
    queue_ids: tuple[str, ...] = ()  # named by postwarden Received fields, newest first
    user_agent: str = ""
    recipients: tuple[str, ...] = ()  # every Original-Rcpt-To


def _clean(value: object) -> str:
    return " ".join(str(value or "").split())[:VALUE_MAX]


def is_report(head: bytes) -> bool:
    """Whether a header block declares a feedback report (RFC 5965 2 (a))."""
    if b"report" not in head.lower():  # the cheap test first: nearly every message
        return False
    try:
        msg = BytesHeaderParser(policy=policy.compat32).parsebytes(head)
        return (msg.get_content_type() == "multipart/report"
                and _clean(msg.get_param("report-type")).lower() == "feedback-report")
    except Exception:  # a header the parser chokes on is no report
        return False


def _address(value: str) -> str:
    pairs = getaddresses([value])
    address = pairs[0][1] if pairs else ""
    return address if "@" in address and address.isprintable() else ""


def _original_header(part: Message) -> Message | None:
    payload = part.get_payload()
    if isinstance(payload, list):  # message/rfc822: the parsed message
        return payload[0] if payload and isinstance(payload[0], Message) else None
    if isinstance(payload, str):  # text/rfc822-headers
        return HeaderParser(policy=policy.compat32).parsestr(payload, headersonly=True)
    return None


def parse(data: bytes) -> Report | None:
    """The report in ``data`` (a whole message), or None when it is not a
    well-formed feedback report."""
    try:
        return _parse(data[:REPORT_MAX])
    except Exception:  # malformed in a way the parser did not foresee
        return None


def _parse(data: bytes) -> Report | None:
    msg = BytesParser(policy=policy.compat32).parsebytes(data)
    if (msg.get_content_type() != "multipart/report"
            or _clean(msg.get_param("report-type")).lower() != "feedback-report"):
        return None
    parts = msg.get_payload()
    if not isinstance(parts, list):
        return None
    fields: Message | None = None
    original: Message | None = None
    for part in parts:
        if not isinstance(part, Message):
            continue
        kind = part.get_content_type()
        if kind == "message/feedback-report" and fields is None:
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                fields = payload[0]
        elif kind in _ORIGINAL and original is None:
            original = _original_header(part)
    if fields is None:
        return None
    feedback_type = _clean(fields.get("Feedback-Type"))
    if not _TOKEN.fullmatch(feedback_type):
        return None
    recipients = tuple(a for a in (_address(_clean(v)) for v in
                                   fields.get_all("Original-Rcpt-To", [])[:100]) if a)
    message_id, to, queue_ids = "", "", []
    if original is not None:
        found = _MESSAGE_ID.search(_clean(original.get("Message-ID")))
        message_id = found.group(0) if found and found.group(0).isprintable() else ""
        to = _address(_clean(original.get("To")))
        for received in original.get_all("Received", [])[:50]:
            m = _OUR_RECEIVED.search(_clean(received))
            if m is not None and m.group(1) not in queue_ids:
                queue_ids.append(m.group(1))
    return Report(feedback_type=feedback_type.lower(),
                  recipient=recipients[0] if recipients else to,
                  message_id=message_id, queue_ids=tuple(queue_ids[:5]),
                  user_agent=_clean(fields.get("User-Agent"))[:100], recipients=recipients)
