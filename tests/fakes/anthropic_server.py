"""A fake Anthropic Messages API on loopback (`POST /v1/messages`), following Anthropic's
documented formats: x-api-key + anthropic-version headers required, `max_tokens` required, SSE
events message_start / content_block_start / ping / content_block_delta / content_block_stop /
message_delta / message_stop, and error bodies `{"type": "error", "error": {type, message}}`.

Behaviour by model name, as in the OpenAI fake: `fail-<status>`, `break-<n>`, `slow-<ms>`,
`limited-<s>` (429 with Retry-After: s), `tool-...` (answers with a tool_use block), `cache-...`
(reports cache read/write tokens), `streamerror-...` (an `error` event after the first delta),
`badkey-model` (a 401 whose message echoes the key). `POST /v1/messages/count_tokens` answers
`input_tokens` = the words of the messages + 3.

A scripted usage (`script_usage(model, usage)`, Anthropic's shape) is the message's usage; in a
stream, message_start carries its input side (input_tokens and the cache fields) with
output_tokens 1, and message_delta carries output_tokens alone or, with `delta="full"` (as newer
API versions send), every field again.

Message Batches (Anthropic's wire format): `POST /v1/messages/batches` {requests: [{custom_id,
params}]} (custom_id must match ^[a-zA-Z0-9_-]{1,64}$ and be unique; params need max_tokens)
returns a `message_batch` (`in_progress`); `GET /v1/messages/batches/{id}` ends it (`ended`, with
`results_url`) unless `server.batch_hold` is set; `GET .../{id}/results` is the JSONL of
`{"custom_id", "result": {"type": "succeeded", "message"} | {"type": "errored", "error": {"type":
"error", "error": {type, message}}} | {"type": "canceled"} | {"type": "expired"}}`, in reverse
order (results come in any order); a `fail-<status>` model errors its request, `expire-...`
expires it. `POST .../{id}/cancel` -> `canceling`, then `ended` with the requests canceled.
"""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta

import orjson
from aiohttp import web

from .openai_server import FakeOpenAI

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
               529: "overloaded_error"}


def _error(status: int, message: str | None = None, retry_after: str = "0") -> web.Response:
    headers = {"retry-after": retry_after} if status == 429 else {}
    body = {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"),
                                       "message": message or f"fake anthropic error {status}"}}
    return web.json_response(body, status=status, headers=headers)


def _answer(body: dict) -> str:
    last = next((m for m in reversed(body.get("messages", [])) if m.get("role") == "user"), {})
    content = last.get("content") or ""
    if isinstance(content, list):
        content = " ".join(p.get("text", "") for p in content if p.get("type") == "text")
    return f"Echo: {content}"


