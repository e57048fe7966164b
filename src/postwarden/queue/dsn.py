"""Delivery status notifications as bytes: RFC 3464 in RFC 6522 reports.

:func:`build_report` is pure: given the queued message, the recipients to
report on and (part of) the original message, it returns the complete
notification, CRLF line ends, ready to be committed to the queue:

``multipart/report; report-type=delivery-status`` (RFC 6522) with

1. ``text/plain``: what happened, in plain English (after Postfix's
   "This is the mail system at host ...");
2. ``message/delivery-status`` (RFC 3464 2.1): the per-message fields
   (Reporting-MTA, Original-Envelope-Id, Arrival-Date), then one block per
   recipient (Original-Recipient, Final-Recipient, Action, Status,
   Remote-MTA, Diagnostic-Code, Last-Attempt-Date, Will-Retry-Until);
3. the original: ``message/rfc822`` (full) or ``text/rfc822-headers``.

When an address or the original needs UTF-8 (the message came with
SMTPUTF8), the RFC 6533 types are used instead (``message/global-delivery-status``,
``message/global``, ``message/global-headers``, address type ``utf-8``) and
the report must itself be sent with SMTPUTF8: :class:`Report` says so.

Security exposure: every value put in a header or field (addresses, ENVID,
ORCPT, remote reply texts) came from outside.  :func:`field` strips CR, LF
and other control characters and caps the length, so nothing can add a
header line or a MIME part; the boundary is random and checked against the
content it encloses.
"""

from __future__ import annotations

import enum
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

from postwarden.envelope import MailParams
from postwarden.storage.base import QueuedMessage

# Longest value of a header or DSN field we write (RFC 5322 2.1.1: lines
# of at most 998 characters).
FIELD_MAX = 900
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]+")
# An SMTP reply inside a diagnostic text: "host x said: 550 5.1.1 no such
# user (in reply to RCPT TO command)"; the "in reply to" note is ours.
_SMTP_REPLY = re.compile(r"(?:\A|\s)([245]\d\d[ -].*?)(?: \(in reply to [^()]*\))?\Z", re.S)
# A relay that names a host: "mx.example.org[192.0.2.1]:25" or "[192.0.2.1]:25".
_RELAY_HOST = re.compile(r"\A([A-Za-z0-9.-]*)\[([^\]\s]+)\]")


class DsnKind(enum.Enum):
    """Which notification (RFC 3461 NOTIFY keyword in upper case)."""

    FAILURE = "failure"
    DELAY = "delay"
    SUCCESS = "success"


SUBJECTS = {
    DsnKind.FAILURE: "Undelivered Mail Returned to Sender",
    DsnKind.DELAY: "Delayed Mail (still being retried)",
    DsnKind.SUCCESS: "Successful Mail Delivery Report",
}


@dataclass(frozen=True, slots=True)
class DsnRecipient:
    """One recipient block of the report."""

    address: str  # Final-Recipient
    action: str  # failed | delayed | delivered | relayed | expanded
    status: str  # RFC 3463 X.Y.Z
    diagnostic: str = ""  # the reply text (remote or local)
    relay: str = ""  # "mx.example.org[192.0.2.1]:25", "local", ...
    orcpt: str | None = None  # "rfc822;addr" (RFC 3461 ORCPT, decoded)
    last_attempt: float | None = None
    will_retry_until: float | None = None  # for "delayed"


@dataclass(frozen=True, slots=True)
class Report:
    """A notification ready to be queued."""

    data: bytes  # the whole message, CRLF line ends
    params: MailParams  # BODY=8BITMIME / SMTPUTF8 as the content needs


