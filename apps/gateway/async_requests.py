"""Async requests: accepted after authentication and admission (so they can never bypass rate limits
or budget holds), run later by a Celery worker through the same pipeline, polled at
GET /v1/requests/{id}, and optionally announced by a signed webhook.

Idempotency: the AsyncRequest id is the pipeline's request id, and the ledger is idempotent on it.
A worker claims a request with a lease (conditional UPDATE); a worker killed mid-request leaves a
lapsed lease, and the resume sweep (beat) runs the request again. A run that finds the ledger row
already written (the worker died between the ledger write and saving the result) does not call the
provider again: it ends as failed with `result_lost` and the usage of the ledger row, and the hold
stored with it is settled with the row's cost unless the dead worker settled it already.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

import httpx
import orjson
from asgiref.sync import async_to_sync, sync_to_async
from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from apps.analytics.selectors import usage_event_summary
from apps.keys.selectors import api_key_auth_by_id

from . import pipeline, queues
from .errors import GatewayError, invalid_api_key
from .models import AsyncRequest, JobStatus
from .providers import Completion
from .selectors import tenant_policy

log = logging.getLogger(__name__)

KIND_BY_ENDPOINT = {path: kind for kind, path in pipeline.ENDPOINT_PATHS.items()}
FINISHED = (JobStatus.COMPLETED, JobStatus.FAILED)


def celery_priority(priority: int) -> int:
    """metadata.priority 0..9 (9 most urgent) -> Celery's priority on Redis (0 is popped first)."""
    return 9 - max(0, min(9, priority))


# --- enqueue ----------------------------------------------------------------------------------


def async_request_create(*, ctx: pipeline.Ctx, plan: dict, completion: Completion | None = None) -> AsyncRequest:
    """Store an admitted request with its plan (`Ctx.plan()`: the parsed request, the hold handed
    over, the bounds and cache key) and enqueue it once the row is committed. A cache hit
    (`completion`) is stored as completed at once."""
    now = timezone.now()
    row = AsyncRequest(
        id=ctx.request_id,
        tenant_id=ctx.auth.tenant_id,
        api_key_id=ctx.auth.key_id,
        endpoint=pipeline.ENDPOINT_PATHS[ctx.kind],
        body=plan["request"]["body"],
        priority=ctx.priority,
        callback_url=ctx.options.callback_url or "",
        admission=plan if completion is None else None,
    )
    if completion is not None:
        row.status, row.result, row.completed_at = JobStatus.COMPLETED, completion.body, now
        row.usage = {**completion.usage.as_openai(), "cost": "0"}
    with transaction.atomic():
        row.save(force_insert=True)
        transaction.on_commit(lambda: _enqueue(row))
    return row


def _enqueue(row: AsyncRequest) -> None:
    """Publish the task. A broker that is down loses nothing: the row stays queued and the resume
    sweep publishes it again."""
    try:
        if row.status == JobStatus.QUEUED:
            queues.publish(queues.ASYNC_RUN, row.id, priority=celery_priority(row.priority))
        elif row.callback_url:
            queues.publish(queues.ASYNC_NOTIFY, row.id)
    except Exception:
        log.exception("could not enqueue async request %s; the resume sweep will retry", row.id)


# --- run (worker) -----------------------------------------------------------------------------


def _claimable(now: datetime) -> Q:
    return Q(status=JobStatus.QUEUED) | Q(status=JobStatus.RUNNING, lease_until__lt=now) | Q(
        status=JobStatus.RUNNING, lease_until__isnull=True)


def async_request_claim(*, request_id: str) -> AsyncRequest | None:
    """Take the request for this worker (a lease), or None if it is done or another worker holds it."""
    now = timezone.now()
    lease = timedelta(seconds=settings.GATEWAY_JOB_LEASE_S)
    taken = AsyncRequest.objects.filter(_claimable(now), id=request_id).update(
        status=JobStatus.RUNNING, lease_until=now + lease, started_at=now, attempts=F("attempts") + 1)
    return AsyncRequest.objects.filter(id=request_id).first() if taken else None


