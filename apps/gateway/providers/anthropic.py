"""Anthropic's Messages API (`POST {api_base}/v1/messages`), translated to and from the OpenAI shape.

Request: system (and developer) messages are lifted into the top-level `system`; `max_tokens` is
required there, so the request's own cap or the provider option `default_max_tokens` is sent; tool
calls and tool results become `tool_use` / `tool_result` blocks; images become image blocks.
Response: stop reasons are mapped (end_turn -> stop, max_tokens -> length, tool_use -> tool_calls).
Usage (`usage_of`): Anthropic's `input_tokens` excludes the prompt cache, so our prompt_tokens is
input_tokens + cache_creation_input_tokens + cache_read_input_tokens, with cached_tokens = the
cache reads and cache_write_tokens = the cache writes (each billed at its own rate);
output_tokens (thinking included) is completion_tokens.
Streams: message_start / content_block_* / message_delta / message_stop events become OpenAI
chunks; usage comes in message_start (input side) and message_delta (output_tokens, and in newer
API versions the input side again), merged field by field; the usage chunk follows the finish
chunk. An `error` event mid-stream raises. Anthropic has no embeddings API.

Message Batches (a deployment with `provider_batch`): `POST /v1/messages/batches` {requests:
[{custom_id, params}]} (params: a Messages body; custom_id `^[a-zA-Z0-9_-]{1,64}$`);
`GET /v1/messages/batches/{id}` until `processing_status` is `ended`, then its `results_url`, a
JSONL of `{"custom_id", "result": {"type": succeeded (with `message`) | errored (with `error`:
{type: error, error: {type, message}}) | canceled | expired}}`, in any order;
`POST /v1/messages/batches/{id}/cancel`.
"""

from __future__ import annotations

import time
from dataclasses import replace
from urllib.parse import urlsplit

import orjson

from .base import (
    GATEWAY_USAGE,
    NATIVE_EVENTS,
    BatchPoll,
    BatchResult,
    Completion,
    ProviderAdapter,
    ProviderError,
    Target,
    Usage,
    register,
)
from .transport import jsonl, open_stream, post_json, request, request_json, sse_events

DEFAULT_API_BASE = "https://api.anthropic.com"
DEFAULT_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096

STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def _text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


def _image_block(url: str) -> dict:
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        media_type = head[5:].split(";")[0] or "image/png"
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _blocks(content) -> list[dict]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    out = []
    for part in content:
        if part.get("type") == "text":
            out.append({"type": "text", "text": part.get("text", "")})
        elif part.get("type") == "image_url":
            image = part.get("image_url") or {}
            out.append(_image_block(image.get("url", "") if isinstance(image, dict) else str(image)))
    return out


def _arguments(raw) -> dict:
    if isinstance(raw, dict):
        return raw
    try:
        value = orjson.loads(raw or "{}")
    except orjson.JSONDecodeError:
        return {"_raw": raw}
    return value if isinstance(value, dict) else {"value": value}


def to_messages(messages: list[dict]) -> tuple[str, list[dict]]:
    """OpenAI messages -> (system text, Anthropic messages), consecutive same-role turns merged."""
    system: list[str] = []
    out: list[dict] = []

    def add(role: str, blocks: list[dict]) -> None:
        if not blocks:
            return
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})

    for m in messages:
        role = m.get("role")
        if role in ("system", "developer"):
            system.append(_text(m.get("content")))
        elif role == "user":
            add("user", _blocks(m.get("content")))
        elif role == "assistant":
            blocks = _blocks(m.get("content"))
            for call in m.get("tool_calls") or ():
                fn = call.get("function") or {}
                blocks.append({"type": "tool_use", "id": call.get("id"), "name": fn.get("name"),
                               "input": _arguments(fn.get("arguments"))})
            add("assistant", blocks)
        elif role == "tool":
            add("user", [{"type": "tool_result", "tool_use_id": m.get("tool_call_id"),
                          "content": _text(m.get("content"))}])
    return "\n\n".join(s for s in system if s), out


def _tool_choice(choice) -> dict | None:
    if choice is None:
        return None
    if isinstance(choice, str):
        return {"auto": {"type": "auto"}, "required": {"type": "any"}, "none": {"type": "none"}}.get(choice)
    name = (choice.get("function") or {}).get("name")
    return {"type": "tool", "name": name} if name else None