class FakeAnthropic(FakeOpenAI):
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_post("/v1/messages/count_tokens", self.count_tokens)
        app.router.add_post("/v1/messages/batches", self.message_batch_create)
        app.router.add_get("/v1/messages/batches/{batch_id}", self.message_batch_retrieve)
        app.router.add_get("/v1/messages/batches/{batch_id}/results", self.message_batch_results)
        app.router.add_post("/v1/messages/batches/{batch_id}/cancel", self.message_batch_cancel)
        return app

    # --- Message Batches ---

    @staticmethod
    def _refused(request: web.Request) -> web.Response | None:
        if not request.headers.get("x-api-key"):
            return _error(401, "x-api-key header is required")
        if not request.headers.get("anthropic-version"):
            return _error(400, "anthropic-version header is required")
        return None

    def _message_batch_view(self, batch: dict) -> dict:
        return {k: v for k, v in batch.items() if not k.startswith("_")}

    async def message_batch_create(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        if (refused := self._refused(request)) is not None:
            return refused
        requests = body.get("requests")
        if not isinstance(requests, list) or not requests:
            return _error(400, "requests: Field required")
        seen = set()
        for i, r in enumerate(requests):
            cid = r.get("custom_id", "")
            if not re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", cid) or cid in seen:
                return _error(400, f"requests.{i}.custom_id: must be unique and match ^[a-zA-Z0-9_-]{{1,64}}$")
            seen.add(cid)
            if "max_tokens" not in (r.get("params") or {}):
                return _error(400, f"requests.{i}.params.max_tokens: Field required")
        now = datetime.now(UTC)
        batch_id = f"msgbatch_fake{len(self.batches) + 1:04d}"
        self.batches[batch_id] = {
            "id": batch_id, "type": "message_batch", "processing_status": "in_progress",
            "request_counts": {"processing": len(requests), "succeeded": 0, "errored": 0, "canceled": 0,
                               "expired": 0},
            "ended_at": None, "created_at": now.isoformat(), "expires_at": (now + timedelta(hours=24)).isoformat(),
            "archived_at": None, "cancel_initiated_at": None, "results_url": None, "_requests": requests,
            "_results": None}
        return web.json_response(self._message_batch_view(self.batches[batch_id]))

    def _message_batch_end(self, batch: dict, *, canceled: bool) -> None:
        results = []
        for r in batch["_requests"]:
            params, model = r["params"], r["params"].get("model", "")
            if canceled:
                result = {"type": "canceled"}
            elif model.startswith("expire-"):
                result = {"type": "expired"}
            elif model.startswith("fail-"):
                status = int(model.split("-")[1])
                result = {"type": "errored", "error": {"type": "error", "error": {
                    "type": ERROR_TYPES.get(status, "api_error"), "message": f"fake anthropic error {status}"}}}
            else:
                text = _answer(params)
                result = {"type": "succeeded", "message": {
                    "id": "msg_fakebatch", "type": "message", "role": "assistant", "model": model,
                    "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
                    "usage": self._usage(params, text, model)}}
            results.append({"custom_id": r["custom_id"], "result": result})
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        for item in results:
            counts[item["result"]["type"]] += 1
        batch.update(processing_status="ended", ended_at=datetime.now(UTC).isoformat(), request_counts=counts,
                     results_url=f"{self.base_url}/v1/messages/batches/{batch['id']}/results",
                     _results=list(reversed(results)))

    async def message_batch_retrieve(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return _error(404, "batch not found")
        self.requests.append({"path": request.path, "headers": dict(request.headers), "body": {}, "query": {}})
        if batch["processing_status"] == "canceling":
            self._message_batch_end(batch, canceled=True)
        elif batch["processing_status"] == "in_progress" and not self.batch_hold:
            self._message_batch_end(batch, canceled=False)
        return web.json_response(self._message_batch_view(batch))

    async def message_batch_results(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None or batch["_results"] is None:
            return _error(404, "results not available")
        self.requests.append({"path": request.path, "headers": dict(request.headers), "body": {}, "query": {}})
        content = b"\n".join(orjson.dumps(item) for item in batch["_results"]) + b"\n"
        return web.Response(body=content, content_type="application/binary")

    async def message_batch_cancel(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return _error(404, "batch not found")
        self.requests.append({"path": request.path, "headers": dict(request.headers), "body": {}, "query": {}})
        self.batch_cancels.append(batch["id"])
        if batch["processing_status"] == "in_progress":
            batch.update(processing_status="canceling", cancel_initiated_at=datetime.now(UTC).isoformat())
        return web.json_response(self._message_batch_view(batch))

    def _usage(self, body: dict, text: str, model: str) -> dict:
        if model in self.scripts:
            return self.scripts[model]["usage"]
        prompt = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", [])) + 3
        usage = {"input_tokens": prompt, "output_tokens": len(text.split()),
                 "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        if model.startswith("cache-"):
            usage.update(cache_creation_input_tokens=7, cache_read_input_tokens=11)
        return usage

    async def count_tokens(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        if not request.headers.get("x-api-key"):
            return _error(401, "x-api-key header is required")
        words = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        return web.json_response({"input_tokens": words + 3})

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        if not request.headers.get("x-api-key"):
            return _error(401, "x-api-key header is required")
        if not request.headers.get("anthropic-version"):
            return _error(400, "anthropic-version header is required")
        if "max_tokens" not in body:
            return _error(400, "max_tokens: Field required")
        if any(m.get("role") not in ("user", "assistant") for m in body.get("messages", [])):
            return _error(400, "messages: roles must be user or assistant")
        model = body.get("model", "")
        if model == "badkey-model":  # echoes the key, as some upstream errors do
            return _error(401, f"invalid x-api-key: {request.headers['x-api-key']}")
        if model.startswith("fail-"):
            return _error(int(model.split("-")[1]))
        if model.startswith("limited-"):  # 429 asking for a pause of that many seconds
            return _error(429, "rate limited", retry_after=model.split("-")[1])
        if model.startswith("slow-"):
            await asyncio.sleep(int(model.split("-")[1]) / 1000)
        text = _answer(body)
        usage = self._usage(body, text, model)
        content = [{"type": "text", "text": text}]
        stop_reason = "end_turn"
        if model.startswith("tool-"):
            content = [{"type": "text", "text": "Let me check."},
                       {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}}]
            stop_reason = "tool_use"
        if not body.get("stream"):
            return web.json_response({"id": "msg_fake01", "type": "message", "role": "assistant", "model": model,
                                      "content": content, "stop_reason": stop_reason, "stop_sequence": None,
                                      "usage": usage})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)

        async def send(event: str, data: dict) -> None:
            await resp.write(f"event: {event}\n".encode() + b"data: " + orjson.dumps({"type": event, **data})
                             + b"\n\n")

        start_usage = {**usage, "output_tokens": 1}
        delta_usage = {"output_tokens": usage["output_tokens"]}
        if self.scripts.get(model, {}).get("delta") == "full":
            delta_usage = usage
        await send("message_start", {"message": {"id": "msg_fake01", "type": "message", "role": "assistant",
                                                 "model": model, "content": [], "stop_reason": None,
                                                 "stop_sequence": None, "usage": start_usage}})
        await send("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
        await send("ping", {})
        words = content[0]["text"].split()
        limit = int(model.split("-")[1]) if model.startswith("break-") else None
        for i, w in enumerate(words):
            if limit is not None and i >= limit:
                # Let the gateway read and relay what was sent before the drop: a break *mid*-stream.
                await asyncio.sleep(0.05)
                request.transport.close()
                return resp
            await send("content_block_delta", {"index": 0, "delta": {"type": "text_delta",
                                                                     "text": w if i == 0 else " " + w}})
            if model.startswith("streamerror-"):
                await send("error", {"error": {"type": "overloaded_error", "message": "Overloaded"}})
                await resp.write_eof()
                return resp
        await send("content_block_stop", {"index": 0})
        if model.startswith("tool-"):
            await send("content_block_start", {"index": 1, "content_block": {"type": "tool_use", "id": "toolu_01",
                                                                             "name": "get_weather", "input": {}}})
            for piece in ('{"city": ', '"Paris"}'):
                await send("content_block_delta", {"index": 1, "delta": {"type": "input_json_delta",
                                                                         "partial_json": piece}})
            await send("content_block_stop", {"index": 1})
        await send("message_delta", {"delta": {"stop_reason": stop_reason, "stop_sequence": None},
                                     "usage": delta_usage})
        await send("message_stop", {})
        await resp.write_eof()
        return resp
