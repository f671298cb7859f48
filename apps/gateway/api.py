"""The data plane under /v1 (django-ninja, async). Views only hand the request to the pipeline and
render what it returns; errors become OpenAI-shaped JSON in one place (GatewayError.response)."""

from __future__ import annotations

import logging
import time

import orjson
from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import Http404, HttpRequest, HttpResponse, StreamingHttpResponse
from django.utils import timezone
from ninja.errors import HttpError
from ninja.errors import ValidationError as NinjaValidationError

from apps.billing.budgets import Hold, budget_statuses_for_key
from apps.core import workers
from apps.core.db import db_sync

from . import async_requests, batches, pipeline, schemas, semantic, tracing
from . import openapi as doc
from .dialects import anthropic_messages, bearer, openai_responses
from .errors import GatewayError, from_http_error, from_param_errors, invalid_request, not_found
from .selectors import routing_table, stored_response_get
from .services import stored_response_delete
from .versions import pinned_name

api = doc.GatewayAPI(title="LLM Service data plane", version="1", urls_namespace="v1", docs_url="/docs")


def _json(body: dict, ctx: pipeline.Ctx, status: int = 200) -> HttpResponse:
    resp = HttpResponse(orjson.dumps(body), status=status, content_type="application/json")
    _decorate(resp, ctx)
    return resp


def _decorate(resp: HttpResponse, ctx: pipeline.Ctx) -> None:
    resp["x-request-id"] = ctx.request_id
    for k, v in ctx.headers.items():
        resp[k] = v


def _error(exc: GatewayError, ctx: pipeline.Ctx) -> HttpResponse:
    resp = exc.response()
    _decorate(resp, ctx)
    return resp


async def _serve(request: HttpRequest, ctx: pipeline.Ctx, authorization: str | None, *, render, error=_error,
                 encoder=None) -> HttpResponse:
    """The one request path of every /v1 model call (chat, embeddings, the seed envelope, and the
    Messages and Responses dialects): prepare, then answer from the cache, queue it (`async`),
    stream it, or call the provider. `render` makes the answer's body, `error` the error shape,
    `encoder` the dialect's stream (OpenAI's chunks when None)."""
    if tracing.ENABLED:
        ctx.traceparent = request.headers.get("traceparent", "")
    raw = request.body  # Django answers a body over its limit (413) itself
    try:
        ctx.semantic_asked, ctx.semantic_threshold_asked = semantic.asked(request.headers)
        hit = await pipeline.prepare(ctx, authorization, raw)
        if ctx.is_async:
            return await _enqueue(ctx, hit)
        ctx.headers["x-gateway-cache"] = ("semantic" if ctx.cache_kind == "semantic" else "hit") if hit is not None \
            else "miss"
        if ctx.cache_similarity is not None:
            ctx.headers["x-gateway-cache-similarity"] = f"{ctx.cache_similarity:.4f}"
        if ctx.stream:
            enc = encoder() if encoder is not None else None
            if hit is not None:
                events = pipeline.EventStream(ctx, enc.replay(hit) if enc else pipeline.replay_events(ctx, hit))
            else:
                first, agen = await pipeline.open_stream(ctx)
                events = pipeline.EventStream(ctx, pipeline.stream_events(ctx, first, agen, encoder=enc), agen)
            resp = StreamingHttpResponse(events, content_type="text/event-stream")
            resp["cache-control"] = "no-cache"
            resp["x-accel-buffering"] = "no"
            _decorate(resp, ctx)
            return resp
        if hit is not None:
            await pipeline.end(ctx)
            completion = hit
        else:
            completion = await pipeline.execute(ctx)
        ctx.headers["x-gateway-cost-usd"] = f"{ctx.cost:f}"
        return _json(await render(completion), ctx)
    except GatewayError as exc:
        resp = error(exc, ctx)
    except Exception:  # the pipeline has already ended the request (hold, ledger row)
        logging.getLogger(__name__).exception("request %s failed", ctx.request_id)
        resp = error(GatewayError(500, "The gateway failed to answer this request.", type="api_error",
                                  code="internal_error"), ctx)
    _decorate(resp, ctx)
    return resp


