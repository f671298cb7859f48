"""A fake Gemini API on loopback, following the documented formats:
`POST /v1beta/models/{model}:generateContent`, `:streamGenerateContent?alt=sse` (each SSE event a
GenerateContentResponse, usageMetadata on the last) and `:batchEmbedContents`; `x-goog-api-key`
required; errors `{"error": {"code", "message", "status"}}`.

Behaviour by model name: `fail-<status>`, `break-<n>`, `slow-<ms>`, `tool-...` (a functionCall).
A scripted usage (`script_usage(model, usageMetadata)`) is the response's usageMetadata; in a
stream, the events before the last carry its prompt side only, the last one all of it.
"""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web

from .openai_server import FakeOpenAI

STATUSES = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED",
            500: "INTERNAL", 503: "UNAVAILABLE"}


def _error(status: int, message: str | None = None) -> web.Response:
    body = {"error": {"code": status, "message": message or f"fake gemini error {status}",
                      "status": STATUSES.get(status, "UNKNOWN")}}
    return web.json_response(body, status=status)


def _answer(body: dict) -> str:
    last = next((c for c in reversed(body.get("contents", [])) if c.get("role") == "user"), {})
    return "Echo: " + " ".join(p.get("text", "") for p in last.get("parts", []) if "text" in p)


class FakeGemini(FakeOpenAI):
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1beta/models/{call}", self.call)
        return app

    async def call(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        if not request.headers.get("x-goog-api-key"):
            return _error(403, "Method doesn't allow unregistered callers. Please use API Key.")
        model, _, method = request.match_info["call"].partition(":")
        if model.startswith("fail-"):
            return _error(int(model.split("-")[1]))
        if model.startswith("slow-"):
            await asyncio.sleep(int(model.split("-")[1]) / 1000)
        if method == "batchEmbedContents":
            return self.embed(body, model)
        if method not in ("generateContent", "streamGenerateContent"):
            return _error(404, f"unknown method {method}")
        if not body.get("contents") or any(c.get("role") not in ("user", "model") for c in body["contents"]):
            return _error(400, "contents: roles must be user or model")
        text = _answer(body)
        prompt = sum(len(p.get("text", "").split()) for c in body["contents"] for p in c["parts"]) + 2
        usage = {"promptTokenCount": prompt, "candidatesTokenCount": len(text.split()),
                 "totalTokenCount": prompt + len(text.split())}
        if model in self.scripts:
            usage = self.scripts[model]["usage"]
        partial = {k: v for k, v in usage.items() if k in ("promptTokenCount", "cachedContentTokenCount")}
        partial["totalTokenCount"] = usage.get("promptTokenCount", 0)
        if model.startswith("tool-"):
            parts = [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]
        else:
            parts = [{"text": text}]
        if method == "generateContent":
            return web.json_response({"candidates": [{"content": {"parts": parts, "role": "model"},
                                                      "finishReason": "STOP", "index": 0}],
                                      "usageMetadata": usage, "modelVersion": model, "responseId": "resp-fake01"})
        if request.query.get("alt") != "sse":
            return _error(400, "this fake only streams with alt=sse")
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        words = text.split() if not model.startswith("tool-") else []
        limit = int(model.split("-")[1]) if model.startswith("break-") else None
        pieces = [" ".join(words[i:i + 2]) + (" " if i + 2 < len(words) else "") for i in range(0, len(words), 2)]
        for i, piece in enumerate(pieces):
            if limit is not None and i >= limit:
                # Let the gateway read and relay what was sent before the drop: a break *mid*-stream.
                await asyncio.sleep(0.05)
                request.transport.close()
                return resp
            event = {"candidates": [{"content": {"parts": [{"text": piece}], "role": "model"}, "index": 0}],
                     "usageMetadata": partial,
                     "modelVersion": model, "responseId": "resp-fake01"}
            await resp.write(b"data: " + orjson.dumps(event) + b"\r\n\r\n")
        last_parts = parts if model.startswith("tool-") else [{"text": ""}]
        final = {"candidates": [{"content": {"parts": last_parts, "role": "model"}, "finishReason": "STOP",
                                 "index": 0}], "usageMetadata": usage, "modelVersion": model,
                 "responseId": "resp-fake01"}
        await resp.write(b"data: " + orjson.dumps(final) + b"\r\n\r\n")
        await resp.write_eof()
        return resp

    def embed(self, body: dict, model: str) -> web.Response:
        out = []
        for req in body.get("requests", []):
            if req.get("model") != f"models/{model}":
                return _error(400, "requests[].model must match the model in the URL")
            dims = req.get("outputDimensionality") or 3
            out.append({"values": [0.5] * dims})
        return web.json_response({"embeddings": out})
