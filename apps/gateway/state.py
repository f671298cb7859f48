"""Shared admission state: rate-limit cells and budget counters, with one Redis backend (atomic
Lua scripts: admission is one round trip, settle is one) and one in-process backend with the same
semantics for the embedded default.

Rate limits are sliding-window logs: each admitted request (or its tokens) is an entry that
counts for exactly 60 s, so no 60-second window ever admits more than the limit.

Budgets are integer micro-dollars: `spent` (settled cost, rebuilt from the ledger when missing),
`held` (sum of open holds) and the open holds themselves, each with an expiry so the hold of a
crashed request is given back.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from dataclasses import dataclass, field

from django.conf import settings

WINDOW_MS = 60_000.0


class StateUnavailable(Exception):
    """The shared state (Redis) could not be reached in time."""


@dataclass(slots=True)
class LimitCell:
    key: str
    limit: int
    cost: int
    share: float = 1.0


@dataclass(slots=True)
class BudgetCell:
    key: str
    limit_micros: int
    hold_micros: int
    hard: bool
    ttl_s: int  # how long the period's keys live (0: forever)


@dataclass(slots=True)
class AdmitOutcome:
    ok: bool
    reason: str = ""  # rate | budget | rebuild
    index: int = -1  # which limit or budget (0-based)
    retry_after_ms: int = 0
    remaining_micros: int = 0
    limits: list[tuple[int, int]] = field(default_factory=list)  # (remaining, reset_ms) per limit


# --- Redis --------------------------------------------------------------------------------------

_ADMIT = """
local now = tonumber(ARGV[1])
local rid = ARGV[2]
local hold_ttl = tonumber(ARGV[3])
local nl = tonumber(ARGV[4])
local nb = tonumber(ARGV[5])
local function purge(zkey, hkey, skey, upto)
  local stale = redis.call('ZRANGEBYSCORE', zkey, '-inf', upto, 'LIMIT', 0, 4000)
  if #stale > 0 then
    local amounts = redis.call('HMGET', hkey, unpack(stale))
    local sum = 0
    for _, v in ipairs(amounts) do sum = sum + tonumber(v or '0') end
    redis.call('DECRBY', skey, sum)
    redis.call('ZREM', zkey, unpack(stale))
    redis.call('HDEL', hkey, unpack(stale))
  end
end
local a = 6
local used = {}
for i = 1, nl do
  local k = (i - 1) * 3
  local limit = tonumber(ARGV[a]); local cost = tonumber(ARGV[a + 1]); local share = tonumber(ARGV[a + 2])
  a = a + 3
  purge(KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], now - 60000)
  local u = tonumber(redis.call('GET', KEYS[k + 3]) or '0')
  if u + cost > math.floor(limit * share + 0.000001) then
    local oldest = redis.call('ZRANGE', KEYS[k + 1], 0, 0, 'WITHSCORES')
    local retry = 1000
    if oldest[2] then retry = math.max(1, math.ceil(tonumber(oldest[2]) + 60000 - now)) end
    return {0, 'rate', i, retry, 0}
  end
  used[i] = u
end
for j = 1, nb do
  local k = nl * 3 + (j - 1) * 4
  local limit = tonumber(ARGV[a]); local hold = tonumber(ARGV[a + 1]); local hard = ARGV[a + 2]
  a = a + 4
  local spent = redis.call('GET', KEYS[k + 1])
  if not spent then return {0, 'rebuild', j, 0, 0} end
  spent = tonumber(spent)
  purge(KEYS[k + 3], KEYS[k + 4], KEYS[k + 2], now)
  local held = tonumber(redis.call('GET', KEYS[k + 2]) or '0')
  if hard == '1' and spent + held + hold > limit then
    return {0, 'budget', j, 0, limit - spent - held}
  end
end
local out = {1, '', 0, 0, 0}
a = 6
for i = 1, nl do
  local k = (i - 1) * 3
  local limit = tonumber(ARGV[a]); local cost = tonumber(ARGV[a + 1])
  a = a + 3
  redis.call('ZADD', KEYS[k + 1], now, rid)
  redis.call('HSET', KEYS[k + 2], rid, cost)
  redis.call('INCRBY', KEYS[k + 3], cost)
  for n = 1, 3 do redis.call('PEXPIRE', KEYS[k + n], 61000) end
  local oldest = redis.call('ZRANGE', KEYS[k + 1], 0, 0, 'WITHSCORES')
  table.insert(out, limit - used[i] - cost)
  table.insert(out, math.ceil(tonumber(oldest[2]) + 60000 - now))
end
for j = 1, nb do
  local k = nl * 3 + (j - 1) * 4
  local hold = tonumber(ARGV[a + 1]); local ttl = tonumber(ARGV[a + 3])
  a = a + 4
  if hold > 0 then
    redis.call('INCRBY', KEYS[k + 2], hold)
    redis.call('ZADD', KEYS[k + 3], now + hold_ttl, rid)
    redis.call('HSET', KEYS[k + 4], rid, hold)
  end
  if ttl > 0 then
    for n = 1, 4 do redis.call('EXPIRE', KEYS[k + n], ttl) end
  end
