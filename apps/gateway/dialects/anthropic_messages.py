"""Anthropic's Messages API inbound (`POST /v1/messages`), as the official `anthropic` SDK sends it.

Request: the body is checked, our fields are taken out (the `x-gateway-*` headers, or `metadata`
keys other than `user_id`), and it is translated to a chat body: `system` becomes a system message,
text and image blocks become content parts, `tool_use` blocks become an assistant's tool calls and
`tool_result` blocks tool messages, `tools`/`tool_choice`/`stop_sequences`/`metadata.user_id` their
OpenAI equivalents. Thinking blocks and `cache_control` have no chat equivalent and are dropped
there. The chat body is what is bounded, limited, held and cached; the Anthropic body (`native`) is
what an `anthropic` deployment is sent, nearly unchanged (model and, when admission lowered it,
max_tokens), so its cache_control, thinking and usage come back as Anthropic sent them.
Answer: a native answer as it is; a chat completion translated to a Message (stop reasons mapped,
usage as input/output/cache tokens). Streams: Anthropic's event sequence, relayed from a native
deployment or written from the chat chunks; `message_delta` (with the usage) and `message_stop`
are sent once the ledger row is durable.
Errors: `{"type": "error", "error": {"type", "message"}}` with the HTTP status, so the SDK raises its
own classes (402 is `billing_error`).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping

import orjson
from django.http import HttpResponse

from .. import pipeline, schemas
from ..errors import GatewayError, invalid_request
from ..providers import Completion, Usage
from ..providers.base import NATIVE_EVENTS
from . import gateway_options

NAME = "messages"

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
               403: "permission_error", 404: "not_found_error", 413: "request_too_large",
               429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
                "content_filter": "refusal"}
_KNOWN = {"model", "messages", "max_tokens", "system", "metadata", "stop_sequences", "stream", "temperature",
          "top_p", "top_k", "tools", "tool_choice", "thinking", "service_tier", "container", "mcp_servers"}


# --- request ----------------------------------------------------------------------------------


def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
    return ""


def _image_part(block: dict, where: str) -> dict:
    source = block.get("source") or {}
    if source.get("type") == "base64":
        url = f"data:{source.get('media_type', 'image/png')};base64,{source.get('data', '')}"
    elif source.get("type") == "url":
        url = source.get("url", "")
    else:
        raise invalid_request(f"Invalid value for '{where}.source': only base64 and url image sources are "
                              "supported.", param=f"{where}.source")
    return {"type": "image_url", "image_url": {"url": url}}


def _chat_messages(messages: list, system) -> list[dict]:
    out: list[dict] = []
    if system:
        out.append({"role": "system", "content": _text_of(system)})
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise invalid_request(f"Invalid value for '{where}.role': must be 'user' or 'assistant'.",
                                  param=f"{where}.role")
        role, content = message["role"], message.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise invalid_request(f"Invalid value for '{where}.content': must be a string or a list of blocks.",
                                  param=f"{where}.content")
        parts: list[dict] = []
        calls: list[dict] = []
        results: list[dict] = []
        for j, block in enumerate(content):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": block.get("text", "")})
            elif kind == "image":
                parts.append(_image_part(block, f"{where}.content[{j}]"))
            elif kind == "tool_use":
                calls.append({"id": block.get("id"), "type": "function",
                              "function": {"name": block.get("name"),
                                           "arguments": orjson.dumps(block.get("input") or {}).decode()}})
            elif kind == "tool_result":
                results.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                                "content": _text_of(block.get("content"))})
            elif kind in ("thinking", "redacted_thinking"):
                continue  # only an Anthropic deployment understands them; it is sent the native body
            else:
                raise invalid_request(f"Invalid value for '{where}.content[{j}].type': {kind!r} is not supported "
                                      "(text, image, tool_use, tool_result, thinking).",
                                      param=f"{where}.content[{j}].type")
        out.extend(results)
        if parts or calls:
            texts_only = all(p["type"] == "text" for p in parts)
            chat: dict = {"role": role,
                          "content": "".join(p["text"] for p in parts) if texts_only else parts}
            if calls:
                chat["tool_calls"] = calls
                if not parts:
                    chat["content"] = None
            out.append(chat)
    return out


def _tool_choice(choice):
    if not isinstance(choice, dict):
        return None
    kind = choice.get("type")
    if kind == "tool":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return {"auto": "auto", "any": "required", "none": "none"}.get(kind)


def to_chat(data: dict, headers: Mapping[str, str]) -> tuple[dict, dict]:
    """A Messages API body -> (the chat body with our fields, the body for Anthropic deployments)."""
    for name in data:
        if name not in _KNOWN:
            raise invalid_request(f"Invalid value for '{name}': is not a recognised field.", param=name)
    if not isinstance(data.get("model"), str) or not data["model"]:
        raise invalid_request("Invalid value for 'model': is required.", param="model")
    max_tokens = data.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise invalid_request("Invalid value for 'max_tokens': is required and must be a positive integer.",
                              param="max_tokens")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid_request("Invalid value for 'messages': is required and must be a non-empty list.",
                              param="messages")
    metadata = data.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise invalid_request("Invalid value for 'metadata': must be an object.", param="metadata")
    native = {k: v for k, v in data.items() if k != "metadata"}
    if metadata and metadata.get("user_id") is not None:
        native["metadata"] = {"user_id": metadata["user_id"]}
    chat: dict = {"model": data["model"], "messages": _chat_messages(messages, data.get("system")),
                  "max_tokens": max_tokens, **gateway_options(headers, metadata)}
    for name in ("temperature", "top_p", "stream"):
        if data.get(name) is not None:
            chat[name] = data[name]
    if chat.get("stream") is True:
        chat["stream_options"] = {"include_usage": True}
    if data.get("stop_sequences"):
        chat["stop"] = data["stop_sequences"]
    if metadata and metadata.get("user_id") is not None:
        chat["user"] = str(metadata["user_id"])
    tools = data.get("tools")
    if tools:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise invalid_request("Invalid value for 'tools': must be a list of tools.", param="tools")
        chat["tools"] = [{"type": "function", "function": {
            "name": t.get("name"), "description": t.get("description", ""),
            "parameters": t.get("input_schema") or {"type": "object", "properties": {}}}}
            for t in tools if t.get("type") in (None, "custom")]
        choice = _tool_choice(data.get("tool_choice"))
        if choice is not None and chat["tools"]:
            chat["tool_choice"] = choice
    return chat, native


def translator(headers: Mapping[str, str]):
    """The pipeline's translate hook for this request (it reads our `x-gateway-*` headers)."""

    async def translate(ctx: pipeline.Ctx, data: dict | bytes) -> schemas.GatewayRequest:
        body = schemas.parse_json(data) if isinstance(data, bytes | bytearray) else data
        chat, native = to_chat(body, headers)
        return schemas.parse_translated(chat, dialect=NAME, native=native)

    return translate


