"""Rate-limit windows (apps.core.state), on both backends: Redis (a hash of second -> amount per
limit) and the embedded SQLite file. What a request is admitted with counts until 60 s after the
end of its second; both backends give the same answers as a plain model of that rule, whatever the
rate; a request admitted again is not charged twice, and its token correction lands in its own
second."""

from __future__ import annotations

import asyncio
import random
import types
import uuid

import pytest
from django.conf import settings

from apps.core import state as core_state
from apps.core.state import LimitCell, RedisState, SqliteState, tenant_key

T0 = 1_800_000_000.250  # seconds; its second ends at 1_800_000_001


@pytest.fixture(params=["redis", "sqlite"])
def backend(request, tmp_path):
    if request.param == "redis":
        if not settings.REDIS_URL:
            pytest.skip("REDIS_URL is not set")
        return RedisState()
    return SqliteState(str(tmp_path / "state.sqlite3"))


@pytest.fixture
def clock(monkeypatch):
    """Seconds since the epoch, as the state module reads them; set `clock.now`."""
    import time

    clock = types.SimpleNamespace(now=T0)
    monkeypatch.setattr(core_state, "time", types.SimpleNamespace(time=lambda: clock.now, monotonic=time.monotonic))
    return clock


def _cell(key: str, limit: int, cost: int = 1, kind: str = "requests") -> LimitCell:
    return LimitCell(key=key, limit=limit, cost=cost, kind=kind)


def _key() -> str:
    return tenant_key(990, "rl", "test", uuid.uuid4().hex[:8], "rpm")


def test_an_admitted_request_counts_until_60_s_after_its_second_ends(backend, clock):
    key = _key()

    async def admit(rid: str, at: float):
        clock.now = at
        return await backend.admit(request_id=rid, limits=[_cell(key, 2)], budgets=[], hold_ttl_s=60)

    async def scenario():
        a, b = await admit("a", T0), await admit("b", T0 + 0.5)
        c = await admit("c", T0 + 30)
        late = await admit("d", 1_800_000_060.999)  # 1 ms before a and b leave the window
        free = await admit("e", 1_800_000_061.000)
        return a, b, c, late, free

    a, b, c, late, free = asyncio.run(scenario())

    assert (a.ok, b.ok) == (True, True)
    assert [a.limits[0][0], b.limits[0][0]] == [1, 0]  # remaining
    assert a.limits[0][1] == 60_750  # reset: ms until its second's end + 60 s
    assert (c.ok, c.reason, c.retry_after_ms) == (False, "rate", 30_750)
    assert (late.ok, late.retry_after_ms) == (False, 1)
    assert free.ok and free.limits[0][0] == 1


def test_both_backends_count_as_the_model_does_at_any_rate(backend, clock):
    """Random arrivals over 150 s (bursts and gaps), random token costs: every answer (admitted
    or not, remaining, reset, retry-after) is what the rule computes from the admitted list."""
    key = tenant_key(990, "rl", "test", uuid.uuid4().hex[:8], "tpm")
    rng = random.Random(14)
    limit = 400
    admitted: list[tuple[int, int]] = []  # (second, cost)

    def model(now_ms: float, cost: int):
        live = [(s, c) for s, c in admitted if (s + 1) * 1000 > now_ms - 60_000]
        used = sum(c for _, c in live)
        oldest = min((s for s, _ in live), default=None)
        if used + cost > limit:
            retry = max(1, -int(-((oldest + 1) * 1000 + 60_000 - now_ms) // 1)) if oldest is not None else 1000
            return ("refused", retry)
        second = int(now_ms // 1000)
        first = min(oldest, second) if oldest is not None else second
        return ("ok", limit - used - cost, -int(-((first + 1) * 1000 + 60_000 - now_ms) // 1))

    async def scenario():
        t, answers = T0, []
        while t < T0 + 150:
            t += rng.choices([0.001, 0.01, 0.2, 0.9, 3.0, 20.0], weights=[40, 30, 15, 8, 5, 2])[0]
            cost = rng.randint(1, 60)
            clock.now = round(t, 3)
            now_ms = clock.now * 1000
            expected = model(now_ms, cost)
            out = await backend.admit(request_id=uuid.uuid4().hex, limits=[_cell(key, limit, cost, "tokens")],
                                      budgets=[], hold_ttl_s=60)
            got = ("ok", *out.limits[0]) if out.ok else ("refused", out.retry_after_ms)
            answers.append((got, expected))
            if out.ok:
                admitted.append((int(now_ms // 1000), cost))
        return answers

    answers = asyncio.run(scenario())

    assert len(answers) > 150
    assert sum(1 for got, _ in answers if got[0] == "refused") > 10  # the limit was reached, often
    assert [got for got, _ in answers] == [expected for _, expected in answers]


def test_the_same_request_admitted_again_is_charged_once_and_corrected_in_its_own_second(backend, clock):
    key = tenant_key(990, "rl", "test", uuid.uuid4().hex[:8], "tpm")

    async def admit(rid: str, cost: int, at: float):
        clock.now = at
        return await backend.admit(request_id=rid, limits=[_cell(key, 100, cost, "tokens")], budgets=[],
                                   hold_ttl_s=60)

    async def scenario():
        await admit("z", 5, T0 - 1)  # a second earlier
        first = await admit("a", 40, T0)
        again = await admit("a", 40, T0 + 5)  # a worker running it again: not charged a second time
        clock.now = T0 + 6
        await backend.settle(request_id="a", limits=[(_cell(key, 100, 40, "tokens"), -30)], budgets=[])
        other = await admit("b", 10, T0 + 7)  # sees a's 10 actual tokens, not its 40 estimated
        z_gone = await admit("c", 10, 1_800_000_060.5)  # z's second has left the window, a's has not
        a_gone = await admit("d", 10, 1_800_000_061.5)  # a's second has left it too; b's has not
        return first, again, other, z_gone, a_gone

    first, again, other, z_gone, a_gone = asyncio.run(scenario())

    assert first.ok and first.limits[0][0] == 55
    assert again.ok
    assert other.ok and other.limits[0][0] == 75
    assert z_gone.ok and z_gone.limits[0][0] == 70  # a (10 after its correction), b, c
    assert a_gone.ok and a_gone.limits[0][0] == 70  # b, c, d


def test_a_redis_window_stays_small_whatever_the_rate(clock):
    """The old log kept one entry per request for a minute (tens of thousands at a few hundred
    requests a second, per limit): a window now keeps one field per second."""
    if not settings.REDIS_URL:
        pytest.skip("REDIS_URL is not set")
    from apps.core import redis as core_redis

    backend, key = RedisState(), _key()

    async def scenario():
        for i in range(3000):  # 30 requests a second for 100 s
            clock.now = T0 + i / 30
            assert (await backend.admit(request_id=f"r{i}", limits=[_cell(key, 10_000)], budgets=[],
                                        hold_ttl_s=60)).ok
        client = core_redis.client()
        entries = {}
        async for name in client.scan_iter(match=f"{key}:*"):
            kind = (await client.type(name)).decode()
            entries[name.decode()] = await {"hash": client.hlen, "zset": client.zcard}.get(kind, client.strlen)(name)
        await client.aclose()
        return entries

    assert asyncio.run(scenario()) == {f"{key}:win": 61 + 2}  # the seconds in the window, their total, the oldest
