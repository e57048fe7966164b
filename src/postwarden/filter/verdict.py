"""What a content filter is given and what it answers.

A filter is an object with a ``name`` and ``check(message)`` returning a
:class:`FilterVerdict`: one of five actions (accept, add headers,
quarantine, reject 5xx, tempfail 4xx), the reason for the log and the rules
that fired.  ``check`` is a coroutine for filters that talk to a daemon
(clamd, rspamd) and a plain function for the built-in ones, so that the
default chain never yields to the event loop.

A filter that cannot decide (daemon down, protocol error) raises
:class:`FilterUnavailable`; the chain turns that into 451 or, where the
administrator chose fail-open, into a warning header.

Security exposure: none by itself; replies built here go to clients and
carry only generic text (signature names and rule details go to the log).
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

from postwarden import reply as R
from postwarden.filter import mime
from postwarden.message import rawheaders


class Action(enum.IntEnum):
    """Ordered by strength: the chain keeps the strongest verdict."""

    ACCEPT = 0
    HEADERS = 1  # accept with added header fields
    QUARANTINE = 2  # accept, hold for review (not delivered)
    TEMPFAIL = 3  # 4xx
    REJECT = 4  # 5xx


# Replies: generic texts (the log has the detail).
VIRUS_FOUND = R.Reply(554, "5.7.1", "Message rejected: virus found")
SPAM_REJECTED = R.Reply(554, "5.7.1", "Message rejected as spam")
SPAM_TEMPFAIL = R.Reply(451, "4.7.1", "Message deferred, try again later")
GREYLISTED = R.Reply(451, "4.7.1", "Greylisted, try again later")
ATTACHMENT_BLOCKED = R.Reply(554, "5.7.1", "Message rejected: blocked attachment type")
CONTENT_REFUSED = R.Reply(554, "5.7.1", "Message rejected by content policy")
FILTER_UNAVAILABLE = R.Reply(451, "4.3.0", "Content filter unavailable, try again later")


class FilterUnavailable(Exception):
    """The filter could not decide (daemon down, timeout, bad answer)."""


@dataclass(frozen=True, slots=True)
class FilterVerdict:
    action: Action
    reason: str = ""
    reply: R.Reply | None = None  # for REJECT and TEMPFAIL
    headers: tuple[tuple[str, str], ...] = ()  # added for HEADERS (and kept otherwise)
    rules: tuple[str, ...] = ()  # what fired, for the log and the quarantine
    score: float | None = None
    notify: bool = False  # tell the postmaster (outbound review)
    subject: str = ""  # a new Subject for the message (rspamd "rewrite subject")


ACCEPT = FilterVerdict(Action.ACCEPT)


@dataclass
class FilterMessage:
    """One message as the filters see it: the content as written (header
    block and body, without the fields this server prepends) and the facts
    of the session."""

    data: bytes
    direction: str  # "inbound" (mx) or "outbound" (authenticated submission)
    client_ip: str = ""
    helo: str = ""
    sender: str = ""
    recipients: tuple[str, ...] = ()
    auth_user: str = ""
    hostname: str = ""
    queue_id: str = ""
    # Authentication-Results this server added (SPF, DKIM, DMARC outcome).
    auth_results: bytes = b""
    _header: rawheaders.HeaderBlock | None = field(default=None, init=False, repr=False,
                                                   compare=False)

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def header(self) -> rawheaders.HeaderBlock:
        """The header fields (parsed once, on first use; every filter reads
        them, so this is a plain attribute check afterwards)."""
        head = self._header
        if head is None:
            head = self._header = rawheaders.parse_header(self.data)
        return head

    def field_value(self, name: bytes) -> bytes | None:
        """The first field called ``name`` (unfolded, stripped), or None."""
        f = self.header.first(name.lower())
        return None if f is None else f.value(self.data).strip()

    @property
    def body(self) -> bytes:
        return self.data[self.header.body_start:]

    @property
    def multipart(self) -> bool:
        ctype = self.field_value(b"content-type")
        return ctype is not None and ctype[:10].lower() == b"multipart/"

    @cached_property
    def mime(self) -> mime.Structure:
        """The MIME parts (walked once, on first use, within the bounds of
        :mod:`postwarden.filter.mime`)."""
        return mime.walk(self.data, self.header)


class Filter(Protocol):
    name: str

    def check(self, message: FilterMessage) -> FilterVerdict | Awaitable[FilterVerdict]:
        ...
