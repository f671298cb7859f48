"""Shared admission state: rate-limit cells and budget counters, with one Redis backend (atomic
Lua scripts: admission is one round trip, settle is one) and one SQLite backend with the same
semantics for the embedded default, shared by the web and worker processes through one file.

Rate limits are sliding windows of one-second steps: what a request is admitted with (1, or its
tokens) counts until 60 s after the end of the second it was admitted in (60 to 61 s), so no
60-second window ever admits more than the limit. On Redis a limit is one hash of second -> sum
(at most 61 of them, whatever the rate) with their total and the oldest second, so admission
reads two fields of it; the whole hash only once a second, when a second leaves the window.

Budgets are integer micro-dollars: `spent` (settled cost, rebuilt from the ledger when missing:
`rebuild_begin`, read the ledger, `set_spent`; a settle in between is kept in `pending` and added,
so a cost settled while the ledger was being read is never lost: counted twice at worst),
`held` (sum of open holds) and the open holds themselves, each with an expiry so the hold of a
crashed request is given back.

Admission is idempotent by request id: a request admitted again while its first admission still
counts (e.g. a batch line run again after its worker died) is not charged a second time; on
Redis one key per request (`...:rl:req:<id>`, the second it was admitted in) says so for all of
its limits, and tells the settle which second its token correction belongs to.

Key layout: every key one admission (or settle) touches carries its tenant's hash tag
(`llms:{t<tenant id>}:...`, see `tenant_key`), so on a Redis Cluster they all sit in one slot
and each script runs on one node; a script never mixes two tenants' keys (`RedisState` refuses).

This module knows cells and counters, not what they mean: gateway names the rate limits, billing
the budgets.
"""

from __future__ import annotations

import asyncio
import math
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field

from django.conf import settings

from . import caches
from . import redis as core_redis
from .redis import StateUnavailable

__all__ = ["AdmitOutcome", "BudgetCell", "LimitCell", "StateUnavailable", "state", "tenant_key"]

WINDOW_MS = 60_000.0
BUDGET_MATCH = "llms:{t*}:bud:*"  # every budget counter (SCAN pattern)
# The Redis run id the budget counters were last validated for, and the lock of that rebuild (on a
# cluster, one of each per node: the name gets the node's hash tag, apps.core.redis.node_tag).
EPOCH_KEY = "llms:state:epoch"
REBUILD_LOCK = "llms:state:rebuilding"


def tenant_key(tenant_id: int, *parts) -> str:
    """`llms:{t<tenant id>}:<part>:<part>...`: a key of a tenant's admission state. The hash tag
    puts all of a tenant's keys in one Redis Cluster slot (atomic scripts across them)."""
    return ":".join([f"llms:{{t{tenant_id}}}", *(str(p) for p in parts)])