# --- answer -----------------------------------------------------------------------------------


def usage_view(usage: Usage) -> dict:
    """Our Usage in Anthropic's convention (input_tokens excludes the prompt cache)."""
    return {"input_tokens": max(usage.prompt_tokens - usage.cached_tokens - usage.cache_write_tokens, 0),
            "output_tokens": usage.completion_tokens,
            "cache_creation_input_tokens": usage.cache_write_tokens,
            "cache_read_input_tokens": usage.cached_tokens}


def _message_id(ctx: pipeline.Ctx) -> str:
    return "msg_" + ctx.request_id.removeprefix("req_")


def _arguments(raw) -> dict:
    try:
        value = orjson.loads(raw or "{}")
    except orjson.JSONDecodeError:
        return {"_raw": raw}
    return value if isinstance(value, dict) else {"value": value}


def from_chat(ctx: pipeline.Ctx, completion: Completion) -> dict:
    choice = (completion.body.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    content: list[dict] = []
    text = message.get("content")
    if isinstance(text, list):
        text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
    if text:
        content.append({"type": "text", "text": text})
    for call in message.get("tool_calls") or ():
        fn = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id") or f"toolu_{uuid.uuid4().hex[:24]}",
                        "name": fn.get("name"), "input": _arguments(fn.get("arguments"))})
    return {"id": _message_id(ctx), "type": "message", "role": "assistant", "model": ctx.model, "content": content,
            "stop_reason": STOP_REASONS.get(choice.get("finish_reason") or "stop", "end_turn"),
            "stop_sequence": None, "usage": usage_view(completion.usage)}


async def render(ctx: pipeline.Ctx, completion: Completion) -> dict:
    """The Message to answer: Anthropic's own when an Anthropic deployment answered, else translated."""
    if completion.native is not None:
        return completion.native
    return from_chat(ctx, completion)


