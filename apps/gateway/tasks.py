"""Celery entry points of the data plane: async requests, batches, webhooks and housekeeping.
Each takes ids, is idempotent, and calls the services in async_requests.py and batches.py. Those
modules publish work by name (queues.py) and never import this one."""

from __future__ import annotations

import httpx
from asgiref.sync import async_to_sync
from celery import shared_task
from django.conf import settings

from . import async_requests, batches, provider_batches, queues


@shared_task(name=queues.ASYNC_RUN, queue="async", acks_late=True)
def async_request_run(request_id: str) -> None:
    async_requests.async_request_run(request_id=request_id)


@shared_task(name=queues.ASYNC_NOTIFY, queue="async", acks_late=True,
             autoretry_for=(async_requests.WebhookError, httpx.HTTPError),
             retry_backoff=2, retry_backoff_max=600, retry_jitter=True,
             max_retries=settings.GATEWAY_WEBHOOK_MAX_RETRIES)
def async_request_notify(request_id: str) -> None:
    async_requests.async_request_notify(request_id=request_id)


@shared_task(name=queues.BATCH_START, queue="batch", acks_late=True)
def batch_start(batch_id: str) -> None:
    for _ in range(batches.batch_start(batch_id=batch_id)):
        batch_lane.apply_async(args=[batch_id])


@shared_task(name=queues.BATCH_LANE, queue="batch", acks_late=True)
def batch_lane(batch_id: str) -> None:
    """One lane of a batch: runs lines one after another; hands over to a fresh task when its time
    budget is spent or the rate limiter asks it to wait; the last lane out finalizes."""
    again = async_to_sync(batches.lane_run)(batch_id=batch_id)
    if again is not None:
        batch_lane.apply_async(args=[batch_id], countdown=again or None)
        return
    batches.batch_finalize(batch_id=batch_id)


@shared_task(name=queues.BATCH_FINALIZE, queue="batch", acks_late=True)
def batch_finalize(batch_id: str) -> None:
    batches.batch_finalize(batch_id=batch_id)


@shared_task(name=queues.BATCH_UPSTREAM, queue="batch", acks_late=True)
def batch_upstream_poll(upstream_id: int, token: int) -> None:
    """One poll of a batch sent to a provider's batch API; reschedules itself (a countdown, never a
    sleeping worker) until the provider's batch has ended and its results are settled, then
    finalizes the gateway batch. The state is in the database (UpstreamBatch)."""
    step, after, batch_id = async_to_sync(provider_batches.upstream_step)(upstream_pk=upstream_id, token=token)
    if step == "again":
        batch_upstream_poll.apply_async(args=[upstream_id, token + 1], countdown=after)
    elif step == "ended":
        batches.batch_finalize(batch_id=batch_id)


@shared_task(queue="async")
def jobs_resume() -> None:
    """Beat: restart async requests and batches whose worker died or whose task was lost."""
    async_requests.async_requests_resume()
    for action, batch_id in batches.batches_resume():
        if action == "start":
            batch_start.apply_async(args=[batch_id])
        elif action == "lane":
            for _ in range(settings.GATEWAY_BATCH_CONCURRENCY):
                batch_lane.apply_async(args=[batch_id])
        else:
            batch_finalize.apply_async(args=[batch_id])
    for upstream_id, token in provider_batches.upstreams_resume():
        batch_upstream_poll.apply_async(args=[upstream_id, token])


@shared_task(queue="async")
def async_requests_purge() -> int:
    """Beat: delete finished async requests older than GATEWAY_ASYNC_RESULT_TTL_S."""
    return async_requests.async_requests_purge()


@shared_task(name="gateway.deployments_probe", ignore_result=True)
def deployments_probe() -> int:
    """Beat: probe every active deployment, recording availability and latency (DeploymentHealth)."""
    from .services import deployments_probe as probe

    return len(probe())


@shared_task(name="gateway.ops_alerts_check", ignore_result=True)
def ops_alerts_check() -> dict:
    """Beat: operational alerts (provider errors and latency, cooldowns, queue backlog)."""
    from .ops_alerts import ops_alerts_check as check

    return check()


@shared_task(queue="async")
def stored_responses_purge() -> int:
    """Beat: delete Responses API answers kept with `store: true` past GATEWAY_RESPONSES_STORE_TTL_S."""
    from .services import stored_responses_purge as purge

    return purge()


@shared_task(queue="async")
def semantic_cache_purge() -> int:
    """Beat: delete semantic cache entries past their TTL (they are never served after it anyway)."""
    from .semantic import entries_purge

    return entries_purge()