def hash_tag(key: str) -> str | None:
    """The part of `key` Redis Cluster hashes (between the first `{` and the next `}`), or None."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1:end]
    return None


def _one_slot(keys: list[str]) -> list[str]:
    """The keys of one script must share one hash tag (one tenant): a cluster would refuse them
    (CROSSSLOT), and one admission never spans tenants."""
    if not keys:
        return keys
    first = keys[0]
    start = first.find("{")
    end = first.find("}", start + 1) if start >= 0 else -1
    if end > start + 1:  # the usual case: every key starts as the first does, up to its tag
        prefix = first[:end + 1]
        if all(k.startswith(prefix) for k in keys):
            return keys
    tags = {hash_tag(k) for k in keys}
    if len(tags) > 1:
        raise ValueError(f"one admission's keys span hash tags {sorted(map(str, tags))}")
    return keys


@dataclass(slots=True)
class LimitCell:
    key: str
    limit: int
    cost: int
    share: float = 1.0
    kind: str = "requests"  # requests | tokens


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
local force = ARGV[6] == '1'
local sec = math.floor(now / 1000)
local first = math.floor((now - 60000) / 1000)  -- the oldest second that still counts
local again = false  -- admitted already, in a second that still counts
if nl > 0 then
  local mine = redis.call('GET', KEYS[nl + nb * 4 + 1])
  again = mine ~= false and tonumber(mine) >= first
end
-- A window: a hash of second -> admitted amount, with 't' (their sum) and 'lo' (the oldest second
-- in it). Read in one HMGET; once a second drops out of the window, read whole and recomputed.
local function window(key)
  local got = redis.call('HMGET', key, 't', 'lo')
  local lo = tonumber(got[2])
  if lo == nil or lo >= first then return tonumber(got[1] or '0'), lo end
  local flat = redis.call('HGETALL', key)
  local u, low, stale = 0, nil, {}
  for n = 1, #flat, 2 do
    local s = tonumber(flat[n])
    if s then
      if s < first then
        stale[#stale + 1] = flat[n]
      else
        u = u + tonumber(flat[n + 1])
        if low == nil or s < low then low = s end
      end
    end
  end
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
  if low then
    redis.call('HSET', key, 't', string.format('%d', u), 'lo', string.format('%d', low))
  else
    redis.call('HDEL', key, 't', 'lo')
  end
  return u, low
end
local a = 7
local used = {}
local oldest = {}
for i = 1, nl do
  local limit = tonumber(ARGV[a]); local cost = tonumber(ARGV[a + 1]); local share = tonumber(ARGV[a + 2])
  a = a + 3
  local u, low = window(KEYS[i])
  if again then u = u - cost end
  if not force and not again and u + cost > math.floor(limit * share + 0.000001) then
    local retry = 1000
    if low then retry = math.max(1, (low + 1) * 1000 + 60000 - now) end
    return {0, 'rate', i, math.ceil(retry), 0}
  end
  used[i] = u
  oldest[i] = low
end
local taken = {}
for j = 1, nb do
  local k = nl + (j - 1) * 4
  local limit = tonumber(ARGV[a]); local hold = tonumber(ARGV[a + 1]); local hard = ARGV[a + 2]
  a = a + 4
  local spent = redis.call('GET', KEYS[k + 1])
  -- A hold put back (force) on a server whose counters are being rebuilt is taken without them.
  if not spent and not force then return {0, 'rebuild', j, 0, 0} end
  spent = tonumber(spent or '0')
  local stale = redis.call('ZRANGEBYSCORE', KEYS[k + 3], '-inf', now, 'LIMIT', 0, 4000)
  if #stale > 0 then
    local amounts = redis.call('HMGET', KEYS[k + 4], unpack(stale))
    local sum = 0
    for _, v in ipairs(amounts) do sum = sum + tonumber(v or '0') end
    redis.call('DECRBY', KEYS[k + 2], sum)
    redis.call('ZREM', KEYS[k + 3], unpack(stale))
    redis.call('HDEL', KEYS[k + 4], unpack(stale))
  end
  local held = tonumber(redis.call('GET', KEYS[k + 2]) or '0')
  taken[j] = redis.call('HEXISTS', KEYS[k + 4], rid) == 1
  if not force and not taken[j] and hard == '1' and spent + held + hold > limit then
    return {0, 'budget', j, 0, limit - spent - held}
  end
end
local out = {1, '', 0, 0, 0}
a = 7
for i = 1, nl do
  local limit = tonumber(ARGV[a]); local cost = tonumber(ARGV[a + 1])
  a = a + 3
  if not again then
    -- A second's first entry renews the window's life (62 s: past its last second's 61).
    if redis.call('HINCRBY', KEYS[i], string.format('%d', sec), cost) == cost then
      redis.call('PEXPIRE', KEYS[i], 62000)
    end
    redis.call('HINCRBY', KEYS[i], 't', cost)
    if oldest[i] == nil then redis.call('HSET', KEYS[i], 'lo', string.format('%d', sec)) end
  end
  table.insert(out, limit - used[i] - cost)
  table.insert(out, math.ceil(((oldest[i] or sec) + 1) * 1000 + 60000 - now))
end
if nl > 0 and not again then redis.call('SET', KEYS[nl + nb * 4 + 1], string.format('%d', sec), 'PX', 62000) end
for j = 1, nb do
  local k = nl + (j - 1) * 4
  local hold = tonumber(ARGV[a + 1]); local ttl = tonumber(ARGV[a + 3])
  a = a + 4
  if hold > 0 and not taken[j] then
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
local only_held = ARGV[1] == '1'
local rid = ARGV[2]
local nl = tonumber(ARGV[3])
local nb = tonumber(ARGV[4])
local now = tonumber(ARGV[5])
local a = 6
local mine = nil
if nl > 0 then
  mine = redis.call('GET', KEYS[nl + nb * 5 + 1])
  if mine and tonumber(mine) < math.floor((now - 60000) / 1000) then mine = nil end  -- out of the window
end
for i = 1, nl do
  local delta = tonumber(ARGV[a])
  a = a + 2
  if delta ~= 0 and mine and redis.call('HEXISTS', KEYS[i], mine) == 1 then
    redis.call('HINCRBY', KEYS[i], mine, delta)
    redis.call('HINCRBY', KEYS[i], 't', delta)
  end
end
local out = {}
for j = 1, nb do
  local k = nl + (j - 1) * 4
  local actual = tonumber(ARGV[a]); a = a + 1
  local amount = redis.call('HGET', KEYS[k + 4], rid)
  if amount then
    redis.call('DECRBY', KEYS[k + 2], tonumber(amount))
    redis.call('HDEL', KEYS[k + 4], rid)
    redis.call('ZREM', KEYS[k + 3], rid)
  elseif only_held then
    actual = 0
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
    local pending = KEYS[nl + nb * 4 + j]
    if actual > 0 and redis.call('EXISTS', pending) == 1 then redis.call('INCRBY', pending, actual) end
    table.insert(out, -1)
    table.insert(out, -1)
  end
end
return out
"""


