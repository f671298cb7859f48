"""The request pipeline: one explicit, ordered path shared by sync, streaming, async and batch.

    authenticate -> validate -> route -> cache lookup -> admit -> call -> settle -> usage event -> respond

Each step is a small function over a request context (`Ctx`). `prepare` runs the steps up to and
including admission; `execute` calls the provider and settles; `finish` writes the ledger row.
A request that fails after authentication still gets its ledger row, and the row is written
before the response completes, so no 2xx ever lacks one.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

import orjson
from django.conf import settings
from django.utils import timezone

from apps.analytics.metrics import UNKNOWN_MODEL, usage_observe
from apps.analytics.services import usage_event_record
from apps.billing import alerts
from apps.billing.selectors import PriceInfo, price_in_force
from apps.billing.services import cost_compute
from apps.core.db import db_sync
from apps.keys import last_used, security
from apps.keys.crypto import api_key_digest
from apps.keys.selectors import KeyAuth, api_key_auth_by_digest

from . import admission, cache, router, schemas
from .errors import GatewayError, invalid_api_key, invalid_request, model_not_found, permission_denied
from .providers import Completion, Usage, adapter_for
from .providers.base import ProviderError
from .selectors import AliasRoute, DeploymentRoute, routing_table
from .tokens import estimate_messages, estimate_text, text_of

CHAT = "chat"
EMBEDDINGS = "embeddings"
MODELS = "models"
ENDPOINT_PATHS = {CHAT: "/v1/chat/completions", EMBEDDINGS: "/v1/embeddings", MODELS: "/v1/models"}


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex


@dataclass(slots=True)
class Ctx:
    """Everything one gateway request carries through the pipeline."""

    kind: str = CHAT
    request_id: str = field(default_factory=new_request_id)
    timestamp: datetime = field(default_factory=timezone.now)
    started: float = field(default_factory=time.perf_counter)
    auth: KeyAuth | None = None
    body: dict = field(default_factory=dict)
    options: schemas.GatewayOptions = field(default_factory=schemas.GatewayOptions)
    model: str = ""
    stream: bool = False
    include_usage: bool = False
    is_async: bool = False
    batch_id: str = ""
    alias: AliasRoute | None = None
    candidates: list[DeploymentRoute] = field(default_factory=list)
    price: PriceInfo | None = None
    admission: admission.Admission | None = None
    deployment: DeploymentRoute | None = None
    attempts: int = 0
    cached: bool = False
    usage: Usage | None = None
    cost: Decimal = Decimal(0)
    saved_cost: Decimal = Decimal(0)
    status: int = 200
    error_code: str = ""
    recorded: bool = False
    cache_key: str = ""  # computed at lookup, before admission may change max_tokens
    headers: dict[str, str] = field(default_factory=dict)
    endpoint: str = ""  # the path the key's endpoint scope is checked against; default by kind
    client_ip: str = ""
    cache_key: str = ""  # set by the cache lookup, before admission may change the body

    @property
    def metadata(self) -> schemas.GatewayMetadata:
        return self.options.metadata or schemas.GatewayMetadata()

    @property
    def budget_id(self) -> str:
        return self.metadata.budget_id or (self.auth.default_budget_id if self.auth else "")

    @property
    def priority(self) -> int:
        return self.metadata.priority if self.metadata.priority is not None else 5


# --- steps ----------------------------------------------------------------------------------

_auth_cache: dict[str, tuple[float, KeyAuth | None]] = {}


async def authenticate(ctx: Ctx, authorization: str | None) -> None:
    """Bearer key -> KeyAuth, by HMAC digest; cached in process for GATEWAY_AUTH_CACHE_TTL_S."""
    if not authorization or not authorization.startswith("Bearer "):
        await security.auth_failure_note(prefix="", ip=ctx.client_ip, reason="missing_key")
        raise invalid_api_key("You didn't provide an API key. Send it as 'Authorization: Bearer sk-...'.")
    secret = authorization[7:].strip()
    digest = api_key_digest(secret)
    now = time.monotonic()
    hit = _auth_cache.get(digest)
    if hit is not None and hit[0] > now:
        auth = hit[1]
    else:
        auth = await db_sync(api_key_auth_by_digest, digest=digest)
        if len(_auth_cache) > 10_000:
            _auth_cache.clear()
        _auth_cache[digest] = (now + settings.GATEWAY_AUTH_CACHE_TTL_S, auth)
    if auth is None:
        await security.auth_failure_note(prefix=secret[:6], ip=ctx.client_ip, reason="unknown_key")
        raise invalid_api_key(f"Incorrect API key provided: {secret[:6]}***.")
    if auth.revoked or (auth.expires_at is not None and auth.expires_at <= timezone.now()):
        reason = "revoked" if auth.revoked else "expired"
        await security.auth_failure_note(prefix=auth.key_prefix, ip=ctx.client_ip, reason=reason,
                                         tenant_id=auth.tenant_id, key_id=auth.key_id)
        raise invalid_api_key(f"This API key has {'been revoked' if auth.revoked else 'expired'}.")
    endpoint = ctx.endpoint or ENDPOINT_PATHS[ctx.kind]
    if not auth.may_use_endpoint(endpoint):
        raise permission_denied(f"This API key may not call {endpoint}.", code="endpoint_not_allowed")
    ctx.auth = auth
    last_used.touch(auth.key_id)
    last_used.flush_soon()


def validate(ctx: Ctx, data: dict | bytes) -> None:
    """Validate and normalise the body (raw JSON or parsed, in OpenAI's or the seed's shape)."""
    if isinstance(data, bytes | bytearray):
        data = schemas.parse_json(data)
    if ctx.kind == EMBEDDINGS:
        body, options = schemas.embeddings_body(data)
    elif "request" in data and "messages" not in data:
        body, options = schemas.seed_envelope(data)
    else:
        body, options = schemas.chat_body(data)
    ctx.body, ctx.options = body, options
    ctx.model = body["model"]
    ctx.stream = bool(body.get("stream"))
    ctx.include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    # A worker may have set these already (a Batches API line is async with the batch's id).
    ctx.is_async = ctx.is_async or bool(options.async_)
    ctx.batch_id = ctx.batch_id or options.batch_id or ""


async def route(ctx: Ctx) -> None:
    """Alias -> deployments in the order to try them, and the price in force."""
    table = await routing_table()
    alias = table.aliases.get(ctx.model)
    auto = alias is None and ctx.model == router.AUTO
    if auto:
        alias = await router.auto_alias(ctx, table)
        ctx.model = alias.alias
        ctx.headers["x-gateway-model"] = alias.alias
    if alias is None:
        raise model_not_found(ctx.model)
    if not ctx.auth.may_use_model(ctx.model):
        raise permission_denied(f"This API key may not use the model `{ctx.model}`.", param="model")
    if ctx.kind == EMBEDDINGS and not alias.supports_embeddings:
        raise invalid_request(f"The model `{ctx.model}` does not offer embeddings.", param="model",
                              code="model_not_embedding")
    ctx.alias = alias
    ctx.candidates = await router.candidates(ctx, alias, strategy="cheapest" if auto else None)
    ctx.price = price_in_force(list(alias.prices), ctx.timestamp)
    if ctx.price is None and not ctx.auth.allow_unpriced_models:
        raise invalid_request(
            f"The model `{ctx.model}` has no price, and this tenant does not allow unpriced models.",
            param="model", code="model_not_priced",
        )
    if ctx.price is None:  # allowed, so recorded at $0 with its tokens, and the tenant is alerted
        await alerts.unpriced_model_observed(tenant_id=ctx.auth.tenant_id, tenant_timezone=ctx.auth.tenant_timezone,
                                             model=ctx.model, at=ctx.timestamp)


async def admit(ctx: Ctx) -> None:
    ctx.admission = await admission.admit(ctx)
    ctx.headers.update(ctx.admission.headers)


def _cost(ctx: Ctx, usage: Usage) -> Decimal:
    if ctx.price is None:
        return Decimal(0)
    return cost_compute(
        price=ctx.price,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_tokens=usage.cached_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        batch=bool(ctx.batch_id) and ctx.is_async,
    )


async def settle(ctx: Ctx) -> None:
    ctx.cost = _cost(ctx, ctx.usage) if ctx.usage else Decimal(0)
    await admission.settle(ctx)


async def settle_and_record(ctx: Ctx) -> None:
    """settle and usage event at once: the ledger row needs only the cost, not the counters, so
    the Redis round trip of the settle and the ledger commit overlap instead of adding up. Both
    always run to the end; the first error, if any, is raised after."""
    ctx.cost = _cost(ctx, ctx.usage) if ctx.usage else Decimal(0)
    results = await asyncio.gather(admission.settle(ctx), record(ctx), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


async def record(ctx: Ctx) -> None:
    """Write the ledger row (once). Needs an authenticated tenant; earlier failures have none."""
    if ctx.recorded or ctx.auth is None:
        return
    ctx.recorded = True
    usage = ctx.usage or Usage()
    meta = ctx.metadata
    d = ctx.deployment
    latency_ms = int((time.perf_counter() - ctx.started) * 1000)
    await usage_event_record(
        request_id=ctx.request_id,
        timestamp=ctx.timestamp,
        tenant_id=ctx.auth.tenant_id,
        api_key_id=ctx.auth.key_id,
        source_id=ctx.auth.source_id,
        source_type=meta.source_type or ctx.auth.source_type,
        source_ref=meta.source_id or ctx.auth.source_name,
        request_type=ctx.kind,
        model=ctx.model,
        deployment_id=d.id if d else None,
        provider=d.provider_name if d else "",
        upstream_model=d.target.upstream_model if d else "",
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_tokens=usage.cached_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        reasoning_tokens=usage.reasoning_tokens,
        cost=ctx.cost,
        saved_cost=ctx.saved_cost,
        price_id=ctx.price.id if ctx.price else None,
        input_usd_per_mtok=ctx.price.input_usd_per_mtok if ctx.price else None,
        output_usd_per_mtok=ctx.price.output_usd_per_mtok if ctx.price else None,
        status=ctx.status,
        error_code=ctx.error_code,
        latency_ms=latency_ms,
        cached=ctx.cached,
        stream=ctx.stream,
        is_async=ctx.is_async,
        batch_id=ctx.batch_id,
        budget_id=ctx.budget_id,
        priority=ctx.priority,
        estimated=usage.estimated,
    )
    usage_observe(model=ctx.model if ctx.alias else UNKNOWN_MODEL, status=ctx.status, latency_ms=latency_ms,
                  prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens, cost=ctx.cost,
                  saved_cost=ctx.saved_cost, cached=ctx.cached, provider=d.provider_name if d else "",
                  error_code=ctx.error_code)


async def fail(ctx: Ctx, exc: GatewayError) -> None:
    """A request that ends in an error: release its hold and record it."""
    ctx.status = exc.status
    ctx.error_code = exc.code or exc.type
    if ctx.admission is not None:
        await admission.release(ctx)
        ctx.admission = None
    await record(ctx)


async def abandoned(ctx: Ctx) -> None:
    """The client went away (the view was cancelled) before the answer: release the hold at once
    rather than when it expires, and record the request (499). Re-raise the CancelledError after."""
    await fail(ctx, GatewayError(499, "The client closed the request before the answer.", type="api_error",
                                 code="client_disconnected"))


# --- runs -----------------------------------------------------------------------------------


async def prepare(ctx: Ctx, authorization: str | None, data: dict | bytes, *,
                  auth: KeyAuth | None = None) -> Completion | None:
    """authenticate -> validate -> route -> cache lookup -> admit. Returns a cache hit, if any.
    A worker running work accepted earlier passes the key's `auth` (re-read by id) instead."""
    if auth is None:
        await authenticate(ctx, authorization)
    else:
        ctx.auth = auth
    try:
        validate(ctx, data)
        await route(ctx)
        hit = await cache.lookup(ctx)
        if hit is not None:
            ctx.cached, ctx.usage = True, hit.usage
            ctx.saved_cost = _cost(ctx, hit.usage)
            return hit
        await admit(ctx)
    except GatewayError as exc:
        await fail(ctx, exc)
        raise
    return None


