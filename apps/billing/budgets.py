"""Budgets at run time: their counters, the hold a request takes against them, its one exit
(settle or release), and `budget_spend`, the one read of what a budget spent and holds that
admission, `GET /v1/budget`, the dashboard and `/metrics` all use.

The counters (apps.core.state: Redis in production, a shared SQLite file in the embedded mode) are
a fast copy of the ledger: a counter that is missing is rebuilt from the ledger; a Redis server
that is not the one the counters were kept on (restarted, failed over, restored from an older
snapshot) has its budget counters dropped and rebuilt, with the open holds put back, before it
admits again; and a beat task raises any counter the ledger shows to be low.

A `Hold` is taken once (`hold_take`) and ends exactly once: `settle` (the actual cost) or
`release` (nothing spent). On the ASGI server's loop a settle finishes after the caller's answer
(`settles_drain` awaits those still running: at shutdown, and before this process reads its
counters). A second exit raises `HoldEnded`; a hold that is never ended stays in
`open_holds()` (tests assert it is empty) and expires from the counters after its TTL. A hold can
be handed to another process (`to_dict` / `Hold.from_dict`: an async request's worker), which
then owns its exit.

This module takes plain values (tenant time zone, the budgets that apply, request id, the upper
bound, the TTL); it knows nothing of requests. Rate-limit cells ride along (`limits`) only so
that every limit and hold is taken in one round trip.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from asgiref.sync import async_to_sync
from django.conf import settings
from django.utils import timezone

from apps.analytics.selectors import ledger_cost_sums
from apps.core import caches, load
from apps.core import redis as core_redis
from apps.core.db import db_sync, on_server_loop
from apps.core.money import micros, money_str, usd
from apps.core.state import (
    BUDGET_MATCH,
    EPOCH_KEY,
    REBUILD_LOCK,
    AdmitOutcome,
    BudgetCell,
    LimitCell,
    StateUnavailable,
    state,
    tenant_key,
)

from . import alerts
from .periods import period_bounds, period_key
from .selectors import BudgetRef, budget_ref, budgets_for_key

log = logging.getLogger(__name__)

KEY_GRACE = timedelta(days=7)  # a period's counters outlive it this long (late settles)

__all__ = ["Hold", "HoldEnded", "HoldPeriod", "StateUnavailable", "budget_spend", "hold_take", "open_holds"]


class HoldEnded(RuntimeError):
    """A hold was settled or released a second time: a bug in the caller."""


@dataclass(slots=True)
class HoldPeriod:
    """One budget a hold is taken against, in the period that contains the request."""

    ref: BudgetRef
    cell: BudgetCell
    period_start: datetime
    period_end: datetime | None


@dataclass(slots=True)
class Refusal:
    """Why `hold_take` did not admit: a rate limit (`index` into `limits`) or a budget (into `budgets`)."""

    reason: str  # rate | budget
    index: int
    retry_after_ms: int = 0
    remaining_micros: int = 0
    period: HoldPeriod | None = None


def budget_periods(*, budgets: list[BudgetRef], at: datetime, hold_micros: int = 0) -> list[HoldPeriod]:
    out = []
    for ref in budgets:
        start, end = period_bounds(period=ref.period, tz=ref.timezone, at=at)
        ttl = int((end - at + KEY_GRACE).total_seconds()) if end else 0
        label = period_key(period=ref.period, tz=ref.timezone, at=at)
        key = tenant_key(ref.tenant_id, "bud", ref.id, f"{_subject_part(ref.subject)}{label}")
        cell = BudgetCell(key=key, limit_micros=micros(ref.limit_usd),
                          hold_micros=hold_micros, hard=ref.hard, ttl_s=ttl)
        out.append(HoldPeriod(ref=ref, cell=cell, period_start=start, period_end=end))
    return out


def _subject_part(subject: str) -> str:
    """A `user:*` budget's counter for one end user: keyed by a digest of the id (bounded length,
    any characters)."""
    return f"u{hashlib.sha256(subject.encode()).hexdigest()[:32]}:" if subject else ""


_open: dict[str, Hold] = {}
# Settled by their callers before their ledger rows were in the ledger (journaled first: `after`).
# Until a row is, a new Redis server gets its hold back with the open ones: neither the counters
# rebuilt from the ledger nor a settle lost in the failover would count the cost meanwhile.
_rows_on_their_way: dict[str, Hold] = {}


def open_holds() -> list[Hold]:
    """The holds this process took or took over and has not ended yet."""
    return list(_open.values())


@dataclass(slots=True, eq=False)
class Hold:
    request_id: str
    budgets: list[HoldPeriod] = field(default_factory=list)
    limits: list[LimitCell] = field(default_factory=list)
    token_estimate: int = 0
    ttl_s: int = 900
    backed: bool = True  # False: admitted without the shared state (a fail-open policy); nothing to end there
    limit_outcome: list[tuple[int, int]] = field(default_factory=list)  # (remaining, reset_ms) per limit
    ended: str = ""  # "" while open, then "settled" | "released"

    @property
    def amount_usd(self) -> Decimal:
        return usd(max((b.cell.hold_micros for b in self.budgets), default=0))

    def _end(self, how: str) -> bool:
        """Mark the one exit. False when there is nothing in the shared state to end."""
        if self.ended:
            raise HoldEnded(f"hold {self.request_id} was already {self.ended}")
        self.ended = how
        _open.pop(self.request_id, None)
        return self.backed and bool(self.limits or self.budgets)

    async def settle(self, *, cost_usd: Decimal, tokens: int, after: asyncio.Future | None = None) -> None:
        """Replace the hold with the actual cost (and the token limits' estimate with `tokens`).

        The caller has written the request's ledger row already (or, `after`, made it durable and
        will have it in the ledger when `after` completes: the settle waits for that), so a counter
        rebuilt from the ledger counts the cost, and until the settle lands the open hold counts it
        (at its upper bound) in the counter. So on the ASGI server's loop the caller does not wait
        for it: it goes out with the next Redis commands while the answer is sent. Anywhere else (a
        worker's short-lived loop, a sync caller) it is awaited."""
        if not self._end("settled"):
            return
        if after is not None and not after.done():
            _rows_on_their_way[self.request_id] = self
            after.add_done_callback(lambda _, rid=self.request_id: _rows_on_their_way.pop(rid, None))
        actual = micros(cost_usd) if cost_usd > 0 else 0
        if not on_server_loop():
            if after is not None:
                await asyncio.shield(after)
            await _close(self, actual_micros=actual, tokens=tokens)
            return
        # Decided now, while this request is still counted: with others in flight, it rides with their commands.
        company = load.serving() > 1
        task = asyncio.get_running_loop().create_task(_close_after_answer(self, actual_micros=actual, tokens=tokens,
                                                                          company=company, after=after))
        _settling.add(task)
        task.add_done_callback(_settling.discard)

    async def settle_lost(self, *, cost_usd: Decimal) -> None:
        """End a hold taken over from a process that stopped after writing the request's ledger row
        (of `cost_usd`): before its settle, or after it (a settle is not idempotent). The cost is
        added only where the hold is still there. Where it is not, it was settled, or it expired
        (then the periodic reconcile raises the counter to the ledger). Token limits are left to
        their one-minute window."""
        if not self._end("settled"):
            return
        await _close(self, actual_micros=micros(cost_usd) if cost_usd > 0 else 0, tokens=0, lost=True)

    async def release(self) -> None:
        """Give the whole hold back (and the token estimate): the request cost nothing."""
        if not self._end("released"):
            return
        await _close(self, actual_micros=0, tokens=0)

    def to_dict(self) -> dict:
        """JSON-safe, so another process (a worker) can take over the exit."""
        return {
            "request_id": self.request_id,
            "budgets": [{
                "ref": {**{f.name: getattr(h.ref, f.name) for f in fields(BudgetRef)},
                        "limit_usd": str(h.ref.limit_usd)},
                "cell": {f.name: getattr(h.cell, f.name) for f in fields(BudgetCell)},
                "period_start": h.period_start.isoformat(),
                "period_end": h.period_end.isoformat() if h.period_end else None,
            } for h in self.budgets],
            "limits": [{f.name: getattr(c, f.name) for f in fields(LimitCell)} for c in self.limits],
            "token_estimate": self.token_estimate,
            "ttl_s": self.ttl_s,
            "backed": self.backed,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Hold:
        """Take over a hold another process took (it must not end it itself)."""
        hold = cls(
            request_id=data["request_id"],
            budgets=[HoldPeriod(
                ref=BudgetRef(**{**d["ref"], "limit_usd": Decimal(d["ref"]["limit_usd"])}),
                cell=BudgetCell(**d["cell"]),
                period_start=datetime.fromisoformat(d["period_start"]),
                period_end=datetime.fromisoformat(d["period_end"]) if d["period_end"] else None,
            ) for d in data.get("budgets", ())],
            limits=[LimitCell(**d) for d in data.get("limits", ())],
            token_estimate=data.get("token_estimate", 0),
            ttl_s=data.get("ttl_s", 900),
            backed=data.get("backed", True),
        )
        _open[hold.request_id] = hold
        return hold

    def hand_over(self) -> dict:
        """Give the exit to another process (the dict goes with the work): this one forgets it."""
        _open.pop(self.request_id, None)
        return self.to_dict()


_settling: set[asyncio.Task] = set()


async def _close_after_answer(hold: Hold, *, actual_micros: int, tokens: int, company: bool,
                             after: asyncio.Future | None = None) -> None:
    """A settle after the answer: nobody waits for it, so while other requests are in flight
    (`company`, apps.core.load) its Redis command goes out with theirs (apps.core.redis.unhurried)
    instead of on its own; alone, it goes at once. A failure is logged here."""
    if after is not None:
        await asyncio.shield(after)  # the request's row is in the ledger (or left to the replay)
        company = company and load.serving() > 0
    if company:
        core_redis.unhurried()
    try:
        await _close(hold, actual_micros=actual_micros, tokens=tokens)
    except Exception:
        log.error("settle of %s failed; its hold expires after its ttl", hold.request_id, exc_info=True)


async def settles_drain() -> None:
    """Wait for the settles this loop left running after their answers (the lifespan shutdown;
    a read of the counters that must see this process' own answers)."""
    loop = asyncio.get_running_loop()
    while running := [t for t in _settling if t.get_loop() is loop]:
        await asyncio.gather(*running, return_exceptions=True)


async def _close(hold: Hold, *, actual_micros: int, tokens: int, lost: bool = False) -> None:
    """`lost`: `Hold.settle_lost`."""
    limit_deltas = [] if lost else [(c, tokens - hold.token_estimate) for c in hold.limits if c.kind == "tokens"]
    try:
        results = await state().settle(request_id=hold.request_id, limits=limit_deltas,
                                       budgets=[(h.cell, actual_micros) for h in hold.budgets], only_held=lost)
    except StateUnavailable:
        # The hold expires by itself; the spend reaches the counter when it is rebuilt or reconciled.
        log.warning("settle of %s could not reach the shared state; the ledger reconcile will catch up",
                    hold.request_id)
        return
    if actual_micros <= 0:
        return
    for period, (before, after) in zip(hold.budgets, results, strict=True):
        if before < 0:
            continue
        await alerts.budget_spend_observed(
            budget_id=period.ref.id, tenant_id=period.ref.tenant_id, period_start=period.period_start,
            period_end=period.period_end, limit_usd=period.ref.limit_usd,
            spent_before=usd(before), spent_after=usd(after),
        )


async def _rebuild(periods: list[HoldPeriod]) -> None:
    """Set the counters of these periods from the ledger where they are missing (one query)."""
    backend = state()
    await backend.rebuild_begin(keys=[p.cell.key for p in periods])  # settles from now on are kept
    spent = await ledger_spend(periods=periods)
    for p in periods:
        await backend.set_spent(key=p.cell.key, micros=micros(spent[p.ref.spend_key]), ttl_s=p.cell.ttl_s)


async def ledger_spend(*, periods: list[HoldPeriod]) -> dict[int | str, Decimal]:
    """What the ledger says each budget (by `spend_key`) spent in its period: the truth the counters
    copy. A `user:*` budget counted for one end user reads that end user's rows; read as a whole,
    every end user's."""
    items = [(p.ref.spend_key, p.ref.tenant_id, p.ref.scope, p.ref.ledger_value, p.period_start, p.period_end)
             for p in periods]
    return await db_sync(ledger_cost_sums, items=items)


async def hold_take(*, request_id: str, budgets: list[BudgetRef], amount_usd: Decimal, at: datetime,
                    ttl_s: int, limits: list[LimitCell] = (), token_estimate: int = 0) -> Hold | Refusal:
    """Take every rate-limit cell and a hold of `amount_usd` on every budget, atomically (one
    round trip), or nothing. Idempotent by request id. Raises StateUnavailable when the shared
    state cannot be reached (the caller applies its policy, then may use `hold_unbacked`)."""
    if request_id in _open:
        return _open[request_id]
    periods = budget_periods(budgets=budgets, at=at, hold_micros=micros(amount_usd) if amount_usd > 0 else 0)
    hold = Hold(request_id=request_id, budgets=periods, limits=list(limits), token_estimate=token_estimate,
                ttl_s=ttl_s)
    if not periods and not limits:
        _open[request_id] = hold
        return hold
    backend = state()
    for _attempt in range(3):
        outcome: AdmitOutcome = await backend.admit(request_id=request_id, limits=list(limits),
                                                    budgets=[p.cell for p in periods], hold_ttl_s=ttl_s)
        if outcome.ok:
            hold.limit_outcome = outcome.limits
            _open[request_id] = hold
            return hold
        if outcome.reason == "rebuild":
            await _rebuild(periods)
            continue
        period = periods[outcome.index] if outcome.reason == "budget" else None
        return Refusal(reason=outcome.reason, index=outcome.index, retry_after_ms=outcome.retry_after_ms,
                       remaining_micros=outcome.remaining_micros, period=period)
    raise StateUnavailable("budget counters could not be rebuilt")


def hold_unbacked(*, request_id: str, ttl_s: int) -> Hold:
    """A hold for a request admitted without the shared state (fail-open): it still has its one
    exit, which has nothing to give back."""
    hold = Hold(request_id=request_id, ttl_s=ttl_s, backed=False)
    _open[request_id] = hold
    return hold


# --- the one read of spend ------------------------------------------------------------------------


async def budget_spend(*, budgets: list[BudgetRef], at: datetime) -> dict[int | str, tuple[Decimal, Decimal]]:
    """`spend_key` (the budget id; with the end user for a `user:*` budget counted for one) ->
    (spent, held) in the period containing `at`, from the counters; the missing ones are rebuilt
    from the ledger in one query. Without the shared state, the ledger alone. A `user:*` budget read
    as a whole has no counter (each end user has one): its spend is the sum over its end users,
    from the ledger, and nothing is held."""
    periods = budget_periods(budgets=budgets, at=at)
    whole = [p for p in periods if p.ref.per_end_user and not p.ref.subject]
    out: dict[int | str, tuple[Decimal, Decimal]] = {}
    if whole:
        for key, amount in (await ledger_spend(periods=whole)).items():
            out[key] = (amount, Decimal(0))
        periods = [p for p in periods if not (p.ref.per_end_user and not p.ref.subject)]
    if not periods:
        return out
    backend = state()
    try:
        found = await backend.usage(keys=[p.cell.key for p in periods])
    except StateUnavailable:
        found = [(None, 0)] * len(periods)
    missing = [p for p, (spent, _) in zip(periods, found, strict=True) if spent is None]
    if missing:
        try:
            await backend.rebuild_begin(keys=[p.cell.key for p in missing])
        except StateUnavailable:
            pass
    ledger = await ledger_spend(periods=missing) if missing else {}
    for p, (spent, held) in zip(periods, found, strict=True):
        if spent is None:
            spent = micros(ledger[p.ref.spend_key])
            try:
                await backend.set_spent(key=p.cell.key, micros=spent, ttl_s=p.cell.ttl_s)
            except StateUnavailable:
                pass
        out[p.ref.spend_key] = (usd(spent), usd(held))
    return out


async def budget_counters_reconcile(*, budgets: list[BudgetRef], at: datetime) -> list[tuple[int, Decimal, Decimal]]:
    """Raise every counter the ledger shows to be low (lost state, a settle that never reached the
    counters). Returns (budget id, counter, ledger) for each one raised. The per-end-user counters
    of `user:*` budgets are not enumerated here (they are rebuilt from the ledger when missing, and
    dropped and rebuilt with every other counter on a new Redis server)."""
    periods = budget_periods(budgets=[b for b in budgets if not b.per_end_user], at=at)
    if not periods:
        return []
    ledger = await ledger_spend(periods=periods)
    backend = state()
    raised = []
    for p in periods:
        want = micros(ledger[p.ref.id])
        before = await backend.raise_spent(key=p.cell.key, micros=want, ttl_s=p.cell.ttl_s)
        if before < 0:
            raised.append((p.ref.id, Decimal(0), ledger[p.ref.id]))
    for budget_id, _, amount in raised:
        log.warning("budget %s: counter below the ledger, raised to %s", budget_id, amount)
    return raised


# --- a Redis server the counters were not kept on ----------------------------------------------------

_durable_sources: list[Callable[[], list[dict]]] = []


def durable_holds_source(fn: Callable[[], list[dict]]) -> None:
    """Register `fn() -> [Hold.to_dict(), ...]`: holds stored with queued work (no process has
    them open yet); they are put back when the counters are rebuilt."""
    if fn not in _durable_sources:
        _durable_sources.append(fn)


async def _restore(conn, holds: list[dict]) -> None:
    """Put these holds back on the server behind `conn` (on a cluster: those whose tenant's slot
    that node serves; the other nodes kept theirs)."""
    backend = state()
    for data in holds:
        if not data.get("budgets") or not data.get("backed", True):
            continue
        cells = [BudgetCell(**d["cell"]) for d in data["budgets"]]
        await backend.admit_on(conn, request_id=data["request_id"], budgets=cells, hold_ttl_s=data.get("ttl_s", 900))


async def on_new_server(run_id: str, previous: str | None, conn) -> None:
    """A connection reached a Redis server this process has not validated (apps.core.redis).

    If the budget counters were not kept on this very server (a restart, a failover to a replica,
    a restore), or this process was on another server until now (it may have settled there after
    the counters here were rebuilt: during a Sentinel failover the old master takes writes until it
    is demoted, and they are lost), drop every `spent` (rebuilt from the ledger as admission needs
    it; a settled cost is in the ledger before its hold ends, apps.gateway.pipeline.end) and put
    back this process's open holds, and those settled whose rows are not in the ledger yet (every
    process puts back its own when it arrives). The holds the server has (a promoted replica's,
    replicated from the old master) are kept: other processes' requests in flight are not
    forgotten before those processes arrive; a hold that ended on the old master after the last
    replication stays until it expires (counted twice meanwhile: refusing early, never
    overspending).
    On a cluster this runs per node, for the counters of the slots that node serves."""
    cmd = core_redis.conn_command
    tag = await core_redis.node_tag(conn)  # "" unless a cluster node
    epoch_key, lock_key = f"{EPOCH_KEY}{tag}", f"{REBUILD_LOCK}{tag}"
    epoch = await cmd(conn, "GET", epoch_key)
    epoch = epoch.decode() if isinstance(epoch, bytes) else epoch
    stale = epoch != run_id
    if not stale and previous is None:
        return  # first contact with the server the counters are kept on: nothing of ours elsewhere
    token = uuid.uuid4().hex
    deadline = time.monotonic() + settings.REDIS_TIMEOUT_S
    while not await cmd(conn, "SET", lock_key, token, "NX", "PX", "15000"):
        # Another connection (this process's or another's) is rebuilding: wait for it rather than
        # refuse the requests behind this one (within REDIS_TIMEOUT_S; the caller bounds it too).
        if time.monotonic() >= deadline:
            raise core_redis.NewServer("another process is rebuilding the budget counters")
        await asyncio.sleep(0.005)
        epoch = await cmd(conn, "GET", epoch_key)
        stale = (epoch.decode() if isinstance(epoch, bytes) else epoch) != run_id
        if not stale and previous is None:
            return
    log.warning("redis: budget counters were kept on %s, this server is %s (this process was on %s): "
                "rebuilding them from the ledger", epoch or "(none)", run_id, previous or "(none)")
    cursor = b"0"
    while True:
        cursor, keys = await cmd(conn, "SCAN", cursor, "MATCH", f"{BUDGET_MATCH}:spent", "COUNT", "1000")
        if keys and tag:  # a cluster node: one slot per DEL
            for key in keys:
                await cmd(conn, "DEL", key)
        elif keys:
            await cmd(conn, "DEL", *keys)
        if cursor in (b"0", 0, "0"):
            break
    if stale:
        durable = []
        for source in _durable_sources:
            durable += await db_sync(source)
        await _restore(conn, durable)
        await cmd(conn, "SET", epoch_key, run_id)
    await _restore(conn, [h.to_dict() for h in (*_open.values(), *_rows_on_their_way.values())])
    await cmd(conn, "DEL", lock_key)


def _reset() -> None:
    _open.clear()
    _rows_on_their_way.clear()


caches.on_reset(_reset)


# --- status: GET /v1/budget, the admin, the management API and the dashboard --------------------------


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    id: int
    name: str
    scope: str
    scope_value: str
    period: str
    enforcement: str
    limit_usd: Decimal
    spent_usd: Decimal
    held_usd: Decimal
    remaining_usd: Decimal
    period_start: datetime  # in the tenant's time zone
    resets_at: datetime | None  # None: a `total` budget never resets
    timezone: str
    tenant_id: int = 0
    end_user: str = ""  # a `user:*` budget counted for this end user ("" : the sum over all of them)

    @property
    def budget_id(self) -> str | None:
        """The value a client sends as `metadata.budget_id` to book on this budget."""
        return self.scope_value if self.scope == "budget_id" else None

    @property
    def utilisation(self) -> Decimal:
        return (self.spent_usd / self.limit_usd) if self.limit_usd > 0 else Decimal(0)

    def as_json(self) -> dict:
        """Money as decimal strings (exact), datetimes ISO 8601 with the tenant's UTC offset."""
        return {
            "id": self.id, "object": "budget", "name": self.name, "budget_id": self.budget_id,
            "scope": self.scope, "scope_value": self.scope_value or None, "end_user": self.end_user or None,
            "period": self.period,
            "enforcement": self.enforcement, "currency": "USD", "limit_usd": money_str(self.limit_usd),
            "spent_usd": money_str(self.spent_usd), "held_usd": money_str(self.held_usd),
            "remaining_usd": money_str(self.remaining_usd),
            "period_start": self.period_start.isoformat() if self.period != "total" else None,
            "resets_at": self.resets_at.isoformat() if self.resets_at else None, "timezone": self.timezone,
        }


async def budget_statuses(*, budgets, at: datetime, end_user: str = "") -> list[BudgetStatus]:
    """Limit, spent, held, remaining and reset time of each budget (Budget rows, tenants loaded).
    With `end_user`, a `user:*` budget is counted for that end user; without, it shows the sum over
    its end users (the limit applies to each of them)."""
    budgets = list(budgets)
    refs = [budget_ref(b) for b in budgets]
    if end_user:
        refs = [replace(r, subject=end_user) if r.per_end_user else r for r in refs]
    spend = await budget_spend(budgets=refs, at=at)
    out = []
    for ref in refs:
        zone = ZoneInfo(ref.timezone)
        start, end = period_bounds(period=ref.period, tz=ref.timezone, at=at)
        spent, held = spend.get(ref.spend_key, (Decimal(0), Decimal(0)))
        out.append(BudgetStatus(
            id=ref.id, name=ref.name, scope=ref.scope, scope_value=ref.scope_value, period=ref.period,
            enforcement="hard" if ref.hard else "soft", limit_usd=ref.limit_usd, spent_usd=spent, held_usd=held,
            remaining_usd=max(Decimal(0), ref.limit_usd - spent - held), period_start=start.astimezone(zone),
            resets_at=end.astimezone(zone) if end else None, timezone=ref.timezone, tenant_id=ref.tenant_id,
            end_user=ref.subject,
        ))
    return out


async def budget_statuses_for_key(*, auth, budget_id: str | None = None, tags=(), end_user: str = "",
                                  at: datetime) -> list[BudgetStatus]:
    """`GET /v1/budget`: the status of every budget that applies to the key (and to requests with
    these tags and this end user), with this process' own answers settled."""
    await settles_drain()
    budgets = await db_sync(lambda: list(budgets_for_key(auth=auth, budget_id=budget_id, tags=tags,
                                                         end_user=end_user)))
    if end_user:  # the end user's own budget replaces the per-end-user one
        mine = any(b.scope == "user" and b.scope_value == end_user for b in budgets)
        budgets = [b for b in budgets if not (mine and b.scope == "user" and b.scope_value == "*")]
    return await budget_statuses(budgets=budgets, at=at, end_user=end_user)


def budget_statuses_sync(*, budgets, at: datetime | None = None) -> list[BudgetStatus]:
    """The same numbers for sync callers (admin, management API, dashboard, /metrics)."""
    budgets = list(budgets.select_related("tenant") if hasattr(budgets, "select_related") else budgets)
    return async_to_sync(budget_statuses)(budgets=budgets, at=at or timezone.now())


def budget_statuses_for_tenants(*, tenant_ids, at: datetime | None = None) -> list[BudgetStatus]:
    """Every budget of these tenants (dashboard, /metrics)."""
    from .models import Budget

    return budget_statuses_sync(budgets=Budget.objects.filter(tenant_id__in=tenant_ids).order_by("tenant_id", "name"),
                                at=at)