def _limit_key(key: str) -> str:
    """A rate limit's window: a hash of second -> what was admitted in that second."""
    return f"{key}:win"


def _admitted_key(limits: list[LimitCell], request_id: str) -> str:
    """The second a request was admitted in, for every limit at once (idempotent admission, and the
    settle's token correction lands in that second). It carries its limits' hash tag."""
    key = limits[0].key
    start = key.find("{")
    end = key.find("}", start + 1) if start >= 0 else -1
    prefix = key[:end + 1] if end > start + 1 else "llms"
    return f"{prefix}:rl:req:{request_id}"


def _budget_keys(key: str) -> list[str]:
    return [f"{key}:spent", f"{key}:held", f"{key}:holds", f"{key}:amounts"]


_SET_SPENT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local v = tonumber(ARGV[1]) + tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], v, 'EX', ARGV[2])
else
  redis.call('SET', KEYS[1], v)
end
redis.call('DEL', KEYS[2])
return 1
"""
PENDING_TTL_S = 600  # a rebuild's ledger read taking longer loses the settles meanwhile to the reconcile

_RECONCILE = """
local cur = redis.call('GET', KEYS[1])
if cur and tonumber(cur) >= tonumber(ARGV[1]) then return tonumber(cur) end
if cur then
  redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL')
