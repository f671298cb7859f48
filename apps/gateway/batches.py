"""OpenAI-compatible Files and Batches: upload a JSONL file, run each line through the pipeline on
Celery, and collect the answers in an output file and the failures in an error file.

How a batch runs:
- `batch_start` splits the input file into BatchLine rows (idempotent on (batch, index)) and starts
  GATEWAY_BATCH_CONCURRENCY worker tasks ("lanes"); that is the batch's bounded concurrency.
- A lane claims one line at a time with a lease (a conditional UPDATE), runs it through
  pipeline.prepare/execute (so rate limits and budget holds apply to every line), saves the
  answer, and goes on; after GATEWAY_BATCH_TASK_BUDGET_S it hands over to a fresh task.
- Each line's request id is derived from the batch id and the line index, and the ledger is
  idempotent on it: a line run twice (a worker killed mid-line) never makes a second ledger row.
  A line whose lease lapsed (its worker died) is claimed again; the resume sweep (beat) restarts
  lanes for a batch gone quiet. A line that finds its ledger row already written is not sent
  again: it fails with `result_lost` (its cost is in the ledger), and the hold the line kept
  (`line_hold_keep`, before the call) is settled with that cost, unless it was already.
- A line our own rate limiter turns away (429) goes back to the queue and the lane waits for
  Retry-After; any other failure (a budget's 402 included) fails the line, and it is recorded.
- Cancel: remaining queued lines are marked cancelled; in-flight lines finish.
- The last lane to find no work left finalizes: output and error files, counts, final status.
- Provider batch APIs: a line whose first-choice deployment allows it (`provider_batch`) is admitted
  the same way and then parked (status `submitted`, its plan with the hold) in an UpstreamBatch
  instead of called; once no line is left to admit, finalize hands the upstreams to their poll
  task (apps/gateway/provider_batches.py), and the batch finalizes when their results are in.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import orjson
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import transaction
from django.db.models import Count, F, Q
from django.utils import timezone

from apps.analytics.selectors import usage_event_summary
from apps.billing.budgets import Hold
from apps.keys.selectors import KeyAuth, api_key_auth_by_id

from . import pipeline, queues, schemas
from .async_requests import worker_failed
from .errors import GatewayError, invalid_api_key, invalid_request, not_found
from .models import Batch, BatchLine, BatchStatus, File, JobStatus, UpstreamBatch, UpstreamStatus

log = logging.getLogger(__name__)

BATCH_ENDPOINTS = {"/v1/chat/completions": pipeline.CHAT, "/v1/embeddings": pipeline.EMBEDDINGS}
ACTIVE = (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING, BatchStatus.CANCELLING)
DONE = (BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED)


def _ts(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value else None


# --- files ------------------------------------------------------------------------------------


def file_create(*, tenant_id: int, purpose: str, filename: str, content: bytes) -> File:
    """Store an uploaded batch input file. The file as a whole must be usable (size, UTF-8, line
    count); each line is checked when the batch runs, and a bad line becomes an error-file entry."""
    if purpose != "batch":
        raise invalid_request("Invalid value for 'purpose': only 'batch' is supported.", param="purpose")
    if len(content) > settings.GATEWAY_FILE_MAX_BYTES:
        raise invalid_request(f"The file is larger than {settings.GATEWAY_FILE_MAX_BYTES} bytes.", param="file",
                              code="file_too_large")
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid_request("The file must be UTF-8 encoded JSONL.", param="file", code="invalid_file")
    lines = sum(1 for line in text.splitlines() if line.strip())
    if lines == 0:
        raise invalid_request("The file has no lines.", param="file", code="empty_file")
    if lines > settings.GATEWAY_BATCH_MAX_LINES:
        raise invalid_request(f"The file has {lines} lines; at most {settings.GATEWAY_BATCH_MAX_LINES} are allowed.",
                              param="file", code="too_many_lines")
    return File.objects.create(id="file-" + uuid.uuid4().hex[:24], tenant_id=tenant_id, purpose=purpose,
                               filename=filename[:255] or "batch.jsonl", bytes=len(content), content=content)


def file_get(*, tenant_id: int, file_id: str) -> File:
    row = File.objects.filter(id=file_id, tenant_id=tenant_id).defer("content").first()
    if row is None:
        raise not_found(f"No such File object: {file_id}")
    return row


def file_content(*, tenant_id: int, file_id: str) -> bytes:
    row = File.objects.filter(id=file_id, tenant_id=tenant_id).values_list("content", flat=True).first()
    if row is None:
        raise not_found(f"No such File object: {file_id}")
    return bytes(row)


def files_list(*, tenant_id: int, purpose: str | None, after: str | None, limit: int) -> tuple[list[File], bool]:
    qs = File.objects.filter(tenant_id=tenant_id).defer("content").order_by("-created_at", "-id")
    if purpose:
        qs = qs.filter(purpose=purpose)
    if after:
        anchor = File.objects.filter(id=after, tenant_id=tenant_id).values_list("created_at", flat=True).first()
        if anchor is not None:
            qs = qs.filter(Q(created_at__lt=anchor) | Q(created_at=anchor, id__lt=after))
    rows = list(qs[: limit + 1])
    return rows[:limit], len(rows) > limit


def file_delete(*, tenant_id: int, file_id: str) -> None:
    """Delete a file; the input file of a batch stays as long as the batch does."""
    file_get(tenant_id=tenant_id, file_id=file_id)
    if Batch.objects.filter(input_file_id=file_id).exists():
        raise invalid_request("The file is the input of a batch and cannot be deleted.", code="file_in_use")
    File.objects.filter(id=file_id, tenant_id=tenant_id).delete()


def file_view(row: File) -> dict:
    return {"id": row.id, "object": "file", "bytes": row.bytes, "created_at": _ts(row.created_at),
            "filename": row.filename, "purpose": row.purpose, "status": "processed", "expires_at": None,
            "status_details": None}


# --- batches: create, read, cancel ------------------------------------------------------------


def batch_create(*, auth: KeyAuth, input_file_id: str, endpoint: str, completion_window: str,
                 metadata: dict | None) -> Batch:
    if endpoint not in BATCH_ENDPOINTS:
        raise invalid_request(f"Invalid value for 'endpoint': must be one of {', '.join(BATCH_ENDPOINTS)}.",
                              param="endpoint")
    if not auth.may_use_endpoint(endpoint):
        raise GatewayError(403, f"This API key may not call {endpoint}.", type="permission_error",
                           code="endpoint_not_allowed", param="endpoint")
    if completion_window != "24h":
        raise invalid_request("Invalid value for 'completion_window': must be '24h'.", param="completion_window")
    if metadata is not None and (not isinstance(metadata, dict) or len(metadata) > 16):
        raise invalid_request("Invalid value for 'metadata': at most 16 string pairs.", param="metadata")
    source = File.objects.filter(id=input_file_id, tenant_id=auth.tenant_id).values_list("purpose", flat=True).first()
    if source is None:
        raise invalid_request(f"No such File object: {input_file_id}", param="input_file_id", code="not_found")
    if source != "batch":
        raise invalid_request("The input file's purpose must be 'batch'.", param="input_file_id")
    now = timezone.now()
    with transaction.atomic():
        batch = Batch.objects.create(
            id="batch_" + uuid.uuid4().hex[:24], tenant_id=auth.tenant_id, api_key_id=auth.key_id, endpoint=endpoint,
            input_file_id=input_file_id, completion_window=completion_window, metadata=metadata,
            expires_at=now + timedelta(hours=24),
        )
        transaction.on_commit(lambda: _publish_start(batch.id))
    return batch


def _publish_start(batch_id: str) -> None:
    try:
        queues.publish(queues.BATCH_START, batch_id)
    except Exception:  # the broker is down: the resume sweep starts the batch later
        log.exception("could not enqueue batch %s", batch_id)


def batch_get(*, tenant_id: int, batch_id: str) -> Batch:
    row = Batch.objects.filter(id=batch_id, tenant_id=tenant_id).first()
    if row is None:
        raise not_found(f"No such Batch object: {batch_id}")
    return row


def batches_list(*, tenant_id: int, after: str | None, limit: int) -> tuple[list[Batch], bool]:
    qs = Batch.objects.filter(tenant_id=tenant_id).order_by("-created_at", "-id")
    if after:
        anchor = Batch.objects.filter(id=after, tenant_id=tenant_id).values_list("created_at", flat=True).first()
        if anchor is not None:
            qs = qs.filter(Q(created_at__lt=anchor) | Q(created_at=anchor, id__lt=after))
    rows = list(qs[: limit + 1])
    return rows[:limit], len(rows) > limit


def batch_cancel(*, tenant_id: int, batch_id: str) -> Batch:
    """Stop a batch: no new line starts; lines in flight finish; the batch ends as cancelled."""
    batch = batch_get(tenant_id=tenant_id, batch_id=batch_id)
    if batch.status in (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS):
        Batch.objects.filter(id=batch_id, status__in=(BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)).update(
            status=BatchStatus.CANCELLING, cancelling_at=timezone.now())
        transaction.on_commit(lambda: queues.publish(queues.BATCH_LANE, batch_id))
        live = upstreams_live(batch_id=batch_id)  # the cancel goes on to the provider with the next poll, now
        transaction.on_commit(lambda: publish_polls(live))
    elif batch.status not in (BatchStatus.CANCELLING, BatchStatus.CANCELLED):
        raise GatewayError(409, f"Cannot cancel a batch with status '{batch.status}'.", code="batch_not_cancellable")
    batch.refresh_from_db()
    return batch


def batch_counts(batch: Batch) -> dict:
    """request_counts; live from the lines while the batch runs, stored once it is done."""
    if batch.status in DONE:
        return {"total": batch.total, "completed": batch.completed, "failed": batch.failed}
    by = dict(BatchLine.objects.filter(batch_id=batch.id).values_list("status").annotate(n=Count("id")))
    return {"total": sum(by.values()) or batch.total, "completed": by.get(JobStatus.COMPLETED, 0),
            "failed": by.get(JobStatus.FAILED, 0)}


def batch_view(batch: Batch) -> dict:
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": batch.errors,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": batch.status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": _ts(batch.created_at),
        "in_progress_at": _ts(batch.in_progress_at),
        "expires_at": _ts(batch.expires_at),
        "finalizing_at": _ts(batch.finalizing_at),
        "completed_at": _ts(batch.completed_at),
        "failed_at": _ts(batch.failed_at),
        "expired_at": _ts(batch.expired_at),
        "cancelling_at": _ts(batch.cancelling_at),
        "cancelled_at": _ts(batch.cancelled_at),
        "request_counts": batch_counts(batch),
        "metadata": batch.metadata,
    }


# --- running (worker) -------------------------------------------------------------------------


def line_request_id(batch_id: str, index: int) -> str:
    """The pipeline's request id of a line: stable across retries, so the ledger keeps one row."""
    return f"{batch_id}_{index}"


