"""Shared deployment state for routing: cooldowns and the providers' own RPM/TPM quotas.

Cooldown: a deployment that fails GATEWAY_COOLDOWN_FAILURES times (retryable failures: connect
errors, timeouts, 429, 5xx) within GATEWAY_COOLDOWN_WINDOW_S is skipped by every instance for
GATEWAY_COOLDOWN_S. Quotas: a deployment with `rpm` / `tpm` set takes one request and its
estimated tokens from a per-minute window before each attempt; at its quota it is skipped.

The state lives in Redis when REDIS_URL is set (every instance sees it, atomic Lua scripts) and in
process otherwise (the embedded single-instance mode). Redis calls have short timeouts
(REDIS_TIMEOUT_S); when Redis fails, the in-process state is used instead, so routing degrades to
per-instance state and never hangs on Redis.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from django.conf import settings

from apps.core import redis as core_redis

log = logging.getLogger(__name__)

PREFIX = "llms:gw:"


def _key(deployment_id: int, what: str) -> str:
    """`llms:gw:{d<id>}:<what>`: a deployment's keys share a hash tag (one Redis Cluster slot), so
    the failure script can touch its failure log and its cooldown together."""
    return f"{PREFIX}{{d{deployment_id}}}:{what}"


def _failures() -> int:
    return int(getattr(settings, "GATEWAY_COOLDOWN_FAILURES", 3))


def _window_s() -> float:
    return float(getattr(settings, "GATEWAY_COOLDOWN_WINDOW_S", 60.0))


def _cooldown_s() -> float:
    return float(getattr(settings, "GATEWAY_COOLDOWN_S", 30.0))


class LocalBackend:
    """In-process state: one instance's view (the embedded mode, and the fallback when Redis fails)."""

    def __init__(self):
        self.failures: dict[int, deque[float]] = {}
        self.until: dict[int, float] = {}
        self.quota: dict[tuple[int, int], list[int]] = {}

    async def cooling(self, ids: list[int]) -> dict[int, float]:
        now = time.monotonic()
        return {i: self.until[i] - now for i in ids if self.until.get(i, 0) > now}

    async def failure_record(self, deployment_id: int) -> bool:
        now = time.monotonic()
        window = self.failures.setdefault(deployment_id, deque())
        window.append(now)
        while window and window[0] <= now - _window_s():
            window.popleft()
        if len(window) >= _failures():
            window.clear()
            self.until[deployment_id] = now + _cooldown_s()
            return True
        return False

    async def quota_take(self, deployment_id: int, minute: int, rpm: int, tpm: int, tokens: int) -> bool:
        if len(self.quota) > 10_000:
            self.quota = {k: v for k, v in self.quota.items() if k[1] >= minute}
        used = self.quota.setdefault((deployment_id, minute), [0, 0])
        if (rpm and used[0] + 1 > rpm) or (tpm and used[1] and used[1] + tokens > tpm):
            return False
        used[0] += 1
        used[1] += tokens
        return True

    async def quota_adjust(self, deployment_id: int, minute: int, tokens: int) -> None:
        used = self.quota.get((deployment_id, minute))
        if used is not None:
            used[1] = max(0, used[1] + tokens)


_FAILURE_LUA = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
if n >= tonumber(ARGV[2]) then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

_QUOTA_LUA = """
local r = tonumber(redis.call('HGET', KEYS[1], 'r') or '0')
local t = tonumber(redis.call('HGET', KEYS[1], 't') or '0')
local rpm, tpm, tokens = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if (rpm > 0 and r + 1 > rpm) or (tpm > 0 and t > 0 and t + tokens > tpm) then return 0 end
redis.call('HINCRBY', KEYS[1], 'r', 1)
redis.call('HINCRBY', KEYS[1], 't', tokens)
redis.call('EXPIRE', KEYS[1], 120)
return 1
"""


