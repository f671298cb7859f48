"""OpenAI's Responses API inbound (`POST /v1/responses`), translated to chat for every provider kind.

Request: `input` (a string, or a list of message, function_call and function_call_output items),
`instructions` (a system message, not carried to the next turn, as OpenAI does), function `tools`,
`tool_choice`, `max_output_tokens`, `temperature`, `top_p`, `text.format` (a response_format),
`reasoning.effort`, `metadata` (ours: budget_id, source_id, ...; also the `x-gateway-*` headers),
`stream`. `store: true` keeps the answer for GATEWAY_RESPONSES_STORE_TTL_S per tenant, so that
`previous_response_id` continues the conversation (rebuilt from the stored chat messages), and
`GET`/`DELETE /v1/responses/{id}` find it. Unlike OpenAI, nothing is stored unless `store: true`
is sent. Built-in tools (web search, file search, ...), `background`, `conversation`, `prompt` and
input files are refused with a 400 that says so.
Answer: a `response` object with `message` and `function_call` output items and usage in the
Responses shape. Streams: response.created, response.in_progress, output_item.added,
content_part.added, output_text.delta, ... function_call_arguments.delta, ..., and
response.completed (or response.incomplete when cut at max_output_tokens) with the usage, sent
once the ledger row is durable.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Mapping

import orjson

from apps.core.db import db_sync

from .. import pipeline, schemas
from ..errors import invalid_request
from ..providers import Completion, Usage
from ..selectors import stored_response_get
from ..services import stored_response_create
from . import gateway_options

NAME = "responses"

_UNSUPPORTED = {"background": "background responses", "conversation": "conversations",
                "prompt": "prompt templates"}
_KNOWN = {"model", "input", "instructions", "tools", "tool_choice", "max_output_tokens", "temperature", "top_p",
          "stream", "store", "previous_response_id", "metadata", "user", "text", "reasoning", "parallel_tool_calls",
          "truncation", "include", "service_tier", "safety_identifier", "prompt_cache_key", "stream_options",
          "cache", "async", "callback_url", *_UNSUPPORTED}


# --- request ----------------------------------------------------------------------------------


def _part(part, where: str) -> dict:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text", "text", "refusal"):
        return {"type": "text", "text": part.get("text") or part.get("refusal") or ""}
    if kind == "input_image":
        url = part.get("image_url")
        if not url:
            raise invalid_request(f"Invalid value for '{where}': only images given by image_url are supported.",
                                  param=where)
        return {"type": "image_url", "image_url": {"url": url, "detail": part.get("detail") or "auto"}}
    raise invalid_request(f"Invalid value for '{where}.type': {kind!r} is not supported by this gateway "
                          "(input_text, input_image, output_text).", param=f"{where}.type")


def _content(content, where: str):
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid_request(f"Invalid value for '{where}': must be a string or a list of parts.", param=where)
    parts = [_part(p, f"{where}[{i}]") for i, p in enumerate(content)]
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def input_messages(value) -> list[dict]:
    """`input` -> chat messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise invalid_request("Invalid value for 'input': must be a string or a non-empty list of items.",
                              param="input")
    out: list[dict] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise invalid_request(f"Invalid value for '{where}': must be an object.", param=where)
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise invalid_request(f"Invalid value for '{where}.role': must be user, assistant, system or "
                                      "developer.", param=f"{where}.role")
            out.append({"role": role, "content": _content(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") is not None:
                last["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": item.get("call_id"),
                        "content": output if isinstance(output, str) else _content(output, f"{where}.output")})
        elif kind == "reasoning":
            continue
        else:
            raise invalid_request(f"Invalid value for '{where}.type': {kind!r} items are not supported by this "
                                  "gateway (message, function_call, function_call_output).", param=f"{where}.type")
    return out


def _tools(tools) -> list[dict]:
    if not isinstance(tools, list):
        raise invalid_request("Invalid value for 'tools': must be a list.", param="tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise invalid_request(f"Invalid value for 'tools[{i}].type': only function tools are supported by this "
                                  f"gateway, not {kind!r}.", param=f"tools[{i}].type")
        fn = {"name": tool.get("name"), "parameters": tool.get("parameters") or {"type": "object", "properties": {}}}
        if tool.get("description"):
            fn["description"] = tool["description"]
        if tool.get("strict") is not None:
            fn["strict"] = tool["strict"]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice):
    if isinstance(choice, str):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    raise invalid_request("Invalid value for 'tool_choice': auto, none, required or a function.", param="tool_choice")


def _response_format(text) -> dict | None:
    fmt = (text or {}).get("format") if isinstance(text, dict) else None
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return None
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    if fmt["type"] == "json_schema":
        schema = {"name": fmt.get("name") or "response", "schema": fmt.get("schema") or {}}
        if fmt.get("strict") is not None:
            schema["strict"] = fmt["strict"]
        return {"type": "json_schema", "json_schema": schema}
    raise invalid_request(f"Invalid value for 'text.format.type': {fmt['type']!r}.", param="text.format.type")


def to_chat(data: dict, headers: Mapping[str, str], history: list[dict]) -> dict:
    """A Responses body (+ the stored conversation it continues) -> a chat body with our fields."""
    for name in data:
        if name not in _KNOWN:
            raise invalid_request(f"Invalid value for '{name}': is not a recognised field.", param=name)
        if name in _UNSUPPORTED and data[name] not in (None, False):
            raise invalid_request(f"'{name}' is not supported by this gateway ({_UNSUPPORTED[name]}).", param=name,
                                  code="unsupported_parameter")
    if not isinstance(data.get("model"), str) or not data["model"]:
        raise invalid_request("Invalid value for 'model': is required.", param="model")
    if data.get("input") is None:
        raise invalid_request("Invalid value for 'input': is required.", param="input")
    messages = list(history) + input_messages(data["input"])
    if data.get("instructions"):
        if not isinstance(data["instructions"], str):
            raise invalid_request("Invalid value for 'instructions': must be a string.", param="instructions")
        messages.insert(0, {"role": "system", "content": data["instructions"]})
    metadata = data.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise invalid_request("Invalid value for 'metadata': must be an object.", param="metadata")
    chat: dict = {"model": data["model"], "messages": messages, **gateway_options(headers, metadata)}
    for name in ("cache", "async", "callback_url"):
        if name in data:
            chat[name] = data[name]
    if data.get("max_output_tokens") is not None:
        chat["max_tokens"] = data["max_output_tokens"]
    for name in ("temperature", "top_p", "stream", "parallel_tool_calls", "user"):
        if data.get(name) is not None:
            chat[name] = data[name]
    if chat.get("stream") is True:
        chat["stream_options"] = {"include_usage": True}
    if data.get("tools"):
        chat["tools"] = _tools(data["tools"])
        if data.get("tool_choice") is not None:
            chat["tool_choice"] = _tool_choice(data["tool_choice"])
    response_format = _response_format(data.get("text"))
    if response_format:
        chat["response_format"] = response_format
    effort = (data.get("reasoning") or {}).get("effort") if isinstance(data.get("reasoning"), dict) else None
    if effort:
        chat["reasoning_effort"] = effort
    return chat


class Turn:
    """What one request carries beyond the chat body: the Responses fields echoed in the answer and
    the conversation to store."""

    def __init__(self, data: dict, history: list[dict]):
        self.data = data
        self.store = data.get("store") is True
        self.history = history
        self.new_messages = input_messages(data["input"])


def translator(headers: Mapping[str, str], turn_out: list):
    """The pipeline's translate hook: resolves `previous_response_id` within the key's tenant,
    then translates. The Turn is handed back through `turn_out` for the answer."""

    async def translate(ctx: pipeline.Ctx, data: dict | bytes) -> schemas.GatewayRequest:
        from django.conf import settings

        body = schemas.parse_json(data) if isinstance(data, bytes | bytearray) else data
        if body.get("store") is True and settings.GATEWAY_RESPONSES_STORE_TTL_S <= 0:
            raise invalid_request("'store' is turned off on this gateway (GATEWAY_RESPONSES_STORE_TTL_S=0).",
                                  param="store", code="store_disabled")
        if body.get("store") is True and (body.get("async") or headers.get("x-gateway-async", "").lower() == "true"):
            raise invalid_request("'store' cannot be combined with 'async'.", param="store")
        history: list[dict] = []
        previous = body.get("previous_response_id")
        if previous is not None:
            if not isinstance(previous, str):
                raise invalid_request("Invalid value for 'previous_response_id': must be a string.",
                                      param="previous_response_id")
            row = await db_sync(stored_response_get, tenant_id=ctx.auth.tenant_id, response_id=previous)
            if row is None:
                raise invalid_request(f"Previous response with id '{previous}' not found (it was not stored, "
                                      "was deleted or has expired).", param="previous_response_id",
                                      code="previous_response_not_found")
            history = row.conversation
        chat = to_chat(body, headers, history)
        turn_out.append(Turn(body, history))
        return schemas.parse_translated(chat, dialect=NAME)

    return translate


# --- answer -----------------------------------------------------------------------------------


def response_id(ctx: pipeline.Ctx) -> str:
    return "resp_" + ctx.request_id.removeprefix("req_")


def usage_view(usage: Usage) -> dict:
    return {"input_tokens": usage.prompt_tokens, "input_tokens_details": {"cached_tokens": usage.cached_tokens},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def message_item(text: str, item_id: str | None = None, status: str = "completed") -> dict:
    return {"type": "message", "id": item_id or _item_id("msg"), "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def call_item(call_id: str, name: str, arguments: str, item_id: str | None = None, status: str = "completed") -> dict:
    return {"type": "function_call", "id": item_id or _item_id("fc"), "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def response_object(ctx: pipeline.Ctx, turn: Turn, *, output: list[dict], status: str, usage: Usage | None,
                    created_at: int, incomplete: bool = False) -> dict:
    data = turn.data
    return {
        "id": response_id(ctx), "object": "response", "created_at": created_at, "status": status,
        "background": False, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "instructions": data.get("instructions"), "max_output_tokens": data.get("max_output_tokens"),
        "model": ctx.model, "output": output, "parallel_tool_calls": data.get("parallel_tool_calls", True),
        "previous_response_id": data.get("previous_response_id"), "reasoning": {"effort": None, "summary": None},
        "store": turn.store, "temperature": data.get("temperature", 1.0), "text": data.get("text") or
        {"format": {"type": "text"}}, "tool_choice": data.get("tool_choice", "auto"), "tools": data.get("tools") or [],
        "top_p": data.get("top_p", 1.0), "truncation": data.get("truncation") or "disabled",
        "usage": usage_view(usage) if usage is not None else None, "user": data.get("user"),
        "metadata": {k: str(v) for k, v in (data.get("metadata") or {}).items()},
    }


def _assistant_message(output: list[dict]) -> dict:
    """The chat message the output items stand for (stored for the next turn)."""
    text = "".join(c["text"] for item in output if item["type"] == "message" for c in item["content"])
    calls = [{"id": item["call_id"], "type": "function", "function": {"name": item["name"],
                                                                      "arguments": item["arguments"]}}
             for item in output if item["type"] == "function_call"]
    message: dict = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    return message


async def keep(ctx: pipeline.Ctx, turn: Turn, response: dict) -> None:
    """`store: true`: keep the conversation through this answer, under the tenant."""
    if not turn.store or response["status"] not in ("completed", "incomplete"):
        return
    conversation = [*turn.history, *turn.new_messages, _assistant_message(response["output"])]
    await db_sync(stored_response_create, response_id=response["id"], tenant_id=ctx.auth.tenant_id,
                  api_key_id=ctx.auth.key_id, conversation=conversation, response=response)


def _output_of(completion: Completion) -> tuple[list[dict], bool]:
    choice = (completion.body.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    output: list[dict] = []
    text = message.get("content")
    if isinstance(text, list):
        text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
    if text:
        output.append(message_item(text))
    for call in message.get("tool_calls") or ():
        fn = call.get("function") or {}
        output.append(call_item(call.get("id") or _item_id("call"), fn.get("name"), fn.get("arguments") or ""))
    return output, choice.get("finish_reason") == "length"


async def render(ctx: pipeline.Ctx, turn: Turn, completion: Completion) -> dict:
    output, cut = _output_of(completion)
    response = response_object(ctx, turn, output=output, status="incomplete" if cut else "completed",
                               usage=completion.usage, created_at=int(time.time()), incomplete=cut)
    await keep(ctx, turn, response)
    return response


class Encoder(pipeline.StreamEncoder):
    """The Responses event sequence, written from chat chunks."""

    def __init__(self, ctx: pipeline.Ctx, turn: Turn):
        self.ctx, self.turn = ctx, turn
        self.seq = 0
        self.created_at = int(time.time())
        self.started = False
        self.output: list[dict] = []
        self.open: dict | None = None  # the output item being streamed
        self.calls: dict[int, int] = {}  # chat tool call index -> output index
        self.cut = False

    def _event(self, name: str, data: dict) -> bytes:
        payload = orjson.dumps({"type": name, "sequence_number": self.seq, **data})
        self.seq += 1
        return f"event: {name}\ndata: ".encode() + payload + b"\n\n"

    def _start(self) -> bytes:
        self.started = True
        shell = response_object(self.ctx, self.turn, output=[], status="in_progress", usage=None,
                                created_at=self.created_at)
        return self._event("response.created", {"response": shell}) + \
            self._event("response.in_progress", {"response": shell})

    def _close(self) -> bytes:
        item, self.open = self.open, None
        if item is None:
            return b""
        index = self.output.index(item)
        out = b""
        if item["type"] == "message":
            text = item["content"][0]["text"]
            out += self._event("response.output_text.done", {"item_id": item["id"], "output_index": index,
                                                             "content_index": 0, "text": text, "logprobs": []})
            out += self._event("response.content_part.done", {"item_id": item["id"], "output_index": index,
                                                              "content_index": 0, "part": item["content"][0]})
        else:
            out += self._event("response.function_call_arguments.done", {
                "item_id": item["id"], "output_index": index, "arguments": item["arguments"], "name": item["name"]})
        item["status"] = "completed"
        return out + self._event("response.output_item.done", {"output_index": index, "item": item})

    def _add(self, item: dict) -> bytes:
        out = self._close()
        self.output.append(item)
        self.open = item
        index = len(self.output) - 1
        shell = {**item, "status": "in_progress"}
        if item["type"] == "message":
            shell["content"] = []
        out += self._event("response.output_item.added", {"output_index": index, "item": shell})
        if item["type"] == "message":
            out += self._event("response.content_part.added", {"item_id": item["id"], "output_index": index,
                                                               "content_index": 0, "part": {
                                                                   "type": "output_text", "text": "",
                                                                   "annotations": [], "logprobs": []}})
        return out

    def _text(self, piece: str) -> bytes:
        out = b""
        if self.open is None or self.open["type"] != "message":
            out += self._add(message_item("", status="in_progress"))
        self.open["content"][0]["text"] += piece
        return out + self._event("response.output_text.delta", {
            "item_id": self.open["id"], "output_index": self.output.index(self.open), "content_index": 0,
            "delta": piece, "logprobs": []})

    def chunk(self, chunk: dict) -> bytes:
        out = b"" if self.started else self._start()
        for choice in chunk.get("choices", ()):
            delta = choice.get("delta") or {}
            if delta.get("content"):
                out += self._text(delta["content"])
            for call in delta.get("tool_calls") or ():
                n = call.get("index", 0)
                fn = call.get("function") or {}
                if n not in self.calls:
                    out += self._add(call_item(call.get("id") or _item_id("call"), fn.get("name") or "", "",
                                               status="in_progress"))
                    self.calls[n] = len(self.output) - 1
                item = self.output[self.calls[n]]
                if fn.get("arguments"):
                    item["arguments"] += fn["arguments"]
                    out += self._event("response.function_call_arguments.delta", {
                        "item_id": item["id"], "output_index": self.calls[n], "delta": fn["arguments"]})
            if choice.get("finish_reason") == "length":
                self.cut = True
        return out

    async def finish(self, ctx: pipeline.Ctx) -> bytes:
        out = (b"" if self.started else self._start()) + self._close()
        for item in self.output:
            item["status"] = "completed"
        response = response_object(ctx, self.turn, output=self.output,
                                   status="incomplete" if self.cut else "completed", usage=ctx.usage,
                                   created_at=self.created_at, incomplete=self.cut)
        await keep(ctx, self.turn, response)
        name = "response.incomplete" if self.cut else "response.completed"
        return out + self._event(name, {"response": response})

    def error(self, message: str, code: str) -> bytes:
        return self._event("error", {"code": code, "message": message, "param": None,
                                     "error": {"type": "api_error", "code": code, "message": message}})

    async def replay(self, completion: Completion) -> AsyncIterator[bytes]:
        """A cached answer, as the stream this request would have produced."""
        output, cut = _output_of(completion)
        yield self._start()
        for item in output:
            if item["type"] == "message":
                yield self._text(item["content"][0]["text"])
        self.cut = cut
        await pipeline.end(self.ctx)
        yield await self.finish(self.ctx)


def stored_view(row) -> dict:
    return row.response
