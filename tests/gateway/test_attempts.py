"""Every upstream attempt is recorded: on the ledger row, in Prometheus, and in provider availability,
failed tries a fallback hid included."""

from decimal import Decimal

import openai
from prometheus_client import REGISTRY
from rest_framework.test import APIClient

from apps.analytics.models import UsageEvent
from apps.analytics.services import usage_rollup_recent
from apps.keys.models import Role
from tests import factories as f
from tests.keys.personas import member

MSG = [{"role": "user", "content": "hello"}]


def _count(provider, deployment, outcome) -> float:
    return REGISTRY.get_sample_value("llm_upstream_attempts_total",
                                     {"provider": provider, "deployment": deployment, "outcome": outcome}) or 0.0


def _failing_primary(upstream, *, alias="flaky"):
    cred = f.ProviderCredentialFactory()
    primary = f.ProviderFactory(name="primary-up", kind="openai_compatible", api_base=upstream.base_url,
                                credential=cred)
    fallback = f.ProviderFactory(name="mock", kind="mock")
    model_alias = f.ModelAliasFactory(alias=alias)
    bad = f.DeploymentFactory(alias=model_alias, provider=primary, upstream_model="fail-503", priority=0)
    good = f.DeploymentFactory(alias=model_alias, provider=fallback, upstream_model="mock-1", priority=1)
    f.PriceFactory(model=alias, input_usd_per_mtok=Decimal(1), output_usd_per_mtok=Decimal(2))
    return bad, good


def test_failed_fallback_attempts_are_recorded_and_counted_per_provider(live_gateway, upstream):
    bad, good = _failing_primary(upstream)
    key = f.ApiKeyFactory()
    before_err = _count("primary-up", f"{bad.id}:fail-503", "error")
    before_ok = _count("mock", f"{good.id}:mock-1", "ok")
    client = openai.OpenAI(base_url=f"{live_gateway}/v1", api_key=key.secret, max_retries=0)

    resp = client.chat.completions.with_raw_response.create(model="flaky", messages=MSG)

    assert resp.status_code == 200
    event = UsageEvent.objects.get(request_id=resp.headers["x-request-id"])
    assert [(a["provider"], a["outcome"], a["status"]) for a in event.attempts] == [
        ("primary-up", "error", 503), ("primary-up", "error", 503), ("mock", "ok", 200)]
    assert all(a["latency_ms"] >= 0 and a["start_ms"] >= 0 for a in event.attempts)
    assert event.attempts[0]["error"] == "upstream_error"
    assert _count("primary-up", f"{bad.id}:fail-503", "error") - before_err == 2
    assert _count("mock", f"{good.id}:mock-1", "ok") - before_ok == 1
    assert REGISTRY.get_sample_value("llm_upstream_attempt_duration_seconds_count",
                                     {"provider": "primary-up", "deployment": f"{bad.id}:fail-503"}) >= 2


def test_a_stream_records_its_time_to_first_byte(live_gateway, upstream):
    _failing_primary(upstream)
    key = f.ApiKeyFactory()
    client = openai.OpenAI(base_url=f"{live_gateway}/v1", api_key=key.secret, max_retries=0)

    list(client.chat.completions.create(model="flaky", messages=MSG, stream=True))

    attempts = UsageEvent.objects.get().attempts
    assert [a["outcome"] for a in attempts] == ["error", "error", "ok"]
    assert "ttfb_ms" in attempts[-1] and "ttfb_ms" not in attempts[0]


def test_availability_is_below_100_percent_for_a_failing_primary_behind_a_live_fallback(live_gateway, upstream):
    _failing_primary(upstream)
    key = f.ApiKeyFactory()
    manager = member(key.tenant, Role.MANAGER, "mia-manager")
    client = openai.OpenAI(base_url=f"{live_gateway}/v1", api_key=key.secret, max_retries=0)
    for _ in range(3):
        client.chat.completions.create(model="flaky", messages=MSG)  # every request succeeds
    usage_rollup_recent()

    api = APIClient()
    api.force_authenticate(manager)
    providers = {p["provider"]: p for p in api.get("/api/analytics/dashboard/").json()["providers"]}

    assert providers["primary-up"]["availability"] == 0.0
    primary = providers["primary-up"]
    assert primary["ok"] == 0 and primary["error"] == primary["attempts"] >= 3
    assert primary["cooldown"] == 1  # the last request skipped it, cooling down: not a call
    assert primary["latency_avg_ms"] is not None
    assert providers["mock"]["availability"] == 1.0
    assert providers["mock"]["ok"] == 3
    assert providers["primary-up"]["probes"] == 0 and providers["primary-up"]["probe_availability"] is None


def test_probes_are_shown_beside_the_attempts_of_a_provider(db, upstream):
    from datetime import timedelta

    from django.utils import timezone

    from apps.analytics.selectors import UsageFilters, provider_availability
    from apps.analytics.services import usage_rollup_recompute
    from apps.gateway.models import DeploymentHealth

    bad, _good = _failing_primary(upstream)
    now = timezone.now()
    for ok in (True, False, True, True):
        DeploymentHealth.objects.create(deployment=bad, checked_at=now, ok=ok, latency_ms=5)
    event = f.UsageEventFactory(timestamp=now, attempts=[
        {"deployment_id": bad.id, "provider": "primary-up", "model": "fail-503", "outcome": "error", "status": 503,
         "error": "upstream_error", "start_ms": 0.0, "latency_ms": 12.0}])
    usage_rollup_recompute(since=now - timedelta(hours=1), until=now + timedelta(minutes=1))

    rows = provider_availability(UsageFilters(tenant_ids=(event.tenant_id,), since=now.date(), until=now.date()))

    assert [(r["provider"], r["availability"], r["probes"], r["probe_availability"]) for r in rows] == [
        ("primary-up", 0.0, 4, 0.75)]


def test_a_cache_hit_has_no_attempt(live_gateway, upstream):
    _failing_primary(upstream)
    key = f.ApiKeyFactory()
    client = openai.OpenAI(base_url=f"{live_gateway}/v1", api_key=key.secret, max_retries=0)
    for _ in range(2):
        client.chat.completions.create(model="flaky", messages=MSG, temperature=0, extra_body={"cache": True})

    rows = list(UsageEvent.objects.order_by("timestamp"))
    assert [r.cached for r in rows] == [False, True]
    assert len(rows[0].attempts) == 3 and rows[1].attempts == []
