"""OpenAI-compatible servers (vLLM, Ollama, Groq, Together, Mistral, OpenRouter, DeepSeek...): the
OpenAI wire format at `api_base` (which ends in /v1), bearer auth.

Usage (`usage_of`, also the parser of the OpenAI and Azure OpenAI adapters): `prompt_tokens`
includes cached tokens; the cached part is `prompt_tokens_details.cached_tokens`, or DeepSeek's
`prompt_cache_hit_tokens` (with `prompt_cache_miss_tokens`, the rest) when that is all the
server reports; `completion_tokens_details.reasoning_tokens` is part of `completion_tokens`.
`prompt_tokens_details.cache_write_tokens` (not in OpenAI's docs; this gateway writes it for
providers that bill cache writes, so a gateway behind another keeps them) is read too.
Streams carry usage on a final chunk without choices (OpenAI, with
`stream_options.include_usage`) or on the chunk with the finish reason (DeepSeek); either way
that chunk gets `GATEWAY_USAGE`.
"""

from __future__ import annotations

import orjson

from .base import GATEWAY_USAGE, Completion, ProviderAdapter, ProviderError, Target, Usage, register
from .transport import open_stream, post_json, sse_events


def _int(data, key: str) -> int:
    return int(data.get(key) or 0) if isinstance(data, dict) else 0


def usage_of(data: dict | None) -> Usage | None:
    """An OpenAI-format usage object in our convention; None when the server sent none."""
    if not isinstance(data, dict) or not data:
        return None
    details = data.get("prompt_tokens_details")
    hit = _int(data, "prompt_cache_hit_tokens")  # DeepSeek
    prompt = _int(data, "prompt_tokens") or hit + _int(data, "prompt_cache_miss_tokens")
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=_int(data, "completion_tokens"),
        cached_tokens=_int(details, "cached_tokens") or hit,
        cache_write_tokens=_int(details, "cache_write_tokens"),
        reasoning_tokens=_int(data.get("completion_tokens_details"), "reasoning_tokens"),
    )


def relayed_usage(data: dict, usage: Usage) -> dict:
    """The upstream's usage object as clients get it: as sent (a provider's own fields kept), with
    the OpenAI fields filled in where the provider reports the same counts under other names."""
    out = dict(data)
    out.setdefault("prompt_tokens", usage.prompt_tokens)
    out.setdefault("completion_tokens", usage.completion_tokens)
    out.setdefault("total_tokens", usage.prompt_tokens + usage.completion_tokens)
    details = data.get("prompt_tokens_details")
    if usage.cached_tokens and not _int(details, "cached_tokens"):
        out["prompt_tokens_details"] = {**(details if isinstance(details, dict) else {}),
                                        "cached_tokens": usage.cached_tokens}
    return out


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
        usage = usage_of(data.get("usage"))
        if usage is None:
            return Completion(body=data, usage=Usage(estimated=True))
        data["usage"] = relayed_usage(data["usage"], usage)
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
                if isinstance(chunk, dict) and chunk.get("usage"):
                    usage = usage_of(chunk["usage"])
                    if usage is not None:
                        chunk["usage"] = relayed_usage(chunk["usage"], usage)
                        chunk[GATEWAY_USAGE] = usage
                yield chunk

    async def embed(self, target: Target, body: dict) -> Completion:
        data = await post_json(self.url(target, "/embeddings"), headers=self.headers(target), body=body,
                               params=self.params(target), secrets=(target.secret,))
        usage = data.get("usage") or {}
        return Completion(body=data, usage=Usage(prompt_tokens=int(usage.get("prompt_tokens") or 0)))
