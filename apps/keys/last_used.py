"""Last-use times of API keys, collected in process and written in bulk.

The data plane calls `touch` on every authenticated request (a dict assignment, no I/O). At most
every GATEWAY_LAST_USED_FLUSH_S seconds, `flush_soon` hands what was collected to a background task
that writes it with `api_key_last_used_write` (one UPDATE per key used in the interval, never per
request); no request waits for it. What a process collected after its last flush is lost if it is
killed: last_used_at is a hint, not the ledger (the ledger has every request).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from datetime import UTC, datetime

from django.conf import settings

from .services import api_key_last_used_write

log = logging.getLogger(__name__)

_seen: dict[int, datetime] = {}
_lock = threading.Lock()
_last_flush = time.monotonic()
_tasks: set[asyncio.Task] = set()


def touch(key_id: int) -> None:
    _seen[key_id] = datetime.now(UTC)


def take() -> dict[int, datetime]:
    """Everything collected so far, emptying the buffer."""
    global _seen
    with _lock:
        batch, _seen = _seen, {}
    return batch


def flush() -> int:
    """Write what was collected now (sync). Returns how many keys changed."""
    global _last_flush
    _last_flush = time.monotonic()
    batch = take()
    return api_key_last_used_write(seen=batch) if batch else 0


async def _flush_async(batch: dict[int, datetime]) -> None:
    try:
        from apps.core.db import db_sync

        await db_sync(api_key_last_used_write, seen=batch)
    except Exception as exc:  # a hint lost is not worth failing anything for
        log.warning("could not write last_used_at for %d keys (%s)", len(batch), type(exc).__name__)


def flush_soon() -> None:
    """From the event loop: start a background write when the flush interval has passed."""
    global _last_flush
    now = time.monotonic()
    if now - _last_flush < settings.GATEWAY_LAST_USED_FLUSH_S or not _seen:
        return
    _last_flush = now
    task = asyncio.get_running_loop().create_task(_flush_async(take()))
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


def reset() -> None:
    """Forget everything collected (tests)."""
    global _last_flush
    take()
    _last_flush = time.monotonic()
