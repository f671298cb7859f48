"""The provider contract: one async interface (complete, stream, embed), one error type that says
whether a retry can help, and a registry from kind to adapter.

Adapters speak their provider's wire format and translate to and from the OpenAI shape our
clients use. Bodies given to an adapter are already OpenAI-shaped, with `model` set to the
deployment's upstream model.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens read from the provider's prompt cache
    cache_write_tokens: int = 0  # prompt tokens written to the provider's prompt cache
    reasoning_tokens: int = 0  # part of completion_tokens
    estimated: bool = False  # counted by us because the provider reported none

    def as_openai(self) -> dict:
        data: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }
        if self.cached_tokens or self.cache_write_tokens:
            data["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        if self.cache_write_tokens:  # not in OpenAI's shape; carried so streams keep it for billing
            data["prompt_tokens_details"]["cache_write_tokens"] = self.cache_write_tokens
        if self.reasoning_tokens:
            data["completion_tokens_details"] = {"reasoning_tokens": self.reasoning_tokens}
        return data

    @classmethod
    def from_openai(cls, data: dict | None) -> Usage | None:
        if not data:
            return None
        details = data.get("prompt_tokens_details") or {}
        out_details = data.get("completion_tokens_details") or {}
        return cls(
            prompt_tokens=int(data.get("prompt_tokens") or 0),
            completion_tokens=int(data.get("completion_tokens") or 0),
            cached_tokens=int(details.get("cached_tokens") or 0),
            cache_write_tokens=int(details.get("cache_write_tokens") or 0),
            reasoning_tokens=int(out_details.get("reasoning_tokens") or 0),
        )


@dataclass(frozen=True, slots=True)
class Target:
    """Where a call goes: one deployment with its provider's settings and decrypted secret."""

    kind: str
    api_base: str
    upstream_model: str
    secret: str = ""
    options: dict = field(default_factory=dict)


@dataclass(slots=True)
class Completion:
    body: dict  # OpenAI chat.completion (or embeddings list) object
    usage: Usage


class ProviderError(Exception):
    """A failed upstream call. `retryable` says whether another attempt (or deployment) can help."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 502,
        retryable: bool = False,
        retry_after: float | None = None,
        code: str = "upstream_error",
        upstream_status: int | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after
        self.code = code
        self.upstream_status = upstream_status


class ProviderAdapter:
    kind: ClassVar[str]
    supports_embeddings: ClassVar[bool] = False

    async def complete(self, target: Target, body: dict) -> Completion:
        raise NotImplementedError

    def stream(self, target: Target, body: dict) -> AsyncIterator[dict]:
        """Yields OpenAI chat.completion.chunk objects; the last one carries `usage` when known."""
        raise NotImplementedError

    async def embed(self, target: Target, body: dict) -> Completion:
        raise ProviderError(f"{self.kind} deployments do not offer embeddings", status=400, code="unsupported")


_registry: dict[str, ProviderAdapter] = {}


def register(cls: type[ProviderAdapter]) -> type[ProviderAdapter]:
    _registry[cls.kind] = cls()
    return cls


def adapter_for(kind: str) -> ProviderAdapter:
    try:
        return _registry[kind]
    except KeyError:
        raise ProviderError(f"no adapter for provider kind {kind!r}", status=500, code="provider_kind_unknown")


def offers_embeddings(kind: str) -> bool:
    adapter = _registry.get(kind)
    return adapter is not None and adapter.supports_embeddings
