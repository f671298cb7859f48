"""The built-in mock provider: deterministic, instant, streams too. The demo uses it.

It answers with a fixed sentence that echoes the last user message, cut to max_tokens words (a
word is a token here). Its usage is counted, not parsed: prompt tokens estimated from the
messages, one completion token a word; streams end with a usage chunk that carries it as
`GATEWAY_USAGE` too, like every adapter's. Upstream models named `fail-<status>` fail with that status, for tests and
demos of fallbacks.
"""

from __future__ import annotations

import hashlib
import time

from ..tokens import estimate_messages, text_of
from .base import GATEWAY_USAGE, Completion, ProviderAdapter, ProviderError, Target, Usage, register


def _answer_words(body: dict) -> list[str]:
    last_user = next((m for m in reversed(body["messages"]) if m.get("role") == "user"), None)
    echo = text_of(last_user.get("content")) if last_user else ""
    words = f"This is a mock response from {body['model']}. You said: {echo}".split()
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    return words[:limit] if limit else words


def _fail_if_asked(target: Target) -> None:
    if target.upstream_model.startswith("fail-"):
        status = int(target.upstream_model.removeprefix("fail-") or 500)
        raise ProviderError(
            f"mock upstream failed with {status}", status=502, retryable=status == 429 or status >= 500,
            upstream_status=status,
        )


def _completion_id(body: dict) -> str:
    return "chatcmpl-mock" + hashlib.sha256(repr(body["messages"]).encode()).hexdigest()[:20]


@register
class MockAdapter(ProviderAdapter):
    kind = "mock"
    supports_embeddings = True

    async def complete(self, target: Target, body: dict) -> Completion:
        _fail_if_asked(target)
        words = _answer_words(body)
        usage = Usage(prompt_tokens=estimate_messages(body["messages"]), completion_tokens=len(words))
        return Completion(
            body={
                "id": _completion_id(body),
                "object": "chat.completion",
                "created": int(time.time()),
                "model": target.upstream_model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": " ".join(words)},
                        "finish_reason": "length" if body.get("max_tokens") == len(words) else "stop",
                        "logprobs": None,
                    }
                ],
                "usage": usage.as_openai(),
            },
            usage=usage,
        )

    async def stream(self, target: Target, body: dict):
        _fail_if_asked(target)
        words = _answer_words(body)
        cid, created = _completion_id(body), int(time.time())

        def chunk(delta: dict, finish: str | None = None) -> dict:
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": target.upstream_model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            }

        yield chunk({"role": "assistant", "content": ""})
        for i, word in enumerate(words):
            yield chunk({"content": word if i == 0 else " " + word})
        yield chunk({}, "length" if body.get("max_tokens") == len(words) else "stop")
        usage = Usage(prompt_tokens=estimate_messages(body["messages"]), completion_tokens=len(words))
        yield {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": target.upstream_model,
            "choices": [],
            "usage": usage.as_openai(),
            GATEWAY_USAGE: usage,
        }

    async def embed(self, target: Target, body: dict) -> Completion:
        _fail_if_asked(target)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        dims = int(body.get("dimensions") or 8)
        data, tokens = [], 0
        for i, item in enumerate(inputs):
            text = item if isinstance(item, str) else " ".join(map(str, item))
            tokens += max(1, len(text.split()))
            digest = hashlib.sha256(text.encode()).digest()
            data.append(
                {"object": "embedding", "index": i, "embedding": [(digest[j % 32] - 128) / 128 for j in range(dims)]}
            )
        usage = Usage(prompt_tokens=tokens)
        return Completion(
            body={
                "object": "list",
                "data": data,
                "model": target.upstream_model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
            usage=usage,
        )
