"""The data plane under /v1 (django-ninja, async). Views only hand the request to the pipeline and
render what it returns; errors become OpenAI-shaped JSON in one place (GatewayError.response)."""

from __future__ import annotations

import time

import orjson
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from ninja import NinjaAPI

from . import pipeline
from .errors import GatewayError, invalid_request
from .selectors import routing_table

api = NinjaAPI(title="LLM Service data plane", version="1", urls_namespace="v1", docs_url="/docs")


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


async def _handle(request: HttpRequest, kind: str, *, envelope: bool = False) -> HttpResponse:
    ctx = pipeline.Ctx(kind=kind, endpoint=request.path_info, client_ip=request.META.get("REMOTE_ADDR", ""))
    try:
        hit = await pipeline.prepare(ctx, request.headers.get("authorization"), request.body)
        if ctx.is_async:
            raise invalid_request("Asynchronous requests are not available yet.", param="async")
        ctx.headers["x-gateway-cache"] = "hit" if hit is not None else "miss"
        if ctx.stream:
            if hit is not None:
                events = pipeline.replay_events(ctx, hit)
            else:
                first, agen = await pipeline.open_stream(ctx)
                events = pipeline.stream_events(ctx, first, agen)
            resp = StreamingHttpResponse(events, content_type="text/event-stream")
            resp["cache-control"] = "no-cache"
            resp["x-accel-buffering"] = "no"
            _decorate(resp, ctx)
            return resp
        if hit is not None:
            await pipeline.record(ctx)
            completion = hit
        else:
            completion = await pipeline.execute(ctx)
        ctx.headers["x-gateway-cost-usd"] = f"{ctx.cost:f}"
        body = completion.body
        if envelope:
            body = {"id": ctx.request_id, "status": "completed", "result": body}
        return _json(body, ctx)
    except GatewayError as exc:
        return _error(exc, ctx)


@api.post("/chat/completions", include_in_schema=True)
async def chat_completions(request: HttpRequest):
    """OpenAI chat completions, streaming or not, plus our `metadata`, `cache`, `async`, `batch_id`."""
    return await _handle(request, pipeline.CHAT)


@api.post("/embeddings")
async def embeddings(request: HttpRequest):
    return await _handle(request, pipeline.EMBEDDINGS)


@api.post("/requests")
async def seed_request(request: HttpRequest):
    """The seed's request envelope `{"request": {model, messages, options, metadata}}`."""
    return await _handle(request, pipeline.CHAT, envelope=True)


@api.get("/models")
async def models(request: HttpRequest):
    ctx = pipeline.Ctx(kind=pipeline.MODELS, endpoint=request.path_info, client_ip=request.META.get("REMOTE_ADDR", ""))
    try:
        await pipeline.authenticate(ctx, request.headers.get("authorization"))
    except GatewayError as exc:
        return _error(exc, ctx)
    table = await routing_table()
    created = int(time.time())
    data = [
        {"id": alias, "object": "model", "created": created, "owned_by": "llm-service"}
        for alias in sorted(table.aliases)
        if ctx.auth.may_use_model(alias)
    ]
    return _json({"object": "list", "data": data}, ctx)


@api.get("/budget")
async def budget_status(request: HttpRequest):
    """Every budget that applies to the calling key: limit, spent, held, remaining, resets_at.
    `?budget_id=` also includes the budget_id budget a request with that metadata.budget_id would hit."""
    from django.utils import timezone

    from apps.billing.selectors import budget_statuses_for_key

    ctx = pipeline.Ctx()
    try:
        await pipeline.authenticate(ctx, request.headers.get("authorization"))
    except GatewayError as exc:
        return _error(exc, ctx)
    statuses = await budget_statuses_for_key(auth=ctx.auth, budget_id=request.GET.get("budget_id") or None,
                                             at=timezone.now())
    return _json({"object": "list", "data": [s.as_json() for s in statuses]}, ctx)