class RedisBackend:
    """State in Redis, shared by every instance, through the process's one client (apps.core.redis)."""

    def __init__(self):
        self._checked: dict[int, tuple[float, float]] = {}  # id -> (checked at, cooling until), monotonic

    def client(self):
        return core_redis.client()

    async def cooling(self, ids: list[int]) -> dict[int, float]:
        """Read from Redis at most every GATEWAY_COOLDOWN_CHECK_CACHE_S per deployment: the
        answers in between come from this process's copy, so the hot path does not pay a Redis
        round trip per request for a state that changes a few times an hour."""
        if not ids:
            return {}
        now = time.monotonic()
        fresh_for = settings.GATEWAY_COOLDOWN_CHECK_CACHE_S
        stale = [i for i in ids if now - self._checked.get(i, (-1e9, 0.0))[0] >= fresh_for]
        if stale:
            # One read at a time: requests arriving while it is in flight use the answers known so
            # far (they are at most one read older), instead of each sending the same read.
            for i in stale:
                self._checked[i] = (now, self._checked.get(i, (0.0, 0.0))[1])
            client = self.client()

            async def read():
                async with client.pipeline(transaction=False) as pipe:
                    for i in stale:
                        pipe.pttl(_key(i, "cool"))
                    return await pipe.execute()

            try:
                ttls = await core_redis.run(read)
            except core_redis.StateUnavailable:
                # Unreachable: the last known answers stand until the next check, so a Redis that
                # is down costs this process one timeout per check period, not one per request.
                raise
            for i, ttl in zip(stale, ttls, strict=True):
                self._checked[i] = (now, now + ttl / 1000 if ttl and ttl > 0 else 0.0)
        out = {}
        for i in ids:
            until = self._checked[i][1]
            if until > now:
                out[i] = until - now
        return out

    async def failure_record(self, deployment_id: int) -> bool:
        client = self.client()
        result = await core_redis.run(lambda: client.eval(
            _FAILURE_LUA, 2, _key(deployment_id, "fail"), _key(deployment_id, "cool"),
            int(_window_s() * 1000), _failures(), int(_cooldown_s() * 1000)))
        if result:
            now = time.monotonic()
            self._checked[deployment_id] = (now, now + _cooldown_s())
        return bool(result)

    async def quota_take(self, deployment_id: int, minute: int, rpm: int, tpm: int, tokens: int) -> bool:
        client = self.client()
        result = await core_redis.run(lambda: client.eval(_QUOTA_LUA, 1, _key(deployment_id, f"quota:{minute}"),
                                                          rpm, tpm, tokens))
        return bool(result)

    async def quota_adjust(self, deployment_id: int, minute: int, tokens: int) -> None:
        client = self.client()
        await core_redis.run(lambda: client.hincrby(_key(deployment_id, f"quota:{minute}"), "t", tokens))


_local = LocalBackend()
_redis: RedisBackend | None = None
_warned_at = -1e9


def _backend() -> LocalBackend | RedisBackend:
    global _redis
    if not settings.REDIS_URL:
        return _local
    if _redis is None:
        _redis = RedisBackend()
    return _redis


async def _call(method: str, *args):
    """Run on the configured backend; on a Redis error, on the in-process state instead."""
    backend = _backend()
    if backend is _local:
        return await getattr(_local, method)(*args)
    try:
        return await getattr(backend, method)(*args)
    except core_redis.StateUnavailable as exc:
        global _warned_at
        if time.monotonic() - _warned_at > 60:
            _warned_at = time.monotonic()
            log.warning("cooldown: Redis unavailable (%s), using in-process state", type(exc).__name__)
        return await getattr(_local, method)(*args)


async def cooling(ids: list[int]) -> dict[int, float]:
    """The deployments among `ids` in cooldown, with the seconds left."""
    return await _call("cooling", list(ids))


async def failure_record(deployment_id: int) -> bool:
    """Count a retryable failure; True when it put the deployment in cooldown."""
    return await _call("failure_record", deployment_id)


def _minute() -> int:
    return int(time.time() // 60)


async def quota_take(deployment_id: int, *, rpm: int | None, tpm: int | None, tokens: int) -> bool:
    """Take one request and `tokens` from the deployment's current minute; False at its quota."""
    if not rpm and not tpm:
        return True
    return await _call("quota_take", deployment_id, _minute(), rpm or 0, tpm or 0, max(0, tokens))


async def quota_adjust(deployment_id: int, *, tokens: int) -> None:
    """Correct the tokens taken by an estimate once the actual count is known."""
    if tokens:
        await _call("quota_adjust", deployment_id, _minute(), tokens)


def seconds_to_next_minute() -> int:
    return 60 - int(time.time()) % 60


def reset_local() -> None:
    """Forget in-process state (tests)."""
    global _local
    _local = LocalBackend()
    if _redis is not None:
        _redis._checked.clear()
