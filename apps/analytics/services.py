"""Writes of the ledger."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import cache

import orjson
from django.conf import settings
from django.db import connection, transaction
from django.db.models import Case, Count, F, IntegerField, Q, Sum, Value, When
from django.db.models.functions import Coalesce, TruncDay, TruncHour
from django.utils import timezone

from apps.core.db import db_sync, pg_pool
from apps.core.stamps import stamp_write

from . import journal
from .models import (
    LATENCY_BUCKETS_MS,
    LATENCY_FIELDS,
    AttemptRollupHourly,
    UsageDimRollupDaily,
    UsageDimRollupHourly,
    UsageEvent,
    UsageRollupDaily,
    UsageRollupHourly,
)
from .selectors import ROLLUP_STAMP

log = logging.getLogger(__name__)

# Rows per INSERT when concurrent requests' rows are written together (see _Batcher).
LEDGER_BATCH_MAX = 64


async def usage_event_record(**fields) -> asyncio.Future | None:
    """Write one ledger row; idempotent on request_id (a second insert of the same id is a no-op).

    Contract: returns only once the row is durable, i.e. committed to the ledger, or written to the
    local ledger journal (apps/analytics/journal.py), from which it is replayed into the ledger if it
    does not get there otherwise. A journaled row is fsync'ed before the call returns, except one
    journaled first without LEDGER_JOURNAL_FIRST_FSYNC: that one outlives the process (the page
    cache), and is fsync'ed once it is known not to reach the ledger through this process. Raises
    when the row is neither (a row the database refuses while written before the answer, or a
    journal write that failed too): the caller must not treat the row as recorded then. Returns
    None when the row is in the ledger already, or a future that completes (never with an error)
    once it is in the ledger or left to the replay: whoever must count on the ledger holding the
    row (a budget settle) waits for it.

    How (GATEWAY_LEDGER_WRITER; figures and guarantees in docs/benchmark.md), on PostgreSQL in the
    ASGI server:
    - "journal" (the default): the row is written to the journal (one write() on the loop; with
      LEDGER_JOURNAL_FIRST_FSYNC, fsync'ed in the journal's thread, concurrent rows in one fsync)
      and the request goes on; the row then goes into the ledger through the group commit below,
      and a journal segment is deleted once all its rows are there. A row the database cannot take
      stays in the journal for the replay. A failed journal write falls back to "batch".
    - "batch": the row is group-committed with concurrent requests' rows through the async pool
      before the request goes on; while the database is unavailable (one of
      `journal.DB_UNAVAILABLE`) it is journaled instead, and for LEDGER_JOURNAL_SKIP_DB_S after a
      failure this process journals without trying the database.
    - "single": one insert per row on that pool; "orm": the ORM in the sync thread, as every caller
      outside the server's loop (a worker, the test client) and SQLite always do.
    - "redis-stream" is an experiment, not durable beyond Redis: XADD to a stream that
      `ledger_stream_drain` (Celery task) writes to the database in bulk (no journal)."""
    writer = settings.GATEWAY_LEDGER_WRITER
    if writer == "redis-stream":
        await _stream_add(fields)
        return None
    pool = await pg_pool() if writer != "orm" else None
    if pool is not None and writer == "journal":
        # One task takes the row all the way (a cancelled request's row too); the caller waits
        # until it is durable.
        loop = asyncio.get_running_loop()
        durable = loop.create_future()
        task = loop.create_task(_journal_first(pool, fields, durable))
        _into_ledger_tasks.add(task)
        task.add_done_callback(_into_ledger_tasks.discard)
        await asyncio.shield(durable)
        return task
    await _record_now(pool, writer, fields)
    return None


async def _record_now(pool, writer: str, fields: dict) -> None:
    """The row committed to the ledger, or journaled if the database is unavailable."""
    if journal.db_skipped():
        await journal.journal_rows([fields], "database down a moment ago")
        return
    try:
        if pool is None:
            await db_sync(usage_event_record_sync, **fields)
        elif writer == "single":
            sql, columns = _insert_sql()
            row = _adapted([fields[a] if a in fields else default() for a, default in columns])
            async with pool.connection() as conn:
                await conn.execute(sql, [[value] for value in row])
        else:
            await _batcher(pool).write(fields)  # journals the rows itself when the database is down
    except journal.DB_UNAVAILABLE as exc:
        journal.db_down()
        await journal.journal_rows([fields], exc)


_into_ledger_tasks: set[asyncio.Task] = set()


async def ledger_writes_drain() -> None:
    """Wait until the rows this event loop journaled first are in the ledger (or left to the
    replay): the server's shutdown, and a read of the ledger that must see this process' answers."""
    loop = asyncio.get_running_loop()
    while running := [t for t in _into_ledger_tasks if t.get_loop() is loop]:
        await asyncio.gather(*running, return_exceptions=True)


async def _journal_first(pool, fields: dict, durable: asyncio.Future) -> None:
    """GATEWAY_LEDGER_WRITER=journal: the row journaled (then `durable` is set), then into the ledger
    (or left in its journal segment for the replay). A failed journal write falls back to
    committing the row before the answer."""
    pending = journal.pending_writer()
    try:
        seg = await pending.append(fields)
    except Exception:  # noqa: BLE001 - whatever it was, the row is not in the journal
        log.exception("ledger: the journal-first append failed; the row goes to the database before the answer")
        try:
            await _record_now(pool, "batch", fields)
        except Exception as exc:  # noqa: BLE001 - the caller raises it: no 2xx without the row
            durable.set_exception(exc)
        else:
            durable.set_result(None)
        return
    durable.set_result(None)
    if journal.db_skipped():
        pending.done(seg, in_ledger=False)
        return
    try:
        await _batcher(pool, journaled=True).write(fields)
    except journal.DB_UNAVAILABLE:
        journal.db_down()
        pending.done(seg, in_ledger=False)
    except Exception:  # noqa: BLE001 - the row is in the journal: the replay sets it aside for an operator
        log.exception("ledger: the database refused row %s after its answer; it stays in the journal",
                      fields.get("request_id"))
        pending.done(seg, in_ledger=False)
    else:
        pending.done(seg, in_ledger=True)


def usage_event_record_sync(**fields) -> None:
    UsageEvent.objects.insert_new([UsageEvent(**fields)])


# --- rollups ----------------------------------------------------------------------------------

ROLLUP_LOCK_ID = 7_000_001


def _hour_floor(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _day_floor(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def _insert_select(model, qs, columns: list[str]) -> int:
    """INSERT INTO <model's table> (columns) <qs's SELECT>: aggregates never leave the database."""
    sql, params = qs.query.sql_with_params()
    table = connection.ops.quote_name(model._meta.db_table)
    cols = ", ".join(connection.ops.quote_name(c) for c in columns)
    with connection.cursor() as cur:
        cur.execute(f"INSERT INTO {table} ({cols}) {sql}", params)  # noqa: S608 - our own compiled SQL
        return cur.rowcount


def _status_class():
    return Case(When(status__lt=300, then=Value(2)), When(status__lt=500, then=Value(4)), default=Value(5),
                output_field=IntegerField())


def _latency_counts() -> dict:
    out, lower = {}, None
    for upper, name in zip(LATENCY_BUCKETS_MS, LATENCY_FIELDS, strict=False):
        cond = Q(latency_ms__lte=upper) if lower is None else Q(latency_ms__gt=lower, latency_ms__lte=upper)
        out[name] = Count("id", filter=cond)
        lower = upper
    out["lat_inf"] = Count("id", filter=Q(latency_ms__gt=LATENCY_BUCKETS_MS[-1]))
    return out


def usage_rollup_recompute(*, since: datetime, until: datetime,
                           exclude_tenants: set[int] | None = None) -> dict[str, int]:
    """Recompute the hourly rollups of every hour touching [since, until) and the daily rollups of
    every UTC day touching it. Idempotent: the buckets are deleted and rebuilt from the ledger in
    one transaction, so it can run as often as wanted and late ledger rows are picked up.

    Rollups are kept forever, the detailed rows only for the retention period: a tenant's month
    whose rows were archived and dropped (LedgerArchive.dropped_at) keeps its rollups as they are."""
    started = timezone.now()
    h_start, h_end = _hour_floor(since), _hour_floor(until)
    if h_end < until:
        h_end += timedelta(hours=1)
    if exclude_tenants is None:
        dropped = _dropped_tenants_by_month(h_start, h_end)
        if dropped:  # month by month (months are whole days), each without its dropped tenants
            from .partitions import month_add, month_bounds, month_start

            out = {"hourly": 0, "daily": 0}
            month = month_start(h_start)
            while month_bounds(month)[0] < h_end:
                lo, hi = month_bounds(month)
                part = usage_rollup_recompute(since=max(lo, h_start), until=min(hi, h_end),
                                              exclude_tenants=dropped.get(month, set()))
                out = {k: out[k] + part[k] for k in out}
                month = month_add(month, 1)
            return out
    exclude_tenants = exclude_tenants or set()
    d_start, d_end = _day_floor(h_start), _day_floor(h_end)
    if d_end < h_end:
        d_end += timedelta(days=1)
    dims = {
        "d_tenant": F("tenant_id"), "d_model": F("model"), "d_model_version": F("model_version"),
        "d_provider": F("provider"),
        "d_source_type": F("source_type"), "d_source_ref": F("source_ref"),
        "d_source_id": Coalesce("source_id", Value(0)), "d_api_key_id": Coalesce("api_key_id", Value(0)),
        "d_budget_id": F("budget_id"),
    }
    def kept(qs):
        return qs.exclude(tenant_id__in=exclude_tenants) if exclude_tenants else qs

    hourly = (
        kept(UsageEvent.objects.filter(timestamp__gte=h_start, timestamp__lt=h_end)).order_by()
        .annotate(d_bucket=TruncHour("timestamp", tzinfo=UTC), **dims, d_status_class=_status_class())
        .values("d_bucket", *dims, "d_status_class")
        .annotate(
            a_requests=Count("id"), a_errors=Count("id", filter=Q(status__gte=400)),
            a_cache_hits=Count("id", filter=Q(cached=True)), a_prompt=Sum("prompt_tokens"),
            a_completion=Sum("completion_tokens"), a_cost=Sum("cost"), a_saved=Sum("saved_cost"),
            a_latency=Sum("latency_ms"), **{f"a_{k}": v for k, v in _latency_counts().items()},
        )
    )
    measure_cols = ["requests", "errors", "cache_hits", "prompt_tokens", "completion_tokens", "cost", "saved_cost",
                    "latency_ms_sum", *LATENCY_FIELDS]
    dim_cols = ["bucket", "tenant_id", "model", "model_version", "provider", "source_type", "source_ref",
                "source_id", "api_key_id", "budget_id", "status_class"]

    def days_from_hours(hourly_model, daily_model, dims: list[str]) -> int:
        """Replace the daily rows of the days touched by the sums of their hourly rows."""
        day_dims = {f"d_{c}": F(c) for c in dims}
        daily = (
            kept(hourly_model.objects.filter(bucket__gte=d_start, bucket__lt=d_end)).order_by()
            .annotate(d_bucket=TruncDay("bucket", tzinfo=UTC), **day_dims)
            .values("d_bucket", *day_dims)
            .annotate(**{f"a_{c}": Sum(c) for c in measure_cols})
        )
        kept(daily_model.objects.filter(bucket__gte=d_start, bucket__lt=d_end)).delete()
        return _insert_select(daily_model, daily, ["bucket", *dims, *measure_cols])

    with transaction.atomic():
        if connection.vendor == "postgresql":  # one recompute at a time (beat overlap, manual runs)
            with connection.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", [ROLLUP_LOCK_ID])
        kept(UsageRollupHourly.objects.filter(bucket__gte=h_start, bucket__lt=h_end)).delete()
        n_hourly = _insert_select(UsageRollupHourly, hourly, dim_cols + measure_cols)
        n_daily = days_from_hours(UsageRollupHourly, UsageRollupDaily, dim_cols[1:])
        AttemptRollupHourly.objects.filter(bucket__gte=h_start, bucket__lt=h_end).delete()
        n_attempts = _attempt_rollup_insert(h_start, h_end)
        kept(UsageDimRollupHourly.objects.filter(bucket__gte=h_start, bucket__lt=h_end)).delete()
        n_dims = _dim_rollup_insert(h_start, h_end, exclude_tenants)
        n_dims_daily = days_from_hours(UsageDimRollupHourly, UsageDimRollupDaily, ["dim", "value", *dim_cols[1:]])
    # The dashboards' "last updated": ledger rows up to here are in the rollups.
    stamp_write(ROLLUP_STAMP, min(until, started))
    return {"hourly": n_hourly, "daily": n_daily, "attempts": n_attempts, "dims": n_dims, "dims_daily": n_dims_daily}


def _dim_rollup_insert(start: datetime, end: datetime, exclude_tenants: set[int]) -> int:
    """The tag and end-user rollups of [start, end): the ledger rows that carry tags or an end user,
    summed per hour, main dimensions, and tag (one row per tag of a request) or end user. Summed in
    Python (the same on both databases; only tagged or attributed rows are read)."""
    import bisect

    rows = (UsageEvent.objects.filter(timestamp__gte=start, timestamp__lt=end)
            .filter(~Q(tags=[]) | ~Q(end_user="")).exclude(tenant_id__in=exclude_tenants)
            .values_list("timestamp", "tenant_id", "model", "provider", "source_type", "source_ref", "source_id",
                         "api_key_id", "budget_id", "status", "cached", "prompt_tokens", "completion_tokens", "cost",
                         "saved_cost", "latency_ms", "tags", "end_user"))
    n_lat = len(LATENCY_FIELDS)
    sums: dict[tuple, list] = {}
    for (at, tenant_id, model, provider, source_type, source_ref, source_id, key_id, budget_id, status, cached,
         prompt, completion, cost, saved, latency, tags, end_user) in rows.iterator(chunk_size=2000):
        status_class = 2 if status < 300 else 4 if status < 500 else 5
        base = (_hour_floor(at), tenant_id, model, provider, source_type, source_ref, source_id or 0, key_id or 0,
                budget_id, status_class)
        lat = bisect.bisect_left(LATENCY_BUCKETS_MS, latency)  # bucket i: latency <= LATENCY_BUCKETS_MS[i]
        for dim, value in [*(("tag", t) for t in tags or ()), *((("user", end_user),) if end_user else ())]:
            acc = sums.get((dim, value, *base))
            if acc is None:
                acc = sums[(dim, value, *base)] = [0, 0, 0, 0, 0, Decimal(0), Decimal(0), 0] + [0] * n_lat
            acc[0] += 1
            acc[1] += status >= 400
            acc[2] += bool(cached)
            acc[3] += prompt
            acc[4] += completion
            acc[5] += cost
            acc[6] += saved
            acc[7] += latency
            acc[8 + lat] += 1
    names = ("requests", "errors", "cache_hits", "prompt_tokens", "completion_tokens", "cost", "saved_cost",
             "latency_ms_sum", *LATENCY_FIELDS)
    UsageDimRollupHourly.objects.bulk_create([
        UsageDimRollupHourly(dim=k[0], value=k[1], bucket=k[2], tenant_id=k[3], model=k[4], provider=k[5],
                             source_type=k[6], source_ref=k[7], source_id=k[8], api_key_id=k[9], budget_id=k[10],
                             status_class=k[11], **dict(zip(names, v, strict=True)))
        for k, v in sums.items()], batch_size=1000)
    return len(sums)


def _attempt_rollup_insert(start: datetime, end: datetime) -> int:
    """The attempt rollups of [start, end) from the ledger rows' `attempts` (in SQL on PostgreSQL)."""
    if connection.vendor == "postgresql":
        table = connection.ops.quote_name(AttemptRollupHourly._meta.db_table)
        ledger = connection.ops.quote_name(UsageEvent._meta.db_table)
        sql = (
            f"INSERT INTO {table} (bucket, tenant_id, model, source_ref, provider, deployment_id, outcome, "  # noqa: S608
            "attempts, latency_ms_sum) "
            "SELECT date_trunc('hour', e.timestamp AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', e.tenant_id, e.model, "
            "e.source_ref, COALESCE(a->>'provider', ''), COALESCE((a->>'deployment_id')::bigint, 0), "
            "COALESCE(a->>'outcome', ''), count(*), COALESCE(round(sum((a->>'latency_ms')::numeric)), 0)::bigint "
            f"FROM {ledger} e CROSS JOIN LATERAL jsonb_array_elements(e.attempts) a "
            "WHERE e.timestamp >= %s AND e.timestamp < %s AND e.attempts <> '[]'::jsonb "
            "GROUP BY 1, 2, 3, 4, 5, 6, 7"
        )
        with connection.cursor() as cur:
            cur.execute(sql, [start, end])
            return cur.rowcount
    sums: dict[tuple, list[int]] = {}
    rows = (UsageEvent.objects.filter(timestamp__gte=start, timestamp__lt=end).exclude(attempts=[])
            .values_list("timestamp", "tenant_id", "model", "source_ref", "attempts"))
    for at, tenant_id, model, source_ref, attempts in rows.iterator(chunk_size=2000):
        for a in attempts or ():
            key = (_hour_floor(at), tenant_id, model, source_ref, a.get("provider") or "",
                   a.get("deployment_id") or 0, a.get("outcome") or "")
            acc = sums.setdefault(key, [0, 0.0])
            acc[0] += 1
            acc[1] += a.get("latency_ms") or 0
    AttemptRollupHourly.objects.bulk_create([
        AttemptRollupHourly(bucket=k[0], tenant_id=k[1], model=k[2], source_ref=k[3], provider=k[4],
                            deployment_id=k[5], outcome=k[6], attempts=v[0], latency_ms_sum=round(v[1]))
        for k, v in sums.items()])
    return len(sums)


