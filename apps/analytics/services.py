"""Writes of the ledger."""

from __future__ import annotations

import asyncio
from functools import cache

import orjson
from django.conf import settings

from apps.gateway.db import db_sync, pg_pool

from .models import UsageEvent

# Rows per INSERT when concurrent requests' rows are written together (see _Batcher).
LEDGER_BATCH_MAX = 64


async def usage_event_record(**fields) -> None:
    """Insert one ledger row; idempotent on request_id (a second insert of the same id is a no-op).
    Durable when it returns: the row is committed before the response it accounts for is sent.

    How (GATEWAY_LEDGER_WRITER; figures in docs/benchmark.md): on PostgreSQL in the ASGI server,
    "batch" (the default) group-commits concurrent requests' rows through the async pool, "single"
    inserts each row on its own; "orm" always uses the ORM in the sync thread (as does every caller
    outside the server's loop). "redis-stream" is an experiment, not durable beyond Redis: XADD to
    a stream that `ledger_stream_drain` (Celery task) writes to the database in bulk."""
    writer = settings.GATEWAY_LEDGER_WRITER
    if writer == "redis-stream":
        await _stream_add(fields)
        return
    pool = await pg_pool() if writer != "orm" else None
    if pool is None:
        await db_sync(usage_event_record_sync, **fields)
    elif writer == "single":
        sql, columns = _insert_sql()
        async with pool.connection() as conn:
            await conn.execute(sql, [[fields[a] if a in fields else default()] for a, default in columns])
    else:
        await _batcher(pool).write(fields)


def usage_event_record_sync(**fields) -> None:
    UsageEvent.objects.bulk_create([UsageEvent(**fields)], ignore_conflicts=True)


class _Batcher:
    """Group commit for the ledger on PostgreSQL: each request awaits the commit of its own row, and
    rows that arrive while an INSERT is in flight go together in the next one (one statement, one
    transaction, one WAL flush). At one request in flight this is a plain single-row insert; under
    load it cuts the database work per row several times. A batch that fails is retried row by row,
    so one bad row fails only its own request."""

    def __init__(self, pool):
        self.pool = pool
        self.pending: list[tuple[list, asyncio.Future]] = []
        self.writer: asyncio.Task | None = None

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
                try:
                    await self._insert([row for row, _ in batch])
                except Exception:  # noqa: BLE001 - retried one by one: each request gets its own outcome
                    for row, future in batch:
                        try:
                            await self._insert([row])
                        except Exception as exc:  # noqa: BLE001 - handed to the request that owns the row
                            future.set_exception(exc)
                        else:
                            future.set_result(None)
                else:
                    for _row, future in batch:
                        future.set_result(None)
        finally:
            self.writer = None

    async def _insert(self, rows: list[list]) -> None:
        sql, _columns = _insert_sql()
        async with self.pool.connection() as conn:
            await conn.execute(sql, [list(column) for column in zip(*rows, strict=True)])


_batchers: dict[int, _Batcher] = {}


def _batcher(pool) -> _Batcher:
    b = _batchers.get(id(pool))
    if b is None:
        b = _batchers[id(pool)] = _Batcher(pool)
    return b


@cache
def _insert_sql() -> tuple[str, list]:
    """One INSERT for any number of rows, ON CONFLICT (request_id) DO NOTHING: each column is passed
    as an array and unnested, so the statement text never changes (psycopg parses and PostgreSQL
    prepares it once). With each column's model default for fields the caller leaves out."""
    from django.db import connection

    fields = [f for f in UsageEvent._meta.concrete_fields if not f.primary_key]
    cols = ", ".join(f'"{f.column}"' for f in fields)
    arrays = ", ".join(f"%s::{f.db_type(connection)}[]" for f in fields)
    sql = (f'INSERT INTO "{UsageEvent._meta.db_table}" ({cols}) SELECT * FROM unnest({arrays}) '  # noqa: S608
           'ON CONFLICT ("request_id") DO NOTHING')
    return sql, [(f.attname, f.get_default) for f in fields]


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

    client = redis.Redis.from_url(settings.REDIS_URL)
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
            UsageEvent.objects.bulk_create([UsageEvent(**orjson.loads(data[b"row"])) for _id, data in entries],
                                           ignore_conflicts=True)
            ids = [entry_id for entry_id, _ in entries]
            client.xack(LEDGER_STREAM, LEDGER_GROUP, *ids)
            client.xdel(LEDGER_STREAM, *ids)
            total += len(entries)
    return total
