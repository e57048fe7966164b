"""Background tasks of long-running services (the alert evaluator, the
replicas' refreshers, the webhook poster, the queue's garbage collector and
heartbeat): how one is stopped.

Security exposure: none; it cancels tasks this process started.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` (if any) and wait until it has ended, so that nothing
    it holds (a connection, a lock) outlives the service's ``stop``."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