def _dropped_tenants_by_month(start: datetime, end: datetime) -> dict:
    """{first day of month: tenant ids} whose detailed rows of that month were dropped, for the
    UTC months touching [start, end)."""
    from .models import LedgerArchive
    from .partitions import month_add, month_bounds, month_start

    months, month = [], month_start(start.astimezone(UTC))
    while month_bounds(month)[0] < end:
        months.append(month)
        month = month_add(month, 1)
    out: dict = {}
    for m, tenant_id in LedgerArchive.objects.filter(dropped_at__isnull=False, month__in=months).values_list(
            "month", "tenant_id"):
        out.setdefault(m, set()).add(tenant_id)
    return out


def usage_rollup_recent(*, now: datetime | None = None) -> dict[str, int]:
    """What the beat task runs: recompute the last ANALYTICS_ROLLUP_LOOKBACK_H hours."""
    now = now or timezone.now()
    return usage_rollup_recompute(since=now - timedelta(hours=settings.ANALYTICS_ROLLUP_LOOKBACK_H),
                                  until=now + timedelta(seconds=1))
class _Batcher:
    """Group commit for the ledger on PostgreSQL: each request awaits the commit of its own row, and
    rows that arrive while an INSERT is in flight go together in the next one (one statement, one
    transaction, one WAL flush). At one request in flight this is a plain single-row insert; under
    load it cuts the database work per row several times. A batch that fails is retried row by row,
    so one bad row fails only its own request."""

    def __init__(self, pool, *, journaled: bool = False):
        self.pool = pool
        # Rows journaled already (GATEWAY_LEDGER_WRITER=journal): an unavailable database is the
        # caller's to handle, not journaled a second time.
        self.journaled = journaled
        self.loop = asyncio.get_running_loop()
        self.pending: list[tuple[list, asyncio.Future]] = []
        self.writer: asyncio.Task | None = None
        # The writer keeps its connection between batches (a pool checkout and return per batch cost
        # about a tenth of a request's CPU at one in flight), and gives it back after LINGER_S idle.
        self.conn = None
        self.used = 0.0
        self.linger: asyncio.TimerHandle | None = None

    async def write(self, fields: dict) -> None:
        _sql, columns = _insert_sql()
        row = [fields[a] if a in fields else default() for a, default in columns]
        future = asyncio.get_running_loop().create_future()
        self.pending.append((row, future))
        if self.writer is None:
            self.writer = asyncio.get_running_loop().create_task(self._drain())
        await asyncio.shield(future)  # a cancelled request still gets its row written

    async def _drain(self) -> None:
        try:
            while self.pending:
                batch, self.pending = self.pending[:LEDGER_BATCH_MAX], self.pending[LEDGER_BATCH_MAX:]
                if journal.db_skipped() and not self.journaled:  # down a moment ago: no waiting on it
                    await self._journal(batch, "database down a moment ago")
                    continue
                try:
                    await self._insert([row for row, _ in batch])
                except journal.DB_UNAVAILABLE as exc:  # the rows are fine, the database is not
                    journal.db_down()
                    await self._journal(batch, exc)
                except Exception:  # noqa: BLE001 - retried one by one: each request gets its own outcome
                    for row, future in batch:
                        try:
                            await self._insert([row])
                        except journal.DB_UNAVAILABLE as exc:
                            journal.db_down()
                            await self._journal([(row, future)], exc)
                        except Exception as exc:  # noqa: BLE001 - handed to the request that owns the row
                            future.set_exception(exc)
                        else:
                            future.set_result(None)
                else:
                    for _row, future in batch:
                        future.set_result(None)
        finally:
            self.writer = None

    async def _journal(self, batch: list[tuple[list, asyncio.Future]], reason) -> None:
        """Journal the batch's rows (one append, one fsync); each request gets the outcome. (Rows
        journaled already get the database's error instead.)"""
        if self.journaled:  # (`reason` is then always the database's error: see _drain)
            for _row, future in batch:
                future.set_exception(reason)
            return
        names = [a for a, _default in _insert_sql()[1]]
        try:
            await journal.journal_rows([dict(zip(names, row, strict=True)) for row, _ in batch], reason)
        except Exception as exc:  # noqa: BLE001 - neither the database nor the journal: the requests fail
            for _row, future in batch:
                future.set_exception(exc)
        else:
            for _row, future in batch:
                future.set_result(None)

    async def _insert(self, rows: list[list]) -> None:
        conn, self.conn = self.conn, None
        if conn is None or conn.closed:
            conn = await self.pool.getconn()
        try:
            if len(rows) == 1:  # one JSON parameter: dumping one-element arrays costs more than the row
                await conn.execute(_insert_one_sql(), [_row_json(rows[0])])
            else:
                rows = [_adapted(row) for row in rows]
                await conn.execute(_insert_sql()[0], [list(column) for column in zip(*rows, strict=True)])
        except BaseException:
            await self.pool.putconn(conn)  # the pool keeps it, or drops it if it is broken
            raise
        self._keep(conn)

    def _keep(self, conn) -> None:
        self.conn, self.used = conn, self.loop.time()
        if self.linger is None:
            self.linger = self.loop.call_later(LINGER_S, self._release_idle)

    def _release_idle(self) -> None:
        """Give the kept connection back once it has been idle for LINGER_S."""
        self.linger = None
        if self.conn is None:
            return
        idle = self.loop.time() - self.used
        if idle < LINGER_S or self.writer is not None:
            self.linger = self.loop.call_later(max(LINGER_S - idle, 0.01), self._release_idle)
            return
        task = self.loop.create_task(self.release())
        _releasing.add(task)
        task.add_done_callback(_releasing.discard)

    async def release(self) -> None:
        conn, self.conn = self.conn, None
        if self.linger is not None:
            self.linger.cancel()
            self.linger = None
        if conn is not None:
            await self.pool.putconn(conn)