def to_request(target: Target, body: dict) -> dict:
    system, messages = to_messages(body["messages"])
    max_tokens = (body.get("max_completion_tokens") or body.get("max_tokens")
                  or int(target.options.get("default_max_tokens") or DEFAULT_MAX_TOKENS))
    req: dict = {"model": target.upstream_model, "max_tokens": max_tokens, "messages": messages}
    if system:
        req["system"] = system
    for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p")):
        if body.get(ours) is not None:
            req[theirs] = body[ours]
    stop = body.get("stop")
    if stop:
        req["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("tools"):
        req["tools"] = [
            {"name": t["function"]["name"], "description": t["function"].get("description", ""),
             "input_schema": t["function"].get("parameters") or {"type": "object", "properties": {}}}
            for t in body["tools"] if t.get("type", "function") == "function"
        ]
        choice = _tool_choice(body.get("tool_choice"))
        if choice:
            req["tool_choice"] = choice
    if body.get("user"):
        req["metadata"] = {"user_id": str(body["user"])}
    return req


def usage_of(data: dict | None) -> Usage | None:
    """An Anthropic `usage` object (or the merged usage of a stream) in our convention."""
    if not isinstance(data, dict) or not data:
        return None
    read = int(data.get("cache_read_input_tokens") or 0)
    write = int(data.get("cache_creation_input_tokens") or 0)
    return Usage(prompt_tokens=int(data.get("input_tokens") or 0) + read + write,
                 completion_tokens=int(data.get("output_tokens") or 0), cached_tokens=read, cache_write_tokens=write)


def from_response(data: dict) -> Completion:
    text, calls = [], []
    for block in data.get("content") or ():
        if block.get("type") == "text":
            text.append(block.get("text", ""))
        elif block.get("type") == "tool_use":
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"),
                                       "arguments": orjson.dumps(block.get("input") or {}).decode()}})
    message: dict = {"role": "assistant", "content": "".join(text) if text or not calls else None}
    if calls:
        message["tool_calls"] = calls
    usage = usage_of(data.get("usage")) or Usage(estimated=True)
    body = {
        "id": data.get("id", ""),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": data.get("model", ""),
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": STOP_REASONS.get(data.get("stop_reason") or "", "stop")}],
        "usage": usage.as_openai(),
    }
    return Completion(body=body, usage=usage)


ERROR_STATUS = {"invalid_request_error": 400, "authentication_error": 401, "permission_error": 403,
                "not_found_error": 404, "request_too_large": 413, "rate_limit_error": 429, "api_error": 500,
                "overloaded_error": 529}


def batch_item_result(item: dict) -> BatchResult:
    """One line of a Message Batch's results."""
    custom_id = str(item.get("custom_id") or "")
    result = item.get("result") if isinstance(item.get("result"), dict) else {}
    kind = result.get("type")
    if kind == "succeeded" and isinstance(result.get("message"), dict):
        completion = from_response(result["message"])
        completion.usage = replace(completion.usage, batch_priced=True)
        return BatchResult(custom_id, "succeeded", completion)
    if kind in ("canceled", "expired"):
        return BatchResult(custom_id, kind)
    outer = result.get("error") if isinstance(result.get("error"), dict) else {}
    err = outer.get("error") if isinstance(outer.get("error"), dict) else outer
    etype = str(err.get("type") or "api_error")
    return BatchResult(custom_id, "errored", status=ERROR_STATUS.get(etype, 502),
                       message=str(err.get("message") or "the upstream failed this request"), code=etype)


