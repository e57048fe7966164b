"""Spam: rspamd's HTTP ``/checkv2`` API.

Owns the ``rspamd`` filter.  The message is POSTed to the normal worker
with the session's facts as request headers (``IP``, ``Helo``, ``From``,
one ``Rcpt`` per recipient, ``User`` for authenticated senders,
``Queue-Id``, ``MTA-Name``; rspamd "protocol" documentation), and the
action of the JSON answer is mapped to a verdict:

=================  ==========================================================
rspamd action      verdict
=================  ==========================================================
reject             554 5.7.1 (reject)
soft reject        451 4.7.1 (tempfail)
greylist           451 4.7.1 (tempfail, "greylisted")
rewrite subject    accept, Subject rewritten, ``X-Spam-*`` headers
add header         accept with ``X-Spam-Flag/Score/Action/Symbols`` headers
no action          accept
=================  ==========================================================

A connection failure, an HTTP error or an answer that is not the expected
JSON makes the filter unavailable (451, or fail-open with a warning header).

Security exposure: sends untrusted content to a local daemon over plain
HTTP (keep it on loopback or a unix socket); reads a bounded answer.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from postwarden.filter.verdict import (
    GREYLISTED,
    SPAM_REJECTED,
    SPAM_TEMPFAIL,
    Action,
    FilterMessage,
    FilterUnavailable,
    FilterVerdict,
)

ANSWER_MAX = 1024 * 1024
SUBJECT_TEMPLATE = "*** SPAM *** %s"


@dataclass(frozen=True, slots=True)
class RspamdSettings:
    # "http://127.0.0.1:11333" or "unix:/run/rspamd/normal.sock".
    url: str = "http://127.0.0.1:11333"
    password: str = ""


def _target(url: str) -> tuple[str, str, int]:
    """("unix", path, 0) or ("tcp", host, port) of a rspamd URL."""
    if url.startswith("unix:"):
        return "unix", url[5:], 0
    rest = url.removeprefix("http://").rstrip("/")
    host, _, port = rest.rpartition(":")
    if not host:
        return "tcp", rest.strip("[]"), 11333
    return "tcp", host.strip("[]"), int(port)


def _clean(value: str) -> str:
    """A request header value: no line breaks from envelope data."""
    return value.replace("\r", " ").replace("\n", " ")[:1000]


async def checkv2(settings: RspamdSettings, message: FilterMessage) -> dict[str, Any]:
    kind, host, port = _target(settings.url)
    headers = [("Content-Length", str(len(message.data))), ("Connection", "close")]
    if message.client_ip:
        headers.append(("IP", message.client_ip))
    if message.helo:
        headers.append(("Helo", message.helo))
    headers.append(("From", message.sender))
    headers += [("Rcpt", r) for r in message.recipients]
    if message.auth_user:
        headers.append(("User", message.auth_user))
    if message.queue_id:
        headers.append(("Queue-Id", message.queue_id))
    if message.hostname:
        headers.append(("MTA-Name", message.hostname))
    if settings.password:
        headers.append(("Password", settings.password))
    request = "POST /checkv2 HTTP/1.0\r\nHost: rspamd\r\n" + "".join(
        f"{k}: {_clean(v)}\r\n" for k, v in headers) + "\r\n"
    try:
        if kind == "unix":
            reader, writer = await asyncio.open_unix_connection(host)
        else:
            reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        raise FilterUnavailable(f"rspamd at {settings.url}: {exc}") from None
    try:
        writer.write(request.encode("utf-8"))
        writer.write(message.data)
        await writer.drain()
        answer = await reader.read(ANSWER_MAX + 1)
        while len(answer) <= ANSWER_MAX:
            more = await reader.read(ANSWER_MAX + 1 - len(answer))
            if not more:
                break
            answer += more
    except OSError as exc:
        raise FilterUnavailable(f"rspamd at {settings.url}: {exc!r}") from None
    finally:
        writer.close()
    head, sep, body = answer.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    if not sep or len(status) < 2 or status[1] != b"200":
        raise FilterUnavailable(f"rspamd: {head[:200]!r}")
    try:
        result = json.loads(body)
    except ValueError:
        raise FilterUnavailable("rspamd: the answer is not JSON") from None
    if not isinstance(result, dict) or "action" not in result:
        raise FilterUnavailable(f"rspamd: unexpected answer {body[:200]!r}")
    return result


class RspamdFilter:
    name = "rspamd"

    def __init__(self, settings: RspamdSettings) -> None:
        self.settings = settings

    async def check(self, message: FilterMessage) -> FilterVerdict:
        result = await checkv2(self.settings, message)
        action = str(result.get("action", ""))
        score = float(result.get("score", 0.0) or 0.0)
        required = float(result.get("required_score", 0.0) or 0.0)
        symbols = result.get("symbols") or {}
        names = tuple(sorted(symbols))[:50] if isinstance(symbols, dict) else ()
        reason = f"rspamd {action} score {score:g}/{required:g}"
        headers = (("X-Spam-Flag", "YES" if action != "no action" else "NO"),
                   ("X-Spam-Score", f"{score:g} / {required:g}"),
                   ("X-Spam-Action", action),
                   ("X-Spam-Symbols", ", ".join(names) or "none"))
        if action == "reject":
            return FilterVerdict(Action.REJECT, reason, SPAM_REJECTED, rules=names, score=score)
        if action == "soft reject":
            return FilterVerdict(Action.TEMPFAIL, reason, SPAM_TEMPFAIL, rules=names,
                                 score=score)
        if action == "greylist":
            return FilterVerdict(Action.TEMPFAIL, reason, GREYLISTED, rules=names, score=score)
        if action == "rewrite subject":
            subject = str(result.get("subject") or "")
            if not subject:
                old = (message.field_value(b"subject") or b"").decode("utf-8", "replace")
                subject = SUBJECT_TEMPLATE % old
            return FilterVerdict(Action.HEADERS, reason, headers=headers, rules=names,
                                 score=score, subject=subject)
        if action == "add header":
            return FilterVerdict(Action.HEADERS, reason, headers=headers, rules=names,
                                 score=score)
        return FilterVerdict(Action.ACCEPT, reason, rules=names, score=score)
