"""The data plane's model calls straight from ASGI.

`POST /v1/chat/completions`, `/v1/embeddings`, `/v1/messages`, `/v1/responses` and `/v1/requests`
carry nearly all of the traffic, and their views need four things of a request: its body, its
headers, its path and the client's address. This module gives them those from the ASGI scope and
sends back the response they return, without Django's request and response machinery or
django-ninja's dispatch, which do nothing for these routes (the views take no parameters, and
errors are rendered by the pipeline in OpenAI's shape) and cost about a tenth of the gateway's CPU
per request (docs/benchmark.md). The same view functions are registered with django-ninja, which
still serves them when this path is off (`GATEWAY_DIRECT_ROUTES=false`) and documents them in the
OpenAPI schema; every other /v1 route goes through Django (config/asgi.py).

What Django's handler and the data plane's middleware do for these routes is done here too: a
body over DATA_UPLOAD_MAX_MEMORY_SIZE is a 413, a client that goes away cancels the view (a stream
then bills what it sent), every response has `x-request-id` and `X-Content-Type-Options`. A
request with a query string takes Django's path (the control-character check reads it there).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing

from django.conf import settings

from . import api
from .errors import GatewayError
from .pipeline import new_request_id

log = logging.getLogger(__name__)

VIEWS = {
    "/v1/chat/completions": api.chat_completions,
    "/v1/embeddings": api.embeddings,
    "/v1/messages": api.messages,
    "/v1/responses": api.responses,
    "/v1/requests": api.seed_request,
}


def view_for(scope) -> object | None:
    """The view this module serves the request with, or None (Django serves it)."""
    if scope["method"] != "POST" or scope.get("query_string") or scope.get("root_path"):
        return None
    return VIEWS.get(scope["path"])


class Headers(dict):
    """Request headers by lower-case name (repeated headers joined with ',', as Django does)."""

    __slots__ = ()

    def get(self, name: str, default=None):
        return dict.get(self, name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return dict.__getitem__(self, name.lower())

    def __contains__(self, name) -> bool:
        return dict.__contains__(self, name.lower())


class DirectRequest:
    """What the model-call views read of a request."""

    __slots__ = ("META", "body", "headers", "method", "path", "path_info")

    def __init__(self, scope, body: bytes, headers: Headers):
        self.method = "POST"
        self.path = self.path_info = scope["path"]
        self.body = body
        self.headers = headers
        client = scope.get("client")
        self.META = {"REMOTE_ADDR": client[0] if client else ""}


class _TooLarge(Exception):
    pass


def _headers(scope) -> Headers:
    out = Headers()
    for raw_name, raw_value in scope["headers"]:
        name, value = raw_name.decode("latin1").lower(), raw_value.decode("latin1")
        out[name] = f"{out[name]},{value}" if name in out else value
    return out


async def _body(receive, headers: Headers) -> bytes | None:
    """The whole body, or None when the client went away first."""
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    declared = headers.get("content-length")
    if limit is not None and declared and declared.isdigit() and int(declared) > limit:
        raise _TooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if limit is not None and size > limit:
                raise _TooLarge
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_large():
    return GatewayError(413, f"The request body is too large (at most {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes).",
                        code="request_too_large").response()


class _Exchange:
    """One request's response state, shared with its disconnect watcher."""

    __slots__ = ("closing", "task")

    def __init__(self):
        self.task = asyncio.current_task()
        self.closing = False  # the last message is being sent: a disconnect now changes nothing

    async def watch(self, receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not self.closing:
                    self.task.cancel()
                return


async def _send(response, send, exchange: _Exchange) -> None:
    headers = [(name.encode("ascii"), value.encode("latin1")) for name, value in response.items()]
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    if response.streaming:
        async with aclosing(aiter(response)) as content:
            async for part in content:
                await send({"type": "http.response.body", "body": part, "more_body": True})
        exchange.closing = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    else:
        exchange.closing = True
        await send({"type": "http.response.body", "body": response.content, "more_body": False})


async def serve(view, scope, receive, send) -> None:
    headers = _headers(scope)
    exchange = _Exchange()
    try:
        body = await _body(receive, headers)
    except _TooLarge:
        response = _too_large()
    else:
        if body is None:
            return
        response = None
    watcher = asyncio.create_task(exchange.watch(receive)) if response is None else None
    try:
        if response is None:
            try:
                response = await view(DirectRequest(scope, body, headers))
            except asyncio.CancelledError:
                raise
            except Exception:  # what Django's handler would make a 500
                log.exception("%s failed", scope["path"])
                response = GatewayError(500, "The server had an error while processing your request.",
                                        type="api_error").response()
        if "x-request-id" not in response:
            response["x-request-id"] = new_request_id()
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        await _send(response, send, exchange)
    except asyncio.CancelledError:
        if watcher is None or not watcher.done():
            raise
        # The client went away: the view was cancelled (the pipeline ended the request), and
        # nobody is left to answer.
        exchange.task.uncancel()
    finally:
        if watcher is not None:
            watcher.cancel()
        if response is not None and response.streaming:
            # (A plain response holds nothing to close; close() would only send Django's
            # request_finished, whose receivers have no connection of this thread to close.)
            response.close()
