"""Value types for the envelope of a message and the connection it came on.

These are plain data; parsing of untrusted text into them lives in
:mod:`postwarden.smtp.address` and :mod:`postwarden.smtp.protocol`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Address:
    """A mailbox ``local@domain``.

    ``domain`` is stored lower-cased (domains are case-insensitive); ``local``
    is kept as given (RFC 5321 2.4: local parts may be case-sensitive), but
    lookups of local users fold it to lower case, as Postfix does.
    """

    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def key(self) -> str:
        """Case-folded form used to look the address up."""
        return f"{self.local.lower()}@{self.domain.lower()}"

    @property
    def is_ascii(self) -> bool:
        return str(self).isascii()

    @classmethod
    def parse_simple(cls, text: str) -> Address:
        """Split a plain ``local@domain`` (trusted input such as the CLI)."""
        local, sep, domain = text.strip().rpartition("@")
        if not sep or not local or not domain:
            raise ValueError(f"not an address: {text!r}")
        return cls(local, domain.lower().rstrip("."))


@dataclass(frozen=True, slots=True)
class MailParams:
    """MAIL FROM parameters (RFC 1870 SIZE, RFC 6152 BODY, RFC 6531 SMTPUTF8,
    RFC 3461 RET/ENVID, RFC 4954 AUTH)."""

    size: int | None = None
    body: str | None = None  # "7BIT" | "8BITMIME" | "BINARYMIME"
    smtputf8: bool = False
    ret: str | None = None  # "FULL" | "HDRS"
    envid: str | None = None  # xtext-decoded
    auth: str | None = None


@dataclass(frozen=True, slots=True)
class RcptParams:
    """RCPT TO parameters (RFC 3461 NOTIFY and ORCPT)."""

    notify: tuple[str, ...] | None = None  # ("NEVER",) or subset of SUCCESS/FAILURE/DELAY
    orcpt: str | None = None  # "addr-type;xtext-decoded address"


@dataclass(frozen=True, slots=True)
class Recipient:
    address: Address
    params: RcptParams = RcptParams()


@dataclass(slots=True)
class Envelope:
    """The envelope of one message: sender (``None`` is the null path ``<>``)
    and accepted recipients with their DSN parameters."""

    sender: Address | None
    params: MailParams = MailParams()
    recipients: list[Recipient] = field(default_factory=list)


@dataclass(slots=True)
class ConnectionInfo:
    """What is known about the client of one session."""

    session_id: str
    listener: str
    peer_ip: str
    peer_port: int
    local_ip: str = ""
    local_port: int = 0
    helo: str = ""
    esmtp: bool = False
    tls_version: str = ""
    tls_cipher: str = ""
    auth_user: str = ""
    auth_mechanism: str = ""
    # On an allow list ([access] allow): exempt from the protection checks
    # (connection limits, bans, rate limits, DNSBL, greylisting).
    trusted: bool = False

    @property
    def tls(self) -> bool:
        return bool(self.tls_version)