def batch_start(*, batch_id: str) -> int:
    """Split the input file into lines (idempotent) and mark the batch in progress. Returns how many
    lanes to start (0 when the batch is not running)."""
    batch = Batch.objects.filter(id=batch_id).select_related("input_file").first()
    if batch is None or batch.status in DONE:
        return 0
    if not BatchLine.objects.filter(batch_id=batch_id).exists():
        text = bytes(batch.input_file.content).decode("utf-8", errors="replace")
        lines, seen = [], set()
        for raw in (r for r in text.splitlines() if r.strip()):
            where = f"Line {len(lines) + 1}"
            try:
                data = orjson.loads(raw)
            except orjson.JSONDecodeError:
                data = {"_invalid": f"{where} is not valid JSON."}
            if not isinstance(data, dict):
                data = {"_invalid": f"{where} is not a JSON object."}
            elif "\\u0000" in raw:
                data = {"_invalid": f"{where} contains a NUL character (\\u0000), which is not allowed."}
            else:
                try:
                    schemas.check_depth(data)
                except GatewayError as exc:
                    data = {"_invalid": f"{where}: {exc.message}", "custom_id": data.get("custom_id")}
            custom_id = data.get("custom_id") if isinstance(data.get("custom_id"), str) else ""
            if custom_id and custom_id in seen:
                data = {"_invalid": f"{where}: the custom_id '{custom_id}' is used by an earlier line.",
                        "custom_id": custom_id}
            seen.add(custom_id)
            lines.append(BatchLine(batch_id=batch_id, index=len(lines), custom_id=custom_id[:200], body=data))
        with transaction.atomic():  # all lines or none, so a retry after a crash starts over
            BatchLine.objects.bulk_create(lines, batch_size=1000, ignore_conflicts=True)
    total = BatchLine.objects.filter(batch_id=batch_id).count()
    now = timezone.now()
    Batch.objects.filter(id=batch_id, status=BatchStatus.VALIDATING).update(
        status=BatchStatus.IN_PROGRESS, in_progress_at=now, total=total, heartbeat_at=now)
    Batch.objects.filter(id=batch_id).exclude(total=total).update(total=total)
    return min(settings.GATEWAY_BATCH_CONCURRENCY, total) or 1