end
return out
"""

_SETTLE = """
local rid = ARGV[2]
local nl = tonumber(ARGV[3])
local nb = tonumber(ARGV[4])
local a = 5
for i = 1, nl do
  local k = (i - 1) * 3
  local delta = tonumber(ARGV[a])
  a = a + 2
  if delta ~= 0 and redis.call('HEXISTS', KEYS[k + 2], rid) == 1 then
    redis.call('HINCRBY', KEYS[k + 2], rid, delta)
    redis.call('INCRBY', KEYS[k + 3], delta)
  end
end
local out = {}
for j = 1, nb do
  local k = nl * 3 + (j - 1) * 4
  local actual = tonumber(ARGV[a]); a = a + 1
  local amount = redis.call('HGET', KEYS[k + 4], rid)
  if amount then
    redis.call('DECRBY', KEYS[k + 2], tonumber(amount))
    redis.call('HDEL', KEYS[k + 4], rid)
    redis.call('ZREM', KEYS[k + 3], rid)
  end
  local before = redis.call('GET', KEYS[k + 1])
  if before then
    table.insert(out, tonumber(before))
    if actual > 0 then
      table.insert(out, redis.call('INCRBY', KEYS[k + 1], actual))
    else
      table.insert(out, tonumber(before))
    end
  else
    table.insert(out, -1)
    table.insert(out, -1)
  end