_batchers: dict[tuple[int, bool], _Batcher] = {}
_releasing: set[asyncio.Task] = set()
LINGER_S = 1.0


async def ledger_writers_release() -> None:
    """The server's shutdown (and a test's end), before the pool closes: the rows journaled first
    go into the ledger, the open journal-first segment is closed, and the ledger writers of this
    event loop give back the connections they keep between batches."""
    await ledger_writes_drain()
    await journal.pending_close()
    loop = asyncio.get_running_loop()
    for batcher in list(_batchers.values()):
        if batcher.loop is loop and batcher.writer is None:
            await batcher.release()


def _batcher(pool, *, journaled: bool = False) -> _Batcher:
    b = _batchers.get((id(pool), journaled))
    if b is None:
        b = _batchers[(id(pool), journaled)] = _Batcher(pool, journaled=journaled)
    return b


@cache
def _insert_sql() -> tuple[str, list]:
    """One INSERT for any number of rows, idempotent on request_id: each column is passed as an array
    and unnested, so the statement text never changes (psycopg parses and PostgreSQL prepares it
    once). With each column's model default for fields the caller leaves out.

    `ON CONFLICT DO NOTHING` has no target: on the partitioned ledger request_id is kept unique by
    the idempotency table's key, which the table's insert trigger checks in this same statement
    (apps/analytics/partitions.py); on an unpartitioned table the unique index on request_id does."""
    from django.db import connection

    fields = _row_fields()
    cols = ", ".join(f'"{f.column}"' for f in fields)
    arrays = ", ".join(f"%s::{f.db_type(connection)}[]" for f in fields)
    sql = (f'INSERT INTO "{UsageEvent._meta.db_table}" ({cols}) SELECT * FROM unnest({arrays}) '  # noqa: S608
           'ON CONFLICT DO NOTHING')
    return sql, [(f.attname, f.get_default) for f in fields]


