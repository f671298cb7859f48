"""Process caches and their reset, in one registry.

A module that keeps something in process registers how to forget it (`on_reset`), and a module
whose cache depends on data another app writes registers under a topic (`on_invalidate`), so
the writer can say "prices changed" (`invalidate("routing")`) without importing the reader.
Tests call `reset_all()` between tests."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

_resets: list[Callable[[], None]] = []
_topics: dict[str, list[Callable[[], None]]] = {}

ROUTING = "routing"  # aliases, deployments, prices, tenants' limits and budgets


def on_reset(fn: Callable[[], None]) -> Callable[[], None]:
    if fn not in _resets:
        _resets.append(fn)
    return fn


def on_invalidate(topic: str, fn: Callable[[], None]) -> None:
    handlers = _topics.setdefault(topic, [])
    if fn not in handlers:
        handlers.append(fn)


def invalidate(topic: str) -> None:
    for fn in _topics.get(topic, ()):
        fn()


def reset_all() -> None:
    for fn in list(_resets):
        fn()
    for handlers in _topics.values():
        for fn in handlers:
            fn()


class Loaded:
    """Values loaded from the database and kept in process for `ttl_s()` seconds each, by key, for
    the hot path: a hit is a dict lookup, and the database sees one load per key and period,
    whatever the traffic.

    - Past `ahead` of its ttl, a value is reloaded in the background by the first caller that sees
      it, while every caller keeps the loaded one: under steady traffic no request waits for a load.
    - A value is never served past its ttl (counted from when its load started): a revoked key or a
      changed limit reaches every process within the ttl, as before.
    - One load per key at a time: callers that need a value (none yet, or expired) await the load in
      flight instead of each starting its own (a thundering herd on every expiry, under load).
    - `forget()` (and `reset_all`) drops every value; a load that started before it is not kept.
    """

    def __init__(self, load: Callable[[object], Awaitable[object]], ttl_s: Callable[[], float], *,
                 ahead: float = 0.5, max_entries: int = 10_000):
        self._load, self._ttl_s, self._ahead, self._max = load, ttl_s, ahead, max_entries
        self._values: dict[object, tuple[float, object]] = {}
        self._loading: dict[object, asyncio.Task] = {}
        self._generation = 0
        on_reset(self.forget)

    async def get(self, key: object = None):
        entry = self._values.get(key)
        if entry is not None:
            ttl = self._ttl_s()
            age = time.monotonic() - entry[0]
            if age <= ttl:
                if age > ttl * self._ahead:
                    self._start(key)
                return entry[1]
        # shield: a caller that goes away does not cancel the load the others await
        return await asyncio.shield(self._start(key))

    def forget(self) -> None:
        self._generation += 1
        self._values.clear()
        self._loading.clear()

    def _start(self, key) -> asyncio.Task:
        loop = asyncio.get_running_loop()
        task = self._loading.get(key)
        if task is None or task.done() or task.get_loop() is not loop:
            task = self._loading[key] = loop.create_task(self._run(key, self._generation))
            task.add_done_callback(_retrieved)
        return task

    async def _run(self, key, generation: int):
        started = time.monotonic()
        try:
            value = await self._load(key)
        finally:
            if self._loading.get(key) is asyncio.current_task():
                del self._loading[key]
        if generation == self._generation:
            if len(self._values) >= self._max:
                self._values.clear()
            self._values[key] = (started, value)
        return value


def _retrieved(task: asyncio.Task) -> None:
    """A background reload that failed: the value in hand stays until its ttl; say why once."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("process cache: a reload failed (%s)", task.exception())
