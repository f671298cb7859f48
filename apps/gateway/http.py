"""One shared async HTTP client per process (and per event loop), pooled, with explicit timeouts.

GATEWAY_HTTP_TRANSPORT picks how upstream calls are made (figures in docs/benchmark.md):
- "native" (default): non-streaming calls through apps/gateway/h1.py's lean HTTP/1.1 client, streams
  through httpx over an aiohttp transport;
- "aiohttp": non-streaming calls go straight to an aiohttp session, streams through httpx over an
  aiohttp transport sharing that session's connection pool;
- "httpx-aiohttp": everything through httpx over the aiohttp transport;
- "httpx": plain httpx (its own pool).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib

import aiohttp
import httpx
from django.conf import settings

from . import h1

_Entry = tuple[asyncio.AbstractEventLoop, httpx.AsyncClient, aiohttp.ClientSession | None, h1.Client | None]
_clients: dict[int, _Entry] = {}
MAX_CONNECTIONS = 512


def _build() -> tuple[httpx.AsyncClient, aiohttp.ClientSession | None, h1.Client | None]:
    connect = settings.GATEWAY_UPSTREAM_CONNECT_TIMEOUT_S
    timeout = httpx.Timeout(connect=connect, read=settings.GATEWAY_UPSTREAM_READ_TIMEOUT_S, write=connect,
                            pool=connect)
    limits = httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=256, keepalive_expiry=30)
    native = None
    if settings.GATEWAY_HTTP_TRANSPORT == "native":
        native = h1.Client(connect_timeout=connect, read_timeout=settings.GATEWAY_UPSTREAM_READ_TIMEOUT_S,
                           max_connections=MAX_CONNECTIONS, keepalive_s=30)
    if settings.GATEWAY_HTTP_TRANSPORT in ("native", "aiohttp", "httpx-aiohttp"):
        from httpx_aiohttp import AiohttpTransport

        # No cookie jar: one session serves every tenant, and an upstream's cookies are nobody's.
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS, keepalive_timeout=30),
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, connect=connect, sock_connect=connect,
                                          sock_read=settings.GATEWAY_UPSTREAM_READ_TIMEOUT_S),
        )
        client = httpx.AsyncClient(transport=AiohttpTransport(client=session, limits=limits), timeout=timeout,
                                   limits=limits)
        return client, session, native
    return httpx.AsyncClient(timeout=timeout, limits=limits), None, None


def _prune() -> None:
    """Forget clients whose event loop has closed, closing their sockets (sync code calling
    async views through async_to_sync runs a short-lived loop per call)."""
    for key, (loop, _client, session, native) in list(_clients.items()):
        if loop.is_closed():
            if native is not None:
                native.close()
            if session is not None and session.connector is not None:
                with contextlib.suppress(Exception):
                    session.connector._close()
            del _clients[key]


def _entry() -> _Entry:
    loop = asyncio.get_running_loop()
    entry = _clients.get(id(loop))
    if entry is None or entry[0] is not loop or entry[1].is_closed:
        _prune()
        entry = _clients[id(loop)] = (loop, *_build())
    return entry


def client() -> httpx.AsyncClient:
    """The httpx client bound to the running event loop."""
    return _entry()[1]


def aiohttp_session() -> aiohttp.ClientSession | None:
    """The aiohttp session for direct non-streaming calls, when GATEWAY_HTTP_TRANSPORT is "aiohttp"."""
    if settings.GATEWAY_HTTP_TRANSPORT != "aiohttp":
        return None
    return _entry()[2]


def native_client() -> h1.Client | None:
    """The lean client for direct non-streaming calls, when GATEWAY_HTTP_TRANSPORT is "native"."""
    return _entry()[3]


atexit.register(_prune)