end
return out
"""


def _limit_keys(key: str) -> list[str]:
    return [f"{key}:log", f"{key}:amounts", f"{key}:used"]


def _budget_keys(key: str) -> list[str]:
    return [f"{key}:spent", f"{key}:held", f"{key}:holds", f"{key}:amounts"]


class RedisState:
    def __init__(self, url: str):
        self.url = url
        self._clients: dict[int, tuple[asyncio.AbstractEventLoop, object, object, object]] = {}

    def _client(self):
        import redis.asyncio as aioredis

        loop = asyncio.get_running_loop()
        entry = self._clients.get(id(loop))
        if entry is None or entry[0] is not loop:
            timeout = settings.REDIS_TIMEOUT_S
            client = aioredis.Redis.from_url(self.url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                             health_check_interval=30)
            entry = (loop, client, client.register_script(_ADMIT), client.register_script(_SETTLE))
            self._clients = {k: v for k, v in self._clients.items() if not v[0].is_closed()}
            self._clients[id(loop)] = entry
        return entry[1:]

    async def _run(self, coro):
        import redis

        try:
            async with asyncio.timeout(settings.REDIS_TIMEOUT_S * 2):  # no extra task, unlike wait_for
                return await coro
        except (redis.RedisError, OSError, TimeoutError) as exc:
            raise StateUnavailable(type(exc).__name__) from exc

    async def admit(self, *, request_id: str, limits: list[LimitCell], budgets: list[BudgetCell],
                    hold_ttl_s: int) -> AdmitOutcome:
        _, admit_script, _ = self._client()
        keys = [k for c in limits for k in _limit_keys(c.key)] + [k for b in budgets for k in _budget_keys(b.key)]
        args: list = [time.time() * 1000, request_id, hold_ttl_s * 1000, len(limits), len(budgets)]
        for c in limits:
            args += [c.limit, c.cost, c.share]
        for b in budgets:
            args += [b.limit_micros, b.hold_micros, "1" if b.hard else "0", b.ttl_s]
        raw = await self._run(admit_script(keys=keys, args=args))
        ok, reason, index, retry_ms, remaining = int(raw[0]), raw[1], int(raw[2]), int(raw[3]), int(raw[4])
        if not ok:
            reason = reason.decode() if isinstance(reason, bytes) else reason
            return AdmitOutcome(ok=False, reason=reason, index=index - 1, retry_after_ms=retry_ms,
                                remaining_micros=remaining)
        pairs = [(int(raw[i]), int(raw[i + 1])) for i in range(5, len(raw), 2)]
        return AdmitOutcome(ok=True, limits=pairs)

    async def settle(self, *, request_id: str, limits: list[tuple[LimitCell, int]],
                     budgets: list[tuple[BudgetCell, int]]) -> list[tuple[int, int]]:
        """Correct token limits by their delta, swap each budget's hold for the actual micros.
        Returns (spent_before, spent_after) per budget (-1 when its counter is missing)."""
        _, _, settle_script = self._client()
        keys = [k for c, _ in limits for k in _limit_keys(c.key)] + [k for b, _ in budgets for k in _budget_keys(b.key)]
        args: list = [time.time() * 1000, request_id, len(limits), len(budgets)]
        for c, delta in limits:
            args += [delta, c.limit]
        for _, actual in budgets:
            args.append(actual)
        raw = await self._run(settle_script(keys=keys, args=args))
        return [(int(raw[i]), int(raw[i + 1])) for i in range(0, len(raw), 2)]

    async def set_spent(self, *, key: str, micros: int, ttl_s: int) -> None:
        client, _, _ = self._client()
        await self._run(client.set(f"{key}:spent", micros, nx=True, ex=ttl_s or None))

    async def usage(self, *, keys: list[str]) -> list[tuple[int | None, int]]:
        client, _, _ = self._client()
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.get(f"{key}:spent")
            pipe.get(f"{key}:held")
        raw = await self._run(pipe.execute())
        return [(int(raw[i]) if raw[i] is not None else None, int(raw[i + 1] or 0)) for i in range(0, len(raw), 2)]


# --- in process -----------------------------------------------------------------------------


class LocalState:
    """The same semantics in one process (embedded default). A lock makes each step atomic
    across threads (a threaded Celery worker); no step awaits while holding it.

    Spent counters are re-read from the ledger every LOCAL_SPENT_REFRESH_S, so spend settled by
    another process of the embedded mode (the worker) is seen here too."""

    LOCAL_SPENT_REFRESH_S = 5.0

    def __init__(self):
        self._lock = threading.Lock()
        self._logs: dict[str, dict[str, tuple[float, int]]] = {}  # limit -> rid -> (at_ms, cost)
        self._spent: dict[str, tuple[int, float]] = {}
        self._holds: dict[str, dict[str, tuple[int, float]]] = {}

    def reset(self) -> None:
        with self._lock:
            self._logs.clear()
            self._spent.clear()
            self._holds.clear()

    def _window(self, key: str, now_ms: float) -> dict[str, tuple[float, int]]:
        log = self._logs.setdefault(key, {})
        for rid in [r for r, (at, _) in log.items() if at <= now_ms - WINDOW_MS]:
            del log[rid]
        return log

    def _held(self, key: str, now_ms: float) -> int:
        holds = self._holds.setdefault(key, {})
        for rid in [r for r, (_, exp) in holds.items() if exp <= now_ms]:
            del holds[rid]
        return sum(a for a, _ in holds.values())

    async def admit(self, *, request_id: str, limits: list[LimitCell], budgets: list[BudgetCell],
                    hold_ttl_s: int) -> AdmitOutcome:
        now = time.time() * 1000
        with self._lock:
            used = []
            for i, c in enumerate(limits):
                log = self._window(c.key, now)
                u = sum(cost for _, cost in log.values())
                if u + c.cost > math.floor(c.limit * c.share + 1e-6):
                    oldest = min((at for at, _ in log.values()), default=None)
                    retry = max(1, math.ceil(oldest + WINDOW_MS - now)) if oldest is not None else 1000
                    return AdmitOutcome(ok=False, reason="rate", index=i, retry_after_ms=retry)
                used.append(u)
            for j, b in enumerate(budgets):
                spent = self._spent.get(b.key)
                if spent is None or time.monotonic() - spent[1] > self.LOCAL_SPENT_REFRESH_S:
                    return AdmitOutcome(ok=False, reason="rebuild", index=j)
                held = self._held(b.key, now)
                if b.hard and spent[0] + held + b.hold_micros > b.limit_micros:
                    return AdmitOutcome(ok=False, reason="budget", index=j,
                                        remaining_micros=b.limit_micros - spent[0] - held)
            pairs = []
            for c, u in zip(limits, used, strict=True):
                log = self._logs[c.key]
                log[request_id] = (now, c.cost)
                oldest = min(at for at, _ in log.values())
                pairs.append((c.limit - u - c.cost, math.ceil(oldest + WINDOW_MS - now)))
            for b in budgets:
                if b.hold_micros > 0:
                    self._holds.setdefault(b.key, {})[request_id] = (b.hold_micros, now + hold_ttl_s * 1000)
            return AdmitOutcome(ok=True, limits=pairs)

    async def settle(self, *, request_id: str, limits: list[tuple[LimitCell, int]],
                     budgets: list[tuple[BudgetCell, int]]) -> list[tuple[int, int]]:
        out = []
        with self._lock:
            for c, delta in limits:
                entry = self._logs.get(c.key, {}).get(request_id)
                if delta and entry is not None:
                    self._logs[c.key][request_id] = (entry[0], entry[1] + delta)
            for b, actual in budgets:
                self._holds.get(b.key, {}).pop(request_id, None)
                spent = self._spent.get(b.key)
                if spent is None:
                    out.append((-1, -1))
                    continue
                self._spent[b.key] = (spent[0] + actual, spent[1])
                out.append((spent[0], spent[0] + actual))
        return out

    async def set_spent(self, *, key: str, micros: int, ttl_s: int) -> None:
        with self._lock:
            self._spent[key] = (micros, time.monotonic())

    async def usage(self, *, keys: list[str]) -> list[tuple[int | None, int]]:
        now = time.time() * 1000
        with self._lock:
            out = []
            for key in keys:
                spent = self._spent.get(key)
                fresh = spent is not None and time.monotonic() - spent[1] <= self.LOCAL_SPENT_REFRESH_S
                out.append((spent[0] if fresh else None, self._held(key, now)))
            return out


_state: RedisState | LocalState | None = None


def state() -> RedisState | LocalState:
    global _state
    if _state is None:
        _state = RedisState(settings.REDIS_URL) if settings.REDIS_URL else LocalState()
    return _state
