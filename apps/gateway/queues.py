"""Publishing Celery work by task name: the modules that decide to enqueue (async_requests,
batches) never import the task module, which imports them (tasks are thin entry points)."""

from __future__ import annotations

from celery import current_app

ASYNC_RUN = "gateway.async_request_run"
ASYNC_NOTIFY = "gateway.async_request_notify"
BATCH_START = "gateway.batch_start"
BATCH_LANE = "gateway.batch_lane"
BATCH_FINALIZE = "gateway.batch_finalize"
BATCH_UPSTREAM = "gateway.batch_upstream_poll"

QUEUE_OF = {ASYNC_RUN: "async", ASYNC_NOTIFY: "async", BATCH_START: "batch", BATCH_LANE: "batch",
            BATCH_FINALIZE: "batch", BATCH_UPSTREAM: "batch"}


def publish(name: str, *args, **options) -> None:
    current_app.send_task(name, args=list(args), queue=QUEUE_OF[name], **options)
