"""The request pipeline: one explicit, ordered path shared by sync, streaming, async and batch.

    authenticate -> validate -> attribute -> route -> cache lookup -> admit
        -> call -> settle -> usage event -> respond

Each step is a small function over a request context (`Ctx`). `prepare` runs the steps up to and
including admission; `execute` and `stream_events` call the provider. Whatever happens after
authentication, a request ends in exactly one place, `end`: its ledger row is written, then its
budget hold (apps.billing.budgets) is settled with the actual cost (or released, concurrently with
the row, when nothing was spent; in the server a settle finishes while the answer is sent). The
row is durable before the response completes (a stream's `[DONE]` is sent
only after its row is durable). Provider errors, any other exception, a cancelled view and a
client that goes away all end there.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal

import orjson
from asgiref.sync import async_to_sync
from django.conf import settings

from apps.analytics.metrics import UNKNOWN_MODEL, attempts_observe, usage_observe
from apps.analytics.request_logs import RequestLogSettings
from apps.analytics.services import usage_event_record
from apps.billing import alerts
from apps.billing.budgets import Hold
from apps.billing.selectors import PriceInfo, price_in_force
from apps.billing.services import cost_compute
from apps.core import caches
from apps.core import redis as core_redis
from apps.core.db import db_sync
from apps.keys import last_used, security
from apps.keys.crypto import api_key_digest
from apps.keys.selectors import KeyAuth, api_key_auth_by_digest

from . import admission, cache, observe, router, schemas, semantic, versions
from .errors import GatewayError, invalid_api_key, invalid_request, model_not_found, permission_denied
from .providers import GATEWAY_USAGE, Completion, Usage, adapter_for
from .providers.base import NATIVE_EVENTS, ProviderError
from .selectors import AliasRoute, DeploymentRoute, TenantPolicy, routing_table, tenant_policy
from .tokens import estimate_text, text_of

log = logging.getLogger(__name__)

CHAT = schemas.CHAT
EMBEDDINGS = schemas.EMBEDDINGS
MODELS = "models"
ENDPOINT_PATHS = {CHAT: "/v1/chat/completions", EMBEDDINGS: "/v1/embeddings", MODELS: "/v1/models"}


# What a request without our options or metadata reads (shared: nothing writes to them).
_NO_OPTIONS = schemas.GatewayOptions()
_NO_METADATA = schemas.GatewayMetadata()


def _now() -> datetime:
    return datetime.now(UTC)


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex


@dataclass(slots=True)
class Ctx:
    """Everything one gateway request carries through the pipeline."""

    kind: str = CHAT
    request_id: str = field(default_factory=new_request_id)
    timestamp: datetime = field(default_factory=_now)
    started: float = field(default_factory=time.perf_counter)
    auth: KeyAuth | None = None
    request: schemas.GatewayRequest | None = None
    is_async: bool = False
    batch_id: str = ""
    # attribution: the source the request books on (the key's, or the one a tenant-wide key named)
    source_id: int | None = None
    source_name: str = ""
    source_type: str = ""
    budget_id: str = ""
    alias: AliasRoute | None = None
    version: str = ""  # the version the client pinned (`alias@version`); empty: the alias's rollout
    hit_version: str = ""  # the version whose answer a cache hit replays
    candidates: list[DeploymentRoute] = field(default_factory=list)
    price: PriceInfo | None = None
    policy: TenantPolicy | None = None
    completion_bound: int = 0
    send_max_tokens: int | None = None  # the max_tokens the upstream is sent, when admission set one
    cache_key: str = ""  # computed at lookup
    hold: Hold | None = None
    deployment: DeploymentRoute | None = None
    attempts: int = 0
    attempt_log: list[observe.Attempt] = field(default_factory=list)  # every upstream try (observe.py)
    cached: bool = False
    cache_kind: str = ""  # how a cached answer was found: "exact" or "semantic"
    cache_similarity: Decimal | None = None  # a semantic hit's similarity (4 decimals)
    semantic: semantic.Probe | None = None  # the semantic cache's view of this request (semantic.py)
    semantic_asked: bool | None = None  # the request's x-gateway-semantic-cache header
    semantic_threshold_asked: Decimal | None = None
    usage: Usage | None = None
    cost: Decimal = Decimal(0)
    saved_cost: Decimal = Decimal(0)
    status: int = 200
    error_code: str = ""
    ended: bool = False
    recorded: bool = False
    # The row journaled first (GATEWAY_LEDGER_WRITER=journal) reaches the ledger when this completes.
    in_ledger: asyncio.Future | None = None
    headers: dict[str, str] = field(default_factory=dict)
    endpoint: str = ""  # the path the key's endpoint scope is checked against; default by kind
    client_ip: str = ""
    retry_rate_limited: bool = False  # a batch line: a 429 of our limiter is retried later, not recorded
    batch_line: bool = False  # a Batches API line: it may go to its deployment's provider batch API
    # observability (observe.py): all left alone unless the tenant logs requests or tracing is on
    watch: bool = False
    log: RequestLogSettings | None = None
    marks: dict[str, tuple[float, float]] | None = None  # step -> (start, end) perf_counter, when watched
    raw_body: bytes | dict | None = None  # the body as received
    response_body: object = None  # as sent: a completion body, an error body, or a stream's chunks
    traceparent: str = ""
    # Another API's dialect (apps.gateway.dialects: "messages", "responses"): the ledger's request_type.
    dialect: str = ""
    # The dialect's translator, run after authentication: its body -> the chat GatewayRequest.
    translate: Callable[[Ctx, dict | bytes], Awaitable[schemas.GatewayRequest]] | None = None

    @property
    def body(self) -> dict:
        return self.request.body

    @property
    def options(self) -> schemas.GatewayOptions:
        return self.request.options if self.request else _NO_OPTIONS

    @property
    def model(self) -> str:
        return self.alias.alias if self.alias else (self.request.model if self.request else "")

    @property
    def model_version(self) -> str:
        """The version that answered (or was tried last): the ledger's, export's and log's."""
        if self.deployment is not None:
            return self.deployment.version
        return self.hit_version or self.version

    @property
    def stream(self) -> bool:
        return self.request is not None and self.request.stream

    @property
    def include_usage(self) -> bool:
        return self.request is not None and self.request.include_usage

    @property
    def metadata(self) -> schemas.GatewayMetadata:
        return self.options.metadata or _NO_METADATA

    @property
    def batch_api_deployment(self) -> DeploymentRoute | None:
        """Where this line goes through a provider's own batch API: a Batches API chat line whose
        first-choice deployment opted in (`provider_batch`) and whose adapter speaks a batch API.
        (No fallback there: the provider's batch answers only once the whole batch has ended.)"""
        if not self.batch_line or self.kind != CHAT or not self.candidates:
            return None
        first = self.candidates[0]
        if not first.provider_batch or not adapter_for(first.target.kind).supports_batch:
            return None
        return first

    @property
    def priority(self) -> int:
        return self.metadata.priority if self.metadata.priority is not None else 5

    def plan(self) -> dict:
        """What admission decided, for the worker that runs this request later (async): it takes
        these as they are and derives nothing again."""
        return {"request": self.request.to_dict(), "hold": self.hold.hand_over() if self.hold else None,
                "timestamp": self.timestamp.isoformat(), "completion_bound": self.completion_bound,
                "send_max_tokens": self.send_max_tokens, "cache_key": self.cache_key,
                "source": [self.source_id, self.source_name, self.source_type], "budget_id": self.budget_id,
                "headers": self.headers}

    def resume(self, plan: dict) -> None:
        """The inverse of `plan`, in the worker (the hold is taken over, not taken again)."""
        self.request = schemas.GatewayRequest.from_dict(plan["request"])
        self.hold = Hold.from_dict(plan["hold"]) if plan.get("hold") else None
        self.timestamp = datetime.fromisoformat(plan["timestamp"])
        self.completion_bound = plan["completion_bound"]
        self.send_max_tokens = plan["send_max_tokens"]
        self.cache_key = plan["cache_key"]
        self.source_id, self.source_name, self.source_type = plan["source"]
        self.budget_id = plan["budget_id"]
        self.dialect = self.request.dialect
        self.is_async = True


