"""Writes of the ledger."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Case, Count, F, IntegerField, Q, Sum, Value, When
from django.db.models.functions import Coalesce, TruncDay, TruncHour
from django.utils import timezone

from .models import LATENCY_BUCKETS_MS, LATENCY_FIELDS, UsageEvent, UsageRollupDaily, UsageRollupHourly


async def usage_event_record(**fields) -> None:
    """Insert one ledger row; idempotent on request_id (a second insert of the same id is a no-op)."""
    await UsageEvent.objects.abulk_create([UsageEvent(**fields)], ignore_conflicts=True)


def usage_event_record_sync(**fields) -> None:
    UsageEvent.objects.bulk_create([UsageEvent(**fields)], ignore_conflicts=True)


# --- rollups ----------------------------------------------------------------------------------

ROLLUP_LOCK_ID = 7_000_001


def _hour_floor(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _day_floor(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def _insert_select(model, qs, columns: list[str]) -> int:
    """INSERT INTO <model's table> (columns) <qs's SELECT>: aggregates never leave the database."""
    sql, params = qs.query.sql_with_params()
    table = connection.ops.quote_name(model._meta.db_table)
    cols = ", ".join(connection.ops.quote_name(c) for c in columns)
    with connection.cursor() as cur:
        cur.execute(f"INSERT INTO {table} ({cols}) {sql}", params)  # noqa: S608 - our own compiled SQL
        return cur.rowcount


def _status_class():
    return Case(When(status__lt=300, then=Value(2)), When(status__lt=500, then=Value(4)), default=Value(5),
                output_field=IntegerField())


def _latency_counts() -> dict:
    out, lower = {}, None
    for upper, name in zip(LATENCY_BUCKETS_MS, LATENCY_FIELDS, strict=False):
        cond = Q(latency_ms__lte=upper) if lower is None else Q(latency_ms__gt=lower, latency_ms__lte=upper)
        out[name] = Count("id", filter=cond)
        lower = upper
    out["lat_inf"] = Count("id", filter=Q(latency_ms__gt=LATENCY_BUCKETS_MS[-1]))
    return out


def usage_rollup_recompute(*, since: datetime, until: datetime) -> dict[str, int]:
    """Recompute the hourly rollups of every hour touching [since, until) and the daily rollups of
    every UTC day touching it. Idempotent: the buckets are deleted and rebuilt from the ledger in
    one transaction, so it can run as often as wanted and late ledger rows are picked up."""
    h_start, h_end = _hour_floor(since), _hour_floor(until)
    if h_end < until:
        h_end += timedelta(hours=1)
    d_start, d_end = _day_floor(h_start), _day_floor(h_end)
    if d_end < h_end:
        d_end += timedelta(days=1)
    dims = {
        "d_tenant": F("tenant_id"), "d_model": F("model"), "d_provider": F("provider"),
        "d_source_type": F("source_type"), "d_source_ref": F("source_ref"),
        "d_source_id": Coalesce("source_id", Value(0)), "d_api_key_id": Coalesce("api_key_id", Value(0)),
        "d_budget_id": F("budget_id"),
    }
    hourly = (
        UsageEvent.objects.filter(timestamp__gte=h_start, timestamp__lt=h_end).order_by()
        .annotate(d_bucket=TruncHour("timestamp", tzinfo=UTC), **dims, d_status_class=_status_class())
        .values("d_bucket", *dims, "d_status_class")
        .annotate(
            a_requests=Count("id"), a_errors=Count("id", filter=Q(status__gte=400)),
            a_cache_hits=Count("id", filter=Q(cached=True)), a_prompt=Sum("prompt_tokens"),
            a_completion=Sum("completion_tokens"), a_cost=Sum("cost"), a_saved=Sum("saved_cost"),
            a_latency=Sum("latency_ms"), **{f"a_{k}": v for k, v in _latency_counts().items()},
        )
    )
    measure_cols = ["requests", "errors", "cache_hits", "prompt_tokens", "completion_tokens", "cost", "saved_cost",
                    "latency_ms_sum", *LATENCY_FIELDS]
    dim_cols = ["bucket", "tenant_id", "model", "provider", "source_type", "source_ref", "source_id", "api_key_id",
                "budget_id", "status_class"]
    with transaction.atomic():
        if connection.vendor == "postgresql":  # one recompute at a time (beat overlap, manual runs)
            with connection.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", [ROLLUP_LOCK_ID])
        UsageRollupHourly.objects.filter(bucket__gte=h_start, bucket__lt=h_end).delete()
        n_hourly = _insert_select(UsageRollupHourly, hourly, dim_cols + measure_cols)
        day_dims = {f"d_{c}": F(c) for c in dim_cols[1:]}
        daily = (
            UsageRollupHourly.objects.filter(bucket__gte=d_start, bucket__lt=d_end).order_by()
            .annotate(d_bucket=TruncDay("bucket", tzinfo=UTC), **day_dims)
            .values("d_bucket", *day_dims)
            .annotate(**{f"a_{c}": Sum(c) for c in measure_cols})
        )
        UsageRollupDaily.objects.filter(bucket__gte=d_start, bucket__lt=d_end).delete()
        n_daily = _insert_select(UsageRollupDaily, daily, dim_cols + measure_cols)
    return {"hourly": n_hourly, "daily": n_daily}


def usage_rollup_recent(*, now: datetime | None = None) -> dict[str, int]:
    """What the beat task runs: recompute the last ANALYTICS_ROLLUP_LOOKBACK_H hours."""
    now = now or timezone.now()
    return usage_rollup_recompute(since=now - timedelta(hours=settings.ANALYTICS_ROLLUP_LOOKBACK_H),
                                  until=now + timedelta(seconds=1))
