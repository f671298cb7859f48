"""The dashboard's model versions page: a rollout's versions side by side, from the rollups, for
the user's tenants only."""

from datetime import date, timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from apps.analytics.selectors import UsageFilters, version_comparison
from apps.analytics.services import usage_rollup_recompute
from tests import factories as f

pytestmark = pytest.mark.django_db

OLD, NEW = "2024-05-13", "2024-08-06"


@pytest.fixture
def rollout(world):
    """acme's `chat`: 4 requests of the old version (one failed), 2 of the new one (slower, dearer);
    globex's own version of `chat`, which acme's people must never see."""
    now = timezone.now()
    for i in range(4):
        f.UsageEventFactory(tenant=world.acme, model="chat", model_version=OLD, latency_ms=40, cost=Decimal("0.001"),
                            prompt_tokens=10, completion_tokens=20, status=502 if i == 0 else 200, timestamp=now)
    for _ in range(2):
        f.UsageEventFactory(tenant=world.acme, model="chat", model_version=NEW, latency_ms=900, cost=Decimal("0.003"),
                            prompt_tokens=30, completion_tokens=60, timestamp=now)
    f.UsageEventFactory(tenant=world.globex, model="chat", model_version="globex-only-version", timestamp=now)
    usage_rollup_recompute(since=now - timedelta(hours=1), until=now + timedelta(minutes=1))
    return world


def test_version_comparison_reads_the_figures_from_the_rollups(rollout):
    today = timezone.now().date()

    [chat] = version_comparison(UsageFilters(tenant_ids=(rollout.acme.id,), since=today, until=today))

    old, new = chat["versions"]
    assert (chat["model"], chat["requests"]) == ("chat", 6)
    assert (old["version"], old["requests"], old["errors"], old["error_rate"]) == (OLD, 4, 1, 0.25)
    assert (new["version"], new["requests"], new["errors"], new["error_rate"]) == (NEW, 2, 0, 0.0)
    assert (old["cost_per_request"], new["cost_per_request"]) == (Decimal("0.001"), Decimal("0.003"))
    assert (old["tokens_per_request"], new["tokens_per_request"]) == (30.0, 90.0)
    assert (old["traffic_pct"], new["traffic_pct"]) == ("66.7", "33.3")
    assert 25 <= old["latency_p50_ms"] <= 50 and 750 <= new["latency_p95_ms"] <= 1000  # the histogram's buckets


def test_versions_page_shows_the_comparison_of_the_users_tenants_only(client, rollout):
    client.force_login(rollout.acme_manager)

    page = client.get("/dashboard/versions/")

    body = page.content.decode()
    assert page.status_code == 200
    assert f'data-version="{OLD}"' in body and f'data-version="{NEW}"' in body
    assert "25.0% (1)" in body and "$0.003" in body and "90.0" in body
    assert "globex-only-version" not in body
    client.force_login(rollout.globex_manager)
    body = client.get("/dashboard/versions/").content.decode()
    assert "globex-only-version" in body and OLD not in body
    assert client.get(f"/dashboard/versions/?tenant={rollout.acme.slug}").content.decode().count("data-version") == 0


def test_versions_page_needs_a_login(client):
    assert client.get("/dashboard/versions/").status_code == 302


def test_versions_page_refuses_bad_dates(client, world):
    client.force_login(world.acme_manager)
    assert client.get("/dashboard/versions/", {"since": date(2026, 2, 1), "until": date(2026, 1, 1)}).status_code == 400


def test_versions_api_gives_the_same_figures_to_the_tenants_people_only(rollout):
    from rest_framework.test import APIClient

    api = APIClient()
    api.force_authenticate(rollout.acme_manager)
    [chat] = api.get("/api/analytics/versions/").json()["models"]
    assert [(v["version"], v["requests"], v["cost_per_request"]) for v in chat["versions"]] == [
        (OLD, 4, "0.001"), (NEW, 2, "0.003")]
    api.force_authenticate(rollout.globex_manager)
    [chat] = api.get("/api/analytics/versions/").json()["models"]
    assert [v["version"] for v in chat["versions"]] == ["globex-only-version"]