# --- steps ----------------------------------------------------------------------------------

_auth_cache = caches.Loaded(lambda digest: db_sync(api_key_auth_by_digest, digest=digest),
                           lambda: settings.GATEWAY_AUTH_CACHE_TTL_S)


async def authenticate(ctx: Ctx, authorization: str | None) -> None:
    """Bearer key -> KeyAuth, by HMAC digest; cached in process for GATEWAY_AUTH_CACHE_TTL_S."""
    if not authorization or not authorization.startswith("Bearer "):
        await security.auth_failure_note(prefix="", ip=ctx.client_ip, reason="missing_key")
        raise invalid_api_key("You didn't provide an API key. Send it as 'Authorization: Bearer sk-...'.")
    secret = authorization[7:].strip()
    auth = await _auth_cache.get(api_key_digest(secret))
    if auth is None:
        await security.auth_failure_note(prefix=secret[:6], ip=ctx.client_ip, reason="unknown_key")
        raise invalid_api_key(f"Incorrect API key provided: {secret[:6]}***.")
    if auth.revoked or (auth.expires_at is not None and auth.expires_at <= _now()):
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


def validate(ctx: Ctx, data: dict | bytes | schemas.GatewayRequest) -> None:
    """Parse the body once into the typed request (raw JSON or parsed, OpenAI's or the seed's shape;
    or already translated from another dialect)."""
    if not isinstance(data, schemas.GatewayRequest):
        ctx.raw_body = data
    ctx.request = data if isinstance(data, schemas.GatewayRequest) else schemas.parse_request(ctx.kind, data)
    # A worker may have set these already (a Batches API line is async with the batch's id).
    ctx.is_async = ctx.is_async or bool(ctx.options.async_)
    ctx.batch_id = ctx.batch_id or ctx.options.batch_id or ""


