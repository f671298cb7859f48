"""A lean HTTP/1.1 client for the upstream calls that are not streamed (GATEWAY_HTTP_TRANSPORT
"native", the default).

One asyncio protocol per connection, httptools (the parser uvicorn uses) to read the answer, and a
keep-alive pool per (scheme, host, port). It does what a non-streaming provider call needs and no
more: one request, one answer read whole (Content-Length, chunked, or until the connection closes),
TLS with the system's trust store, a connect timeout and a read timeout that counts from the last
byte received (as aiohttp's sock_read did). No redirects, cookies, proxies or compression (it sends
no Accept-Encoding, so the answer comes as it is).

Why not aiohttp for these: the same call costs about 150-190 µs of CPU through an aiohttp session
and 20-30 µs here (docs/benchmark.md), and this call is on every request's path. Streams still go
through httpx over the aiohttp transport (apps/gateway/http.py).

A connection goes back to the pool only after a whole answer that allows keep-alive; a request that
fails, times out or is cancelled half way closes its connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections import deque
from functools import cache, lru_cache
from urllib.parse import urlencode, urlsplit

import httptools

USER_AGENT = b"llm-service"


class UpstreamTimeout(TimeoutError):
    """No byte of the answer for the read timeout (or no connection within the connect timeout)."""


class UpstreamConnectionError(ConnectionError):
    """The connection failed, or closed before the whole answer arrived."""


class Response:
    __slots__ = ("status", "headers", "content")

    def __init__(self, status: int, headers: dict[str, str], content: bytes):
        self.status = status
        self.headers = headers  # names in lower case
        self.content = content


@cache
def _ssl_context() -> ssl.SSLContext:
    return ssl.create_default_context()


@lru_cache(maxsize=4096)
def _origin(url: str) -> tuple[tuple[str, str, int], bytes, bytes]:
    """(pool key, request target, Host header value) of a URL; cached, as a deployment's URLs do not
    change from one request to the next."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    default = 443 if scheme == "https" else 80
    port = parts.port or default
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    host_header = host if port == default else f"{host}:{port}"
    return (scheme, parts.hostname, port), target.encode("ascii"), host_header.encode("idna")


def _header_block(headers: dict[str, str]) -> bytes:
    lines = []
    for name, value in headers.items():
        line = f"{name}: {value}\r\n"
        if "\r" in line[:-2] or "\n" in line[:-2]:
            raise ValueError(f"header {name!r} holds a line break")
        lines.append(line)
    return "".join(lines).encode("latin-1")


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request in flight at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future | None = None
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.headers_done = False
        self.open = True
        self.last_read = 0.0
        self.idle_since = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.read_timeout = 0.0

    # -- asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:  # a server speaking out of turn, between answers: not to be trusted again
            self.close()
            return
        self.last_read = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamConnectionError(f"upstream sent a malformed answer ({exc})"))
            self.close()

    def eof_received(self):
        self._ended()
        return False  # close the transport

    def connection_lost(self, exc) -> None:
        self.open = False
        self._ended(exc)

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        if self.waiter is None or self.waiter.done():  # a second answer to one request: out of turn
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (100 Continue): the real one follows
            self.headers, self.headers_done = {}, False
            return
        response = Response(status, self.headers, b"".join(self.body))
        if not self.parser.should_keep_alive():
            self.close()
        self._finish(response)

    # -- the request
    async def exchange(self, data: bytes, read_timeout: float) -> Response:
        self.waiter = self.loop.create_future()
        self.headers, self.body, self.headers_done = {}, [], False
        self.read_timeout = read_timeout
        self.last_read = self.loop.time()
        self.timer = self.loop.call_at(self.last_read + read_timeout, self._check_read)
        try:
            self.transport.write(data)
            return await self.waiter
        except BaseException:
            self.close()  # half way through an answer: the connection cannot be reused
            raise
        finally:
            self.waiter = None
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None

    def _check_read(self) -> None:
        due = self.last_read + self.read_timeout
        if self.loop.time() < due:
            self.timer = self.loop.call_at(due, self._check_read)
            return
        self.timer = None
        self._fail(UpstreamTimeout(f"no answer from upstream in {self.read_timeout:g} s"))
        self.close()

    def _ended(self, exc: BaseException | None = None) -> None:
        """The connection closed: an answer that runs until the close is whole now; any other is cut."""
        self.open = False
        if self.waiter is None or self.waiter.done():
            return
        if self.headers_done and "content-length" not in self.headers \
                and "chunked" not in self.headers.get("transfer-encoding", "").lower():
            self._finish(Response(self.parser.get_status_code(), self.headers, b"".join(self.body)))
        else:
            self._fail(UpstreamConnectionError(f"upstream closed the connection before its answer ended ({exc})"
                                               if exc else "upstream closed the connection before its answer ended"))

    def _finish(self, response: Response) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(response)

    def _fail(self, exc: BaseException) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def close(self) -> None:
        self.open = False
        transport, self.transport = self.transport, None
        if transport is None:
            return
        if not self.loop.is_closed():
            transport.abort()
            return
        # A closed loop (a short-lived one from async_to_sync) cannot run the transport's close:
        # end the connection at the TCP level, the socket object closes its descriptor when dropped.
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class Client:
    """A pool of keep-alive connections per origin, bound to one event loop."""

    def __init__(self, *, connect_timeout: float, read_timeout: float, max_connections: int = 512,
                 keepalive_s: float = 30.0, ssl_context: ssl.SSLContext | None = None):
        self.ssl_context = ssl_context  # None: the system's trust store
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive_s = keepalive_s
        self.slots = asyncio.Semaphore(max_connections)
        self.idle: dict[tuple[str, str, int], deque[_Connection]] = {}
        self.closed = False

    async def post(self, url: str, *, headers: dict[str, str], content: bytes,
                   params: dict | None = None) -> Response:
        origin, target, host = _origin(url)
        if params:
            target += (b"&" if b"?" in target else b"?") + urlencode(params).encode("ascii")
        head = b"POST %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: %s\r\nContent-Length: %d\r\n%s\r\n" % (
            target, host, USER_AGENT, len(content), _header_block(headers))
        async with self.slots:
            conn = self._take(origin) or await self._connect(origin)
            response = await conn.exchange(head + content, self.read_timeout)
            if conn.open:
                conn.idle_since = conn.loop.time()
                self.idle.setdefault(origin, deque()).append(conn)
            return response

    def _take(self, origin) -> _Connection | None:
        idle = self.idle.get(origin)
        while idle:
            conn = idle.pop()  # the most recently used: the likeliest to be open still
            if conn.open and conn.loop.time() - conn.idle_since < self.keepalive_s:
                return conn
            conn.close()
        return None

    async def _connect(self, origin) -> _Connection:
        scheme, hostname, port = origin
        loop = asyncio.get_running_loop()
        tls = (self.ssl_context or _ssl_context()) if scheme == "https" else None
        try:
            async with asyncio.timeout(self.connect_timeout):
                _transport, conn = await loop.create_connection(
                    lambda: _Connection(loop), hostname, port, ssl=tls,
                    server_hostname=hostname if tls else None)
        except TimeoutError as exc:
            raise UpstreamTimeout(f"no connection to {hostname}:{port} in {self.connect_timeout:g} s") from exc
        except OSError as exc:
            raise UpstreamConnectionError(f"cannot connect to {hostname}:{port} ({exc})") from exc
        return conn

    def close(self) -> None:
        self.closed = True
        for idle in self.idle.values():
            for conn in idle:
                conn.close()
        self.idle.clear()
