"""Celery entry points of analytics: idempotent, safe to run concurrently or twice."""

from celery import shared_task

from . import services


@shared_task(name="analytics.usage_rollup_recent", ignore_result=True)
def usage_rollup_recent() -> dict:
    return services.usage_rollup_recent()


@shared_task(name="analytics.ledger_stream_drain")
def ledger_stream_drain_task() -> int:
    """Only used with GATEWAY_LEDGER_WRITER=redis-stream (an experiment; see docs/benchmark.md)."""
    return services.ledger_stream_drain()


@shared_task(name="analytics.ledger_replay", ignore_result=True)
def ledger_replay_task() -> dict:
    """Replay the ledger journal of this worker's host into the ledger (apps/analytics/journal.py)."""
    from .journal import ledger_replay

    return ledger_replay()


@shared_task(name="analytics.ledger_upkeep", ignore_result=True)
def ledger_upkeep_task() -> dict:
    """Create the ledger's partitions ahead; archive and drop what retention lets go (PostgreSQL)."""
    from .archive import ledger_upkeep

    return ledger_upkeep()