async def _handle(request: HttpRequest, kind: str, *, envelope: bool = False) -> HttpResponse:
    """An OpenAI-shaped call (chat completions, embeddings) or the seed's envelope."""
    ctx = pipeline.Ctx(kind=kind, endpoint=request.path_info, client_ip=request.META.get("REMOTE_ADDR", ""))

    async def render(completion) -> dict:
        if envelope:
            return {"id": ctx.request_id, "status": "completed", "result": completion.body}
        return completion.body

    return await _serve(request, ctx, request.headers.get("authorization"), render=render)


@api.post("/chat/completions", openapi_extra=doc.CHAT)
async def chat_completions(request: HttpRequest):
    """OpenAI chat completions, streaming or not, plus our `metadata`, `cache`, `async`, `batch_id`."""
    return await _handle(request, pipeline.CHAT)


def _dialect_ctx(request: HttpRequest, dialect: str, translate) -> pipeline.Ctx:
    return pipeline.Ctx(kind=pipeline.CHAT, dialect=dialect, translate=translate, endpoint=request.path_info,
                        client_ip=request.META.get("REMOTE_ADDR", ""))


@api.post("/messages", openapi_extra=doc.MESSAGES)
async def messages(request: HttpRequest):
    """Anthropic's Messages API (`x-api-key` or Bearer), to any provider kind; our metadata in
    `x-gateway-*` headers or `metadata` (see apps/gateway/dialects/anthropic_messages.py)."""
    m = anthropic_messages
    ctx = _dialect_ctx(request, m.NAME, m.translator(request.headers))
    return await _serve(request, ctx, bearer(request.headers), encoder=lambda: m.Encoder(ctx),
                        render=lambda c: m.render(ctx, c), error=m.error_response)


@api.post("/messages/count_tokens", openapi_extra=doc.MESSAGES_COUNT_TOKENS)
async def messages_count_tokens(request: HttpRequest):
    """Input tokens of a Messages body: the provider's count (Anthropic deployments), else our
    estimate, flagged (`"estimated": true`, `x-gateway-estimated: true`). Free: no ledger row."""
    ctx = pipeline.Ctx(dialect=anthropic_messages.NAME, endpoint=request.path_info,
                       client_ip=request.META.get("REMOTE_ADDR", ""))
    try:
        await pipeline.authenticate(ctx, bearer(request.headers))
        answer, estimated = await anthropic_messages.count_tokens(ctx, schemas.parse_json(request.body),
                                                                  request.headers)
    except GatewayError as exc:
        resp = anthropic_messages.error_response(exc, ctx)
        _decorate(resp, ctx)
        return resp
    if estimated:
        ctx.headers["x-gateway-estimated"] = "true"
    return _json(answer, ctx)


@api.post("/responses", openapi_extra=doc.RESPONSES)
async def responses(request: HttpRequest):
    """OpenAI's Responses API, to any provider kind (see apps/gateway/dialects/openai_responses.py)."""
    r = openai_responses
    turn: list = []  # the translator hands back what the answer echoes and stores
    ctx = _dialect_ctx(request, r.NAME, r.translator(request.headers, turn))
    return await _serve(request, ctx, bearer(request.headers), encoder=lambda: r.Encoder(ctx, turn[0]),
                        render=lambda c: r.render(ctx, turn[0], c))


@api.get("/responses/{response_id}", openapi_extra=doc.RESPONSE_GET)
async def response_retrieve(request: HttpRequest, response_id: str):
    """A response kept with `store: true` (within the key's tenant and GATEWAY_RESPONSES_STORE_TTL_S)."""
    ctx = await _authenticated(request)
    row = await db_sync(stored_response_get, tenant_id=ctx.auth.tenant_id, response_id=response_id)
    if row is None:
        raise not_found(f"No response with id '{response_id}' is stored (only `store: true` responses are kept).")
    return _json(openai_responses.stored_view(row), ctx)


