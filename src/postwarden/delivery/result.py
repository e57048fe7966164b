"""The outcome of one delivery attempt to one mailbox or recipient.

Every transport (Maildir now; LMTP and remote SMTP later) answers with a
:class:`DeliveryResult`: delivered, deferred (temporary: the recipient stays
queued and is retried) or failed (permanent: a bounce is due).  Temporary is
the default whenever a transport cannot prove the failure is permanent.

The ``dsn`` is an RFC 3463 enhanced status code; ``text`` is short and
generic because it ends up in bounces sent to the sender.  Details (errno,
paths) go to the log only.

Security exposure: none beyond carrying text that may later be quoted in a
bounce; transports must not put internal paths or secrets into ``text``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from postwarden.storage.base import RcptStatus


class DeliveryStatus(enum.Enum):
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    status: DeliveryStatus
    dsn: str  # RFC 3463 enhanced status code, e.g. "2.0.0", "4.4.1", "5.1.1"
    text: str
    # Who answered: "local", "lmtp:unix:/path", "mx.example.org[192.0.2.1]:25".
    relay: str = ""
    # The receiving peer advertised DSN and took the DSN parameters over, so
    # it (not we) sends any success notice (RFC 3461 5.2.2 "relayed").
    peer_dsn: bool = False

    @classmethod
    def delivered(cls, text: str, dsn: str = "2.0.0", *, relay: str = "",
                  peer_dsn: bool = False) -> DeliveryResult:
        return cls(DeliveryStatus.DELIVERED, dsn, text, relay, peer_dsn)

    @classmethod
    def deferred(cls, dsn: str, text: str, *, relay: str = "") -> DeliveryResult:
        return cls(DeliveryStatus.DEFERRED, dsn, text, relay)

    @classmethod
    def failed(cls, dsn: str, text: str, *, relay: str = "") -> DeliveryResult:
        return cls(DeliveryStatus.FAILED, dsn, text, relay)

    @property
    def reply(self) -> str:
        """``"<dsn> <text>"``: what is stored as the recipient's last reply."""
        return f"{self.dsn} {self.text}"

    @property
    def rcpt_status(self) -> RcptStatus:
        return {
            DeliveryStatus.DELIVERED: RcptStatus.DELIVERED,
            DeliveryStatus.DEFERRED: RcptStatus.DEFERRED,
            DeliveryStatus.FAILED: RcptStatus.FAILED,
        }[self.status]


def worst(results: list[DeliveryResult]) -> DeliveryResult:
    """Combine the results for one recipient expanded to several mailboxes.

    Any deferral wins (the recipient is retried: at-least-once delivery may
    then duplicate the copies that succeeded), then any failure.
    """
    if not results:
        raise ValueError("no results to combine")
    for status in (DeliveryStatus.DEFERRED, DeliveryStatus.FAILED):
        for r in results:
            if r.status is status:
                return r
    return results[0]
