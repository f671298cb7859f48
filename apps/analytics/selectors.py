"""Reads of the ledger."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

from .models import UsageEvent

CSV_COLUMNS = [
    "request_id", "timestamp", "tenant", "source_type", "source_id", "key", "request_type", "model",
    "prompt_tokens", "completion_tokens", "cost", "async", "cached", "batch_id", "budget_id", "status",
    "latency_ms",
]


def usage_events(*, tenant_ids, since: datetime | None = None, until: datetime | None = None, **filters):
    qs = UsageEvent.objects.filter(tenant_id__in=tenant_ids, **filters)
    if since is not None:
        qs = qs.filter(timestamp__gte=since)
    if until is not None:
        qs = qs.filter(timestamp__lt=until)
    return qs.order_by("timestamp", "id")


_EXPORT_FIELDS = (
    "request_id", "timestamp", "tenant__slug", "source_type", "source_ref", "api_key__name", "request_type",
    "model", "prompt_tokens", "completion_tokens", "cost", "is_async", "cached", "batch_id", "budget_id",
    "status", "latency_ms", "saved_cost", "price_id", "deployment_id", "estimated",
)


def usage_export_rows(qs) -> Iterator[dict]:
    """Ledger rows as flat dicts, streamed from the database in chunks (constant memory)."""
    yield from qs.values(*_EXPORT_FIELDS).iterator(chunk_size=2000)


def csv_row(row: dict) -> list:
    return [
        row["request_id"], row["timestamp"].isoformat(), row["tenant__slug"], row["source_type"], row["source_ref"],
        row["api_key__name"] or "", row["request_type"], row["model"], row["prompt_tokens"],
        row["completion_tokens"], str(row["cost"]), str(row["is_async"]).lower(), str(row["cached"]).lower(),
        row["batch_id"], row["budget_id"], row["status"], row["latency_ms"],
    ]


def seed_usage_event(row: dict) -> dict:
    """A ledger row in the seed's usage-event shape, with our extra fields beside it."""
    return {
        "usage_event": {
            "timestamp": row["timestamp"].isoformat(),
            "source": {"type": row["source_type"], "id": row["source_ref"]},
            "request_type": row["request_type"],
            "tokens": {"prompt": row["prompt_tokens"], "completion": row["completion_tokens"]},
            "model": row["model"],
            "cost": str(row["cost"]),
            "metadata": {
                "async": row["is_async"],
                "cached": row["cached"],
                "batch_id": row["batch_id"] or None,
                "budget_id": row["budget_id"] or None,
            },
        },
        "request_id": row["request_id"],
        "tenant": row["tenant__slug"],
        "key": row["api_key__name"],
        "deployment_id": row["deployment_id"],
        "status": row["status"],
        "latency_ms": row["latency_ms"],
        "saved_cost": str(row["saved_cost"]),
        "price_version": row["price_id"],
        "estimated": row["estimated"],
    }


def usage_by_batch(*, tenant_ids, batch_id: str | None = None, since: datetime | None = None,
                   until: datetime | None = None) -> list[dict]:
    """The ledger grouped by the seed's batch_id (requests without one are left out): per batch the
    number of requests, of failed ones, tokens, cost, and the first and last timestamp. Newest first."""
    from django.db.models import Count, Max, Min, Q, Sum

    qs = usage_events(tenant_ids=tenant_ids, since=since, until=until).exclude(batch_id="")
    if batch_id is not None:
        qs = qs.filter(batch_id=batch_id)
    rows = (
        qs.order_by()
        .values("tenant_id", "batch_id")
        .annotate(
            requests=Count("id"),
            failed=Count("id", filter=Q(status__gte=400)),
            prompt_tokens=Sum("prompt_tokens"),
            completion_tokens=Sum("completion_tokens"),
            cost=Sum("cost"),
            first_at=Min("timestamp"),
            last_at=Max("timestamp"),
        )
        .order_by("-last_at")
    )
    return list(rows)
