"""Writes of the ledger."""

from __future__ import annotations

from .models import UsageEvent


async def usage_event_record(**fields) -> None:
    """Insert one ledger row; idempotent on request_id (a second insert of the same id is a no-op)."""
    await UsageEvent.objects.abulk_create([UsageEvent(**fields)], ignore_conflicts=True)


def usage_event_record_sync(**fields) -> None:
    UsageEvent.objects.bulk_create([UsageEvent(**fields)], ignore_conflicts=True)