def _claimable(now: datetime) -> Q:
    return Q(status=JobStatus.QUEUED) | Q(status=JobStatus.RUNNING, lease_until__lt=now)


def line_claim(*, batch_id: str) -> BatchLine | None:
    """The next line for this worker (by index), under a lease; None when no line is left to start."""
    now = timezone.now()
    lease = timedelta(seconds=settings.GATEWAY_JOB_LEASE_S)
    for _ in range(5):
        pks = list(BatchLine.objects.filter(_claimable(now), batch_id=batch_id).order_by("index")
                   .values_list("pk", flat=True)[:8])
        if not pks:
            return None
        for pk in pks:
            if BatchLine.objects.filter(_claimable(now), pk=pk).update(
                    status=JobStatus.RUNNING, lease_until=now + lease, attempts=F("attempts") + 1):
                Batch.objects.filter(id=batch_id).update(heartbeat_at=now)
                return BatchLine.objects.get(pk=pk)
    return None


def line_save(*, line_pk: int, status: str, response: dict | None, error: dict | None) -> None:
    BatchLine.objects.filter(pk=line_pk, status=JobStatus.RUNNING).update(
        status=status, response=response, error=error, lease_until=None)


def line_hold_keep(*, line_pk: int, hold: dict) -> None:
    """Store the hold a running line took (`Hold.to_dict`), for whoever runs the line after its worker."""
    BatchLine.objects.filter(pk=line_pk, status=JobStatus.RUNNING).update(plan={"hold": hold})


