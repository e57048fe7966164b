"""SMTP replies as typed values, and the verdicts checks return.

A :class:`Reply` is a code, an enhanced status code (RFC 3463) and a text.
Replies are built here, not assembled as strings across the code base: the
client sees the generic text of these constants, the log holds the detail.

Security exposure: reply texts go to untrusted clients. They never carry
internal detail (paths, exception text, signature names).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: ``code`` (e.g. 250), ``enhanced`` (e.g. "2.1.0") and text.

    ``enhanced`` is empty for replies that carry no enhanced status code
    (the greeting and the EHLO reply, RFC 2034 section 3).
    """

    code: int
    enhanced: str
    text: str | tuple[str, ...]

    @property
    def positive(self) -> bool:
        """True for 2xx and 3xx replies (the command was accepted)."""
        return self.code < 400

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def lines(self) -> tuple[str, ...]:
        return (self.text,) if isinstance(self.text, str) else self.text

    def to_bytes(self) -> bytes:
        """Serialise as one or more CRLF-terminated lines (RFC 5321 4.2.1)."""
        lines = self.lines() or ("",)
        out = []
        last = len(lines) - 1
        for i, line in enumerate(lines):
            sep = " " if i == last else "-"
            if self.enhanced:
                out.append(f"{self.code}{sep}{self.enhanced} {line}\r\n")
            else:
                out.append(f"{self.code}{sep}{line}\r\n")
        return "".join(out).encode("utf-8", "replace")

    def with_text(self, text: str) -> Reply:
        return Reply(self.code, self.enhanced, text)

    def __str__(self) -> str:
        first = self.lines()[0] if self.lines() else ""
        return f"{self.code} {self.enhanced} {first}".replace("  ", " ")


# Standard replies.  Names follow the situation, not the code.
OK = Reply(250, "2.0.0", "OK")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RCPT_OK = Reply(250, "2.1.5", "Recipient OK")
RESET_OK = Reply(250, "2.0.0", "Reset OK")
NOOP_OK = Reply(250, "2.0.0", "OK")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
READY_TLS = Reply(220, "2.0.0", "Ready to start TLS")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
VRFY_CANNOT = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = Reply(214, "2.0.0", ("Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT",
                           "VRFY HELP STARTTLS AUTH; see RFC 5321"))

SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
TIMEOUT = Reply(421, "4.4.2", "Timeout, closing connection")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
TOO_MANY_COMMANDS = Reply(421, "4.7.0", "Too many commands, closing connection")
TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available")
TEMP_FAILURE = Reply(451, "4.3.0", "Temporary failure, please try again later")
STORAGE_FULL = Reply(452, "4.3.1", "Insufficient system storage")
TOO_MANY_RCPTS = Reply(452, "4.5.3", "Too many recipients")
AUTH_TEMPFAIL = Reply(454, "4.7.0", "Temporary authentication failure")

SYNTAX_ERROR = Reply(500, "5.5.2", "Syntax error, command unrecognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
PARAM_SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
ADDRESS_SYNTAX = Reply(501, "5.1.3", "Bad address syntax")
SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
NEED_EHLO = Reply(503, "5.5.1", "Send EHLO/HELO first")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command first")
NEED_RCPT = Reply(503, "5.5.1", "Need RCPT command first")
NESTED_MAIL = Reply(503, "5.5.1", "Nested MAIL command")
ALREADY_TLS = Reply(503, "5.5.1", "TLS already active")
ALREADY_AUTH = Reply(503, "5.5.1", "Already authenticated")
PARAM_UNRECOGNIZED = Reply(555, "5.5.4", "Unsupported MAIL/RCPT parameter")
MECH_UNSUPPORTED = Reply(504, "5.5.4", "Unrecognized authentication mechanism")
AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
AUTH_BAD_ENCODING = Reply(501, "5.5.2", "Cannot decode response")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
TLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
UNKNOWN_USER = Reply(550, "5.1.1", "Recipient address rejected: user unknown")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address not owned by the authenticated user")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
LINE_LIMIT_EXCEEDED = Reply(550, "5.6.0", "Message contains lines longer than 998 characters")
SMTPUTF8_REQUIRED = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
ACCESS_DENIED = Reply(554, "5.7.1", "Access denied")


class Outcome(enum.Enum):
    """The four outcomes of a check (Postfix OK/DUNNO/REJECT/DEFER)."""

    ACCEPT = "accept"
    NO_OPINION = "no-opinion"
    REJECT = "reject"
    TEMPFAIL = "tempfail"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a policy check decided, with the reply to send and the log detail."""

    outcome: Outcome
    reply: Reply | None = None
    reason: str = ""

    @property
    def final(self) -> bool:
        return self.outcome is not Outcome.NO_OPINION


NO_OPINION = Verdict(Outcome.NO_OPINION)


def accept(reason: str = "") -> Verdict:
    return Verdict(Outcome.ACCEPT, None, reason)


def reject(reply: Reply, reason: str) -> Verdict:
    return Verdict(Outcome.REJECT, reply, reason)


def tempfail(reason: str, reply: Reply = TEMP_FAILURE) -> Verdict:
    return Verdict(Outcome.TEMPFAIL, reply, reason)