@api.delete("/responses/{response_id}", openapi_extra=doc.RESPONSE_DELETE)
async def response_delete(request: HttpRequest, response_id: str):
    ctx = await _authenticated(request)
    if not await db_sync(stored_response_delete, tenant_id=ctx.auth.tenant_id, response_id=response_id):
        raise not_found(f"No response with id '{response_id}' is stored.")
    return _json({"id": response_id, "object": "response", "deleted": True}, ctx)


@api.post("/embeddings", openapi_extra=doc.EMBEDDINGS)
async def embeddings(request: HttpRequest):
    return await _handle(request, pipeline.EMBEDDINGS)


@api.post("/requests", openapi_extra=doc.SEED)
async def seed_request(request: HttpRequest):
    """The seed's request envelope `{"request": {model, messages, options, metadata}}`."""
    return await _handle(request, pipeline.CHAT, envelope=True)


@api.get("/models", openapi_extra=doc.MODELS)
async def models(request: HttpRequest):
    ctx = pipeline.Ctx(kind=pipeline.MODELS, endpoint=request.path_info, client_ip=request.META.get("REMOTE_ADDR", ""))
    try:
        await pipeline.authenticate(ctx, request.headers.get("authorization"))
    except GatewayError as exc:
        return _error(exc, ctx)
    table = await routing_table()
    created = int(time.time())
    regions = ctx.auth.allowed_regions

    def servable(deployments) -> bool:  # in the tenant's regions
        return not regions or any(d.region in regions for d in deployments)

    data = []
    for alias, route in sorted(table.aliases.items()):
        whole = ctx.auth.may_use_model(alias)
        if whole and servable(route.deployments):
            data.append({"id": alias, "object": "model", "created": created, "owned_by": "llm-service"})
        for version, deployments in sorted(route.versions.items()):  # each version, as `alias@version`
            name = pinned_name(alias, version)
            if (whole or ctx.auth.may_use_model(name)) and servable(deployments):
                data.append({"id": name, "object": "model", "created": created, "owned_by": "llm-service",
                             "parent": alias, "version": version,
                             "share": route_share(route, version)})
    return _json({"object": "list", "data": data}, ctx)


def route_share(route, version: str) -> int | None:
    """The version's percent of the bare alias's traffic; None without a rollout."""
    if not route.rollout_names:
        return None
    if version not in route.rollout_names:
        return 0
    i = route.rollout_names.index(version)
    return route.rollout_bounds[i] - (route.rollout_bounds[i - 1] if i else 0)


@api.get("/budget", openapi_extra=doc.BUDGET)
async def budget_status(request: HttpRequest):
    """Every budget that applies to the calling key: limit, spent, held, remaining, resets_at, and the
    `budget_id` a client sends as metadata.budget_id to book on it. `?budget_id=` also includes
    the budget_id budget a request with that metadata.budget_id would hit, `?tag=` (repeatable) the
    budgets of those tags, `?user=` the end user's budget (`user:<id>`, else `user:*` counted for them)."""
    ctx = pipeline.Ctx(endpoint=request.path_info, client_ip=request.META.get("REMOTE_ADDR", ""))
    try:
        await pipeline.authenticate(ctx, request.headers.get("authorization"))
    except GatewayError as exc:
        return _error(exc, ctx)
    statuses = await budget_statuses_for_key(auth=ctx.auth, budget_id=request.GET.get("budget_id") or None,
                                             tags=[t for t in request.GET.getlist("tag") if t],
                                             end_user=request.GET.get("user") or "", at=timezone.now())
    return _json({"object": "list", "data": [s.as_json() for s in statuses]}, ctx)


# --- async requests ---------------------------------------------------------------------------