def line_response(batch_id: str, line: BatchLine, *, status: int, body: dict) -> dict:
    """A line's entry in the output or error file (OpenAI's batch output line)."""
    rid = line_request_id(batch_id, line.index)
    return {"id": "batch_req_" + rid.removeprefix("batch_"), "custom_id": line.custom_id,
            "response": {"status_code": status, "request_id": rid, "body": body}, "error": None}


# --- lines for a provider's batch API (the talking to the provider: provider_batches.py) ----------


def line_park(*, line_pk: int, batch_id: str, plan: dict, provider_kind: str) -> None:
    """Store a line admitted for a provider batch, with its plan (the hold in it), in the upstream
    batch of its batch and deployment."""
    upstream, _ = UpstreamBatch.objects.get_or_create(batch_id=batch_id, deployment_id=plan["deployment_id"],
                                                      defaults={"provider_kind": provider_kind})
    BatchLine.objects.filter(pk=line_pk, status=JobStatus.RUNNING).update(
        status=JobStatus.SUBMITTED, plan=plan, upstream=upstream, lease_until=None, response=None, error=None)


def upstreams_open_to_submit(*, batch_id: str) -> list[tuple[int, int]]:
    """Call in the batch's row lock once no line is left to admit: its open upstreams become
    `submitting`. Returns (upstream id, poll token) of each, for their poll tasks."""
    ids = list(UpstreamBatch.objects.filter(batch_id=batch_id, status=UpstreamStatus.OPEN).values_list("id", flat=True))
    UpstreamBatch.objects.filter(id__in=ids).update(status=UpstreamStatus.SUBMITTING, next_poll_at=timezone.now())
    return list(UpstreamBatch.objects.filter(id__in=ids).values_list("id", "polls"))


def upstreams_live(*, batch_id: str) -> list[tuple[int, int]]:
    """(id, poll token) of the batch's upstreams being submitted or run by the provider."""
    return list(UpstreamBatch.objects.filter(
        batch_id=batch_id, status__in=(UpstreamStatus.SUBMITTING, UpstreamStatus.SUBMITTED)).values_list("id", "polls"))


