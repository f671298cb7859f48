"""OpenAI-compatible servers (vLLM, Ollama, Groq, Together, Mistral, OpenRouter...): the OpenAI
wire format at `api_base` (which ends in /v1), bearer auth."""

from __future__ import annotations

import orjson

from .base import Completion, ProviderAdapter, ProviderError, Target, Usage, register
from .transport import open_stream, post_json, sse_events


@register
class OpenAICompatibleAdapter(ProviderAdapter):
    kind = "openai_compatible"
    supports_embeddings = True

    def headers(self, target: Target) -> dict:
        headers = {"content-type": "application/json"}
        if target.secret:
            headers["authorization"] = f"Bearer {target.secret}"
        return headers

    def params(self, target: Target) -> dict | None:
        return None

    def url(self, target: Target, path: str) -> str:
        return target.api_base.rstrip("/") + path

    async def complete(self, target: Target, body: dict) -> Completion:
        data = await post_json(self.url(target, "/chat/completions"), headers=self.headers(target),
                               body=body, params=self.params(target), secrets=(target.secret,))
        usage = Usage.from_openai(data.get("usage")) or Usage(estimated=True)
        return Completion(body=data, usage=usage)

    async def stream(self, target: Target, body: dict):
        body = {**body, "stream": True, "stream_options": {**(body.get("stream_options") or {}),
                                                           "include_usage": True}}
        async with open_stream(self.url(target, "/chat/completions"), headers=self.headers(target),
                               body=body, params=self.params(target), secrets=(target.secret,)) as resp:
            async for _event, data in sse_events(resp):
                if data.strip() == "[DONE]":
                    return
                try:
                    chunk = orjson.loads(data)
                except orjson.JSONDecodeError:
                    raise ProviderError("upstream sent a stream event that is not JSON", code="upstream_bad_body")
                if isinstance(chunk, dict) and "error" in chunk:
                    err = chunk["error"]
                    message = err.get("message") if isinstance(err, dict) else str(err)
                    raise ProviderError(f"upstream stream error: {message}", code="upstream_stream_error")
                yield chunk

    async def embed(self, target: Target, body: dict) -> Completion:
        data = await post_json(self.url(target, "/embeddings"), headers=self.headers(target), body=body,
                               params=self.params(target), secrets=(target.secret,))
        usage = data.get("usage") or {}
        return Completion(body=data, usage=Usage(prompt_tokens=int(usage.get("prompt_tokens") or 0)))