@register
class AnthropicAdapter(ProviderAdapter):
    kind = "anthropic"
    native_dialect = "messages"  # a Messages API client's body goes through as it is
    supports_batch = True

    def headers(self, target: Target) -> dict:
        headers = {"content-type": "application/json",
                   "anthropic-version": str(target.options.get("anthropic_version") or DEFAULT_VERSION)}
        if target.secret:
            headers["x-api-key"] = target.secret
        if target.options.get("beta"):
            beta = target.options["beta"]
            headers["anthropic-beta"] = ",".join(beta) if isinstance(beta, list) else str(beta)
        return headers

    def url(self, target: Target, *, stream: bool = False) -> str:
        return (target.api_base or DEFAULT_API_BASE).rstrip("/") + "/v1/messages"

    def payload(self, target: Target, req: dict) -> dict:
        """The Messages body as this endpoint takes it (Anthropic on Vertex AI moves some of it)."""
        return req

    async def complete(self, target: Target, body: dict) -> Completion:
        data = await post_json(self.url(target), headers=self.headers(target),
                               body=self.payload(target, to_request(target, body)),
                               secrets=(target.secret,))
        return from_response(data)

    async def complete_native(self, target: Target, body: dict) -> Completion:
        data = await post_json(self.url(target), headers=self.headers(target),
                               body=self.payload(target, {**body, "model": target.upstream_model}),
                               secrets=(target.secret,))
        completion = from_response(data)
        completion.native = data
        return completion

    async def count_tokens(self, target: Target, body: dict) -> int | None:
        url = (target.api_base or DEFAULT_API_BASE).rstrip("/") + "/v1/messages/count_tokens"
        data = await post_json(url, headers=self.headers(target), body={**body, "model": target.upstream_model},
                               secrets=(target.secret,))
        tokens = data.get("input_tokens")
        return int(tokens) if isinstance(tokens, int) else None

    def _batches_url(self, target: Target, suffix: str = "") -> str:
        return (target.api_base or DEFAULT_API_BASE).rstrip("/") + "/v1/messages/batches" + suffix

    def _plain_headers(self, target: Target) -> dict:
        return {k: v for k, v in self.headers(target).items() if k != "content-type"}

    async def batch_submit(self, target: Target, requests: list[tuple[str, dict]], *, metadata: dict) -> str:
        body = {"requests": [{"custom_id": cid, "params": self.payload(target, to_request(target, b))}
                             for cid, b in requests]}
        created = await request_json("POST", self._batches_url(target), headers=self.headers(target), body=body,
                                     secrets=(target.secret,))
        return str(created["id"])

    async def batch_poll(self, target: Target, upstream_id: str) -> BatchPoll:
        data = await request_json("GET", self._batches_url(target, f"/{upstream_id}"),
                                  headers=self._plain_headers(target), secrets=(target.secret,))
        status = str(data.get("processing_status") or "")
        return BatchPoll(status=status, ended=status == "ended", data=data)

    async def batch_results(self, target: Target, poll: BatchPoll) -> list[BatchResult]:
        # The results_url as given, when it is on the API's own host (the key goes with it);
        # otherwise the documented results path of the batch.
        url = str(poll.data.get("results_url") or "")
        base = urlsplit(target.api_base or DEFAULT_API_BASE)
        if not url or urlsplit(url)[:2] != base[:2]:
            url = self._batches_url(target, f"/{poll.data.get('id')}/results")
        content = await request("GET", url, headers=self._plain_headers(target), secrets=(target.secret,))
        return [batch_item_result(item) for item in jsonl(content)]

    async def batch_cancel(self, target: Target, upstream_id: str) -> None:
        await request_json("POST", self._batches_url(target, f"/{upstream_id}/cancel"),
                           headers=self._plain_headers(target), secrets=(target.secret,))

    async def stream_native(self, target: Target, body: dict):
        """Every upstream event, relayed under NATIVE_EVENTS (thinking and signature deltas, pings
        included), on chunks that also say in OpenAI's shape what the event adds (for the cache,
        the estimate of a broken stream and billing: the merged usage rides on message_delta's)."""
        req = self.payload(target, {**body, "model": target.upstream_model, "stream": True})
        async with open_stream(self.url(target, stream=True), headers=self.headers(target), body=req,
                               secrets=(target.secret,)) as resp:
            usage: dict = {}
            tools: dict[int, int] = {}
            async for event, data in sse_events(resp):
                try:
                    payload = orjson.loads(data)
                except orjson.JSONDecodeError:
                    raise ProviderError("upstream sent a stream event that is not JSON", code="upstream_bad_body")
                kind = payload.get("type") or event or ""
                delta: dict | None = None
                finish = None
                chunk: dict = {"id": "", "object": "chat.completion.chunk", "created": 0,
                               "model": target.upstream_model, "choices": [], NATIVE_EVENTS: [(kind, data)]}
                if kind == "message_start":
                    usage.update((payload.get("message") or {}).get("usage") or {})
                    delta = {"role": "assistant", "content": ""}
                elif kind == "content_block_start" and (payload.get("content_block") or {}).get("type") == "tool_use":
                    block = payload["content_block"]
                    n = tools[payload.get("index", 0)] = len(tools)
                    delta = {"tool_calls": [{"index": n, "id": block.get("id"), "type": "function",
                                             "function": {"name": block.get("name"), "arguments": ""}}]}
                elif kind == "content_block_delta":
                    d = payload.get("delta") or {}
                    if d.get("type") == "text_delta":
                        delta = {"content": d.get("text", "")}
                    elif d.get("type") == "input_json_delta":
                        delta = {"tool_calls": [{"index": tools.get(payload.get("index", 0), 0),
                                                 "function": {"arguments": d.get("partial_json", "")}}]}
                elif kind == "message_delta":
                    usage.update({k: v for k, v in (payload.get("usage") or {}).items() if v is not None})
                    delta, finish = {}, STOP_REASONS.get((payload.get("delta") or {}).get("stop_reason") or "", "stop")
                    parsed = usage_of(usage)
                    if parsed is not None:
                        chunk["usage"], chunk[GATEWAY_USAGE] = parsed.as_openai(), parsed
                elif kind == "error":
                    err = payload.get("error") or {}
                    raise ProviderError(f"upstream stream error: {err.get('message') or err.get('type')}",
                                        code="upstream_stream_error")
                if delta is not None:
                    chunk["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
                yield chunk
                if kind == "message_stop":
                    return
            raise ProviderError("upstream stream ended before message_stop", code="upstream_stream_broken")

    async def stream(self, target: Target, body: dict):
        req = self.payload(target, {**to_request(target, body), "stream": True})
        async with open_stream(self.url(target, stream=True), headers=self.headers(target), body=req,
                               secrets=(target.secret,)) as resp:
            cid, model, created = "", target.upstream_model, int(time.time())
            usage: dict = {}
            usage_sent = False
            tool_index: dict[int, int] = {}  # Anthropic content block index -> OpenAI tool call index

            def chunk(delta: dict, finish: str | None = None) -> dict:
                return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

            def usage_chunk() -> dict:
                parsed = usage_of(usage)
                return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [], "usage": parsed.as_openai(), GATEWAY_USAGE: parsed}

            async for event, data in sse_events(resp):
                try:
                    payload = orjson.loads(data)
                except orjson.JSONDecodeError:
                    raise ProviderError("upstream sent a stream event that is not JSON", code="upstream_bad_body")
                kind = payload.get("type") or event
                if kind == "message_start":
                    message = payload.get("message") or {}
                    cid, model = message.get("id", cid), message.get("model", model)
                    usage.update(message.get("usage") or {})
                    yield chunk({"role": "assistant", "content": ""})
                elif kind == "content_block_start":
                    block = payload.get("content_block") or {}
                    if block.get("type") == "tool_use":
                        n = tool_index[payload.get("index", 0)] = len(tool_index)
                        yield chunk({"tool_calls": [{"index": n, "id": block.get("id"), "type": "function",
                                                     "function": {"name": block.get("name"), "arguments": ""}}]})
                    elif block.get("type") == "text" and block.get("text"):
                        yield chunk({"content": block["text"]})
                elif kind == "content_block_delta":
                    delta = payload.get("delta") or {}
                    if delta.get("type") == "text_delta":
                        yield chunk({"content": delta.get("text", "")})
                    elif delta.get("type") == "input_json_delta":
                        n = tool_index.get(payload.get("index", 0), 0)
                        yield chunk({"tool_calls": [{"index": n,
                                                     "function": {"arguments": delta.get("partial_json", "")}}]})
                elif kind == "message_delta":
                    usage.update({k: v for k, v in (payload.get("usage") or {}).items() if v is not None})
                    reason = (payload.get("delta") or {}).get("stop_reason")
                    yield chunk({}, STOP_REASONS.get(reason or "", "stop"))
                    if usage:  # message_delta's usage is the final count
                        usage_sent = True
                        yield usage_chunk()
                elif kind == "message_stop":
                    if usage and not usage_sent:
                        yield usage_chunk()
                    return
                elif kind == "error":
                    err = payload.get("error") or {}
                    raise ProviderError(f"upstream stream error: {err.get('message') or err.get('type')}",
                                        code="upstream_stream_error")
            raise ProviderError("upstream stream ended before message_stop", code="upstream_stream_broken")