def publish_polls(pairs: list[tuple[int, int]]) -> None:
    for upstream_id, token in pairs:
        try:
            queues.publish(queues.BATCH_UPSTREAM, upstream_id, token)
        except Exception:  # the broker is down: the resume sweep publishes it later
            log.exception("could not enqueue the poll of upstream batch %s", upstream_id)


def line_requeue(*, line_pk: int) -> None:
    """Back to the queue (the rate limiter asked to wait); the attempt does not count."""
    BatchLine.objects.filter(pk=line_pk, status=JobStatus.RUNNING).update(
        status=JobStatus.QUEUED, lease_until=None, attempts=F("attempts") - 1)


def lines_cancel(*, batch_id: str, expired: bool = False) -> int:
    """Mark the lines not started yet as cancelled (cancel) or expired (past the completion window)."""
    error = {"code": "batch_expired", "message": "The batch's completion window ended before this line ran."} \
        if expired else {"code": "batch_cancelled", "message": "The batch was cancelled before this line ran."}
    return BatchLine.objects.filter(batch_id=batch_id, status=JobStatus.QUEUED).update(
        status=JobStatus.CANCELLED, error=error)


def batch_expire_if_due(*, batch_id: str) -> bool:
    """Past its completion window, a running batch starts no new line. Returns True if expired."""
    now = timezone.now()
    Batch.objects.filter(id=batch_id, status=BatchStatus.IN_PROGRESS, expires_at__lt=now,
                         expired_at__isnull=True).update(expired_at=now)
    if Batch.objects.filter(id=batch_id, expired_at__isnull=False).exists():
        lines_cancel(batch_id=batch_id, expired=True)
        return True
    return False


def batch_status(*, batch_id: str) -> str | None:
    return Batch.objects.filter(id=batch_id).values_list("status", flat=True).first()


@dataclass(slots=True)
class LineOutcome:
    status: str  # completed | failed | retry | submitted (parked for a provider batch API)
    response: dict | None = None
    error: dict | None = None
    retry_after_s: float = 0.0
    plan: dict | None = None  # a parked line's plan (pipeline.defer)
    provider_kind: str = ""


def _line_body(line: BatchLine, endpoint: str) -> dict:
    """The request body of a line, after checking the line's envelope; raises GatewayError(400)."""
    data = line.body
    if "_invalid" in data:
        raise invalid_request(data["_invalid"], code="invalid_line")
    if not line.custom_id:
        raise invalid_request("Invalid value for 'custom_id': is required.", param="custom_id", code="invalid_line")
    if (data.get("method") or "POST").upper() != "POST":
        raise invalid_request("Invalid value for 'method': must be 'POST'.", param="method", code="invalid_line")
    if data.get("url") != endpoint:
        raise invalid_request(f"Invalid value for 'url': every line of this batch must use '{endpoint}'.",
                              param="url", code="invalid_line")
    body = data.get("body")
    if not isinstance(body, dict):
        raise invalid_request("Invalid value for 'body': must be an object.", param="body", code="invalid_line")
    body = {k: v for k, v in body.items() if k not in ("async", "batch_id", "callback_url")}
    if body.get("stream"):
        raise invalid_request("Invalid value for 'body.stream': batch lines cannot stream.", param="body.stream",
                              code="invalid_line")
    return body


