"""A fake Azure OpenAI on loopback: the OpenAI fake's behaviour under
`/openai/deployments/{deployment}/chat/completions|embeddings?api-version=...`, with Azure's
checks: an `api-key` header (401 otherwise), an `api-version` query (404 otherwise), and the
deployment name from the path (the body's `model` is ignored). Streams open with a
`prompt_filter_results` chunk that has no choices, as Azure's do."""

from __future__ import annotations

import orjson
from aiohttp import web

from .openai_server import FakeOpenAI


def _azure_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


class FakeAzureOpenAI(FakeOpenAI):
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self.azure_chat)
        app.router.add_post("/openai/deployments/{deployment}/embeddings", self.azure_embeddings)
        return app

    def _check(self, request: web.Request) -> web.Response | None:
        if not request.headers.get("api-key"):
            return _azure_error(401, "401", "Access denied due to invalid subscription key or wrong API endpoint.")
        if not request.query.get("api-version"):
            return _azure_error(404, "404", "Resource not found")
        return None

    async def azure_chat(self, request: web.Request) -> web.StreamResponse:
        bad = self._check(request)
        if bad is not None:
            await self._record(request)
            return bad
        raw = orjson.loads(await request.read() or b"{}")
        self.requests.append({"path": request.path, "headers": dict(request.headers), "body": raw,
                              "query": dict(request.query)})
        body = {**raw, "model": request.match_info["deployment"]}
        return await self.chat_for(request, body, prefilter=True)

    async def azure_embeddings(self, request: web.Request) -> web.Response:
        bad = self._check(request)
        if bad is not None:
            await self._record(request)
            return bad
        raw = orjson.loads(await request.read() or b"{}")
        self.requests.append({"path": request.path, "headers": dict(request.headers), "body": raw,
                              "query": dict(request.query)})
        return self.embeddings_for({**raw, "model": request.match_info["deployment"]})