def attribute(ctx: Ctx, policy: TenantPolicy) -> None:
    """Who the request books on. A key bound to a source may name only that source; a tenant-wide
    key may name any declared source of its tenant (whose limits and budgets then apply). A
    `metadata.budget_id` must name a declared budget unless the tenant allows free-form ids, and a
    key whose default budget id is binding may name no other."""
    auth, meta = ctx.auth, ctx.metadata
    named, named_type = meta.source_id, meta.source_type
    if auth.source_id is not None:
        if (named and named != auth.source_name) or (named_type and named_type != auth.source_type):
            raise permission_denied(
                f"This API key books on the {auth.source_type} '{auth.source_name}' and may not name "
                f"{'the source ' + repr(named) if named and named != auth.source_name else 'another source type'}.",
                code="source_mismatch", param="metadata.source_id")
        ctx.source_id, ctx.source_name, ctx.source_type = auth.source_id, auth.source_name, auth.source_type
    elif named:
        found = policy.sources.get(named)
        if found is None or (named_type and named_type != found[1]):
            raise permission_denied(f"'{named}' is not a declared {named_type or 'source'} of this tenant.",
                                    code="source_mismatch", param="metadata.source_id")
        ctx.source_id, ctx.source_name, ctx.source_type = found[0], named, found[1]
    else:
        ctx.source_type = named_type or "application"
    asked = meta.budget_id
    if asked and auth.budget_id_binding and auth.default_budget_id and asked != auth.default_budget_id:
        raise permission_denied(f"This API key books on budget id '{auth.default_budget_id}' only.",
                                code="budget_id_not_allowed", param="metadata.budget_id")
    if asked and not auth.allow_freeform_budget_ids and asked not in policy.budget_ids:
        raise invalid_request(f"Unknown budget_id '{asked}': this tenant declares no such budget (ask an admin to "
                              "add it, or to allow free-form budget ids).", param="metadata.budget_id",
                              code="unknown_budget_id")
    ctx.budget_id = asked or auth.default_budget_id


async def route(ctx: Ctx) -> None:
    """Alias -> deployments in the order to try them, and the price in force."""
    table = await routing_table()
    model = ctx.request.model
    alias = table.aliases.get(model)
    if alias is None and (pinned := versions.split_pinned(model)) is not None:
        alias = table.aliases.get(pinned[0])
        if alias is None or pinned[1] not in alias.versions:
            raise model_not_found(model)
        ctx.version = pinned[1]
    auto = alias is None and model == router.AUTO
    if auto:
        alias = await router.auto_alias(ctx, table)
        ctx.headers["x-gateway-model"] = alias.alias
    if alias is None:
        raise model_not_found(model)
    if not ctx.auth.may_use_model(alias.alias) and not (ctx.version and ctx.auth.may_use_model(model)):
        raise permission_denied(f"This API key may not use the model `{model if ctx.version else alias.alias}`.",
                                param="model")
    if ctx.kind == EMBEDDINGS and not alias.supports_embeddings:
        # The client hears only that the model does not embed; the operator learns which setting says so.
        log.warning("embeddings request for alias %r refused: the alias is not an embedding model (its "
                    "`supports_embeddings` is off or inferred off from its deployments' models; set "
                    "`supports_embeddings: true` in the gateway_apply file or tick \"Supports embeddings\" "
                    "on the model alias in the admin)", alias.alias)
        raise invalid_request(f"The model `{alias.alias}` does not offer embeddings.", param="model",
                              code="model_not_embedding")
    ctx.alias = alias
    ctx.candidates = await router.candidates(ctx, alias, strategy="cheapest" if auto else None, version=ctx.version)
    ctx.price = price_in_force(list(alias.prices), ctx.timestamp)
    if ctx.price is None and not ctx.auth.allow_unpriced_models:
        raise invalid_request(
            f"The model `{alias.alias}` has no price, and this tenant does not allow unpriced models.",
            param="model", code="model_not_priced",
        )
    if ctx.price is None:  # allowed, so recorded at $0 with its tokens, and the tenant is alerted
        await alerts.unpriced_model_observed(tenant_id=ctx.auth.tenant_id, tenant_timezone=ctx.auth.tenant_timezone,
                                             model=alias.alias, at=ctx.timestamp)


