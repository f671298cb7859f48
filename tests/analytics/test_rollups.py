import re
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest

from apps.analytics.models import UsageRollupDaily, UsageRollupHourly
from apps.analytics.selectors import UsageFilters, latency_percentile, usage_breakdown, usage_series, usage_totals
from apps.analytics.services import usage_rollup_recompute
from tests import factories as f

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 3, 10, 9, 15, tzinfo=UTC)


def _events(tenant, **kw):
    key = f.ApiKeyFactory(tenant=tenant, name="k1")
    base = {"tenant": tenant, "api_key": key, "source": key.source, "source_ref": key.source.name}
    f.UsageEventFactory(**base, timestamp=T0, cost=Decimal("0.10"), latency_ms=40, **kw)
    f.UsageEventFactory(**base, timestamp=T0 + timedelta(minutes=10), cost=Decimal("0.20"), latency_ms=400,
                        cached=True, saved_cost=Decimal("0.05"), **kw)
    f.UsageEventFactory(**base, timestamp=T0 + timedelta(hours=1), cost=Decimal("0"), status=502, latency_ms=900,
                        provider="up-a", **kw)
    f.UsageEventFactory(**base, timestamp=T0 + timedelta(days=1), cost=Decimal("1.00"), latency_ms=100,
                        model="other", **kw)
    return key


def _filters(tenant, **kw):
    return UsageFilters(tenant_ids=(tenant.id,), since=date(2026, 3, 10), until=date(2026, 3, 11), **kw)


def test_recompute_builds_hourly_and_daily_rollups_matching_the_ledger():
    tenant = f.TenantFactory()
    _events(tenant)
    usage_rollup_recompute(since=T0 - timedelta(days=1), until=T0 + timedelta(days=2))
    assert UsageRollupHourly.objects.filter(tenant=tenant).count() == 3
    assert sum(r.requests for r in UsageRollupDaily.objects.filter(tenant=tenant)) == 4
    totals = usage_totals(_filters(tenant, granularity="day"))
    assert totals["requests"] == 4
    assert totals["cost"] == Decimal("1.30")
    assert totals["saved_cost"] == Decimal("0.05")
    assert totals["cache_hit_rate"] == 0.25
    assert totals["error_rate"] == 0.25
    assert totals["tokens"] == 4 * 30


def test_recompute_is_idempotent_and_picks_up_late_rows():
    tenant = f.TenantFactory()
    key = _events(tenant)
    for _ in range(2):
        usage_rollup_recompute(since=T0 - timedelta(hours=1), until=T0 + timedelta(days=2))
    assert usage_totals(_filters(tenant))["requests"] == 4
    f.UsageEventFactory(tenant=tenant, api_key=key, timestamp=T0 + timedelta(minutes=1), cost=Decimal("0.5"))
    usage_rollup_recompute(since=T0, until=T0 + timedelta(minutes=2))
    totals = usage_totals(_filters(tenant))
    assert totals["requests"] == 5
    assert totals["cost"] == Decimal("1.80")


def test_series_breakdowns_and_filters():
    tenant = f.TenantFactory()
    _events(tenant)
    usage_rollup_recompute(since=T0 - timedelta(days=1), until=T0 + timedelta(days=2))
    hourly = usage_series(_filters(tenant, granularity="hour"))
    assert [r["requests"] for r in hourly] == [2, 1, 1]
    assert [r["bucket"].hour for r in hourly] == [9, 10, 9]
    by_model = usage_breakdown(_filters(tenant), "model")
    assert [(r["label"], r["cost"]) for r in by_model] == [("other", Decimal("1.00")), ("gpt-4o-mini", Decimal("0.30"))]
    assert usage_breakdown(_filters(tenant), "key")[0]["label"] == "k1"
    only_other = usage_totals(_filters(tenant, model="other"))
    assert only_other["requests"] == 1


def test_rollups_are_per_tenant():
    mine, theirs = f.TenantFactory(), f.TenantFactory()
    _events(mine)
    f.UsageEventFactory(tenant=theirs, timestamp=T0, cost=Decimal("9"))
    usage_rollup_recompute(since=T0 - timedelta(days=1), until=T0 + timedelta(days=2))
    assert usage_totals(_filters(mine))["cost"] == Decimal("1.30")
    assert usage_totals(_filters(theirs))["cost"] == Decimal("9")


def test_latency_percentile_interpolates_within_bucket():
    # 10 requests at <=25 ms, 10 in (25, 50]
    hist = [10, 10] + [0] * 14
    assert latency_percentile(hist, 0.5) == 25
    assert latency_percentile(hist, 0.95) == 48
    assert latency_percentile([0] * 16, 0.5) is None


@pytest.mark.parametrize("tz", ["UTC", "Europe/Berlin", "America/New_York"])
def test_budget_spend_is_the_ledger_of_each_period_in_the_tenants_time_zone(tz):
    """The one budget_spend read (admission, /v1/budget, dashboard, /metrics) rebuilds a missing
    counter from the ledger of the budget's calendar period in the tenant's zone."""
    from apps.analytics.models import UsageEvent
    from apps.billing.budgets import budget_statuses_sync
    from apps.billing.models import Budget
    from apps.billing.periods import period_bounds

    tenant = f.TenantFactory(timezone=tz)
    for period in ("monthly", "weekly", "daily", "total"):
        f.BudgetFactory(tenant=tenant, name=period, period=period)
    now = datetime(2026, 3, 18, 15, 30, tzinfo=UTC)  # a Wednesday
    at = datetime(2026, 2, 27, tzinfo=UTC)
    while at < now:  # one event every 5 hours, 0.01 each
        f.UsageEventFactory(tenant=tenant, timestamp=at, cost=Decimal("0.01"))
        at += timedelta(hours=5)

    for b in budget_statuses_sync(budgets=Budget.objects.filter(tenant=tenant), at=now):
        start, end = period_bounds(period=b.period, tz=tz, at=now)
        ledger = UsageEvent.objects.filter(tenant=tenant, timestamp__gte=start)
        assert b.spent_usd == sum(e.cost for e in ledger), b.name
        assert b.spent_usd > 0


@pytest.mark.parametrize("model", ["UsageRollupHourly", "UsageRollupDaily", "AttemptRollupHourly"])
def test_the_recent_recompute_finds_its_buckets_by_index_not_by_reading_every_rollup(model):
    """The beat recomputes the last hours of every tenant each minute: it deletes and re-reads rollups
    by bucket alone. Without an index led by the bucket, PostgreSQL scanned all of the (tenant,
    bucket) index, i.e. every rollup ever kept (0.06 s at 1M ledger rows, growing with the history:
    docs/ledger-at-scale.md)."""
    from django.db import connection

    from apps.analytics import models

    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL query plans")
    qs = getattr(models, model).objects.filter(bucket__gte=T0, bucket__lt=T0 + timedelta(hours=3))
    with connection.cursor() as cur:
        cur.execute("SET LOCAL enable_seqscan = off")  # an empty test table would be read whole anyway
    plan = qs.explain()

    assert "Index Cond: ((bucket >= " in plan
    assert re.search(r"\b(rollup_h|rollup_d|attempt_h)_bucket\b", plan) and "tenant_bucket" not in plan, plan
