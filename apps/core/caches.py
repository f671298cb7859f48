"""Process caches and their reset, in one registry.

A module that keeps something in process registers how to forget it (`on_reset`), and a module
whose cache depends on data another app writes registers under a topic (`on_invalidate`), so
the writer can say "prices changed" (`invalidate("routing")`) without importing the reader.
Tests call `reset_all()` between tests."""

from __future__ import annotations

from collections.abc import Callable

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
