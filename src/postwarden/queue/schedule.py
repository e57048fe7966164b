"""Retry scheduling: pure functions of time, no I/O.

Deferred recipients are retried with exponential backoff (Postfix's
``minimal_backoff_time``/``maximal_backoff_time``), and a recipient still
undelivered after the queue lifetime (``maximal_queue_lifetime``) expires.
RFC 5321 4.5.4.1 asks for a retry interval of at least 30 minutes and a
give-up time of at least 4-5 days; the defaults live in
:class:`postwarden.config.QueueConfig`.

Each delay is spread by up to +-:data:`JITTER` when a random source is
given, so that the many recipients deferred by one outage (a destination
down, a full disk) do not all come back in the same second.  Tests pass a
seeded :class:`random.Random` and get the same times on every run.

Security exposure: none (arithmetic on trusted configuration).
"""

from __future__ import annotations

import random

# Whatever the configuration says, never retry sooner than this: a zero
# ``retry_min`` must not turn a permanent deferral into a busy loop.
RETRY_FLOOR = 1.0
# Relative spread of retry times: a delay d becomes uniform in d*(1 +- JITTER).
JITTER = 0.15


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


def jittered(delay: float, rng: random.Random | None) -> float:
    """``delay`` spread by up to +-JITTER (unchanged without ``rng``)."""
    if rng is None:
        return delay
    return max(RETRY_FLOOR, delay * rng.uniform(1.0 - JITTER, 1.0 + JITTER))


def next_attempt(attempts: int, now: float, retry_min: float, retry_max: float,
                 rng: random.Random | None = None) -> float:
    """When to try again after the ``attempts``-th attempt failed at ``now``."""
    return now + jittered(backoff(attempts, retry_min, retry_max), rng)


def delay_warning_due(received_at: float, now: float, delay_warning: float) -> bool:
    """A deferred recipient is old enough for its one delay warning (0: never)."""
    return delay_warning > 0 and now - received_at >= delay_warning


def expired(received_at: float, now: float, lifetime: float) -> bool:
    """The message has been queued for ``lifetime`` seconds or more."""
    return now - received_at >= lifetime
