"""Celery entry points of analytics."""

from celery import shared_task

from .services import ledger_stream_drain


@shared_task(name="analytics.ledger_stream_drain")
def ledger_stream_drain_task() -> int:
    """Only used with GATEWAY_LEDGER_WRITER=redis-stream (an experiment; see docs/benchmark.md)."""
    return ledger_stream_drain()
