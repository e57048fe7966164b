"""Retry scheduling: pure functions of time, no I/O.

Deferred recipients are retried with exponential backoff (Postfix's
``minimal_backoff_time``/``maximal_backoff_time``), and a recipient still
undelivered after the queue lifetime (``maximal_queue_lifetime``) expires.
RFC 5321 4.5.4.1 asks for a retry interval of at least 30 minutes and a
give-up time of at least 4-5 days; the defaults live in
:class:`postwarden.config.QueueConfig`.

Security exposure: none (arithmetic on trusted configuration).
"""

from __future__ import annotations

# Whatever the configuration says, never retry sooner than this: a zero
# ``retry_min`` must not turn a permanent deferral into a busy loop.
RETRY_FLOOR = 1.0


def backoff(attempts: int, retry_min: float, retry_max: float) -> float:
    """Seconds to wait after ``attempts`` attempts (1 after the first)."""
    low = max(retry_min, RETRY_FLOOR)
    high = max(retry_max, low)
    if attempts <= 1:
        return low
    # Cap the exponent before computing: 2**attempts overflows float for a
    # recipient retried thousands of times.
    exponent = min(attempts - 1, 64)
    return float(min(high, low * 2.0**exponent))


def next_attempt(attempts: int, now: float, retry_min: float, retry_max: float) -> float:
    """When to try again after the ``attempts``-th attempt failed at ``now``."""
    return now + backoff(attempts, retry_min, retry_max)


def expired(received_at: float, now: float, lifetime: float) -> bool:
    """The message has been queued for ``lifetime`` seconds or more."""
    return now - received_at >= lifetime