async def line_run(*, batch: Batch, line: BatchLine, auth: KeyAuth | None) -> LineOutcome:
    """One line through the pipeline as an async request of the batch. Its request id is derived
    from the batch and the line, so a line run again (its worker died) is admitted once: the same
    hold and rate-limit slots, not a second set."""
    rid = line_request_id(batch.id, line.index)
    envelope = {"id": "batch_req_" + rid.removeprefix("batch_"), "custom_id": line.custom_id}
    if line.attempts > 1 and (event := await sync_to_async(usage_event_summary)(request_id=rid)) is not None:
        await pipeline.settle_lost(line.plan, cost_usd=event["cost"])
        error = {"code": "result_lost", "message": "A worker stopped after running this line and before saving "
                                                   "its answer; its cost is in the ledger."}
        return LineOutcome(JobStatus.FAILED, {**envelope, "response": None, "error": error}, error)
    # A line our rate limiter turns away is retried later under the same request id: no 429 row.
    ctx = pipeline.Ctx(kind=BATCH_ENDPOINTS[batch.endpoint], request_id=rid, is_async=True, batch_id=batch.id,
                       retry_rate_limited=True, batch_line=True)
    try:
        if line.attempts > settings.GATEWAY_JOB_MAX_ATTEMPTS:
            if line.plan and line.plan.get("hold"):  # an earlier attempt's hold, released by `end`
                ctx.hold = Hold.from_dict(line.plan["hold"])
            raise worker_failed(line.attempts - 1)
        if auth is None or auth.revoked:
            raise invalid_api_key("The API key of this batch was revoked or deleted.")
        if auth.expires_at is not None and auth.expires_at <= timezone.now():
            raise invalid_api_key("The API key of this batch expired.")
        hit = await pipeline.prepare(ctx, None, _line_body(line, batch.endpoint), auth=auth)
        if hit is not None:
            await pipeline.end(ctx)
            completion = hit
        elif (deployment := ctx.batch_api_deployment) is not None:
            return LineOutcome(JobStatus.SUBMITTED, plan=pipeline.defer(ctx, deployment),
                               provider_kind=deployment.target.kind)
        else:
            if ctx.hold is not None and ctx.hold.budgets and ctx.hold.backed:
                # Kept with the line before the call: if this worker stops after the ledger row,
                # the line's next run ends the hold (`settle_lost`) rather than leave it to expire.
                await sync_to_async(line_hold_keep)(line_pk=line.pk, hold=ctx.hold.to_dict())
            completion = await pipeline.execute(ctx)
    except GatewayError as exc:
        if exc.status == 429 and not ctx.ended:
            after = next((v for k, v in exc.headers.items() if k.lower() == "retry-after"), None)
            return LineOutcome("retry", retry_after_s=float(after or 1))
        ctx.auth = ctx.auth or auth
        await pipeline.end(ctx, exc)  # a no-op when the pipeline already ended it
        return _failed(envelope, rid, exc)
    except Exception as exc:
        ctx.auth = ctx.auth or auth
        await pipeline.end(ctx, exc)
        return _failed(envelope, rid, GatewayError(500, "The gateway failed to run this line.", type="api_error",
                                                   code="internal_error"))
    response = {**envelope, "response": {"status_code": 200, "request_id": rid, "body": completion.body},
                "error": None}
    return LineOutcome(JobStatus.COMPLETED, response)


def _failed(envelope: dict, rid: str, exc: GatewayError) -> LineOutcome:
    response = {**envelope, "response": {"status_code": exc.status, "request_id": rid, "body": exc.body()},
                "error": None}
    return LineOutcome(JobStatus.FAILED, response, exc.body()["error"])


async def lane_run(*, batch_id: str) -> float | None:
    """Work through the batch's lines until none is left to start or the time budget is spent.
    Returns None when this lane is done, or seconds after which a fresh lane task should go on."""
    deadline = time.monotonic() + settings.GATEWAY_BATCH_TASK_BUDGET_S
    batch = await Batch.objects.filter(id=batch_id).afirst()
    if batch is None:
        return None
    auth = await sync_to_async(api_key_auth_by_id)(key_id=batch.api_key_id) if batch.api_key_id else None
    while True:
        status = await sync_to_async(batch_status)(batch_id=batch_id)
        if status == BatchStatus.CANCELLING:
            await sync_to_async(lines_cancel)(batch_id=batch_id)
            return None
        if status != BatchStatus.IN_PROGRESS or await sync_to_async(batch_expire_if_due)(batch_id=batch_id):
            return None
        line = await sync_to_async(line_claim)(batch_id=batch_id)
        if line is None:
            return None
        outcome = await line_run(batch=batch, line=line, auth=auth)
        if outcome.status == "retry":
            await sync_to_async(line_requeue)(line_pk=line.pk)
            return max(0.5, min(outcome.retry_after_s, 60.0))
        if outcome.status == JobStatus.SUBMITTED:
            await sync_to_async(line_park)(line_pk=line.pk, batch_id=batch_id, plan=outcome.plan,
                                           provider_kind=outcome.provider_kind)
        else:
            await sync_to_async(line_save)(line_pk=line.pk, status=outcome.status, response=outcome.response,
                                           error=outcome.error)
        if time.monotonic() > deadline:
            return 0.0