def _cost(ctx: Ctx, usage: Usage) -> Decimal:
    """The provider-billed cost: a batch price only where the provider billed one."""
    if ctx.price is None:
        return Decimal(0)
    return cost_compute(
        price=ctx.price,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_tokens=usage.cached_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        batch=usage.batch_priced,
        provider_kind=ctx.deployment.target.kind if ctx.deployment else "",
    )


def _error_of(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, GatewayError):
        return exc.status, exc.code or exc.type
    if isinstance(exc, asyncio.CancelledError):
        return 499, "client_disconnected"
    if isinstance(exc, ProviderError):
        return 502, exc.code
    return 500, "internal_error"


async def end(ctx: Ctx, exc: BaseException | None = None) -> None:
    """The one place a request ends: its ledger row is written and its hold is settled with the actual
    cost (anything produced, a partial stream included, is billed; after the row) or released.
    Both always run to the end; then a failure to make the row durable is raised (the caller must
    not answer 2xx without it). Safe to call again: only the first call acts."""
    if ctx.ended or ctx.auth is None:
        return
    if ctx.retry_rate_limited and isinstance(exc, GatewayError) and exc.code == "rate_limit_exceeded" \
            and ctx.hold is None:
        return  # nothing was taken, and the same request id runs again later
    ctx.ended = True
    if exc is not None:
        ctx.status, ctx.error_code = _error_of(exc)
        if ctx.watch:
            ctx.response_body = observe.with_error(ctx.response_body, exc, ctx.status, ctx.error_code)
        if ctx.status == 500:
            log.error("request %s failed", ctx.request_id, exc_info=(type(exc), exc, exc.__traceback__))
    hold, ctx.hold = ctx.hold, None
    failure: BaseException | None = None
    if not ctx.cached:
        try:
            ctx.cost = _cost(ctx, ctx.usage) if ctx.usage else Decimal(0)
        except Exception as cost_exc:  # a bug of ours: bill the upper bound (never under), say so
            failure = cost_exc
            log.error("request %s: cost not computed", ctx.request_id, exc_info=True)
            ctx.cost = hold.amount_usd if hold is not None else Decimal(0)
            ctx.status, ctx.error_code = 500, "cost_unknown"
    settle = hold is not None and ctx.usage is not None and not ctx.cached
    if hold is not None and not settle:  # nothing spent: released at once, beside the row
        results = await asyncio.gather(record(ctx), hold.release(), return_exceptions=True)
    else:
        try:
            await record(ctx)
            results = []
        except Exception as exc:  # noqa: BLE001 - the settle below still runs; then it is raised
            results = [exc]
    if settle:
        # The hold is swapped for the cost only once the row is in the ledger (a row journaled first:
        # once `ctx.in_ledger` says the ledger has it): at every moment a request's cost is in its
        # open hold or in the ledger, so budget counters rebuilt from the ledger (a Redis failover,
        # a restart) plus the open holds put back never miss it. (On the server's loop the settle
        # finishes after the answer: apps.billing.budgets.Hold.settle.)
        tokens = ctx.usage.prompt_tokens + ctx.usage.completion_tokens
        try:
            await hold.settle(cost_usd=ctx.cost, tokens=tokens, after=ctx.in_ledger)
        except Exception as exc:  # noqa: BLE001 - raised below, after the row
            results.append(exc)
    for result in results:
        if isinstance(result, BaseException) and failure is None:
            failure = result
    if failure is not None:
        raise failure