elseif tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
return -1
"""


def _admit_args(request_id: str, limits: list[LimitCell], budgets: list[BudgetCell], hold_ttl_s: int,
                force: bool) -> tuple[list[str], list]:
    keys = [_limit_key(c.key) for c in limits] + [k for b in budgets for k in _budget_keys(b.key)]
    if limits:
        keys.append(_admitted_key(limits, request_id))
    args: list = [time.time() * 1000, request_id, hold_ttl_s * 1000, len(limits), len(budgets), "1" if force else "0"]
    for c in limits:
        args += [c.limit, c.cost, c.share]
    for b in budgets:
        args += [b.limit_micros, b.hold_micros, "1" if b.hard else "0", b.ttl_s]
    return keys, args


def _outcome(raw) -> AdmitOutcome:
    ok, reason, index, retry_ms, remaining = int(raw[0]), raw[1], int(raw[2]), int(raw[3]), int(raw[4])
    if not ok:
        reason = reason.decode() if isinstance(reason, bytes) else reason
        return AdmitOutcome(ok=False, reason=reason, index=index - 1, retry_after_ms=retry_ms,
                            remaining_micros=remaining)
    return AdmitOutcome(ok=True, limits=[(int(raw[i]), int(raw[i + 1])) for i in range(5, len(raw), 2)])


class RedisState:
    """Every call is one round trip through the process's one Redis client (apps.core.redis)."""

    async def admit(self, *, request_id: str, limits: list[LimitCell], budgets: list[BudgetCell],
                    hold_ttl_s: int, force: bool = False) -> AdmitOutcome:
        keys, args = _admit_args(request_id, limits, budgets, hold_ttl_s, force)
        _one_slot(keys)
        return _outcome(await core_redis.run(lambda: core_redis.script(_ADMIT, keys, args)))

    async def admit_on(self, conn, *, request_id: str, budgets: list[BudgetCell], hold_ttl_s: int) -> bool:
        """Put back an open hold on one raw connection (while a new server is being validated).
        False when its keys live on another node of the cluster (that node kept them)."""
        import redis

        keys, args = _admit_args(request_id, [], budgets, hold_ttl_s, True)
        try:
            await core_redis.conn_command(conn, "EVAL", _ADMIT, len(_one_slot(keys)), *keys, *args)
        except redis.ResponseError as exc:
            if str(exc).startswith(("MOVED", "ASK")):
                return False
            raise
        return True

    async def settle(self, *, request_id: str, limits: list[tuple[LimitCell, int]],
                     budgets: list[tuple[BudgetCell, int]], only_held: bool = False) -> list[tuple[int, int]]:
        """Correct token limits by their delta, swap each budget's hold for the actual micros.
        `only_held`: add the actual micros only where the hold is still there (whoever settles
        cannot know whether it was settled already). Returns (spent_before, spent_after) per
        budget (-1 when its counter is missing)."""
        keys = [_limit_key(c.key) for c, _ in limits] + [k for b, _ in budgets for k in _budget_keys(b.key)]
        keys += [f"{b.key}:pending" for b, _ in budgets]
        if limits:
            keys.append(_admitted_key([c for c, _ in limits], request_id))
        _one_slot(keys)
        args: list = [1 if only_held else 0, request_id, len(limits), len(budgets), time.time() * 1000]
        for c, delta in limits:
            args += [delta, c.limit]
        for _, actual in budgets:
            args.append(actual)
        raw = await core_redis.run(lambda: core_redis.script(_SETTLE, keys, args), own_budget=True)
        return [(int(raw[i]), int(raw[i + 1])) for i in range(0, len(raw), 2)]

    async def rebuild_begin(self, *, keys: list[str]) -> None:
        """Before the ledger is read for these missing counters: from now on a settle that finds
        the counter missing keeps its cost in `pending`, which `set_spent` adds."""
        client = core_redis.client()

        async def mark():
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.set(f"{key}:pending", 0, nx=True, ex=PENDING_TTL_S)
            return await pipe.execute()

        await core_redis.run(mark)

    async def set_spent(self, *, key: str, micros: int, ttl_s: int) -> None:
        """Set a missing counter to what the ledger said (read after `rebuild_begin`) plus what was
        settled since; a counter that is there already is left alone."""
        await core_redis.run(lambda: core_redis.script(_SET_SPENT, [f"{key}:spent", f"{key}:pending"], [micros, ttl_s]))

    async def raise_spent(self, *, key: str, micros: int, ttl_s: int) -> int:
        """Raise `spent` to at least `micros` (a reconcile with the ledger). Returns the value it
        had when it was already at least that high, else -1."""
        return int(await core_redis.run(lambda: core_redis.script(_RECONCILE, [f"{key}:spent"], [micros, ttl_s])))

    async def usage(self, *, keys: list[str]) -> list[tuple[int | None, int]]:
        client = core_redis.client()

        async def read():
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.get(f"{key}:spent")
                pipe.get(f"{key}:held")
            return await pipe.execute()

        raw = await core_redis.run(read)
        return [(int(raw[i]) if raw[i] is not None else None, int(raw[i + 1] or 0)) for i in range(0, len(raw), 2)]

    def reset(self) -> None:
        pass