@cache
def _json_positions() -> tuple[int, ...]:
    """Where the JSON columns (the attempts) sit in a row of _insert_sql."""
    from django.db.models import JSONField

    return tuple(i for i, f in enumerate(_row_fields()) if isinstance(f, JSONField))


def _adapted(row: list) -> list:
    """The row as psycopg must be given it: JSON values wrapped (a list would go as an array)."""
    from psycopg.types.json import Jsonb

    row = list(row)
    for i in _json_positions():
        row[i] = Jsonb(row[i])
    return row


@cache
def _insert_one_sql() -> str:
    """The single-row form of _insert_sql: the same columns, from one JSON object (`_row_json`) that
    PostgreSQL unpacks into the table's row type. Dumping one string costs the caller less than
    45 typed parameters (docs/benchmark.md); a JSON null is SQL NULL, as the ORM stores None."""
    table = UsageEvent._meta.db_table
    cols = ", ".join(f'"{f.column}"' for f in _row_fields())
    return (f'INSERT INTO "{table}" ({cols}) SELECT {cols} '  # noqa: S608
            f'FROM json_populate_record(NULL::"{table}", %s::json) ON CONFLICT DO NOTHING')


@cache
def _row_fields() -> list:
    """The ledger row's fields, in the order of every insert's columns (the id is the database's)."""
    return [f for f in UsageEvent._meta.concrete_fields if not f.primary_key]