def batch_finalize(*, batch_id: str) -> bool:
    """Once no line is queued or running: write the output and error files and end the batch.
    Idempotent (deterministic file ids, a row lock on the batch). Returns True when finalized."""
    with transaction.atomic():
        batch = Batch.objects.select_for_update().filter(id=batch_id).first()
        if batch is None or batch.status in DONE or batch.status == BatchStatus.VALIDATING:
            return False
        if batch.status == BatchStatus.CANCELLING:
            lines_cancel(batch_id=batch_id)
        if BatchLine.objects.filter(batch_id=batch_id, status__in=(JobStatus.QUEUED, JobStatus.RUNNING)).exists():
            return False
        opened = upstreams_open_to_submit(batch_id=batch_id)
        if opened:
            transaction.on_commit(lambda: publish_polls(opened))
        if BatchLine.objects.filter(batch_id=batch_id, status=JobStatus.SUBMITTED).exists():
            return False  # waiting on a provider's batch API; its poll task finalizes
        now = timezone.now()
        cancelled = batch.status == BatchStatus.CANCELLING
        batch.finalizing_at = batch.finalizing_at or now
        out, err, counts = [], [], {JobStatus.COMPLETED: 0, JobStatus.FAILED: 0}
        for line in BatchLine.objects.filter(batch_id=batch_id).order_by("index").iterator(chunk_size=1000):
            if line.status == JobStatus.COMPLETED:
                out.append(orjson.dumps(line.response))
            elif line.status == JobStatus.CANCELLED:
                rid = line_request_id(batch_id, line.index)
                err.append(orjson.dumps({"id": "batch_req_" + rid.removeprefix("batch_"),
                                         "custom_id": line.custom_id, "response": None, "error": line.error}))
            else:
                err.append(orjson.dumps(line.response or {"custom_id": line.custom_id, "response": None,
                                                          "error": line.error}))
            counts[line.status] = counts.get(line.status, 0) + 1
        suffix = batch_id.removeprefix("batch_")
        batch.output_file = _result_file(batch, f"file-{suffix}-out", out) if out else None
        batch.error_file = _result_file(batch, f"file-{suffix}-err", err) if err else None
        batch.completed, batch.failed = counts[JobStatus.COMPLETED], counts[JobStatus.FAILED]
        batch.total = sum(counts.values())
        if cancelled:
            batch.status, batch.cancelled_at = BatchStatus.CANCELLED, now
        elif batch.expired_at:
            batch.status = BatchStatus.EXPIRED
        else:
            batch.status, batch.completed_at = BatchStatus.COMPLETED, now
        batch.save()
    return True


def _result_file(batch: Batch, file_id: str, lines: list[bytes]) -> File:
    content = b"\n".join(lines) + b"\n"
    purpose = "batch_output"
    name = f"{batch.id}_{'output' if file_id.endswith('-out') else 'error'}.jsonl"
    row, _ = File.objects.update_or_create(
        id=file_id, defaults={"tenant_id": batch.tenant_id, "purpose": purpose, "filename": name,
                              "bytes": len(content), "content": content})
    return row


def batches_resume(*, now: datetime | None = None) -> list[tuple[str, str]]:
    """What the resume sweep must restart: batches gone quiet for a lease period (their workers died
    or their tasks were lost). Returns (action, batch_id) pairs: 'start', 'lane' or 'finalize'."""
    now = now or timezone.now()
    stale = now - timedelta(seconds=settings.GATEWAY_JOB_LEASE_S)
    todo = []
    for batch_id, status in Batch.objects.filter(status__in=ACTIVE).filter(
            Q(heartbeat_at__lt=stale) | Q(heartbeat_at__isnull=True, created_at__lt=stale)
    ).values_list("id", "status")[:200]:
        Batch.objects.filter(id=batch_id).update(heartbeat_at=now)
        if status == BatchStatus.VALIDATING:
            todo.append(("start", batch_id))
        elif BatchLine.objects.filter(_claimable(now), batch_id=batch_id).exists():
            todo.append(("lane", batch_id))
        else:
            todo.append(("finalize", batch_id))
    return todo