# --- embedded: one SQLite file shared by the web and worker processes ---------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS limit_log (key TEXT NOT NULL, rid TEXT NOT NULL, at_ms REAL NOT NULL,
    cost INTEGER NOT NULL, PRIMARY KEY (key, rid));
CREATE TABLE IF NOT EXISTS spent (key TEXT PRIMARY KEY, micros INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS pending (key TEXT PRIMARY KEY, micros INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS holds (key TEXT NOT NULL, rid TEXT NOT NULL, amount INTEGER NOT NULL,
    expires_ms REAL NOT NULL, PRIMARY KEY (key, rid));
"""


class SqliteState:
    """The same semantics in a SQLite file (GATEWAY_STATE_PATH) that every process of the embedded
    mode opens: the web process admits, the worker settles, and both see one set of counters. Each
    step is one IMMEDIATE transaction (atomic across processes and threads), run off the event loop."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = 0

    def _db(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def _tx(self, fn):
        with self._lock:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return out

    async def _run(self, fn):
        try:
            return await asyncio.to_thread(self._tx, fn)
        except sqlite3.Error as exc:
            raise StateUnavailable(f"sqlite: {exc}") from exc

    @staticmethod
    def _held(db, key: str, now_ms: float) -> int:
        db.execute("DELETE FROM holds WHERE key = ? AND expires_ms <= ?", (key, now_ms))
        return db.execute("SELECT COALESCE(SUM(amount), 0) FROM holds WHERE key = ?", (key,)).fetchone()[0]

    async def admit(self, *, request_id: str, limits: list[LimitCell], budgets: list[BudgetCell],
                    hold_ttl_s: int, force: bool = False) -> AdmitOutcome:
        now = time.time() * 1000
        second_end = (now // 1000 + 1) * 1000  # an entry is stamped with its second's end (as on Redis)

        def step(db) -> AdmitOutcome:
            used, again = [], []
            for i, c in enumerate(limits):
                db.execute("DELETE FROM limit_log WHERE key = ? AND at_ms <= ?", (c.key, now - WINDOW_MS))
                u = db.execute("SELECT COALESCE(SUM(cost), 0) FROM limit_log WHERE key = ?", (c.key,)).fetchone()[0]
                mine = db.execute("SELECT cost FROM limit_log WHERE key = ? AND rid = ?",
                                  (c.key, request_id)).fetchone()
                again.append(mine is not None)
                if mine is not None:
                    u -= mine[0]
                elif not force and u + c.cost > math.floor(c.limit * c.share + 1e-6):
                    oldest = db.execute("SELECT MIN(at_ms) FROM limit_log WHERE key = ?", (c.key,)).fetchone()[0]
                    retry = max(1, math.ceil(oldest + WINDOW_MS - now)) if oldest is not None else 1000
                    return AdmitOutcome(ok=False, reason="rate", index=i, retry_after_ms=retry)
                used.append(u)
            for j, b in enumerate(budgets):
                row = db.execute("SELECT micros FROM spent WHERE key = ?", (b.key,)).fetchone()
                if row is None:
                    return AdmitOutcome(ok=False, reason="rebuild", index=j)
                held = self._held(db, b.key, now)
                taken = db.execute("SELECT 1 FROM holds WHERE key = ? AND rid = ?", (b.key, request_id)).fetchone()
                if not force and not taken and b.hard and row[0] + held + b.hold_micros > b.limit_micros:
                    return AdmitOutcome(ok=False, reason="budget", index=j,
                                        remaining_micros=b.limit_micros - row[0] - held)
            pairs = []
            for c, u, was in zip(limits, used, again, strict=True):
                if not was:
                    db.execute("INSERT INTO limit_log (key, rid, at_ms, cost) VALUES (?, ?, ?, ?)",
                               (c.key, request_id, second_end, c.cost))
                oldest = db.execute("SELECT MIN(at_ms) FROM limit_log WHERE key = ?", (c.key,)).fetchone()[0]
                pairs.append((c.limit - u - c.cost, math.ceil(oldest + WINDOW_MS - now)))
            for b in budgets:
                if b.hold_micros > 0:
                    db.execute("INSERT OR IGNORE INTO holds (key, rid, amount, expires_ms) VALUES (?, ?, ?, ?)",
                               (b.key, request_id, b.hold_micros, now + hold_ttl_s * 1000))
            return AdmitOutcome(ok=True, limits=pairs)

        return await self._run(step)

    async def settle(self, *, request_id: str, limits: list[tuple[LimitCell, int]],
                     budgets: list[tuple[BudgetCell, int]], only_held: bool = False) -> list[tuple[int, int]]:
        def step(db) -> list[tuple[int, int]]:
            for c, delta in limits:
                if delta:
                    db.execute("UPDATE limit_log SET cost = cost + ? WHERE key = ? AND rid = ?",
                               (delta, c.key, request_id))
            out = []
            for b, actual in budgets:
                held = db.execute("DELETE FROM holds WHERE key = ? AND rid = ?", (b.key, request_id)).rowcount
                if only_held and not held:
                    actual = 0
                row = db.execute("SELECT micros FROM spent WHERE key = ?", (b.key,)).fetchone()
                if row is None:
                    db.execute("UPDATE pending SET micros = micros + ? WHERE key = ?", (actual, b.key))
                    out.append((-1, -1))
                    continue
                db.execute("UPDATE spent SET micros = micros + ? WHERE key = ?", (actual, b.key))
                out.append((row[0], row[0] + actual))
            return out

        return await self._run(step)

    async def rebuild_begin(self, *, keys: list[str]) -> None:
        def step(db):
            for key in keys:
                db.execute("INSERT OR IGNORE INTO pending (key, micros) VALUES (?, 0)", (key,))

        await self._run(step)

    async def set_spent(self, *, key: str, micros: int, ttl_s: int) -> None:
        def step(db):
            if db.execute("SELECT 1 FROM spent WHERE key = ?", (key,)).fetchone() is None:
                row = db.execute("SELECT micros FROM pending WHERE key = ?", (key,)).fetchone()
                db.execute("INSERT INTO spent (key, micros) VALUES (?, ?)", (key, micros + (row[0] if row else 0)))
            db.execute("DELETE FROM pending WHERE key = ?", (key,))

        await self._run(step)

    async def raise_spent(self, *, key: str, micros: int, ttl_s: int) -> int:
        def step(db) -> int:
            row = db.execute("SELECT micros FROM spent WHERE key = ?", (key,)).fetchone()
            if row is not None and row[0] >= micros:
                return row[0]
            db.execute("INSERT OR REPLACE INTO spent (key, micros) VALUES (?, ?)", (key, micros))
            return -1

        return await self._run(step)

    async def usage(self, *, keys: list[str]) -> list[tuple[int | None, int]]:
        now = time.time() * 1000

        def step(db):
            out = []
            for key in keys:
                row = db.execute("SELECT micros FROM spent WHERE key = ?", (key,)).fetchone()
                out.append((row[0] if row else None, self._held(db, key, now)))
            return out

        return await self._run(step)

    def reset(self) -> None:
        def step(db):
            for table in ("limit_log", "spent", "holds", "pending"):
                db.execute(f"DELETE FROM {table}")  # noqa: S608 - fixed names

        self._tx(step)


_state: RedisState | SqliteState | None = None


def state() -> RedisState | SqliteState:
    global _state
    if _state is None:
        _state = RedisState() if settings.REDIS_URL else SqliteState(settings.GATEWAY_STATE_PATH)
    return _state


def _reset() -> None:
    global _state
    if _state is not None:
        _state.reset()
    _state = None


caches.on_reset(_reset)