async def record(ctx: Ctx) -> None:
    """Write the ledger row; `ctx.recorded` only once usage_event_record says it is durable
    (committed, or journaled on local disk while the database is away)."""
    usage = ctx.usage or Usage()
    meta = ctx.metadata
    d = ctx.deployment
    latency_ms = int((time.perf_counter() - ctx.started) * 1000)
    attempts = [a.as_dict(ctx.started) for a in ctx.attempt_log]
    ledger_started = time.perf_counter()
    ctx.in_ledger = await usage_event_record(
        request_id=ctx.request_id,
        timestamp=ctx.timestamp,
        tenant_id=ctx.auth.tenant_id,
        api_key_id=ctx.auth.key_id,
        source_id=ctx.source_id if ctx.request is not None else ctx.auth.source_id,
        source_type=ctx.source_type or meta.source_type or ctx.auth.source_type or "application",
        source_ref=ctx.source_name or ctx.auth.source_name,
        request_type=ctx.dialect or ctx.kind,
        model=ctx.model if ctx.alias else (ctx.request.model if ctx.request else ""),
        deployment_id=d.id if d else None,
        provider=d.provider_name if d else "",
        upstream_model=d.target.upstream_model if d else "",
        model_version=ctx.model_version,
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
        cache_kind=ctx.cache_kind,
        cache_similarity_bp=int(ctx.cache_similarity * 10_000) if ctx.cache_similarity is not None else None,
        stream=ctx.stream,
        is_async=ctx.is_async,
        batch_id=ctx.batch_id,
        budget_id=ctx.budget_id,
        tags=ctx.request.tags if ctx.request is not None else [],
        end_user=ctx.request.end_user if ctx.request is not None else "",
        priority=ctx.priority,
        estimated=usage.estimated,
        attempts=attempts,
        prompt_hash=cache.prompt_digest(ctx) if ctx.usage is not None and not ctx.cached else "",
    )
    ctx.recorded = True
    if ctx.watch:
        ctx.marks["ledger"] = (ledger_started, time.perf_counter())
        await observe.finished(ctx, attempts, latency_ms)
    usage_observe(model=ctx.model if ctx.alias else UNKNOWN_MODEL, status=ctx.status, latency_ms=latency_ms,
                  prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens, cost=ctx.cost,
                  saved_cost=ctx.saved_cost, cached=ctx.cached, provider=d.provider_name if d else "",
                  error_code=ctx.error_code)
    if attempts:
        attempts_observe([(a.provider, a.deployment_label, a.outcome, a.end - a.start) for a in ctx.attempt_log])


# --- runs -----------------------------------------------------------------------------------


async def prepare(ctx: Ctx, authorization: str | None, data: dict | bytes, *,
                  auth: KeyAuth | None = None) -> Completion | None:
    """authenticate -> validate -> attribute -> route -> cache lookup -> admit. Returns a cache hit,
    if any (not yet recorded: `end` records it). A worker running work accepted earlier passes the
    key's `auth` (re-read by id) instead of a header. A failure after authentication ends the
    request (its ledger row) before it is raised."""
    core_redis.request_begin()
    if auth is None:
        await authenticate(ctx, authorization)
    else:
        ctx.auth = auth
    try:
        policy = await tenant_policy(ctx.auth.tenant_id)
        watch(ctx, policy)
        if ctx.translate is not None:
            if ctx.watch:
                ctx.raw_body = data  # the body as the client sent it, before translation
            data = await ctx.translate(ctx, data)
        validate(ctx, data)
        attribute(ctx, policy)
        await route(ctx)
        started = time.perf_counter()
        hit = await cache.lookup(ctx)
        if hit is not None:
            ctx.cache_kind = "exact"
        else:
            hit = await semantic_lookup(ctx)
        if ctx.watch:
            ctx.marks["cache"] = (started, time.perf_counter())
        if hit is not None:
            ctx.cached, ctx.usage = True, hit.usage
            if ctx.hit_version:
                ctx.headers["x-gateway-model-version"] = ctx.hit_version
            ctx.saved_cost = _cost(ctx, hit.usage)
            if ctx.watch:
                ctx.response_body = hit.body
            return hit
        started = time.perf_counter()
        ctx.hold = await admission.admit(ctx, policy)
        if ctx.watch:
            ctx.marks["admission"] = (started, time.perf_counter())
    except BaseException as exc:
        await end(ctx, exc)
        raise
    return None


async def semantic_lookup(ctx: Ctx) -> Completion | None:
    """The semantic cache (semantic.py): embed the prompt with the tenant's embedding alias, as an
    embeddings request of the same key through this same pipeline (admitted, billed, on the ledger
    as `<request id>_emb`), then search the tenant's entries. Any failure is a miss."""
    ctx.semantic = semantic.probe(ctx)
    if ctx.semantic is None:
        return None
    vector = await _embed_for_cache(ctx, ctx.semantic.embedding_alias, semantic.prompt_text(ctx))
    if vector is None:
        ctx.semantic = None
        return None
    match = await semantic.search(ctx, vector)
    if match is None:
        return None
    ctx.cache_kind, ctx.cache_similarity = "semantic", match.similarity
    return cache.decode_entry(match.payload)