def _finish(row_id: str, *, status: str, result=None, error=None, usage=None) -> None:
    AsyncRequest.objects.filter(id=row_id, status=JobStatus.RUNNING).update(
        status=status, result=result, error=error, usage=usage, completed_at=timezone.now(), lease_until=None)


def _usage_of(ctx: pipeline.Ctx) -> dict | None:
    if ctx.usage is None:
        return None
    return {**ctx.usage.as_openai(), "cost": str(ctx.cost)}


def worker_failed(attempts: int) -> GatewayError:
    """Work whose worker died or crashed on every attempt: given up, its hold released."""
    return GatewayError(500, f"Gave up after {attempts} attempts that each ended without an answer.",
                        type="api_error", code="worker_failed")


async def _execute(row: AsyncRequest) -> tuple[str, dict | None, dict | None, dict | None]:
    """Run call -> settle -> ledger on the stored plan: the parsed request, the hold (taken over:
    this worker ends it), the bounds and the cache key are used as they are."""
    ctx = pipeline.Ctx(kind=KIND_BY_ENDPOINT.get(row.endpoint, pipeline.CHAT), request_id=row.id,
                       timestamp=row.created_at)
    auth = await sync_to_async(api_key_auth_by_id)(key_id=row.api_key_id) if row.api_key_id else None
    ctx.auth = auth
    try:
        if not isinstance(row.admission, dict) or "request" not in row.admission:
            raise GatewayError(500, "This request was stored without its plan and cannot run.", type="api_error",
                               code="plan_missing")
        ctx.resume(row.admission)
        if row.attempts > settings.GATEWAY_JOB_MAX_ATTEMPTS:
            raise worker_failed(row.attempts - 1)
        if auth is None or auth.revoked:
            raise invalid_api_key("The API key of this request was revoked or deleted before it ran.")
        if auth.expires_at is not None and auth.expires_at <= timezone.now():
            raise invalid_api_key("The API key of this request expired before it ran.")
        pipeline.watch(ctx, await tenant_policy(auth.tenant_id))
        if ctx.watch:
            ctx.raw_body = ctx.request.body  # as accepted (the worker has the parsed request only)
        await pipeline.route(ctx)
        completion = await pipeline.execute(ctx)
    except GatewayError as exc:
        await pipeline.end(ctx, exc)  # a no-op when execute already ended it
        return JobStatus.FAILED, None, exc.body()["error"] | {"status": exc.status}, _usage_of(ctx)
    except Exception as exc:
        await pipeline.end(ctx, exc)
        log.exception("async request %s failed", row.id)
        error = {"message": "The gateway failed to run this request.", "type": "api_error", "param": None,
                 "code": "internal_error", "status": 500}
        return JobStatus.FAILED, None, error, _usage_of(ctx)
    return JobStatus.COMPLETED, completion.body, None, _usage_of(ctx)


def async_request_run(*, request_id: str) -> None:
    """Run one async request through the pipeline (the Celery task's body). Safe to call twice."""
    row = async_request_claim(request_id=request_id)
    if row is None:
        return
    event = usage_event_summary(request_id=request_id)
    if event is not None:
        async_to_sync(pipeline.settle_lost)(row.admission, cost_usd=event["cost"])
        usage = {"prompt_tokens": event["prompt_tokens"], "completion_tokens": event["completion_tokens"],
                 "total_tokens": event["prompt_tokens"] + event["completion_tokens"], "cost": str(event["cost"])}
        error = {"message": "A worker stopped after running this request and before saving its result.",
                 "type": "api_error", "param": None, "code": "result_lost", "status": event["status"]}
        _finish(request_id, status=JobStatus.FAILED, error=error, usage=usage)
    else:
        status, result, error, usage = async_to_sync(_execute)(row)
        _finish(request_id, status=status, result=result, error=error, usage=usage)
    if row.callback_url:
        queues.publish(queues.ASYNC_NOTIFY, request_id)


