"""Database access from the async data plane.

The data-plane ASGI handler (config/asgi.py) has no per-request thread, so sync ORM calls run in the
process' one sync thread (asgiref's thread-sensitive executor): `db_sync` runs a function there and
then gives its connection back, as Django does at the end of a request (inside an atomic block, a
test's or a caller's transaction, the connection is left alone).

On PostgreSQL, the ASGI server's event loop also gets an async psycopg pool (`pg_pool`), for the
one write per request (the ledger row): no thread hop, and concurrent inserts instead of one at a
time in the sync thread. Only the server's own loop (marked by `server_loop_mark`) has one; other
callers (Celery tasks running the pipeline under async_to_sync, the test client) have short-lived
loops and use the ORM.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections, connection

T = TypeVar("T")


def _run_and_release(fn: Callable[..., T], kwargs: dict) -> T:
    try:
        return fn(**kwargs)
    finally:
        if not connection.in_atomic_block:
            close_old_connections()


async def db_sync(fn: Callable[..., T], /, **kwargs) -> T:
    """`await db_sync(selector, arg=...)`: run a sync DB function off the event loop."""
    return await sync_to_async(_run_and_release)(fn, kwargs)


_server_loop: asyncio.AbstractEventLoop | None = None
_pool = None  # psycopg_pool.AsyncConnectionPool, bound to _pool_loop
_pool_loop: asyncio.AbstractEventLoop | None = None


def server_loop_mark() -> None:
    """Called by the ASGI application for each /v1 request: the server's loop lives as long as the
    process, so it may keep a pool."""
    global _server_loop
    loop = asyncio.get_running_loop()
    if _server_loop is not loop:
        _server_loop = loop


def on_server_loop() -> bool:
    """Whether the caller runs on the ASGI server's long-lived loop (where background work may be
    left to finish after the request), not on a short-lived one (a Celery task, the test client)."""
    return _server_loop is not None and asyncio.get_running_loop() is _server_loop


def _conninfo() -> str:
    from psycopg.conninfo import make_conninfo

    db = settings.DATABASES["default"]
    parts = {"dbname": db["NAME"], "user": db.get("USER"), "password": db.get("PASSWORD"),
             "host": db.get("HOST"), "port": str(db.get("PORT") or "")}
    return make_conninfo(**{k: v for k, v in parts.items() if v})


async def pg_pool():
    """The async psycopg pool of the server's event loop, or None (not PostgreSQL, or not the
    server's loop)."""
    global _pool, _pool_loop
    if not settings.IS_POSTGRES:
        return None
    loop = asyncio.get_running_loop()
    if loop is not _server_loop:
        return None
    if _pool is None or _pool_loop is not loop:
        from psycopg_pool import AsyncConnectionPool

        # synchronous_commit (GATEWAY_LEDGER_SYNCHRONOUS_COMMIT): what a ledger commit waits for;
        # docs/benchmark.md "The ledger" says what each setting survives.
        kwargs = {"autocommit": True, "options": f"-c synchronous_commit={settings.GATEWAY_LEDGER_SYNCHRONOUS_COMMIT}"}
        pool = AsyncConnectionPool(_conninfo(), min_size=settings.GATEWAY_PG_POOL_MIN,
                                   max_size=settings.GATEWAY_PG_POOL_MAX, kwargs=kwargs,
                                   timeout=settings.GATEWAY_PG_POOL_TIMEOUT_S, open=False, name="data-plane")
        await pool.open(wait=False)
        _pool, _pool_loop = pool, loop
    return _pool