def _json_value(value):
    if isinstance(value, Decimal):
        return str(value)  # exact: never through a float
    raise TypeError(f"{type(value).__name__} in a ledger row")


def _row_json(row: list) -> str:
    """A row of _insert_sql as the JSON object _insert_one_sql takes (keys: column names)."""
    return orjson.dumps(dict(zip(_row_columns(), row, strict=True)), default=_json_value).decode()


@cache
def _row_columns() -> tuple[str, ...]:
    return tuple(f.column for f in _row_fields())


# --- experiment: the ledger through a Redis stream --------------------------------------------

LEDGER_STREAM = "llms:ledger"
LEDGER_GROUP = "ledger-writers"
_redis_clients: dict[int, object] = {}


async def _stream_add(fields: dict) -> None:
    import redis.asyncio as aioredis

    loop = asyncio.get_running_loop()
    client = _redis_clients.get(id(loop))
    if client is None:
        client = _redis_clients[id(loop)] = aioredis.Redis.from_url(settings.REDIS_URL)
    await client.xadd(LEDGER_STREAM, {"row": orjson.dumps(fields, default=str)})


def ledger_stream_drain(*, batch: int = 1000, consumer: str = "drain") -> int:
    """Move rows from the Redis stream to the ledger in bulk; returns how many were read. A row is
    acknowledged only after its INSERT committed, so a crash re-delivers it (the insert is idempotent)."""
    import redis

    from apps.core.redis import sync_client_for

    client = sync_client_for(settings.REDIS_URL, timeout_s=30)
    try:
        client.xgroup_create(LEDGER_STREAM, LEDGER_GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    total = 0
    for start in ("0", ">"):  # first what this consumer was given but never acknowledged, then new rows
        while True:
            reply = client.xreadgroup(LEDGER_GROUP, consumer, {LEDGER_STREAM: start}, count=batch)
            entries = reply[0][1] if reply else []
            if not entries:
                break
            UsageEvent.objects.insert_new([UsageEvent(**orjson.loads(data[b"row"])) for _id, data in entries])
            ids = [entry_id for entry_id, _ in entries]
            client.xack(LEDGER_STREAM, LEDGER_GROUP, *ids)
            client.xdel(LEDGER_STREAM, *ids)
            total += len(entries)
    return total
