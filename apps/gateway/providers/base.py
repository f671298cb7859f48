"""The provider contract: one async interface (complete, stream, embed), one error type that says
whether a retry can help, and a registry from kind to adapter.

Adapters speak their provider's wire format and translate to and from the OpenAI shape our
clients use. Bodies given to an adapter are already OpenAI-shaped, with `model` set to the
deployment's upstream model.

Each adapter owns its provider's usage parser: the only place where that provider's usage fields
become our `Usage`. `Completion.usage` (non-streaming) and the `GATEWAY_USAGE` entry of a stream
chunk (streaming) are what billing costs; the OpenAI-shaped `usage` next to them is for clients.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

GATEWAY_USAGE = "_gateway_usage"
"""Key of the parsed `Usage` on a stream chunk that carries usage. Private to the gateway: the
pipeline pops it before the chunk is relayed."""

NATIVE_EVENTS = "_native_events"
"""Key of the provider's own stream events `[(event, data)]` on a chunk of a native stream
(`stream_native`): a client speaking that provider's dialect is sent them as they came."""


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts under the one convention cost_compute relies on, whatever the provider:

    - `prompt_tokens` counts every input token, including those read from and written to the
      provider's prompt cache; `cached_tokens` and `cache_write_tokens` are the parts of it billed
      at their own rates (so a cached token is never billed twice, nor missed);
    - `completion_tokens` counts every output token, including reasoning ("thinking") tokens;
      `reasoning_tokens` is the part of it that was reasoning (billed at the output rate).
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens read from the provider's prompt cache
    cache_write_tokens: int = 0  # prompt tokens written to the provider's prompt cache
    reasoning_tokens: int = 0  # part of completion_tokens
    estimated: bool = False  # counted by us because the provider reported none
    batch_priced: bool = False  # the provider billed this call at its batch price (a provider batch API's result)

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
        """A usage object in the OpenAI wire format (what `as_openai` writes, and what OpenAI-style
        upstreams send). The parser is the OpenAI-compatible adapter's; this is a shortcut to it."""
        from .openai_compatible import usage_of

        return usage_of(data)


@dataclass(frozen=True, slots=True)
class Target:
    """Where a call goes: one deployment with its provider's settings and decrypted secret."""

    kind: str
    api_base: str
    upstream_model: str
    secret: str = ""
    options: dict = field(default_factory=dict)
    region: str = ""  # the deployment's region (Bedrock and Vertex AI endpoints are regional)


@dataclass(slots=True)
class Completion:
    body: dict  # OpenAI chat.completion (or embeddings list) object
    usage: Usage
    native: dict | None = None  # the provider's own response body, for a client speaking its dialect


@dataclass(frozen=True, slots=True)
class BatchPoll:
    """What a provider says of one of its batches: its own status word, whether it has ended
    (no request will change any more: results can be collected), and its body as sent."""

    status: str
    ended: bool
    data: dict


@dataclass(slots=True)
class BatchResult:
    """One request's result in a provider batch: `succeeded` (with its completion, usage billed at
    the batch price), `errored` (the upstream status and message), `canceled` or `expired` (never run)."""

    custom_id: str
    outcome: str
    completion: Completion | None = None
    status: int = 0
    message: str = ""
    code: str = ""


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
    # The inbound dialect (apps.gateway.dialects) this adapter can take as it is, unchanged:
    # `complete_native` / `stream_native` receive that dialect's body with `model` set.
    native_dialect: ClassVar[str] = ""

    async def complete(self, target: Target, body: dict) -> Completion:
        raise NotImplementedError

    def stream(self, target: Target, body: dict) -> AsyncIterator[dict]:
        """Yields OpenAI chat.completion.chunk objects. A chunk that carries usage has it twice:
        `usage` in the OpenAI shape for the client, and `chunk[GATEWAY_USAGE]`, the `Usage` this
        adapter parsed from the provider's own fields, for billing. When several chunks carry
        usage, the last one's is the call's."""
        raise NotImplementedError

    async def embed(self, target: Target, body: dict) -> Completion:
        raise ProviderError(f"{self.kind} deployments do not offer embeddings", status=400, code="unsupported")

    def takes_native(self, target: Target) -> str:
        """The dialect this target takes unchanged ("" for none); one adapter may serve several."""
        return self.native_dialect

    async def complete_native(self, target: Target, body: dict) -> Completion:
        """A body in `native_dialect`, sent unchanged; `Completion.native` is the provider's answer."""
        raise NotImplementedError

    def stream_native(self, target: Target, body: dict) -> AsyncIterator[dict]:
        """As `stream`, each chunk also carrying the provider's own events under NATIVE_EVENTS."""
        raise NotImplementedError

    async def count_tokens(self, target: Target, body: dict) -> int | None:
        """Input tokens of a `native_dialect` body as the provider counts them, None if it cannot."""
        return None

    # --- the provider's own batch API (Deployment.provider_batch; apps/gateway/provider_batches.py) ---
    supports_batch: ClassVar[bool] = False

    async def batch_submit(self, target: Target, requests: list[tuple[str, dict]], *, metadata: dict) -> str:
        """Send OpenAI-shaped chat bodies `[(custom_id, body)]` as one provider batch; returns its id."""
        raise NotImplementedError

    async def batch_poll(self, target: Target, upstream_id: str) -> BatchPoll:
        raise NotImplementedError

    async def batch_results(self, target: Target, poll: BatchPoll) -> list[BatchResult]:
        """Every result of an ended batch, in the provider's order (match them by custom_id)."""
        raise NotImplementedError

    async def batch_cancel(self, target: Target, upstream_id: str) -> None:
        raise NotImplementedError


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


def offers_batch(kind: str) -> bool:
    """Whether deployments of this kind can send Batches API lines to the provider's batch API."""
    adapter = _registry.get(kind)
    return adapter is not None and adapter.supports_batch
