"""/metrics, /healthz and /readyz."""

from decimal import Decimal

import orjson
import pytest
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from apps.analytics.services import usage_rollup_recent
from tests import factories as f

pytestmark = pytest.mark.django_db


def samples(client) -> dict:
    resp = client.get("/metrics")
    assert resp.status_code == 200
    out = {}
    for family in text_string_to_metric_families(resp.content.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(all_samples, name, **labels):
    return all_samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_gateway_requests_are_counted_with_tokens_cost_and_latency(client, setup):
    before = samples(client)
    body = {"model": setup.alias, "messages": [{"role": "user", "content": "count me"}]}
    resp = client.post("/v1/chat/completions", data=orjson.dumps(body), content_type="application/json",
                       HTTP_AUTHORIZATION=f"Bearer {setup.secret}")
    assert resp.status_code == 200
    after = samples(client)
    usage = resp.json()["usage"]
    assert value(after, "llm_requests_total", model=setup.alias, status="200") - \
        value(before, "llm_requests_total", model=setup.alias, status="200") == 1
    assert value(after, "llm_tokens_total", model=setup.alias, kind="completion") - \
        value(before, "llm_tokens_total", model=setup.alias, kind="completion") == usage["completion_tokens"]
    assert value(after, "llm_cost_usd_total", model=setup.alias) > value(before, "llm_cost_usd_total",
                                                                         model=setup.alias)
    assert value(after, "llm_request_duration_seconds_count", model=setup.alias, status="200") >= 1
    assert value(after, "llm_provider_request_duration_seconds_count", provider=setup.provider.name) >= 1


def test_budget_utilisation_gauge(client, world):
    f.UsageEventFactory(tenant=world.acme, cost=Decimal("2.5"), timestamp=timezone.now())
    usage_rollup_recent()
    s = samples(client)
    assert value(s, "llm_budget_utilisation", tenant="acme", budget="acme-monthly", period="monthly") == 0.25
    assert value(s, "llm_budget_spend_usd", tenant="globex", budget="globex-monthly", period="monthly") == 0


def test_process_metrics_are_exposed(client, db):
    assert b"python_info" in client.get("/metrics").content


def test_healthz(client):
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_checks_database_broker_and_redis(client, db, settings):
    body = client.get("/readyz").json()
    assert body["status"] == "ok"
    assert body["checks"]["database"] == "ok"
    assert "broker" in body["checks"]
    if settings.REDIS_URL:
        assert body["checks"]["redis"] == "ok"
    assert body["providers"] == []


def test_readyz_fails_when_redis_is_unreachable(client, db, settings):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    resp = client.get("/readyz")
    assert resp.status_code == 503
    assert resp.json()["checks"]["redis"].startswith("error")


def test_unknown_model_names_do_not_become_labels(client, setup):
    body = {"model": "made-up-model-123", "messages": [{"role": "user", "content": "x"}]}
    resp = client.post("/v1/chat/completions", data=orjson.dumps(body), content_type="application/json",
                       HTTP_AUTHORIZATION=f"Bearer {setup.secret}")
    assert resp.status_code == 404
    text = client.get("/metrics").content.decode()
    assert "made-up-model-123" not in text
    assert 'llm_requests_total{model="(unknown)",status="404"}' in text


def test_metrics_name_every_tenant_so_only_loopback_or_the_token_may_scrape(client, settings):
    f.BudgetFactory(tenant=f.TenantFactory(slug="acme"), name="acme-monthly")

    assert client.get("/metrics", REMOTE_ADDR="203.0.113.7").status_code == 403  # e.g. a /v1 client
    assert b"acme-monthly" in client.get("/metrics").content  # loopback (the embedded default)

    settings.METRICS_TOKEN = "scrape-secret"
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    scraped = client.get("/metrics", REMOTE_ADDR="203.0.113.7", HTTP_AUTHORIZATION="Bearer scrape-secret")
    assert scraped.status_code == 200
    assert b"acme-monthly" in scraped.content


def test_readyz_tells_other_hosts_the_status_alone(client, setup, settings):
    body = {"model": setup.alias, "messages": [{"role": "user", "content": "x"}]}
    assert client.post("/v1/chat/completions", data=orjson.dumps(body), content_type="application/json",
                       HTTP_AUTHORIZATION=f"Bearer {setup.secret}").status_code == 200
    usage_rollup_recent()
    details = client.get("/readyz").json()  # loopback: the details
    assert [p["provider"] for p in details["providers"]] == [setup.provider.name]

    resp = client.get("/readyz", REMOTE_ADDR="203.0.113.7")  # e.g. a /v1 client or the internet

    assert resp.status_code == 200
    assert resp.json() == {"status": "ok"}
    assert setup.provider.name.encode() not in resp.content


def test_readyz_details_need_the_metrics_token_when_one_is_set(client, db, settings):
    settings.METRICS_TOKEN = "scrape-secret"
    assert client.get("/readyz").json() == {"status": "ok"}  # loopback too, as for /metrics
    assert client.get("/readyz", HTTP_AUTHORIZATION="Bearer wrong").json() == {"status": "ok"}

    body = client.get("/readyz", REMOTE_ADDR="203.0.113.7", HTTP_AUTHORIZATION="Bearer scrape-secret").json()

    assert body["checks"]["database"] == "ok"


def test_readyz_status_code_holds_without_the_details(client, db, settings):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    resp = client.get("/readyz", REMOTE_ADDR="203.0.113.7")
    assert resp.status_code == 503
    assert resp.json() == {"status": "unavailable"}