async def _embed_for_cache(ctx: Ctx, alias: str, text: str):
    named = ctx.metadata  # the same attribution as the request: what it named, checked again
    meta = {k: v for k, v in (("source_id", named.source_id), ("source_type", named.source_type),
                              ("budget_id", named.budget_id), ("priority", named.priority)) if v is not None}
    child = Ctx(kind=EMBEDDINGS, request_id=f"{ctx.request_id}_emb", endpoint=ENDPOINT_PATHS[EMBEDDINGS],
                client_ip=ctx.client_ip, is_async=ctx.is_async, batch_id=ctx.batch_id,
                retry_rate_limited=ctx.retry_rate_limited)  # a batch line retried later: its embedding too
    data = {"model": alias, "input": text, "metadata": meta}

    async def run_child() -> Completion:
        hit = await prepare(child, None, data, auth=ctx.auth)
        if hit is not None:
            await end(child)
            return hit
        return await execute(child)

    try:  # its own task: the child's Redis wait budget is its own, not taken from the request's
        completion = await asyncio.create_task(run_child())
        return semantic.unit_vector(completion.body["data"][0]["embedding"])
    except Exception as exc:  # noqa: BLE001 - refused, failed or malformed: a miss, the request goes on
        semantic.warn(f"embedding with `{alias}`", exc)
        return None


def watch(ctx: Ctx, policy: TenantPolicy) -> None:
    """Observe this request (step timings, the bodies sent and received) only when its tenant logs
    requests or tracing is on: otherwise none of that work is done."""
    if policy.request_log is not None or observe.tracing_on():
        ctx.watch, ctx.log, ctx.marks = True, policy.request_log, {}


def _upstream_body(ctx: Ctx, deployment: DeploymentRoute) -> dict:
    body = {**ctx.body, "model": deployment.target.upstream_model}
    if ctx.send_max_tokens is not None and ctx.kind == CHAT:
        body.pop("max_completion_tokens", None)
        body["max_tokens"] = ctx.send_max_tokens
    if not ctx.stream:
        body.pop("stream", None)
        body.pop("stream_options", None)
    return body


def _native_body(ctx: Ctx, deployment: DeploymentRoute) -> dict | None:
    """The client's own body, when it speaks the dialect this deployment's adapter takes unchanged
    (with the max_tokens admission settled on)."""
    req = ctx.request
    if not req.dialect or req.native is None or \
            adapter_for(deployment.target.kind).takes_native(deployment.target) != req.dialect:
        return None
    body = {**req.native}
    if ctx.send_max_tokens is not None:
        body["max_tokens"] = ctx.send_max_tokens
    if not ctx.stream:
        body.pop("stream", None)
    return body


def _estimate_usage(ctx: Ctx, completion_text: str) -> Usage:
    if ctx.kind == EMBEDDINGS:
        return Usage(prompt_tokens=ctx.request.token_estimate, estimated=True)
    return Usage(prompt_tokens=ctx.request.token_estimate, completion_tokens=estimate_text(completion_text),
                 estimated=True)


async def execute(ctx: Ctx) -> Completion:
    """call (with retries and fallbacks) -> settle -> cache store -> usage event."""

    async def invoke(deployment: DeploymentRoute) -> Completion:
        adapter = adapter_for(deployment.target.kind)
        body = _upstream_body(ctx, deployment)
        if ctx.kind == EMBEDDINGS:
            return await adapter.embed(deployment.target, body)
        native = _native_body(ctx, deployment)
        if native is not None:
            return await adapter.complete_native(deployment.target, native)
        return await adapter.complete(deployment.target, body)

    try:
        completion = await router.call_with_fallbacks(ctx, invoke)
        if completion.usage.estimated:
            text = ""
            if ctx.kind == CHAT:
                text = "".join(text_of((c.get("message") or {}).get("content"))
                               for c in completion.body.get("choices", []))
            completion.usage = _estimate_usage(ctx, text)
        ctx.usage = completion.usage
        if ctx.watch:
            ctx.response_body = completion.body
        await cache.store(ctx, completion)
    except BaseException as exc:
        await end(ctx, exc)
        raise
    await end(ctx)
    return completion


async def run(ctx: Ctx, authorization: str | None, data: dict | bytes) -> Completion:
    """The whole pipeline for a non-streaming request (sync view, async worker, batch line)."""
    hit = await prepare(ctx, authorization, data)
    if hit is not None:
        await end(ctx)
        return hit
    return await execute(ctx)


# --- deferred: a batch line run by a provider's own batch API ----------------------------------


def defer(ctx: Ctx, deployment: DeploymentRoute) -> dict:
    """A batch line admitted (its hold taken) for `deployment`'s provider batch API, handed over:
    the plan (`Ctx.plan`, the hold with it), the alias and the body the upstream is sent. Whoever
    collects the provider's result ends it with `end_deferred` (or `release_deferred`)."""
    return {**ctx.plan(), "alias": ctx.alias.alias, "deployment_id": deployment.id,
            "upstream_body": _upstream_body(ctx, deployment)}


