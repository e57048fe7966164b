"""The SMTP server protocol engine, sans I/O: bytes in, events and replies out.

Owns the command grammar and the state machine of RFC 5321 with PIPELINING
(RFC 2920), CHUNKING/BDAT (RFC 3030), STARTTLS (RFC 3207), AUTH (RFC 4954),
SIZE, 8BITMIME, SMTPUTF8, ENHANCEDSTATUSCODES and DSN.  It never touches a
socket: :class:`postwarden.smtp.session.Session` feeds it bytes, takes events,
decides what they mean (policy, storage) and answers each with
:meth:`ServerProtocol.respond`.  The engine answers syntax and sequence
errors itself.

Written by hand because aiosmtpd, the only maintained Python SMTP server
library, reads DATA line by line into memory and lacks PIPELINING and
CHUNKING; here DATA is found with buffer scans (``bytes.find``), never per line
in Python, and flows out in chunks as it arrives.

Security exposure: parses every byte a client sends.  Only CRLF.CRLF ends
DATA (no SMTP smuggling via bare CR or LF); every buffer is bounded by the
limits given; input buffered after STARTTLS is discarded (RFC 3207 6).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from postwarden import reply as R
from postwarden.envelope import MailParams, RcptParams
from postwarden.limits import Limits
from postwarden.smtp.address import (
    Path,
    PathError,
    parse_mail_params,
    parse_path,
    parse_rcpt_params,
    split_path_and_params,
)


class State(enum.Enum):
    GREETED = "greeted"  # waiting for EHLO/HELO
    READY = "ready"  # no transaction
    MAIL = "mail"  # MAIL accepted, no recipient yet
    RCPT = "rcpt"  # at least one recipient accepted
    DATA = "data"  # reading DATA content
    BDAT = "bdat"  # between BDAT chunks of one transaction
    CHUNK = "chunk"  # reading the octets of one BDAT chunk
    AUTH = "auth"  # reading a SASL response line
    TLS = "tls"  # 220 sent to STARTTLS, handshake pending
    CLOSED = "closed"


# ---- events --------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Ehlo:
    domain: str
    extended: bool  # EHLO (True) or HELO (False)


@dataclass(frozen=True, slots=True)
class Mail:
    path: Path
    params: MailParams


@dataclass(frozen=True, slots=True)
class Rcpt:
    path: Path
    params: RcptParams


@dataclass(frozen=True, slots=True)
class Data:
    pass


@dataclass(frozen=True, slots=True)
class DataChunk:
    """Message content (dot-unstuffed for DATA), no answer expected."""

    data: bytes


@dataclass(frozen=True, slots=True)
class DataEnd:
    """End of DATA content (the CRLF.CRLF was seen); answer with the result."""

    long_lines: bool


@dataclass(frozen=True, slots=True)
class BdatEnd:
    """All octets of one BDAT chunk were read; answer with 250 or an error."""

    size: int
    last: bool
    long_lines: bool


@dataclass(frozen=True, slots=True)
class Rset:
    pass


@dataclass(frozen=True, slots=True)
class Vrfy:
    arg: str


@dataclass(frozen=True, slots=True)
class StartTls:
    pass


@dataclass(frozen=True, slots=True)
class Auth:
    mechanism: str  # upper case
    initial: str | None  # initial response (RFC 4954 4), "=" means empty


@dataclass(frozen=True, slots=True)
class AuthResponse:
    line: str  # "*" cancels (RFC 4954 4)


@dataclass(frozen=True, slots=True)
class Quit:
    pass


class NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()

Event = (Ehlo | Mail | Rcpt | Data | DataChunk | DataEnd | BdatEnd | Rset | Vrfy | StartTls
         | Auth | AuthResponse | Quit)
# Events that need ``respond``; DataChunk does not.
_NEEDS_ANSWER = (Ehlo, Mail, Rcpt, Data, DataEnd, BdatEnd, Rset, Vrfy, StartTls, Auth,
                 AuthResponse)

_TRANSACTION_STATES = (State.MAIL, State.RCPT, State.BDAT)
_UNIMPLEMENTED = {"TURN", "ETRN", "ATRN", "EXPN", "SEND", "SOML", "SAML", "VERB", "XCLIENT",
                  "XFORWARD"}
# A web client (or a cross-protocol attack) on the SMTP port: postscreen hangs up.
_HTTP_VERBS = {"GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS", "DELETE", "HOST:",
               "USER-AGENT:"}
HTTP_REFUSED = R.Reply(554, "5.5.0", "Protocol error: this is an SMTP server, not HTTP")
# Lines beginning with a dot handled one by one in a read of DATA; beyond
# them, the rest of the read is unstuffed in bulk (_next_data).
_DOT_LINES_PER_READ = 16

NO_RECIPIENTS = R.Reply(554, "5.5.1", "No valid recipients")
CLOSING = R.Reply(221, "2.0.0", "Bye")
EHLO_SYNTAX = R.Reply(501, "5.5.4", "Syntax: EHLO hostname")
BDAT_SYNTAX = R.Reply(501, "5.5.4", "Syntax: BDAT chunk-size [LAST]")
BDAT_AFTER_FAILURE = R.Reply(503, "5.5.1", "Previous BDAT failed, send RSET")
DATA_AFTER_BDAT = R.Reply(503, "5.5.1", "DATA not allowed after BDAT")


class ServerProtocol:
    """One SMTP server connection's protocol state, without I/O.

    Usage: ``receive(data)``; loop ``ev = next_event()`` until ``NEED_DATA``,
    answering each event (except DataChunk) with ``respond(reply)``; send
    ``data_to_send()``.  ``closed`` tells when to hang up (after sending).
    """

    def __init__(self, limits: Limits, *, tls_active: bool = False) -> None:
        self.limits = limits
        self.state = State.GREETED
        self.tls_active = tls_active
        self.authenticated = False
        self.esmtp = False
        self.utf8 = False  # the current transaction uses SMTPUTF8
        self.rcpt_count = 0
        self.errors = 0
        self.commands = 0
        self._in = bytearray()
        self._out = bytearray()
        self._pending: Event | None = None  # event waiting for respond()
        self._skip_line = False  # discarding the rest of an overlong line
        # DATA/BDAT content.
        self._data = bytearray()
        self._data_prefix = 0  # virtual CRLF not part of the content
        self._chunk_left = 0
        self._chunk_size = 0
        self._chunk_last = False
        self._chunk_discard = False  # BDAT outside a valid transaction
        self._chunk_discard_reply: R.Reply | None = None
        self._line_len = 0  # length of the current content line so far
        self._long_lines = False
        self._bdat_failed = False
        self._data_done = False  # content handed out, DataEnd comes next
        self.http_seen = False  # the client spoke HTTP (the session bans it)

    # ---- I/O side -----------------------------------------------------

    def receive(self, data: bytes) -> None:
        self._in += data

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def buffered(self) -> int:
        """Bytes received but not yet consumed (pipelined input)."""
        return len(self._in)

    def send(self, reply: R.Reply) -> None:
        """Queue a reply that answers no event (the greeting, a 421)."""
        self._out += reply.to_bytes()
        if reply.code == 421:
            self.state = State.CLOSED

    def tls_started(self) -> None:
        """The TLS handshake finished: RFC 3207 4.2, forget all prior state."""
        self._in.clear()  # RFC 3207 6: discard plaintext pipelined after STARTTLS
        self.tls_active = True
        self.esmtp = False
        self.authenticated = False
        self._reset_transaction()
        self.state = State.GREETED

    # ---- event side ---------------------------------------------------

    def next_event(self) -> Event | NeedData:
        if self._pending is not None:
            raise RuntimeError(f"respond() to {self._pending!r} first")
        while True:
            st = self.state
            if st is State.CLOSED or st is State.TLS:
                return NEED_DATA
            if st is State.DATA:
                return self._next_data()
            if st is State.CHUNK:
                ev = self._next_chunk()
                if ev is None:
                    continue  # discarded chunk fully consumed and answered
                return ev
            line = self._next_line()
            if line is None:
                return NEED_DATA
            ev = self._parse_line(line)
            if ev is not None:
                if isinstance(ev, _NEEDS_ANSWER):
                    self._pending = ev
                return ev

    def respond(self, reply: R.Reply) -> None:
        """Answer the pending event; positive replies advance the state."""
        ev = self._pending
        if ev is None:
            raise RuntimeError("no event to respond to")
        self._pending = None
        ok = reply.positive
        if isinstance(ev, Ehlo):
            if ok:
                self.esmtp = ev.extended
                self._reset_transaction()
                self.state = State.READY
        elif isinstance(ev, Mail):
            if ok:
                self.state = State.MAIL
                self.utf8 = ev.params.smtputf8
                self.rcpt_count = 0
        elif isinstance(ev, Rcpt):
            if ok:
                self.state = State.RCPT
                self.rcpt_count += 1
        elif isinstance(ev, Data):
            if reply.code == 354:
                self._start_content()
                self._data_prefix = 2
                self._data += b"\r\n"  # the content starts at a line start
                self.state = State.DATA
        elif isinstance(ev, DataEnd):
            self._reset_transaction()
            self.state = State.READY
        elif isinstance(ev, BdatEnd):
            if ok and not ev.last:
                self.state = State.BDAT
            else:
                self._reset_transaction()
                self.state = State.READY
                self._bdat_failed = not ok and not ev.last
        elif isinstance(ev, Rset):
            self._reset_transaction()
            self._bdat_failed = False
            self.state = State.READY if self.state is not State.GREETED else State.GREETED
        elif isinstance(ev, StartTls):
            if reply.code == 220:
                self.state = State.TLS
        elif isinstance(ev, Auth | AuthResponse):
            if reply.code == 334:
                self.state = State.AUTH
            else:
                self.state = State.READY
                if reply.code == 235:
                    self.authenticated = True
        self._reply(reply)

    # ---- internals ----------------------------------------------------

    def _reply(self, reply: R.Reply) -> None:
        self._out += reply.to_bytes()
        if reply.code == 421:
            self.state = State.CLOSED
            return
        if reply.code >= 400:
            self.errors += 1
            if self.errors >= self.limits.errors_max:
                self._out += R.TOO_MANY_ERRORS.to_bytes()
                self.state = State.CLOSED

    def _reset_transaction(self) -> None:
        self.utf8 = False
        self.rcpt_count = 0
        self._data.clear()
        self._data_prefix = 0

    def _start_content(self) -> None:
        self._data.clear()
        self._line_len = 0
        self._long_lines = False

    def _next_line(self) -> str | None:
        """One command line, CRLF (or bare LF) stripped; None if incomplete."""
        buf = self._in
        limit = self.limits.auth_line_max
        while True:
            nl = buf.find(b"\n", 0, limit + 1)
            if nl < 0:
                if len(buf) <= limit:
                    return None
                # Overlong line: answer once, then discard up to its end,
                # and only that: what follows it may have arrived with it.
                if not self._skip_line:
                    self._skip_line = True
                    self._reply(R.LINE_TOO_LONG)
                    if self.closed:
                        return None
                end = buf.find(b"\n", limit + 1)
                if end < 0:
                    del buf[:]
                    return None
                del buf[: end + 1]
                self._skip_line = False
                continue
            raw = bytes(buf[:nl])
            del buf[: nl + 1]
            if self._skip_line:
                self._skip_line = False
                continue
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            verb_end = raw.find(b" ")
            verb = raw[: verb_end if verb_end >= 0 else len(raw)].upper()
            in_auth = self.state is State.AUTH or verb == b"AUTH"
            if not in_auth and len(raw) + 2 > self.limits.command_line_max:
                self._reply(R.LINE_TOO_LONG)
                if self.closed:
                    return None
                continue
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                self._reply(R.SYNTAX_ERROR)
                if self.closed:
                    return None

    def _parse_line(self, line: str) -> Event | None:
        """Check a command (syntax, sequence); answer errors; return its event."""
        if self.state is State.AUTH:
            return AuthResponse(line.strip())
        self.commands += 1
        if self.commands > self.limits.commands_max:
            self._reply(R.TOO_MANY_COMMANDS)
            return None
        if "\r" in line or "\x00" in line:
            self._reply(R.SYNTAX_ERROR)
            return None
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        handler = _COMMANDS.get(verb)
        if handler is None and verb in _HTTP_VERBS:
            self.http_seen = True
            self._out += HTTP_REFUSED.to_bytes()
            self.state = State.CLOSED
            return None
        if handler is None:
            self._reply(R.NOT_IMPLEMENTED if verb in _UNIMPLEMENTED else R.SYNTAX_ERROR)
            return None
        try:
            return handler(self, arg)
        except PathError as exc:
            self._reply(exc.reply)
            return None

    def _need_ehlo(self) -> bool:
        if self.state is State.GREETED:
            self._reply(R.NEED_EHLO)
            return True
        return False

    # One method per verb: check syntax and sequence, then hand the event out.

    def _cmd_ehlo(self, arg: str) -> Event | None:
        return self._helo(arg, extended=True)

    def _cmd_helo(self, arg: str) -> Event | None:
        return self._helo(arg, extended=False)

    def _helo(self, arg: str, *, extended: bool) -> Event | None:
        domain = arg.strip()
        if not domain or " " in domain:
            self._reply(EHLO_SYNTAX)
            return None
        return Ehlo(domain, extended)

    def _cmd_mail(self, arg: str) -> Event | None:
        if self._need_ehlo():
            return None
        if self.state in _TRANSACTION_STATES:
            self._reply(R.NESTED_MAIL)
            return None
        path_s, params_s = split_path_and_params(arg, "FROM:")
        params = parse_mail_params(params_s, esmtp=self.esmtp,
                                   size_max=self.limits.message_size_max)
        path = parse_path(path_s, utf8=params.smtputf8, allow_null=True)
        return Mail(path, params)

    def _cmd_rcpt(self, arg: str) -> Event | None:
        if self._need_ehlo():
            return None
        if self.state not in (State.MAIL, State.RCPT):
            self._reply(R.BAD_SEQUENCE if self.state is State.BDAT else R.NEED_MAIL)
            return None
        if self.rcpt_count >= self.limits.recipients_max:
            self._reply(R.TOO_MANY_RCPTS)
            return None
        path_s, params_s = split_path_and_params(arg, "TO:")
        params = parse_rcpt_params(params_s, esmtp=self.esmtp)
        path = parse_path(path_s, utf8=self.utf8, allow_postmaster=True)
        return Rcpt(path, params)

    def _cmd_data(self, arg: str) -> Event | None:
        if self._need_ehlo():
            return None
        if arg.strip():
            self._reply(R.PARAM_SYNTAX)
            return None
        if self.state is State.BDAT:
            self._reply(DATA_AFTER_BDAT)
            return None
        if self.state is State.MAIL:
            self._reply(NO_RECIPIENTS)
            return None
        if self.state is not State.RCPT:
            self._reply(R.NEED_MAIL)
            return None
        return Data()

    def _cmd_bdat(self, arg: str) -> Event | None:
        parts = arg.split()
        if (not 1 <= len(parts) <= 2 or not parts[0].isdigit() or len(parts[0]) > 20
                or (len(parts) == 2 and parts[1].upper() != "LAST")):
            # The chunk size is unknown: the connection cannot be resynchronised.
            self._reply(BDAT_SYNTAX)
            self._reply(R.Reply(421, "4.5.0", "BDAT syntax error, closing connection"))
            return None
        size = int(parts[0])
        last = len(parts) == 2
        self._chunk_left = self._chunk_size = size
        self._chunk_last = last
        self._chunk_discard = False
        self._chunk_discard_reply = None
        if self.state not in (State.RCPT, State.BDAT) or not self.esmtp:
            # RFC 3030 2: the octets are read even when the command fails.
            self._chunk_discard = True
            if self.state is State.GREETED:
                self._chunk_discard_reply = R.NEED_EHLO
            elif self._bdat_failed:
                self._chunk_discard_reply = BDAT_AFTER_FAILURE
            elif self.state is State.MAIL:
                self._chunk_discard_reply = NO_RECIPIENTS
            else:
                self._chunk_discard_reply = R.NEED_MAIL
        elif self.state is State.RCPT:
            self._start_content()
        self.state = State.CHUNK
        return None

    def _next_chunk(self) -> Event | NeedData | None:
        if self._chunk_left:
            if not self._in:
                return NEED_DATA
            take = min(self._chunk_left, len(self._in))
            data = bytes(self._in[:take])
            del self._in[:take]
            self._chunk_left -= take
            if not self._chunk_discard:
                self._scan_lines(data)
                return DataChunk(data)
            if self._chunk_left:
                return NEED_DATA
        # Chunk complete.
        if self._chunk_discard:
            reply = self._chunk_discard_reply or R.BAD_SEQUENCE
            self.state = State.GREETED if reply is R.NEED_EHLO else State.READY
            self._reply(reply)
            return None
        self.state = State.BDAT  # until respond() decides
        ev = BdatEnd(self._chunk_size, self._chunk_last, self._long_lines)
        self._pending = ev
        return ev

    def _scan_lines(self, data: bytes) -> None:
        """Track the longest content line with C-speed splits (no Python loop
        per line); RFC 5321 4.5.3.1.6 counts the CRLF in the 1000 octets."""
        limit = self.limits.text_line_max
        if not limit or self._long_lines:
            return
        first_nl = data.find(b"\n")
        if first_nl < 0:
            self._line_len += len(data)
        else:
            if self._line_len + first_nl + 1 > limit:
                self._long_lines = True
                return
            last_nl = data.rfind(b"\n")
            if last_nl > first_nl and _has_long_line(data, first_nl + 1, last_nl, limit):
                self._long_lines = True
                return
            self._line_len = len(data) - last_nl - 1
        if self._line_len + 1 > limit:
            self._long_lines = True

    def _next_data(self) -> Event | NeedData:
        """Scan for CRLF.CRLF and hand out unstuffed content (RFC 5321 4.5.2).

        One search for CRLF "." per pass finds both the end of the data and
        the dot-stuffed lines (in usual text it finds only the end), and the
        content is copied once, out of the input buffer.  ``_data`` holds
        what is kept back between passes: a tail that may begin CRLF.CRLF or
        CRLF.. (at most 4 octets) and, first, the virtual CRLF that puts the
        content at a line start (``_data_prefix``)."""
        if self._data_done:
            self._data_done = False
            return self._next_data_end()
        buf = self._in
        held = self._data
        if held:
            buf[:0] = held  # in place: what arrived is not copied
            held.clear()
        n = len(buf)
        prefix = self._data_prefix
        find = buf.find
        start = prefix  # content not yet taken; the virtual CRLF is not content
        cuts: list[tuple[int, int]] = []  # content taken before a stuffed dot
        end = -1
        bulk = -1  # where the C-speed search and replace take over
        pos = 0
        turns = 0
        while True:
            i = find(b"\r\n.", pos)
            if i < 0 or i + 5 > n:  # none, or too close to the end to tell
                break
            turns += 1
            if turns > _DOT_LINES_PER_READ:
                # Many lines begin with a dot (a client may send nothing
                # else): the rest of this read costs a search for CRLF.CRLF
                # and a replace, not a turn of this loop per line.
                bulk = pos
                end = find(b"\r\n.\r\n", pos)
                break
            c = buf[i + 3]
            if c == 0x2E:  # CRLF.. : a stuffed dot, the first one goes
                cuts.append((start, i + 3))
                start = pos = i + 4
            elif c == 0x0D and buf[i + 4] == 0x0A:
                end = i
                break
            else:
                pos = i + 3
        if end >= 0:
            # The CRLF before the dot belongs to the content (RFC 5321 4.1.1.4).
            content = self._take(buf, cuts, start, end + 2, bulk)
            del buf[: end + 5]  # what follows (pipelined commands) stays
            self._data_prefix = 0
            if content:
                self._scan_lines(content)
                self._data_done = True
                return DataChunk(content)
            return self._next_data_end()
        if not cuts and n - prefix <= 4:
            held += buf
            buf.clear()
            return NEED_DATA
        # Keep back a tail that might start CRLF.CRLF or CRLF..: everything
        # from the first CR among the last 4 octets.
        cut = find(b"\r", max(n - 4, start, bulk))
        if cut < 0:
            cut = n
        content = self._take(buf, cuts, start, cut, bulk)
        held += buf[cut:]
        buf.clear()
        self._data_prefix = 0
        if not content:
            return NEED_DATA
        self._scan_lines(content)
        return DataChunk(content)

    @staticmethod
    def _take(buf: bytearray, cuts: list[tuple[int, int]], start: int, stop: int,
              bulk: int) -> bytes:
        """``buf[start:stop]`` after the pieces in ``cuts``, in one copy;
        from ``bulk`` on (unless it is -1), with each CRLF.. unstuffed by a
        replace."""
        with memoryview(buf) as view:
            if bulk < 0:
                if not cuts:
                    return view[start:stop].tobytes()
                return b"".join([*(view[a:b] for a, b in cuts), view[start:stop]])
            rest = view[bulk:stop].tobytes().replace(b"\r\n..", b"\r\n.")
            return b"".join([*(view[a:b] for a, b in cuts), view[start:bulk], rest])

    def _next_data_end(self) -> Event:
        ev = DataEnd(self._long_lines)
        self._pending = ev
        return ev

    def _cmd_rset(self, arg: str) -> Event | None:
        if arg.strip():
            self._reply(R.PARAM_SYNTAX)
            return None
        return Rset()

    def _cmd_noop(self, arg: str) -> Event | None:
        self._reply(R.NOOP_OK)
        return None

    def _cmd_quit(self, arg: str) -> Event | None:
        self._out += CLOSING.to_bytes()
        self.state = State.CLOSED
        return Quit()

    def _cmd_vrfy(self, arg: str) -> Event | None:
        if not arg.strip():
            self._reply(R.PARAM_SYNTAX)
            return None
        return Vrfy(arg.strip())

    def _cmd_help(self, arg: str) -> Event | None:
        self._reply(R.HELP)
        return None

    def _cmd_starttls(self, arg: str) -> Event | None:
        if arg.strip():
            self._reply(R.PARAM_SYNTAX)
            return None
        if self.tls_active:
            self._reply(R.ALREADY_TLS)
            return None
        if self.state is State.GREETED or not self.esmtp:
            self._reply(R.NEED_EHLO)
            return None
        if self.state in _TRANSACTION_STATES:
            self._reply(R.BAD_SEQUENCE)
            return None
        return StartTls()

    def _cmd_auth(self, arg: str) -> Event | None:
        if self._need_ehlo():
            return None
        if self.authenticated:
            self._reply(R.ALREADY_AUTH)
            return None
        if self.state in _TRANSACTION_STATES:
            # RFC 4954 4: AUTH is not permitted during a mail transaction.
            self._reply(R.BAD_SEQUENCE)
            return None
        parts = arg.split()
        if not 1 <= len(parts) <= 2:
            self._reply(R.PARAM_SYNTAX)
            return None
        return Auth(parts[0].upper(), parts[1] if len(parts) == 2 else None)


_COMMANDS = {
    "EHLO": ServerProtocol._cmd_ehlo,
    "HELO": ServerProtocol._cmd_helo,
    "MAIL": ServerProtocol._cmd_mail,
    "RCPT": ServerProtocol._cmd_rcpt,
    "DATA": ServerProtocol._cmd_data,
    "BDAT": ServerProtocol._cmd_bdat,
    "RSET": ServerProtocol._cmd_rset,
    "NOOP": ServerProtocol._cmd_noop,
    "QUIT": ServerProtocol._cmd_quit,
    "VRFY": ServerProtocol._cmd_vrfy,
    "HELP": ServerProtocol._cmd_help,
    "STARTTLS": ServerProtocol._cmd_starttls,
    "AUTH": ServerProtocol._cmd_auth,
}


def _has_long_line(data: bytes, start: int, end: int, limit: int) -> bool:
    """Whether ``data[start:end]`` (``start`` just after a LF, ``data[end]``
    a LF) holds a line of ``limit`` octets or more before its LF.

    Hops from line start to line start instead of splitting into lines: the
    last LF within ``limit`` octets of a line start (``bytes.rfind``, C
    speed) ends a short line, as is every line before it in that window, so
    the next hop starts after it; without a LF there, the line is long."""
    rfind = data.rfind
    pos = start
    while end - pos >= limit:  # a shorter rest ends at the LF at ``end``
        nl = rfind(b"\n", pos, pos + limit)
        if nl < 0:
            return True
        pos = nl + 1
    return False


def ehlo_reply(hostname: str, client: str, extensions: list[str]) -> R.Reply:
    """The multi-line EHLO reply (RFC 5321 4.1.1.1); no enhanced code."""
    return R.Reply(250, "", (f"{hostname} greets {client}", *extensions))