# --- reads ------------------------------------------------------------------------------------


def _ts(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value else None


def async_request_get(*, tenant_id: int, request_id: str) -> AsyncRequest | None:
    """The request if it belongs to the tenant (anyone else gets None, shown as 404)."""
    return AsyncRequest.objects.filter(id=request_id, tenant_id=tenant_id).first()


def async_request_view(row: AsyncRequest) -> dict:
    """GET /v1/requests/{id} and the webhook body."""
    return {
        "id": row.id,
        "object": "request",
        "status": row.status,
        "model": (row.body.get("request") or row.body).get("model") if isinstance(row.body, dict) else None,
        "created_at": _ts(row.created_at),
        "started_at": _ts(row.started_at),
        "completed_at": _ts(row.completed_at),
        "result": row.result,
        "error": row.error,
        "usage": row.usage,
    }


# --- webhook ----------------------------------------------------------------------------------


class WebhookError(Exception):
    """The receiver did not accept the webhook; Celery retries with backoff."""


def async_request_notify(*, request_id: str) -> None:
    """POST the finished request to its callback_url, signed with the tenant's webhook secret,
    through the guarded client (public addresses only). Raises WebhookError on a non-2xx; a
    destination that is not allowed is logged and dropped (a retry cannot help)."""
    from apps.keys import outbound
    from apps.keys.services import tenant_webhook_secret

    row = AsyncRequest.objects.filter(id=request_id).first()
    if row is None or not row.callback_url or row.webhook_delivered_at or row.status not in FINISHED:
        return
    payload = orjson.dumps(async_request_view(row))
    headers = {"content-type": "application/json", "user-agent": "llm-service-webhook/1",
               "x-llm-signature": outbound.signature_header(
                   body=payload, secret=tenant_webhook_secret(tenant_id=row.tenant_id)),
               "x-llm-request-id": row.id}
    try:
        resp = outbound.post(row.callback_url, body=payload, headers=headers,
                             timeout=settings.GATEWAY_WEBHOOK_TIMEOUT_S)
    except outbound.DestinationRefused as exc:
        log.warning("callback of async request %s refused, not retried: %s", row.id, exc)
        return
    except httpx.HTTPError as exc:
        raise WebhookError(f"{type(exc).__name__}: {exc}") from exc
    if not 200 <= resp.status_code < 300:
        raise WebhookError(f"callback answered {resp.status_code}")
    AsyncRequest.objects.filter(id=request_id).update(webhook_delivered_at=timezone.now())


# --- housekeeping (beat) ----------------------------------------------------------------------


def async_requests_purge(*, now: datetime | None = None) -> int:
    """Delete finished requests older than GATEWAY_ASYNC_RESULT_TTL_S. Returns how many."""
    cutoff = (now or timezone.now()) - timedelta(seconds=settings.GATEWAY_ASYNC_RESULT_TTL_S)
    deleted, _ = AsyncRequest.objects.filter(status__in=FINISHED, completed_at__lt=cutoff).delete()
    return deleted


def async_requests_resume(*, now: datetime | None = None, limit: int = 500) -> list[str]:
    """Publish again the requests no worker is on: queued for longer than a lease (the publish was
    lost) or running with a lapsed lease (the worker died). Claims make a duplicate harmless."""
    now = now or timezone.now()
    stale = now - timedelta(seconds=settings.GATEWAY_JOB_LEASE_S)
    rows = list(AsyncRequest.objects.filter(
        Q(status=JobStatus.QUEUED, created_at__lt=stale) | Q(status=JobStatus.RUNNING, lease_until__lt=now)
    ).values_list("id", "priority")[:limit])
    for request_id, priority in rows:
        queues.publish(queues.ASYNC_RUN, request_id, priority=celery_priority(priority))
    return [r for r, _ in rows]
