"""One shared async HTTP client per process (and per event loop), pooled, with explicit timeouts.

GATEWAY_HTTP_TRANSPORT picks httpx over an aiohttp transport (default: it measured faster under
concurrency, see README) or plain httpx.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib

import httpx
from django.conf import settings

_clients: dict[int, tuple[asyncio.AbstractEventLoop, httpx.AsyncClient]] = {}


def _build() -> httpx.AsyncClient:
    timeout = httpx.Timeout(
        connect=settings.GATEWAY_UPSTREAM_CONNECT_TIMEOUT_S,
        read=settings.GATEWAY_UPSTREAM_READ_TIMEOUT_S,
        write=settings.GATEWAY_UPSTREAM_CONNECT_TIMEOUT_S,
        pool=settings.GATEWAY_UPSTREAM_CONNECT_TIMEOUT_S,
    )
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=256, keepalive_expiry=30)
    if settings.GATEWAY_HTTP_TRANSPORT == "aiohttp":
        from httpx_aiohttp import AiohttpTransport

        return httpx.AsyncClient(transport=AiohttpTransport(limits=limits), timeout=timeout, limits=limits)
    return httpx.AsyncClient(timeout=timeout, limits=limits)


def _prune() -> None:
    """Forget clients whose event loop has closed, closing their sockets (sync code calling
    async views through async_to_sync runs a short-lived loop per call)."""
    for key, (loop, c) in list(_clients.items()):
        if loop.is_closed():
            session = getattr(c._transport, "client", None)
            connector = getattr(session, "connector", None)
            if connector is not None:
                with contextlib.suppress(Exception):
                    connector._close()
            del _clients[key]


def client() -> httpx.AsyncClient:
    """The client bound to the running event loop."""
    loop = asyncio.get_running_loop()
    entry = _clients.get(id(loop))
    if entry is None or entry[0] is not loop or entry[1].is_closed:
        _prune()
        entry = _clients[id(loop)] = (loop, _build())
    return entry[1]


atexit.register(_prune)