async def end_deferred(ctx: Ctx, plan: dict, deployment: DeploymentRoute | None, *,
                       completion: Completion | None = None, error: GatewayError | None = None) -> None:
    """End a deferred line as any request ends (`end`): settled at the price the provider billed
    (its batch price: the result's usage says so) with its ledger row, or released on an error.
    The price is the version in force when the line was admitted."""
    ctx.resume(plan)
    ctx.alias = (await routing_table()).aliases.get(plan.get("alias") or ctx.request.model)
    if ctx.alias is not None:
        ctx.price = price_in_force(list(ctx.alias.prices), ctx.timestamp)
    ctx.deployment = deployment
    if completion is None:
        await end(ctx, error or GatewayError(502, "The provider's batch failed this request.", type="api_error",
                                             code="upstream_error"))
        return
    usage = completion.usage
    if usage.estimated:
        text = "".join(text_of((c.get("message") or {}).get("content")) for c in completion.body.get("choices", ()))
        usage = _estimate_usage(ctx, text)
    ctx.usage = replace(usage, batch_priced=True)
    await end(ctx)


async def release_deferred(plan: dict, *, keep_limits: bool = False) -> None:
    """Give back a deferred line's hold without a ledger row: the provider never ran it
    (cancelled, expired). `keep_limits`: its rate-limit counts stand (the line did run)."""
    data = plan.get("hold") if isinstance(plan, dict) else None
    if data:
        await Hold.from_dict({**data, "limits": []} if keep_limits else data).release()


async def settle_lost(plan: dict | None, *, cost_usd: Decimal) -> None:
    """End the hold stored with work (`Ctx.plan`, or `{"hold": ...}`) whose worker stopped after its
    ledger row, of `cost_usd`, and before its answer was saved: its settle may or may not have run."""
    data = plan.get("hold") if isinstance(plan, dict) else None
    if data:
        await Hold.from_dict(data).settle_lost(cost_usd=cost_usd)


# --- streaming ------------------------------------------------------------------------------


