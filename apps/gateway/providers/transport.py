"""HTTP helpers shared by the adapters: one POST with error mapping, and an SSE reader."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import httpx
import orjson

from .. import http
from .base import ProviderError


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _scrub(text: str, secrets: tuple[str, ...]) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


def error_from_response(resp: httpx.Response, content: bytes, secrets: tuple[str, ...] = ()) -> ProviderError:
    """Map an upstream error status to a ProviderError, keeping the upstream's own message."""
    return _error_from(resp.status_code, resp.headers.get("retry-after"), content, secrets)


def _error_from(status: int, retry_after: str | None, content: bytes, secrets: tuple[str, ...]) -> ProviderError:
    message = content.decode(errors="replace")[:500]
    try:
        data = orjson.loads(content)
        err = data.get("error", data) if isinstance(data, dict) else data
        if isinstance(err, list) and err:  # Gemini sometimes wraps the error in a list
            err = err[0].get("error", err[0])
        if isinstance(err, dict) and err.get("message"):
            message = str(err["message"])
        elif isinstance(err, str):
            message = err
    except (orjson.JSONDecodeError, AttributeError, TypeError):
        pass
    retryable = status in (408, 409, 429) or status >= 500
    if status == 429:
        code, ours = "upstream_rate_limited", 429
    elif status in (400, 404, 413, 422):
        code, ours = "upstream_invalid_request", 400
    elif status in (401, 403):
        code, ours = "upstream_auth_failed", 502
    else:
        code, ours = "upstream_error", 502
    return ProviderError(
        f"upstream returned {status}: {_scrub(message, secrets)}",
        status=ours,
        retryable=retryable,
        retry_after=_retry_after(retry_after),
        code=code,
        upstream_status=status,
    )


def _network_error(exc: Exception) -> ProviderError:
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return ProviderError(f"upstream timed out ({type(exc).__name__})", status=504, retryable=True,
                             code="upstream_timeout")
    return ProviderError(f"upstream unreachable ({type(exc).__name__})", status=502, retryable=True,
                         code="upstream_unreachable")


async def post_json(url: str, *, headers: dict, body: dict, params: dict | None = None,
                    secrets: tuple[str, ...] = ()) -> dict:
    native = http.native_client()
    session = http.aiohttp_session() if native is None else None
    if native is not None:  # the fast path (see apps/gateway/http.py)
        try:
            resp = await native.post(url, headers=headers, content=orjson.dumps(body), params=params)
        except (OSError, TimeoutError) as exc:  # the client's own errors subclass these two
            raise _network_error(exc)
        status, content, retry_after = resp.status, resp.content, resp.headers.get("retry-after")
    elif session is not None:  # no httpx layer
        try:
            async with session.post(url, data=orjson.dumps(body), headers=headers, params=params) as resp:
                status, content = resp.status, await resp.read()
                retry_after = resp.headers.get("retry-after")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _network_error(exc)
    else:
        try:
            resp = await http.client().post(url, content=orjson.dumps(body), headers=headers, params=params)
        except httpx.HTTPError as exc:
            raise _network_error(exc)
        status, content, retry_after = resp.status_code, resp.content, resp.headers.get("retry-after")
    if status >= 400:
        raise _error_from(status, retry_after, content, secrets)
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        raise ProviderError("upstream returned a body that is not JSON", retryable=True, code="upstream_bad_body")


@asynccontextmanager
async def open_stream(url: str, *, headers: dict, body: dict, params: dict | None = None,
                      secrets: tuple[str, ...] = ()):
    """POST and yield the open response once its status is known to be good."""
    request = http.client().build_request("POST", url, content=orjson.dumps(body), headers=headers, params=params)
    try:
        resp = await http.client().send(request, stream=True)
    except httpx.HTTPError as exc:
        raise _network_error(exc)
    try:
        if resp.status_code >= 400:
            raise error_from_response(resp, await resp.aread(), secrets)
        yield resp
    finally:
        await resp.aclose()


async def sse_events(resp: httpx.Response) -> AsyncIterator[tuple[str | None, str]]:
    """Yields (event name, data) for each server-sent event. Mid-stream failures raise ProviderError."""
    event: str | None = None
    data: list[str] = []
    try:
        async for line in resp.aiter_lines():
            if not line:
                if data:
                    yield event, "\n".join(data)
                event, data = None, []
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
        if data:
            yield event, "\n".join(data)
    except httpx.HTTPError as exc:
        raise ProviderError(f"upstream stream broke ({type(exc).__name__})", status=502, retryable=False,
                            code="upstream_stream_broken")


async def request(method: str, url: str, *, headers: dict, body: dict | None = None, files: dict | None = None,
                  data: dict | None = None, secrets: tuple[str, ...] = ()) -> bytes:
    """One call off the hot path (provider batch APIs: uploads, polls, downloads), through the
    shared httpx client; the raw body of a 2xx, else a ProviderError as `post_json` raises."""
    kwargs: dict = {"headers": headers}
    if body is not None:
        kwargs["content"] = orjson.dumps(body)
    if files is not None:
        kwargs["files"], kwargs["data"] = files, data
    try:
        resp = await http.client().request(method, url, **kwargs)
    except httpx.HTTPError as exc:
        raise _network_error(exc)
    if resp.status_code >= 400:
        raise error_from_response(resp, resp.content, secrets)
    return resp.content


async def request_json(method: str, url: str, **kwargs) -> dict:
    content = await request(method, url, **kwargs)
    try:
        data = orjson.loads(content)
    except orjson.JSONDecodeError:
        raise ProviderError("upstream returned a body that is not JSON", retryable=True, code="upstream_bad_body")
    if not isinstance(data, dict):
        raise ProviderError("upstream returned a JSON body that is not an object", code="upstream_bad_body")
    return data


def jsonl(content: bytes) -> list[dict]:
    """The objects of a JSONL download; a line that is not a JSON object is skipped."""
    out = []
    for line in content.splitlines():
        if not line.strip():
            continue
        try:
            item = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(item, dict):
            out.append(item)
    return out
