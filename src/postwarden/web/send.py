"""``POST /api/v1/messages``: applications send mail over HTTP.

The body is JSON (``from``, ``to``/``cc``/``bcc``, ``subject``, ``text``,
``html``, ``attachments`` as base64, ``headers``), or JSON with ``raw`` (a
whole RFC 5322 message), or the raw message itself with
``Content-Type: message/rfc822``.  The message then takes the path of an
SMTP submission by the key's account: the MAIL and RCPT checks of the
policy (sender binding, suspension, rate limits, relay rules, alias
expansion), then :func:`postwarden.smtp.commit.queue_message` (content
review, DKIM signing, the commit point).  The answer, 202, holds the queue
id.  Each send key may submit ``[admin] send_rate`` messages a minute.

Security exposure: the request comes from an application holding a send
key.  Header values with line breaks are refused (no header injection),
the body is bounded by the configured message size, and Bcc recipients
never appear in the message.
"""

from __future__ import annotations

import base64
import binascii
import collections
import email.errors
import email.policy
import email.utils
import time
from email.message import EmailMessage
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from postwarden import reply as R
from postwarden.envelope import (
    Address,
    ConnectionInfo,
    Envelope,
    MailParams,
    RcptParams,
    Recipient,
)
from postwarden.ids import new_session_id
from postwarden.message import authresults, cleanup
from postwarden.message.lineends import to_crlf
from postwarden.policy import CheckContext, Stage
from postwarden.smtp import commit
from postwarden.smtp.address import PathError, parse_path
from postwarden.storage.base import StorageError
from postwarden.web.api import ApiError, read_json
from postwarden.web.store import ApiKey

LISTENER = "http-api"
MAX_RECIPIENTS = 1000
# Fields the JSON form sets itself (or that only the server writes).
RESERVED = {"from", "to", "cc", "bcc", "subject", "mime-version", "content-type",
            "content-transfer-encoding", "received", "dkim-signature",
            "authentication-results", "return-path"}
RATE_WINDOW = 60.0


def _addresses(data: dict[str, Any], key: str) -> list[str]:
    value = data.get(key, [])
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise ApiError(422, f"{key}: an address or a list of addresses")
    return [v for v in items if v.strip()]


def _mailbox(text: str, field: str) -> Address:
    """The address of ``Name <addr>`` or ``addr``, checked as SMTP checks it."""
    _, addr = email.utils.parseaddr(text)
    if not addr or "\r" in text or "\n" in text:
        raise ApiError(422, f"{field}: {text[:100]!r} is not an address")
    try:
        path = parse_path(f"<{addr}>", utf8=not addr.isascii())
    except PathError:
        raise ApiError(422, f"{field}: {text[:100]!r} is not an address") from None
    assert path.address is not None
    return path.address


