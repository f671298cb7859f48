"""Batches API lines sent to a provider's own batch API (OpenAI Batch API, Anthropic Message
Batches), where the deployment allows it (`Deployment.provider_batch`), at the provider's batch price.

How it goes (docs/async-and-batches.md):
- A lane admits each line as usual (`pipeline.prepare`: rate limits and a budget hold per line; a
  line a budget refuses fails there and never leaves the gateway). A line whose first-choice
  deployment opted in is not called: it is parked (`pipeline.defer`: its plan, with the hold
  handed over, stored on the line) in the UpstreamBatch of its batch and deployment.
- Once no line of the batch is left to admit, `batch_finalize` marks those UpstreamBatches
  `submitting` and publishes their poll task (`upstream_step`), which sends the parked lines as one
  provider batch, then reschedules itself every GATEWAY_PROVIDER_BATCH_POLL_S (a countdown, no
  sleeping worker) until the provider says the batch ended. The state is in the database: a task
  that is lost (a worker killed) is published again by the resume sweep (`upstreams_resume`).
  A poll token (`polls`) taken by a conditional UPDATE keeps one poll chain per UpstreamBatch.
- When it has ended, the results are downloaded and each is mapped back to its line by custom_id
  (`line-<index>`): a success is settled at the batch price with its ledger row
  (`pipeline.end_deferred`); an error releases the hold (the line goes to the error file, with a
  ledger row of its status); a cancelled or expired line releases its hold without a ledger row.
  A line is claimed (a lease) before it is billed and the ledger is idempotent by request id, so
  results processed twice bill each line once.
- Cancel (`POST /v1/batches/{id}/cancel`) is sent on to the provider by the next poll (published
  at once); lines not yet submitted are released.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from apps.analytics.selectors import usage_event_summary
from apps.keys.selectors import api_key_auth_by_id

from . import pipeline
from .batches import line_request_id, line_response
from .errors import GatewayError
from .models import Batch, BatchLine, BatchStatus, JobStatus, UpstreamBatch, UpstreamStatus
from .providers import ProviderError, adapter_for
from .providers.base import BatchResult
from .selectors import DeploymentRoute, deployment_route

log = logging.getLogger(__name__)

# Past the batch's own expiry by this much, an upstream that still cannot be reached is given up.
GIVE_UP_AFTER = timedelta(hours=24)


def upstream_custom_id(index: int) -> str:
    """The custom_id a line is sent under (the client's own may not fit Anthropic's ^[a-zA-Z0-9_-]{1,64}$)."""
    return f"line-{index}"


def _index_of(custom_id: str) -> int | None:
    head, _, tail = custom_id.partition("-")
    return int(tail) if head == "line" and tail.isdigit() else None


# --- the resume sweep ---------------------------------------------------------------------------


def upstreams_resume(*, now=None) -> list[tuple[int, int]]:
    """Upstreams whose poll is overdue by a lease period (its task was lost): publish them again
    with their current token (a duplicate loses the token race and stops)."""
    now = now or timezone.now()
    stale = now - timedelta(seconds=settings.GATEWAY_JOB_LEASE_S)
    rows = UpstreamBatch.objects.filter(
        Q(next_poll_at__lt=stale) | Q(next_poll_at__isnull=True),
        status__in=(UpstreamStatus.SUBMITTING, UpstreamStatus.SUBMITTED))
    return list(rows.values_list("id", "polls")[:200])


# --- the poll task ------------------------------------------------------------------------------


def _take_token(upstream_pk: int, token: int) -> UpstreamBatch | None:
    """Own this poll (the token moves on by one), or None when another task already did."""
    due = timezone.now() + timedelta(seconds=settings.GATEWAY_PROVIDER_BATCH_POLL_S)
    taken = UpstreamBatch.objects.filter(
        id=upstream_pk, polls=token, status__in=(UpstreamStatus.SUBMITTING, UpstreamStatus.SUBMITTED)
    ).update(polls=token + 1, next_poll_at=due)
    return UpstreamBatch.objects.select_related("batch").filter(id=upstream_pk).first() if taken else None


def _parked(upstream: UpstreamBatch) -> list[BatchLine]:
    return list(BatchLine.objects.filter(upstream=upstream, status=JobStatus.SUBMITTED).order_by("index"))


def _save(upstream_pk: int, **fields) -> None:
    UpstreamBatch.objects.filter(id=upstream_pk).update(**fields)


async def upstream_step(*, upstream_pk: int, token: int) -> tuple[str, float, str]:
    """One poll of an upstream batch. Returns (what next, seconds, batch id): ("again", s) to poll
    again in s seconds, ("ended", 0) when every line is settled (the batch may finalize), or
    ("skip", 0) when another task owns this poll."""
    upstream = await sync_to_async(_take_token)(upstream_pk, token)
    if upstream is None:
        return "skip", 0.0, ""
    batch: Batch = upstream.batch
    again = ("again", settings.GATEWAY_PROVIDER_BATCH_POLL_S, batch.id)
    ended = ("ended", 0.0, batch.id)
    route = await sync_to_async(deployment_route)(deployment_id=upstream.deployment_id) \
        if upstream.deployment_id else None
    cancelling = batch.status == BatchStatus.CANCELLING
    if route is None:
        await _lines_fail(batch, upstream, None, "The deployment of this provider batch was deleted.",
                          code="upstream_lost")
        return ended
    adapter = adapter_for(route.target.kind)
    if upstream.status == UpstreamStatus.SUBMITTING:
        if cancelling:  # never sent: the lines give their holds back
            await _lines_release(upstream, "batch_cancelled", "The batch was cancelled before this line ran.")
            await sync_to_async(_save)(upstream.id, status=UpstreamStatus.ENDED, ended_at=timezone.now())
            return ended
        lines = await sync_to_async(_parked)(upstream)
        if not lines:
            await sync_to_async(_save)(upstream.id, status=UpstreamStatus.ENDED, ended_at=timezone.now())
            return ended
        try:
            upstream_id = await adapter.batch_submit(
                route.target, [(upstream_custom_id(line.index), line.plan["upstream_body"]) for line in lines],
                metadata={"gateway_batch_id": batch.id})
        except ProviderError as exc:
            if exc.retryable and not _given_up(batch):
                log.warning("provider batch of %s not submitted yet (%s); trying again", batch.id, exc.message)
                return again
            await _lines_fail(batch, upstream, route, f"The provider refused the batch: {exc.message}",
                              code=exc.code, status=exc.status)
            return ended
        await sync_to_async(_save)(upstream.id, status=UpstreamStatus.SUBMITTED, upstream_id=upstream_id,
                                   submitted_at=timezone.now())
        return again
    try:
        if cancelling and not upstream.cancel_sent:
            await adapter.batch_cancel(route.target, upstream.upstream_id)
            await sync_to_async(_save)(upstream.id, cancel_sent=True)
            upstream.cancel_sent = True
        poll = await adapter.batch_poll(route.target, upstream.upstream_id)
        await sync_to_async(_save)(upstream.id, upstream_status=poll.status[:32])
        if not poll.ended:
            return again
        results = await adapter.batch_results(route.target, poll)
    except ProviderError as exc:
        if _given_up(batch):
            await _lines_fail(batch, upstream, route, f"The provider batch could not be read: {exc.message}",
                              code="upstream_lost")
            return ended
        log.warning("provider batch %s of %s: %s; polling again", upstream.upstream_id, batch.id, exc.message)
        return again
    # A line the provider returned nothing for: never run if the batch was cancelled or expired
    # (OpenAI leaves such lines out of both files), else lost by the provider.
    missing = "canceled" if upstream.cancel_sent else "expired" if poll.status == "expired" else "errored"
    await results_apply(upstream_pk=upstream.id, results=results, route=route, missing=missing,
                        missing_message=_missing_message(poll.data))
    return ended


def _given_up(batch: Batch) -> bool:
    return batch.expires_at is not None and timezone.now() > batch.expires_at + GIVE_UP_AFTER


def _missing_message(data: dict) -> str:
    errors = ((data.get("errors") or {}).get("data") or []) if isinstance(data.get("errors"), dict) else []
    found = "; ".join(str(e.get("message")) for e in errors if isinstance(e, dict) and e.get("message"))
    return f"The provider's batch returned no result for this line{': ' + found if found else ''}."


# --- results: each line billed once --------------------------------------------------------------


def _line_claim(line_pk: int) -> BatchLine | None:
    """A parked line for this worker to settle (a lease), or None when it is settled or another
    worker is on it."""
    now = timezone.now()
    taken = BatchLine.objects.filter(Q(lease_until__isnull=True) | Q(lease_until__lt=now), pk=line_pk,
                                     status=JobStatus.SUBMITTED).update(
        lease_until=now + timedelta(seconds=settings.GATEWAY_JOB_LEASE_S))
    return BatchLine.objects.filter(pk=line_pk).first() if taken else None


def _line_done(line_pk: int, *, status: str, response: dict | None, error: dict | None) -> None:
    BatchLine.objects.filter(pk=line_pk, status=JobStatus.SUBMITTED).update(
        status=status, response=response, error=error, lease_until=None)


async def results_apply(*, upstream_pk: int, results: list[BatchResult], route: DeploymentRoute | None,
                        missing: str = "errored", missing_message: str = "") -> None:
    """Settle every parked line of an ended upstream batch from its result; a line without one
    gets the outcome `missing`. Safe to run again on the same results: a line is billed once."""
    upstream = await UpstreamBatch.objects.select_related("batch").aget(id=upstream_pk)
    batch = upstream.batch
    auth = await sync_to_async(api_key_auth_by_id)(key_id=batch.api_key_id) if batch.api_key_id else None
    by_index = {_index_of(r.custom_id): r for r in results}
    for line in await sync_to_async(_parked)(upstream):
        result = by_index.get(line.index) or BatchResult(upstream_custom_id(line.index), missing, status=502,
                                                         message=missing_message or "No result for this line.",
                                                         code="upstream_result_missing")
        await _line_settle(batch, line.pk, result, route, auth)
    await sync_to_async(_save)(upstream.id, status=UpstreamStatus.ENDED, ended_at=timezone.now())


async def _line_settle(batch: Batch, line_pk: int, result: BatchResult, route, auth) -> None:
    line = await sync_to_async(_line_claim)(line_pk)
    if line is None:
        return
    rid = line_request_id(batch.id, line.index)
    if result.outcome in ("canceled", "expired"):
        code = "batch_cancelled" if result.outcome == "canceled" else "batch_expired"
        await pipeline.release_deferred(line.plan)
        await sync_to_async(_line_done)(line.pk, status=JobStatus.CANCELLED, response=None, error={
            "code": code, "message": f"The provider {'cancelled' if code == 'batch_cancelled' else 'expired'} "
                                     "this line before it ran."})
        return
    already = await sync_to_async(usage_event_summary)(request_id=rid)
    ctx = pipeline.Ctx(kind=pipeline.CHAT, request_id=rid, is_async=True, batch_id=batch.id, auth=auth)
    error = None if result.outcome == "succeeded" else GatewayError(
        result.status or 502, f"The provider failed this line: {result.message}", type="api_error",
        code=result.code or "upstream_error")
    if already is not None:
        # Billed by an earlier run that stopped before saving the line: not billed again; the hold
        # (if that run did not end it) is given back, its rate-limit counts kept.
        await pipeline.release_deferred(line.plan, keep_limits=True)
    elif auth is None:
        await pipeline.release_deferred(line.plan)
        error = error or GatewayError(401, "The API key of this batch was deleted.", type="invalid_request_error",
                                      code="invalid_api_key")
    else:
        await pipeline.end_deferred(ctx, line.plan, route, completion=result.completion, error=error)
    if error is None:
        outcome = line_response(batch.id, line, status=200, body=result.completion.body)
        await sync_to_async(_line_done)(line.pk, status=JobStatus.COMPLETED, response=outcome, error=None)
    else:
        outcome = line_response(batch.id, line, status=error.status, body=error.body())
        await sync_to_async(_line_done)(line.pk, status=JobStatus.FAILED, response=outcome,
                                        error=error.body()["error"])


async def _lines_release(upstream: UpstreamBatch, code: str, message: str) -> None:
    for line in await sync_to_async(_parked)(upstream):
        claimed = await sync_to_async(_line_claim)(line.pk)
        if claimed is None:
            continue
        await pipeline.release_deferred(claimed.plan)
        await sync_to_async(_line_done)(claimed.pk, status=JobStatus.CANCELLED, response=None,
                                        error={"code": code, "message": message})


async def _lines_fail(batch: Batch, upstream: UpstreamBatch, route, message: str, *, code: str,
                      status: int = 502) -> None:
    lines = await sync_to_async(_parked)(upstream)
    results = [BatchResult(upstream_custom_id(line.index), "errored", status=status, message=message, code=code)
               for line in lines]
    await results_apply(upstream_pk=upstream.id, results=results, route=route)