def _upstream_body(ctx: Ctx, deployment: DeploymentRoute) -> dict:
    body = {**ctx.body, "model": deployment.target.upstream_model}
    if not ctx.stream:
        body.pop("stream", None)
        body.pop("stream_options", None)
    return body


def _estimate_usage(ctx: Ctx, completion_text: str) -> Usage:
    if ctx.kind == EMBEDDINGS:
        inputs = ctx.body["input"] if isinstance(ctx.body["input"], list) else [ctx.body["input"]]
        return Usage(prompt_tokens=sum(estimate_text(str(i)) for i in inputs), estimated=True)
    return Usage(prompt_tokens=estimate_messages(ctx.body["messages"]),
                 completion_tokens=estimate_text(completion_text), estimated=True)


async def execute(ctx: Ctx) -> Completion:
    """call (with retries and fallbacks) -> settle -> cache store -> usage event."""

    async def invoke(deployment: DeploymentRoute) -> Completion:
        adapter = adapter_for(deployment.target.kind)
        body = _upstream_body(ctx, deployment)
        if ctx.kind == EMBEDDINGS:
            return await adapter.embed(deployment.target, body)
        return await adapter.complete(deployment.target, body)

    try:
        completion = await router.call_with_fallbacks(ctx, invoke)
    except GatewayError as exc:
        await fail(ctx, exc)
        raise
    except asyncio.CancelledError:
        await abandoned(ctx)
        raise
    if completion.usage.estimated:
        text = ""
        if ctx.kind == CHAT:
            text = "".join(text_of((c.get("message") or {}).get("content")) for c in completion.body.get("choices", []))
        completion.usage = _estimate_usage(ctx, text)
    ctx.usage = completion.usage
    await cache.store(ctx, completion)
    await settle_and_record(ctx)
    return completion