def _check_text(value: Any, where: str = "body") -> None:
    """Every string must be valid Unicode (JSON allows lone surrogates)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(422, f"{where}: not valid Unicode text") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k, where)
            _check_text(v, f"{where}.{k}" if where != "body" else str(k))
    elif isinstance(value, list):
        for v in value:
            _check_text(v, where)


def _build(data: dict[str, Any]) -> bytes:
    """The message of the JSON fields (malformed values: 422, never 500)."""
    try:
        return _compose(data)
    except ApiError:
        raise
    except (ValueError, TypeError, LookupError, email.errors.MessageError) as exc:
        raise ApiError(422, f"cannot build the message: {exc}"[:300]) from None


def _compose(data: dict[str, Any]) -> bytes:
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = str(data["from"])
    for key in ("to", "cc"):
        values = _addresses(data, key)
        if values:
            msg[key.capitalize()] = ", ".join(values)
    subject = data.get("subject", "")
    if not isinstance(subject, str) or "\n" in subject or "\r" in subject:
        raise ApiError(422, "subject: one line of text")
    msg["Subject"] = subject
    headers = data.get("headers", {})
    if not isinstance(headers, dict):
        raise ApiError(422, "headers: an object of name: value")
    for name, value in headers.items():
        if (not isinstance(value, str) or not name or not name.isascii()
                or any(c in name for c in ": \t\r\n") or not name.isprintable()
                or "\r" in value or "\n" in value):
            raise ApiError(422, f"headers: {name[:50]!r} is not a usable header")
        if name.lower() in RESERVED:
            raise ApiError(422, f"headers: set {name} with its own field")
        msg[name] = value
    text, html = data.get("text"), data.get("html")
    if text is None and html is None:
        text = ""
    for key, value in (("text", text), ("html", html)):
        if value is not None and not isinstance(value, str):
            raise ApiError(422, f"{key}: a string")
    if text is not None:
        msg.set_content(text)
        if html is not None:
            msg.add_alternative(html, subtype="html")
    else:
        msg.set_content(html, subtype="html")
    attachments = data.get("attachments", [])
    if not isinstance(attachments, list):
        raise ApiError(422, "attachments: a list")
    for i, a in enumerate(attachments):
        if not isinstance(a, dict) or not isinstance(a.get("filename"), str) \
                or not isinstance(a.get("content"), str):
            raise ApiError(422, f"attachments[{i}]: filename and content (base64) expected")
        try:
            content = base64.b64decode(a["content"], validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(422, f"attachments[{i}].content: not base64") from None
        ctype = a.get("content_type", "application/octet-stream")
        if not isinstance(ctype, str) or ctype.count("/") != 1 or "\n" in ctype:
            raise ApiError(422, f"attachments[{i}].content_type: type/subtype")
        main, sub = ctype.split("/")
        filename = a["filename"]
        if "\r" in filename or "\n" in filename or not filename:
            raise ApiError(422, f"attachments[{i}].filename: one line")
        msg.add_attachment(content, maintype=main, subtype=sub, filename=filename)
    return msg.as_bytes()


def _raw_lines(raw: bytes) -> bytes:
    """CRLF line ends (a bare LF is taken as a line end) and no Bcc field."""
    text = to_crlf(raw)
    head, sep, body = text.partition(b"\r\n\r\n")
    kept: list[bytes] = []
    skipping = False
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                kept.append(line)
            continue
        skipping = line.lower().startswith(b"bcc:")
        if not skipping:
            kept.append(line)
    return b"\r\n".join(kept) + (sep or b"\r\n\r\n") + body


class SendApi:
    def __init__(self, server: Any) -> None:
        self.server = server
        self.cfg = server.config
        self._sent: dict[str, collections.deque[float]] = {}

    def _listener(self) -> Any:
        for lst in self.cfg.listeners:
            if lst.mode in ("submission", "submissions"):
                return lst
        raise ApiError(503, "no submission listener is configured")

    def _rate(self, key: ApiKey) -> None:
        now = time.monotonic()
        sent = self._sent.setdefault(key.key_id, collections.deque())
        while sent and sent[0] <= now - RATE_WINDOW:
            sent.popleft()
        if len(sent) >= self.cfg.admin.send_rate:
            raise ApiError(429, f"rate limit: {self.cfg.admin.send_rate} messages a minute "
                                "for this key")
        sent.append(now)

    async def send(self, request: Request, key: ApiKey) -> Response:
        limit = self.cfg.limits.message_size_max
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "message/rfc822":
            raw = bytearray()
            async for chunk in request.stream():
                raw += chunk
                if len(raw) > limit:
                    raise ApiError(413, f"message larger than {limit} bytes")
            data: dict[str, Any] = {}
            message = _raw_lines(bytes(raw))
        else:
            data = await read_json(request, limit * 4 // 3 + 65536)
            _check_text(data)
            if "raw" in data:
                if not isinstance(data["raw"], str):
                    raise ApiError(422, "raw: the message as a string")
                message = _raw_lines(data["raw"].encode("utf-8", "surrogateescape"))
            else:
                if not isinstance(data.get("from"), str):
                    raise ApiError(422, "from: required")
                message = _build(data)
        if len(message) > limit:
            raise ApiError(413, f"message larger than {limit} bytes")
        head = message.partition(b"\r\n\r\n")[0]
        fields = email.message_from_bytes(head + b"\r\n\r\n", policy=email.policy.compat32)
        given = data.get("from")
        sender_text = given if isinstance(given, str) else str(fields.get("From", ""))
        sender = _mailbox(sender_text, "from")
        rcpt_texts = [t for k in ("to", "cc", "bcc") for t in _addresses(data, k)]
        if not rcpt_texts:  # a raw message: its To and Cc (Bcc was removed)
            rcpt_texts = [a for _, a in email.utils.getaddresses(
                [str(v) for k in ("To", "Cc") for v in fields.get_all(k, [])]) if a]
        if not rcpt_texts:
            raise ApiError(422, "to: at least one recipient")
        if len(rcpt_texts) > MAX_RECIPIENTS:
            raise ApiError(422, f"at most {MAX_RECIPIENTS} recipients")
        rcpts = list(dict.fromkeys(_mailbox(t, "to") for t in rcpt_texts))
        self._rate(key)
        return await self._submit(request, key, sender, rcpts, message)

    async def _submit(self, request: Request, key: ApiKey, sender: Address,
                      rcpts: list[Address], message: bytes) -> Response:
        srv = self.server.context
        listener = self._listener()
        conn = ConnectionInfo(
            session_id=new_session_id(), listener=LISTENER,
            peer_ip=request.client.host if request.client else "", peer_port=(
                request.client.port if request.client else 0),
            helo="http-api", esmtp=True,
            tls_version="TLSv1.3" if request.url.scheme == "https" else "",
            auth_user=key.account, auth_mechanism="API-KEY")
        smtputf8 = not message.isascii() and not all(a.local.isascii() for a in rcpts)
        params = MailParams(smtputf8=smtputf8 or not str(sender).isascii())
        envelope = Envelope(sender, params)

        def check_context() -> CheckContext:
            return CheckContext(config=self.cfg, listener=listener, conn=conn,
                                directory=srv.directory, envelope=envelope)

        # MAIL: sender binding to the key's account, suspension, rate limits.
        ctx = check_context()
        ctx.path = parse_path(f"<{sender}>", utf8=params.smtputf8)
        ctx.mail_params = params
        verdict = await srv.policy.run(Stage.MAIL, ctx)
        refused = self._refused(verdict, "from")
        if refused is not None:
            return refused
        expanded: dict[str, Recipient] = {}
        for rcpt in rcpts:
            ctx = check_context()
            ctx.path = parse_path(f"<{rcpt}>", utf8=params.smtputf8)
            ctx.rcpt_params = RcptParams()
            verdict = await srv.policy.run(Stage.RCPT, ctx)
            refused = self._refused(verdict, f"to {rcpt}")
            if refused is not None:
                return refused
            for target in ctx.targets:
                addr = Address.parse_simple(target)
                if addr.key not in expanded:
                    orcpt = None if addr.key == rcpt.key else f"rfc822;{rcpt}"
                    expanded[addr.key] = Recipient(addr, RcptParams(None, orcpt))
        # The content, as SMTP writes it: forged Authentication-Results dropped.
        head, sep, rest = message.partition(b"\r\n\r\n")
        head += b"\r\n"
        cleaned, _ = authresults.remove_forged(head, self.cfg.hostname)
        data = cleaned + sep[2:] + rest
        try:
            body = srv.queue.new_body()
            body.write(data)
        except StorageError:
            raise ApiError(503, "the queue cannot take the message now: retry later") from None
        scanner = cleanup.HeaderScanner()
        scanner.feed(data)
        scanner.close()
        queued = await commit.queue_message(
            srv, conn, listener, commit.Pending(
                envelope, list(expanded.values()), body, scanner, head, not data.isascii(),
                len(data)), b"", srv.metrics.listener(LISTENER))
        if queued.queue_id is None:
            return self._reply_error(queued.reply, "content")
        return JSONResponse({"queue_id": queued.queue_id,
                             "recipients": [str(r.address) for r in expanded.values()]},
                            status_code=202)

    def _refused(self, verdict: R.Verdict, what: str) -> Response | None:
        if verdict.outcome in (R.Outcome.ACCEPT, R.Outcome.NO_OPINION):
            return None
        return self._reply_error(verdict.reply or R.TEMP_FAILURE, what)

    @staticmethod
    def _reply_error(reply: R.Reply, what: str) -> Response:
        """The SMTP reply as HTTP: temporary 503 (429 for a rate limit),
        permanent 403 for the sender, 422 for the rest."""
        text = reply.text if isinstance(reply.text, str) else " ".join(reply.text)
        if reply.code < 500:
            status = 429 if "rate" in text.lower() else 503
        else:
            status = 403 if what == "from" else 422
        return JSONResponse({"error": f"{what}: {text}", "smtp_code": reply.code,
                             "dsn": reply.enhanced}, status_code=status)
