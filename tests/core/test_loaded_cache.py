"""apps.core.caches.Loaded: the hot path's process caches (keys, routes, tenants' policies)."""

import asyncio

import pytest

from apps.core.caches import Loaded


class Source:
    """A loader whose loads finish only when the test lets them."""

    def __init__(self):
        self.loads = 0
        self.gate = asyncio.Event()
        self.value = "v1"

    async def load(self, key):
        self.loads += 1
        value = self.value  # what the database held when the load started
        await self.gate.wait()
        return f"{key}:{value}"


async def test_concurrent_callers_of_a_missing_value_share_one_load():
    src = Source()
    cache = Loaded(src.load, lambda: 60)

    waiting = [asyncio.ensure_future(cache.get("k")) for _ in range(30)]
    await asyncio.sleep(0)
    src.gate.set()

    assert await asyncio.gather(*waiting) == ["k:v1"] * 30
    assert src.loads == 1


async def test_a_value_past_its_reload_point_is_served_while_it_reloads_in_the_background():
    src = Source()
    src.gate.set()
    cache = Loaded(src.load, lambda: 60, ahead=0.0)  # reload ahead as soon as a value has any age
    assert await cache.get("k") == "k:v1"
    src.gate.clear()
    src.value = "v2"

    assert await cache.get("k") == "k:v1"  # answered at once, the reload is still waiting
    await asyncio.sleep(0)  # the reload starts
    assert await cache.get("k") == "k:v1"
    assert src.loads == 2  # one reload, not one per caller
    src.gate.set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)

    assert await cache.get("k") == "k:v2"


async def test_an_expired_value_is_never_served():
    src = Source()
    src.gate.set()
    ttl = [60.0]
    cache = Loaded(src.load, lambda: ttl[0])
    assert await cache.get("k") == "k:v1"
    src.value = "v2"
    ttl[0] = 0.0

    assert await cache.get("k") == "k:v2"


async def test_a_load_started_before_forget_is_not_kept():
    src = Source()
    cache = Loaded(src.load, lambda: 60)
    early = asyncio.ensure_future(cache.get("k"))
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # the load has started
    cache.forget()  # e.g. a routing change committed while the old table was loading
    src.value = "v2"
    src.gate.set()

    assert await early == "k:v1"  # its caller asked before the change
    assert await cache.get("k") == "k:v2"
    assert src.loads == 2


async def test_a_failed_load_fails_its_callers_and_the_next_caller_loads_again():
    calls = []

    async def load(key):
        calls.append(key)
        if len(calls) == 1:
            raise RuntimeError("database away")
        return "ok"

    cache = Loaded(load, lambda: 60)

    with pytest.raises(RuntimeError):
        await cache.get("k")
    assert await cache.get("k") == "ok"