def sse(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else orjson.dumps(data).decode()
    return f"data: {payload}\n\n".encode()


async def open_stream(ctx: Ctx) -> tuple[dict | None, AsyncIterator[dict]]:
    """Open the upstream stream with fallbacks, up to its first chunk: until a byte reaches the
    client, a failure may still fall back; after it, never."""

    async def invoke(deployment: DeploymentRoute):
        adapter = adapter_for(deployment.target.kind)
        native = _native_body(ctx, deployment)
        if native is not None:
            agen = adapter.stream_native(deployment.target, native)
        else:
            agen = adapter.stream(deployment.target, _upstream_body(ctx, deployment))
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
    except BaseException as exc:
        await end(ctx, exc)
        raise


def _chunk_usage(chunk: dict) -> Usage | None:
    """The usage an adapter parsed for this chunk (`_gateway_usage`, its own parser), else the
    OpenAI-shaped `usage` of an OpenAI-style stream."""
    parsed = chunk.pop(GATEWAY_USAGE, None)
    if parsed is not None:
        return parsed
    return Usage.from_openai(chunk.get("usage")) if chunk.get("usage") else None


class StreamStalled(ProviderError):
    pass


async def _next_chunk(agen: AsyncIterator[dict]) -> dict | None:
    """The next upstream chunk, or None at the end; a stream silent for GATEWAY_STREAM_IDLE_TIMEOUT_S
    between chunks has stalled. (A transport may swallow the cancellation and end the stream
    instead: the expired deadline says it stalled all the same.)"""
    deadline = asyncio.timeout(settings.GATEWAY_STREAM_IDLE_TIMEOUT_S)
    try:
        async with deadline:
            chunk = await anext(agen, None)
    except TimeoutError:
        chunk = None
    if deadline.expired():
        raise StreamStalled(f"The upstream sent nothing for {settings.GATEWAY_STREAM_IDLE_TIMEOUT_S:g}s; the stream "
                            "was ended.", code="upstream_stream_stalled")
    return chunk


class EventStream:
    """The SSE body of a streamed response. Its generator ends the request (`end`) before `[DONE]`;
    `close()` (Django closes every response) ends a request whose body was never iterated, or
    stops one the client left mid-way, so the hold and the ledger row never wait on luck."""

    _pending: set = set()

    def __init__(self, ctx: Ctx, events: AsyncIterator[bytes], upstream: AsyncIterator[dict] | None = None):
        self.ctx = ctx
        self._events = events
        self._upstream = upstream

    def __aiter__(self):
        return self._events.__aiter__()

    def close(self) -> None:
        if self.ctx.ended:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # closed from a thread (Django's standard handler): end it from here
            async_to_sync(self._abandon)()
            return
        task = loop.create_task(self._abandon())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _abandon(self) -> None:
        try:
            await self._events.aclose()  # a started generator ends the request in its `finally`
        except Exception:  # noqa: BLE001 - whatever the generator's state, the request still ends below
            log.warning("stream %s: closing its generator failed", self.ctx.request_id, exc_info=True)
        if not self.ctx.ended:
            try:
                await end(self.ctx, asyncio.CancelledError())
            finally:
                if self._upstream is not None:
                    await self._upstream.aclose()


class StreamEncoder:
    """How a stream is written in another dialect (apps.gateway.dialects): each relayed chunk, the
    closing events (sent after the request has ended, as `[DONE]` is) and a mid-stream error."""

    def chunk(self, chunk: dict) -> bytes:
        raise NotImplementedError

    async def finish(self, ctx: Ctx) -> bytes:
        raise NotImplementedError

    def error(self, message: str, code: str) -> bytes:
        raise NotImplementedError


async def stream_events(ctx: Ctx, first: dict | None, agen: AsyncIterator[dict],
                        encoder: StreamEncoder | None = None) -> AsyncIterator[bytes]:
    """Relay the upstream chunks as SSE (OpenAI's, or `encoder`'s dialect); settle and write the
    ledger row before `[DONE]` (or the encoder's closing events). A failure mid-stream ends the
    stream with an error event (which the SDKs raise); a client that goes away is billed for what
    was produced."""
    produced: list[str] = []
    usage: Usage | None = None
    usage_chunk: dict | None = None
    chunk = first
    recorder = cache.StreamRecorder(ctx)
    sent: list[dict] | None = None
    if ctx.watch:
        sent = ctx.response_body = []
    try:
        while chunk is not None:
            found = _chunk_usage(chunk)
            recorder.add(chunk)
            if sent is not None:
                sent.append(chunk)
            if found is not None:
                usage = found
                if not chunk.get("choices"):
                    usage_chunk = chunk
                    chunk = await _next_chunk(agen)
                    continue
                if not ctx.include_usage:
                    chunk = {k: v for k, v in chunk.items() if k != "usage"}
            for choice in chunk.get("choices", ()):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    produced.append(piece)
            if encoder is not None:
                yield encoder.chunk(chunk)
            else:
                chunk.pop(NATIVE_EVENTS, None)
                yield sse(chunk)
            chunk = await _next_chunk(agen)
        ctx.usage = usage or _estimate_usage(ctx, "".join(produced))
        await recorder.store(ctx.usage)
        await end(ctx)
        if encoder is not None:
            yield await encoder.finish(ctx)
            return
        if ctx.include_usage:
            yield sse(usage_chunk or {"id": first.get("id") if first else ctx.request_id,
                                      "object": "chat.completion.chunk", "created": int(time.time()),
                                      "model": ctx.model, "choices": [], "usage": ctx.usage.as_openai()})
        yield sse("[DONE]")
    except ProviderError as exc:
        ctx.usage = usage or _estimate_usage(ctx, "".join(produced))
        await end(ctx, GatewayError(502, exc.message, type="api_error", code=exc.code))
        if encoder is not None:
            yield encoder.error(exc.message, exc.code)
        else:
            yield sse({"error": {"message": exc.message, "type": "api_error", "param": None, "code": exc.code}})
    except Exception as exc:
        # Not the provider's doing (our own failure, or a ledger row that could not be made durable):
        # bill what was produced, and end without [DONE] so the client knows the answer is incomplete.
        if not ctx.ended:
            ctx.usage = usage or _estimate_usage(ctx, "".join(produced))
            await end(ctx, exc)
        log.error("stream %s failed", ctx.request_id, exc_info=True)
        if encoder is not None:
            yield encoder.error("The gateway failed while streaming this answer.", "internal_error")
        else:
            yield sse({"error": {"message": "The gateway failed while streaming this answer.", "type": "api_error",
                                 "param": None, "code": "internal_error"}})
    finally:
        if not ctx.ended:  # the client went away mid-stream: bill what was produced
            ctx.usage = usage or _estimate_usage(ctx, "".join(produced))
            await end(ctx, asyncio.CancelledError())
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
    await end(ctx)
    if ctx.include_usage:
        yield sse({**base, "choices": [], "usage": completion.usage.as_openai()})
    yield sse("[DONE]")