def event(name: str, data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else orjson.dumps({"type": name, **data}).decode()
    return f"event: {name}\ndata: {payload}\n\n".encode()


class Encoder(pipeline.StreamEncoder):
    """Anthropic's stream: relayed from an Anthropic deployment, or written from chat chunks."""

    def __init__(self, ctx: pipeline.Ctx):
        self.ctx = ctx
        self.started = False
        self.block = -1  # index of the open content block, -1 when none
        self.open_kind = ""
        self.tools: dict[int, int] = {}  # chat tool call index -> content block index
        self.stop_reason = "end_turn"
        self.held: list[bytes] = []  # a native stream's message_delta and message_stop, sent at the end

    def _start(self) -> bytes:
        self.started = True
        return event("message_start", {"message": {
            "id": _message_id(self.ctx), "type": "message", "role": "assistant", "model": self.ctx.model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": self.ctx.request.token_estimate, "output_tokens": 0}}})

    def _close(self) -> bytes:
        if self.block < 0 or not self.open_kind:
            return b""
        self.open_kind = ""
        return event("content_block_stop", {"index": self.block})

    def _open(self, block: dict) -> bytes:
        out = self._close()
        self.block += 1
        self.open_kind = block["type"]
        return out + event("content_block_start", {"index": self.block, "content_block": block})

    def chunk(self, chunk: dict) -> bytes:
        native = chunk.get(NATIVE_EVENTS)
        if native is not None:
            out = b""
            for name, data in native:
                if name in ("message_delta", "message_stop"):
                    self.held.append(event(name, data))
                else:
                    out += event(name, data)
            return out
        out = b"" if self.started else self._start()
        for choice in chunk.get("choices", ()):
            delta = choice.get("delta") or {}
            if delta.get("content"):
                if self.open_kind != "text":
                    out += self._open({"type": "text", "text": ""})
                out += event("content_block_delta", {"index": self.block,
                                                     "delta": {"type": "text_delta", "text": delta["content"]}})
            for call in delta.get("tool_calls") or ():
                n = call.get("index", 0)
                fn = call.get("function") or {}
                if n not in self.tools:
                    out += self._open({"type": "tool_use", "id": call.get("id") or f"toolu_{uuid.uuid4().hex[:24]}",
                                       "name": fn.get("name"), "input": {}})
                    self.tools[n] = self.block
                if fn.get("arguments"):
                    out += event("content_block_delta", {"index": self.tools[n], "delta": {
                        "type": "input_json_delta", "partial_json": fn["arguments"]}})
            if choice.get("finish_reason"):
                self.stop_reason = STOP_REASONS.get(choice["finish_reason"], "end_turn")
        return out

    async def finish(self, ctx: pipeline.Ctx) -> bytes:
        if self.held:
            return b"".join(self.held)
        out = (b"" if self.started else self._start()) + self._close()
        out += event("message_delta", {"delta": {"stop_reason": self.stop_reason, "stop_sequence": None},
                                       "usage": usage_view(ctx.usage or Usage())})
        return out + event("message_stop", {})

    def error(self, message: str, code: str) -> bytes:
        kind = "overloaded_error" if "overloaded" in message.lower() else "api_error"
        return event("error", {"error": {"type": kind, "message": message}})

    async def replay(self, completion: Completion) -> AsyncIterator[bytes]:
        """A cached answer, as the stream this request would have produced."""
        message = from_chat(self.ctx, completion)
        yield self._start()
        for block in message["content"]:
            if block["type"] == "text":
                yield self._open({"type": "text", "text": ""})
                yield event("content_block_delta", {"index": self.block,
                                                    "delta": {"type": "text_delta", "text": block["text"]}})
        yield self._close()
        self.stop_reason = message["stop_reason"]
        await pipeline.end(self.ctx)
        yield await self.finish(self.ctx)


# --- errors -----------------------------------------------------------------------------------


def error_response(exc: GatewayError, ctx: pipeline.Ctx) -> HttpResponse:
    """A GatewayError in Anthropic's shape (our code kept next to it), with its status and headers."""
    kind = ERROR_TYPES.get(exc.status, "api_error" if exc.status >= 500 else "invalid_request_error")
    body = {"type": "error", "error": {"type": kind, "message": exc.message, "code": exc.code},
            "request_id": ctx.request_id}
    resp = HttpResponse(orjson.dumps(body), status=exc.status, content_type="application/json")
    for k, v in exc.headers.items():
        resp[k] = v
    return resp


# --- count_tokens -----------------------------------------------------------------------------


async def count_tokens(ctx: pipeline.Ctx, data: dict, headers: Mapping[str, str]) -> tuple[dict, bool]:
    """Input tokens of a Messages body: from the first Anthropic deployment of the model (Anthropic
    counts for free), else our estimate. Returns (answer, estimated)."""
    from ..providers import adapter_for
    from ..providers.base import ProviderError
    from ..selectors import routing_table

    body = {**data, "max_tokens": data.get("max_tokens") or 1}
    chat, native = to_chat(body, headers)
    request = schemas.parse_translated(chat, dialect=NAME, native=native)
    table = await routing_table()
    alias = table.aliases.get(request.model)
    if alias is None:
        from ..errors import model_not_found

        raise model_not_found(request.model)
    if not ctx.auth.may_use_model(alias.alias):
        from ..errors import permission_denied

        raise permission_denied(f"This API key may not use the model `{alias.alias}`.", param="model")
    counted = {k: v for k, v in native.items() if k in ("model", "messages", "system", "tools", "tool_choice",
                                                         "thinking")}
    for deployment in alias.deployments:
        adapter = adapter_for(deployment.target.kind)
        if adapter.takes_native(deployment.target) != NAME:
            continue
        try:
            tokens = await adapter.count_tokens(deployment.target, counted)
        except ProviderError:
            continue
        if tokens is not None:
            return {"input_tokens": tokens}, False
    return {"input_tokens": request.token_estimate, "estimated": True}, True