def field(text: str, limit: int = FIELD_MAX) -> str:
    """``text`` safe as one header/field value: no control characters."""
    text = _CONTROL.sub(" ", text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def rfc_date(ts: float) -> str:
    return format_datetime(datetime.fromtimestamp(ts, UTC))


def remote_mta(relay: str) -> str:
    """``dns; host`` for a relay that names a host, else ""."""
    m = _RELAY_HOST.match(relay)
    if m is None:
        return ""
    return f"dns; {m.group(1) or '[' + m.group(2) + ']'}"


def diagnostic_code(text: str) -> str:
    """RFC 3464 2.3.6: ``smtp; <reply>`` when the text holds an SMTP reply,
    otherwise our own diagnostic type."""
    m = _SMTP_REPLY.search(text)
    if m is not None:
        return f"smtp; {field(m.group(1))}"
    return f"X-Postwarden; {field(text)}"


def _recipient_block(r: DsnRecipient, utf8: bool) -> list[str]:
    addr_type = "utf-8" if utf8 and not r.address.isascii() else "rfc822"
    lines = []
    if r.orcpt:
        lines.append(f"Original-Recipient: {field(r.orcpt)}")
    lines += [f"Final-Recipient: {addr_type}; {field(r.address)}",
              f"Action: {r.action}",
              f"Status: {field(r.status, 20)}"]
    mta = remote_mta(r.relay)
    if mta:
        lines.append(f"Remote-MTA: {field(mta)}")
    if r.diagnostic:
        lines.append(f"Diagnostic-Code: {diagnostic_code(r.diagnostic)}")
    if r.last_attempt is not None:
        lines.append(f"Last-Attempt-Date: {rfc_date(r.last_attempt)}")
    if r.will_retry_until is not None:
        lines.append(f"Will-Retry-Until: {rfc_date(r.will_retry_until)}")
    return lines


def delivery_status(msg: QueuedMessage, recipients: Sequence[DsnRecipient], hostname: str,
                    utf8: bool) -> str:
    """The ``message/delivery-status`` body (RFC 3464 2.1)."""
    head = [f"Reporting-MTA: dns; {hostname}",
            f"X-Postwarden-Queue-ID: {msg.queue_id}",
            f"X-Postwarden-Sender: rfc822; {field(msg.sender)}"]
    if msg.params.envid:
        head.append(f"Original-Envelope-Id: {field(msg.params.envid)}")
    head.append(f"Arrival-Date: {rfc_date(msg.received_at)}")
    blocks = [head] + [_recipient_block(r, utf8) for r in recipients]
    return "\r\n\r\n".join("\r\n".join(b) for b in blocks) + "\r\n"


_SIGNATURE = "                   The mail system"
_HELP = ("For further assistance, please send mail to postmaster.\r\n\r\n"
         "If you do so, please include this problem report. You can\r\n"
         "delete your own text from the attached returned message.")


def _explain(r: DsnRecipient) -> str:
    what = field(r.diagnostic) or r.status
    if remote_mta(r.relay) and not what.startswith("host "):
        what = f"host {field(r.relay)} said: {what}"
    elif r.relay and r.action in ("delivered", "relayed", "expanded"):
        what = f"delivery via {field(r.relay)}: {what}"
    return f"<{field(r.address)}>: {what}"


def _duration(seconds: float) -> str:
    hours = max(seconds, 0.0) / 3600
    return f"{hours / 24:.1f} days" if hours >= 48 else f"{hours:.1f} hours"


def human_text(kind: DsnKind, msg: QueuedMessage, recipients: Sequence[DsnRecipient],
               hostname: str, now: float, returned: str) -> str:
    """The first part: Postfix's wording, one line per recipient at the end."""
    out = [f"This is the mail system at host {hostname}.", ""]
    if kind is DsnKind.FAILURE:
        out += ["I'm sorry to have to inform you that your message could not",
                f"be delivered to one or more recipients. {returned}", "", _HELP]
    elif kind is DsnKind.DELAY:
        until = min((r.will_retry_until for r in recipients if r.will_retry_until),
                    default=None)
        out += ["#" * 68,
                "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
                "#" * 68, "",
                f"Your message could not be delivered for {_duration(now - msg.received_at)}."]
        if until is not None:
            out.append(f"It will be retried until {rfc_date(until)}.")
        out += ["", _HELP]
    else:
        out += ["Your message was successfully delivered to the destination(s)",
                "listed below. If the message was delivered to mailbox you will",
                "receive no further notifications. Otherwise you may still receive",
                "notifications of mail delivery errors from other systems."]
    out += ["", _SIGNATURE, ""] + [_explain(r) for r in recipients]
    return "\r\n".join(out) + "\r\n"


def _part(headers: list[str], body: bytes) -> bytes:
    return ("\r\n".join(headers) + "\r\n\r\n").encode("utf-8") + body


def build_report(kind: DsnKind, msg: QueuedMessage, recipients: Sequence[DsnRecipient], *,
                 hostname: str, now: float, original: bytes | None = None,
                 full: bool = False, truncated: bool = False) -> Report:
    """The complete notification to ``msg.sender`` about ``recipients``.

    ``original`` is the whole original message when ``full``, else its
    header block (or ``None``: no third part).  ``truncated``: the full
    message was wanted but too large, so only headers are attached.
    """
    if not msg.sender:
        raise ValueError("no notification to the null sender (RFC 3461 6.1)")
    if not recipients:
        raise ValueError("a notification needs at least one recipient")
    # RFC 6533 types only when something needs UTF-8: an address, or the
    # original's headers of a message that came with SMTPUTF8.
    utf8 = (not msg.sender.isascii()
            or not all(r.address.isascii() and (r.orcpt or "").isascii() for r in recipients)
            or (msg.params.smtputf8 and original is not None and not original.isascii()))
    if original is None:
        returned = ""
    elif full:
        returned = "It's attached below."
    elif truncated:
        returned = "The message was too large to return; its headers are attached below."
    else:
        returned = "Its headers are attached below."
    text = human_text(kind, msg, recipients, hostname, now, returned).encode("utf-8")
    status = delivery_status(msg, recipients, hostname, utf8).encode("utf-8")
    parts = [
        _part(["Content-Description: Notification",
               f"Content-Type: text/plain; charset={'us-ascii' if text.isascii() else 'utf-8'}",
               f"Content-Transfer-Encoding: {'7bit' if text.isascii() else '8bit'}"], text),
        _part(["Content-Description: Delivery report",
               "Content-Type: message/"
               + ("global-delivery-status" if utf8 else "delivery-status"),
               f"Content-Transfer-Encoding: {'7bit' if status.isascii() else '8bit'}"], status),
    ]
    if original is not None:
        if full:
            ctype = "message/global" if utf8 else "message/rfc822"
            desc = "Undelivered Message" if kind is DsnKind.FAILURE else "Message"
        else:
            ctype = "message/global-headers" if utf8 else "text/rfc822-headers"
            desc = ("Undelivered Message Headers" if kind is DsnKind.FAILURE
                    else "Message Headers")
        body = original if original.endswith(b"\r\n") else original + b"\r\n"
        parts.append(_part([f"Content-Description: {desc}", f"Content-Type: {ctype}",
                            f"Content-Transfer-Encoding: {'7bit' if body.isascii() else '8bit'}"],
                           body))
    boundary = _boundary(parts, msg.queue_id)
    eight_bit = not all(p.isascii() for p in parts)
    head = [f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
            f"To: <{field(msg.sender)}>",
            f"Subject: {SUBJECTS[kind]}",
            f"Date: {rfc_date(now)}",
            f"Message-ID: <{secrets.token_hex(12)}@{hostname}>",
            # RFC 3834 5: machine-generated, so that auto-responders stay quiet.
            "Auto-Submitted: auto-replied",
            "MIME-Version: 1.0",
            f'Content-Type: multipart/report; report-type=delivery-status;\r\n'
            f'\tboundary="{boundary}"']
    if eight_bit:
        head.append("Content-Transfer-Encoding: 8bit")
    data = bytearray(("\r\n".join(head) + "\r\n\r\n"
                      + "This is a MIME-encapsulated message.\r\n").encode("utf-8"))
    for p in parts:
        data += f"\r\n--{boundary}\r\n".encode() + p
    data += f"\r\n--{boundary}--\r\n".encode()
    params = MailParams(body="8BITMIME" if eight_bit else None, smtputf8=utf8)
    return Report(bytes(data), params)


def _boundary(parts: Sequence[bytes], queue_id: str) -> str:
    """Random, at most 70 characters (RFC 2046 5.1.1), absent from the parts."""
    while True:
        boundary = f"{secrets.token_hex(16)}/{queue_id[:30]}"
        marker = b"--" + boundary.encode()
        if not any(marker in p for p in parts):
            return boundary
