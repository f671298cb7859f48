"""cache_stats: the response cache's hit rate and saved dollars, read from the ledger."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from apps.analytics.selectors import cache_stats
from tests import factories as f

pytestmark = pytest.mark.django_db


def test_hit_rate_and_saved_dollars_per_tenant_and_period():
    tenant, other = f.TenantFactory(), f.TenantFactory()
    now = timezone.now()
    f.UsageEventFactory(tenant=tenant, cost=Decimal("0.002"))
    f.UsageEventFactory(tenant=tenant, cached=True, cost=0, saved_cost=Decimal("0.002"))
    f.UsageEventFactory(tenant=tenant, cached=True, cost=0, saved_cost=Decimal("0.0005"))
    f.UsageEventFactory(tenant=tenant, status=502)  # failures are not answered requests
    f.UsageEventFactory(tenant=tenant, cached=True, saved_cost=Decimal("9"), timestamp=now - timedelta(days=40))
    f.UsageEventFactory(tenant=other, cached=True, saved_cost=Decimal("7"))

    stats = cache_stats(tenant_ids=[tenant.id], since=now - timedelta(days=1))

    assert (stats.requests, stats.hits, stats.saved_usd) == (3, 2, Decimal("0.0025"))
    assert stats.hit_rate == pytest.approx(2 / 3)


def test_no_traffic_is_a_zero_hit_rate():
    stats = cache_stats(tenant_ids=[f.TenantFactory().id])

    assert (stats.requests, stats.hits, stats.saved_usd, stats.hit_rate) == (0, 0, Decimal(0), 0.0)


def test_cache_hits_through_the_gateway_show_up(client, setup, upstream):
    import orjson

    body = orjson.dumps({"model": setup.alias, "messages": [{"role": "user", "content": "x"}], "temperature": 0})
    for _ in range(4):
        client.post("/v1/chat/completions", data=body, content_type="application/json",
                    HTTP_AUTHORIZATION=f"Bearer {setup.secret}")

    stats = cache_stats(tenant_ids=[setup.tenant.id])
    assert (stats.requests, stats.hits) == (4, 3)
    assert stats.saved_usd > 0