async def _enqueue(ctx: pipeline.Ctx, hit) -> HttpResponse:
    """`async: true`: admitted already (prepare took the rate-limit slots and budget hold); store
    the request with its plan and answer 202. The worker takes the hold over and ends it."""
    problem = None
    if ctx.stream:
        problem = invalid_request("'stream' cannot be combined with 'async'.", param="stream")
    if problem is not None:
        await pipeline.end(ctx, problem)
        return _error(problem, ctx)
    if hit is not None:
        await pipeline.end(ctx)
    plan = ctx.plan()  # hands the hold over: from here the stored request owns its exit
    try:
        row = await db_sync(async_requests.async_request_create, ctx=ctx, plan=plan, completion=hit)
    except Exception:
        # Not stored, so never run: take the hold back and end the request before reporting it.
        logging.getLogger(__name__).exception("could not store async request %s", ctx.request_id)
        exc = GatewayError(503, "The request could not be queued; try again.", type="api_error", code="not_queued")
        if plan.get("hold"):
            ctx.hold = Hold.from_dict(plan["hold"])
        await pipeline.end(ctx, exc)
        return _error(exc, ctx)
    ctx.headers["x-gateway-cache"] = "hit" if hit is not None else "miss"
    body = {"id": row.id, "object": "request", "status": row.status}
    seen = workers.consumer_seen_cached("async")
    if seen is None:
        seen = await sync_to_async(workers.consumer_seen)("async")
    if hit is None and not seen:
        # Queued, but no worker consuming "async" was seen lately: it waits until one starts.
        ctx.headers["x-gateway-worker"] = "none-seen"
        body["warning"] = ("No worker consuming the 'async' queue has been seen recently; the request "
                           "waits until one runs (`celery -A config worker`).")
    return _json(body, ctx, status=202)


async def _authenticated(request: HttpRequest) -> pipeline.Ctx:
    """Authenticate a non-pipeline /v1 call; the key's endpoint scope is checked against its path."""
    ctx = pipeline.Ctx(endpoint=request.path_info, client_ip=request.META.get("REMOTE_ADDR", ""))
    await pipeline.authenticate(ctx, request.headers.get("authorization"))
    return ctx


@api.get("/requests/{request_id}", openapi_extra=doc.REQUEST_GET)
async def seed_request_get(request: HttpRequest, request_id: str):
    """Status of an async request and, once finished, its result or error and usage."""
    ctx = await _authenticated(request)
    row = await db_sync(async_requests.async_request_get, tenant_id=ctx.auth.tenant_id, request_id=request_id)
    if row is None:
        raise not_found(f"No such request: {request_id}")
    return _json(async_requests.async_request_view(row), ctx)


# --- files and batches (OpenAI-compatible) ----------------------------------------------------


def _read_upload(request: HttpRequest) -> tuple[str, str, bytes]:
    upload = request.FILES.get("file")
    if upload is None:
        raise invalid_request("Invalid value for 'file': is required (multipart/form-data).", param="file")
    if upload.size > settings.GATEWAY_FILE_MAX_BYTES:
        raise invalid_request("The file is too large.", param="file", code="file_too_large")
    return request.POST.get("purpose", ""), upload.name or "", upload.read()


@api.exception_handler(GatewayError)
def _gateway_error(request: HttpRequest, exc: GatewayError) -> HttpResponse:
    """Views outside the pipeline (files, batches) raise GatewayError; it is rendered here, once.
    (RequestIdMiddleware gives these answers their x-request-id.)"""
    return exc.response()


@api.exception_handler(NinjaValidationError)
def _param_error(request: HttpRequest, exc: NinjaValidationError) -> HttpResponse:
    """A path or query parameter ninja could not parse (`?limit=null`): a 400 naming it, not a 422."""
    return from_param_errors(exc.errors).response()


@api.exception_handler(HttpError)
def _ninja_http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    return from_http_error(exc.status_code, exc.message).response()


@api.exception_handler(Http404)
def _not_found(request: HttpRequest, exc: Http404) -> HttpResponse:
    return not_found("Not found.").response()