async def run(ctx: Ctx, authorization: str | None, data: dict | bytes) -> Completion:
    """The whole pipeline for a non-streaming request (sync view, async worker, batch line)."""
    hit = await prepare(ctx, authorization, data)
    if hit is not None:
        await record(ctx)
        return hit
    return await execute(ctx)


# --- streaming ------------------------------------------------------------------------------


def sse(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else orjson.dumps(data).decode()
    return f"data: {payload}\n\n".encode()


async def open_stream(ctx: Ctx) -> tuple[dict | None, AsyncIterator[dict]]:
    """Open the upstream stream with fallbacks, up to its first chunk: until a byte reaches the
    client, a failure may still fall back; after it, never."""

    async def invoke(deployment: DeploymentRoute):
        agen = adapter_for(deployment.target.kind).stream(deployment.target, _upstream_body(ctx, deployment))
        try:
            first = await agen.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException:
            await agen.aclose()
            raise
        return first, agen

    try:
        return await router.call_with_fallbacks(ctx, invoke)
    except GatewayError as exc:
        await fail(ctx, exc)
        raise
    except asyncio.CancelledError:
        await abandoned(ctx)
        raise


async def stream_events(ctx: Ctx, first: dict | None, agen: AsyncIterator[dict]) -> AsyncIterator[bytes]:
    """Relay the upstream chunks as SSE; settle and write the ledger row before `[DONE]`.
    A failure mid-stream ends the stream with an error event (which the OpenAI SDK raises); a
    client that goes away is billed for what was produced."""
    produced: list[str] = []
    usage: Usage | None = None
    usage_chunk: dict | None = None
    chunk = first
    recorder = cache.StreamRecorder(ctx)
    try:
        while chunk is not None:
            recorder.add(chunk)
            if chunk.get("usage"):
                usage = Usage.from_openai(chunk["usage"])
                if not chunk.get("choices"):
                    usage_chunk = chunk
                    chunk = await anext(agen, None)
                    continue
                if not ctx.include_usage:
                    chunk = {k: v for k, v in chunk.items() if k != "usage"}
            for choice in chunk.get("choices", ()):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    produced.append(piece)
            yield sse(chunk)
            chunk = await anext(agen, None)
        ctx.usage = usage or _estimate_usage(ctx, "".join(produced))
        await recorder.store(ctx.usage)
        await settle_and_record(ctx)
        if ctx.include_usage:
            yield sse(usage_chunk or {"id": first.get("id") if first else ctx.request_id,
                                      "object": "chat.completion.chunk", "created": int(time.time()),
                                      "model": ctx.model, "choices": [], "usage": ctx.usage.as_openai()})
        yield sse("[DONE]")
    except ProviderError as exc:
        ctx.status, ctx.error_code = 502, exc.code
        ctx.usage = usage or _estimate_usage(ctx, "".join(produced))
        await settle(ctx)
        await record(ctx)
        yield sse({"error": {"message": exc.message, "type": "api_error", "param": None, "code": exc.code}})
    finally:
        if not ctx.recorded:  # the client went away mid-stream: bill what was produced
            ctx.status, ctx.error_code = 499, "client_disconnected"
            ctx.usage = usage or _estimate_usage(ctx, "".join(produced))
            await settle(ctx)
            await record(ctx)
        await agen.aclose()


async def replay_events(ctx: Ctx, completion: Completion) -> AsyncIterator[bytes]:
    """A cached completion, replayed as the SSE stream the same request would have produced."""
    body = completion.body
    base = {"id": body.get("id", ctx.request_id), "object": "chat.completion.chunk",
            "created": body.get("created", int(time.time())), "model": body.get("model", ctx.model)}
    for choice in body.get("choices", ()):
        message = choice.get("message") or {}
        idx = choice.get("index", 0)
        yield sse({**base, "choices": [{"index": idx, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}]})
        if message.get("content"):
            yield sse({**base, "choices": [{"index": idx, "delta": {"content": message["content"]},
                                            "finish_reason": None}]})
        yield sse({**base, "choices": [{"index": idx, "delta": {}, "finish_reason": choice.get("finish_reason")}]})
    await record(ctx)
    if ctx.include_usage:
        yield sse({**base, "choices": [], "usage": completion.usage.as_openai()})
    yield sse("[DONE]")
