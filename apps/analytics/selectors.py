"""Reads of the ledger."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from django.db.models import Count, Q, Sum

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
        row["completion_tokens"], f"{row['cost']:f}", str(row["is_async"]).lower(), str(row["cached"]).lower(),
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
            "cost": f"{row['cost']:f}",
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
        "saved_cost": f"{row['saved_cost']:f}",
        "price_version": row["price_id"],
        "estimated": row["estimated"],
    }


@dataclass(frozen=True)
class CacheStats:
    requests: int  # answered requests (status 200) that the cache could have served
    hits: int
    saved_usd: Decimal  # what the hits would have cost at the prices in force

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0


def cache_stats(*, tenant_ids, since: datetime | None = None, until: datetime | None = None,
                **filters) -> CacheStats:
    """Response-cache hit rate and saved dollars over the ledger (e.g. filters: model=..., api_key_id=...)."""
    qs = usage_events(tenant_ids=tenant_ids, since=since, until=until, status=200, **filters).order_by()
    agg = qs.aggregate(requests=Count("id"), hits=Count("id", filter=Q(cached=True)),
                       saved=Sum("saved_cost", filter=Q(cached=True)))
    return CacheStats(requests=agg["requests"], hits=agg["hits"], saved_usd=agg["saved"] or Decimal(0))