def _page(data: list[dict], more: bool) -> dict:
    """OpenAI's list envelope."""
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": more}


@api.post("/files", openapi_extra=doc.FILE_UPLOAD)
async def file_upload(request: HttpRequest):
    ctx = await _authenticated(request)
    purpose, name, content = await db_sync(_read_upload, request=request)
    row = await db_sync(batches.file_create, tenant_id=ctx.auth.tenant_id, purpose=purpose, filename=name,
                        content=content)
    return _json(batches.file_view(row), ctx)


@api.get("/files/{file_id}", openapi_extra=doc.FILE_GET)
async def file_retrieve(request: HttpRequest, file_id: str):
    ctx = await _authenticated(request)
    row = await db_sync(batches.file_get, tenant_id=ctx.auth.tenant_id, file_id=file_id)
    return _json(batches.file_view(row), ctx)


@api.get("/files", openapi_extra=doc.FILE_LIST)
async def file_list(request: HttpRequest, purpose: str | None = None, after: str | None = None, limit: int = 100):
    ctx = await _authenticated(request)
    rows, more = await db_sync(batches.files_list, tenant_id=ctx.auth.tenant_id, purpose=purpose, after=after,
                               limit=max(1, min(limit, 10_000)))
    return _json(_page([batches.file_view(r) for r in rows], more), ctx)


@api.delete("/files/{file_id}", openapi_extra=doc.FILE_DELETE)
async def file_delete(request: HttpRequest, file_id: str):
    ctx = await _authenticated(request)
    await db_sync(batches.file_delete, tenant_id=ctx.auth.tenant_id, file_id=file_id)
    return _json({"id": file_id, "object": "file", "deleted": True}, ctx)


@api.get("/files/{file_id}/content", openapi_extra=doc.FILE_CONTENT)
async def file_content(request: HttpRequest, file_id: str):
    ctx = await _authenticated(request)
    content = await db_sync(batches.file_content, tenant_id=ctx.auth.tenant_id, file_id=file_id)
    resp = HttpResponse(content, content_type="application/jsonl")
    _decorate(resp, ctx)
    return resp


@api.post("/batches", openapi_extra=doc.BATCH_CREATE_OP)
async def batch_create(request: HttpRequest):
    ctx = await _authenticated(request)
    data = schemas.parse_json(request.body)

    def create() -> dict:
        row = batches.batch_create(
            auth=ctx.auth, input_file_id=str(data.get("input_file_id") or ""),
            endpoint=str(data.get("endpoint") or ""), completion_window=str(data.get("completion_window") or "24h"),
            metadata=data.get("metadata"))
        return batches.batch_view(row)

    return _json(await db_sync(create), ctx)


@api.get("/batches", openapi_extra=doc.BATCH_LIST)
async def batch_list(request: HttpRequest, after: str | None = None, limit: int = 20):
    ctx = await _authenticated(request)

    def page() -> dict:
        rows, more = batches.batches_list(tenant_id=ctx.auth.tenant_id, after=after, limit=max(1, min(limit, 100)))
        return _page([batches.batch_view(r) for r in rows], more)

    return _json(await db_sync(page), ctx)


@api.get("/batches/{batch_id}", openapi_extra=doc.BATCH_GET)
async def batch_retrieve(request: HttpRequest, batch_id: str):
    ctx = await _authenticated(request)
    return _json(await db_sync(lambda: batches.batch_view(
        batches.batch_get(tenant_id=ctx.auth.tenant_id, batch_id=batch_id))), ctx)


@api.post("/batches/{batch_id}/cancel", openapi_extra=doc.BATCH_CANCEL)
async def batch_cancel(request: HttpRequest, batch_id: str):
    ctx = await _authenticated(request)
    return _json(await db_sync(lambda: batches.batch_view(
        batches.batch_cancel(tenant_id=ctx.auth.tenant_id, batch_id=batch_id))), ctx)
