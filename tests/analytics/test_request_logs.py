"""Request logs: what a request sent and got back, with its attempts, for tenants that turned them
on; readable by the tenant's managers by request id, by no one else; redacted; kept for the
tenant's retention."""

import time
from datetime import timedelta
from decimal import Decimal

import openai
import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from apps.analytics.models import RequestLog, RequestLogPolicy, UsageEvent
from apps.analytics.request_logs import request_log_settings, request_logs_purge, request_logs_write
from apps.keys.models import Role
from tests import factories as f
from tests.keys.personas import member

LEAKED = "sk-live-0123456789abcdefXYZ"


def _wait_for_log(request_id: str) -> RequestLog:
    """The server writes logs in the background: poll for the row, with a bound."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        row = RequestLog.objects.filter(request_id=request_id).first()
        if row is not None:
            return row
        time.sleep(0.02)
    raise AssertionError(f"no request log for {request_id}")


def _flaky_alias(upstream, alias="flaky"):
    cred = f.ProviderCredentialFactory()
    primary = f.ProviderFactory(name="primary-up", kind="openai_compatible", api_base=upstream.base_url,
                                credential=cred)
    model_alias = f.ModelAliasFactory(alias=alias)
    f.DeploymentFactory(alias=model_alias, provider=primary, upstream_model="fail-503", priority=0)
    f.DeploymentFactory(alias=model_alias, provider=f.ProviderFactory(name="mock", kind="mock"),
                        upstream_model="mock-1", priority=1)
    f.PriceFactory(model=alias, input_usd_per_mtok=Decimal(1), output_usd_per_mtok=Decimal(2))


@pytest.fixture
def logged(live_gateway, upstream):
    """A tenant logging bodies, a manager of it, a manager of another tenant, and an SDK client."""
    _flaky_alias(upstream)
    key = f.ApiKeyFactory(name="bot-key")
    RequestLogPolicy.objects.create(tenant=key.tenant, bodies=True, retention_days=7)
    other = f.TenantFactory(slug="other-co")
    client = openai.OpenAI(base_url=f"{live_gateway}/v1", api_key=key.secret, max_retries=0)
    return {"key": key, "client": client, "manager": member(key.tenant, Role.MANAGER, "mo-manager"),
            "outsider": member(other, Role.MANAGER, "oz-manager")}


def _api(user) -> APIClient:
    api = APIClient()
    api.force_authenticate(user)
    return api


def test_a_request_log_is_readable_by_its_tenants_manager_and_404_for_another_tenant(logged):
    resp = logged["client"].chat.completions.with_raw_response.create(
        model="flaky", messages=[{"role": "user", "content": f"my key is {LEAKED}, say hi"}])
    request_id = resp.headers["x-request-id"]
    _wait_for_log(request_id)

    got = _api(logged["manager"]).get(f"/api/request-logs/{request_id}/")
    assert got.status_code == 200
    log = got.json()
    assert (log["request_id"], log["status"], log["model"], log["key"]) == (request_id, 200, "flaky", "bot-key")
    assert [(a["provider"], a["outcome"]) for a in log["attempts"]] == [
        ("primary-up", "error"), ("primary-up", "error"), ("mock", "ok")]
    assert log["timings"]["total_ms"] >= 0 and "ledger_ms" in log["timings"]
    assert "say hi" in log["request_body"] and '"model":"flaky"' in log["request_body"]
    assert resp.parse().choices[0].message.content.replace(LEAKED, "[REDACTED]") in log["response_body"]

    assert _api(logged["outsider"]).get(f"/api/request-logs/{request_id}/").status_code == 404
    assert _api(logged["outsider"]).get("/api/request-logs/").json()["results"] == []


def test_a_key_like_string_in_a_body_is_redacted_before_storage(logged):
    resp = logged["client"].chat.completions.with_raw_response.create(
        model="flaky", messages=[{"role": "user", "content": f"my key is {LEAKED} and Bearer abc.def.ghi-123"}])

    row = _wait_for_log(resp.headers["x-request-id"])

    assert LEAKED not in row.request_body and "abc.def.ghi-123" not in row.request_body
    assert "[REDACTED]" in row.request_body
    assert LEAKED not in row.response_body  # the mock echoes the prompt: redacted there too
    assert not RequestLog.objects.filter(request_body__contains="0123456789abcdef").exists()


def test_a_streamed_answer_is_logged_assembled(logged):
    resp = logged["client"].chat.completions.with_raw_response.create(
        model="flaky", messages=[{"role": "user", "content": "stream please"}], stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in resp.parse() if c.choices)

    row = _wait_for_log(resp.headers["x-request-id"])

    assert row.stream and text and f'"content":"{text}"' in row.response_body
    assert '"object":"chat.completion"' in row.response_body
    assert row.attempts[-1]["outcome"] == "ok" and "ttfb_ms" in row.attempts[-1]


def test_the_list_filters_and_searches_the_bodies(logged):
    ids = []
    for word in ("apples", "pears"):
        resp = logged["client"].chat.completions.with_raw_response.create(
            model="flaky", messages=[{"role": "user", "content": f"I like {word}"}])
        ids.append(resp.headers["x-request-id"])
    for rid in ids:
        _wait_for_log(rid)
    api = _api(logged["manager"])

    found = api.get("/api/request-logs/", {"q": "pears"}).json()["results"]
    assert [r["request_id"] for r in found] == [ids[1]]
    assert "request_body" not in found[0]  # the list is light: open one for its bodies
    both = api.get("/api/request-logs/", {"model": "flaky", "status": 200, "key": "bot-key"}).json()["results"]
    assert len(both) == 2
    assert api.get("/api/request-logs/", {"status": 502}).json()["results"] == []
    later = (timezone.now() + timedelta(hours=1)).isoformat()
    assert api.get("/api/request-logs/", {"since": later}).json()["results"] == []
    assert api.get("/api/request-logs/", {"since": "yesterday"}).status_code == 400


def test_bodies_are_never_stored_for_a_tenant_that_did_not_turn_them_on(live_gateway, upstream):
    _flaky_alias(upstream)
    meta_only = f.ApiKeyFactory()
    RequestLogPolicy.objects.create(tenant=meta_only.tenant, bodies=False)
    silent = f.ApiKeyFactory()
    for key in (meta_only, silent):
        client = openai.OpenAI(base_url=f"{live_gateway}/v1", api_key=key.secret, max_retries=0)
        client.chat.completions.create(model="flaky", messages=[{"role": "user", "content": "secret plans"}])

    row = _wait_for_log(UsageEvent.objects.get(tenant=meta_only.tenant).request_id)
    assert (row.request_body, row.response_body) == ("", "")
    assert len(row.attempts) == 3
    assert UsageEvent.objects.filter(tenant=silent.tenant).exists()
    assert not RequestLog.objects.filter(tenant=silent.tenant).exists()


def _entry(tenant, request_id, *, days_ago=0, **extra):
    policy = request_log_settings(tenant_id=tenant.id)
    return {"policy": policy, "request_id": request_id, "tenant_id": tenant.id,
            "timestamp": timezone.now() - timedelta(days=days_ago), "status": 200, "request": {"x": 1},
            "response": {"y": 2}, **extra}


@pytest.mark.django_db
def test_retention_deletes_old_logs():
    short, long_ = f.TenantFactory(), f.TenantFactory()
    RequestLogPolicy.objects.create(tenant=short, bodies=True, retention_days=7)
    RequestLogPolicy.objects.create(tenant=long_, bodies=True, retention_days=90)
    request_logs_write(entries=[_entry(short, "old", days_ago=8), _entry(short, "new", days_ago=6),
                                _entry(long_, "kept", days_ago=30)])
    RequestLogPolicy.objects.filter(tenant=long_).update(enabled=False)  # off: retention still applies

    assert request_logs_purge() == 1
    assert sorted(RequestLog.objects.values_list("request_id", flat=True)) == ["kept", "new"]


@pytest.mark.django_db
def test_tenant_patterns_are_redacted_and_bodies_capped(settings):
    settings.REQUEST_LOG_MAX_BODY_BYTES = 64
    tenant = f.TenantFactory()
    RequestLogPolicy.objects.create(tenant=tenant, bodies=True, redact_patterns=[r"ACCT-\d+"])
    request_logs_write(entries=[_entry(tenant, "r1", request={"note": "pay ACCT-991 now"},
                                       response={"text": "z" * 500})])

    row = RequestLog.objects.get(request_id="r1")
    assert "ACCT-991" not in row.request_body and "[REDACTED]" in row.request_body
    assert row.response_truncated and len(row.response_body.encode()) <= 64
    assert not row.request_truncated


@pytest.mark.django_db
def test_the_requests_page_lists_and_opens_a_tenants_logs_only(client):
    mine, theirs = f.TenantFactory(), f.TenantFactory()
    for tenant in (mine, theirs):
        RequestLogPolicy.objects.create(tenant=tenant, bodies=True)
    request_logs_write(entries=[_entry(mine, "req_mine", request={"messages": "find the needle"}),
                                _entry(theirs, "req_theirs")])
    client.force_login(member(mine, Role.MANAGER, "page-manager"))

    listed = client.get("/dashboard/requests/", {"q": "needle"}).content.decode()
    assert "req_mine" in listed and "req_theirs" not in listed
    assert "req_mine" not in client.get("/dashboard/requests/", {"q": "haystack"}).content.decode()
    opened = client.get("/dashboard/requests/req_mine/")
    assert opened.status_code == 200 and "find the needle" in opened.content.decode()
    assert client.get("/dashboard/requests/req_theirs/").status_code == 404
    assert client.get("/dashboard/requests/", {"since": "soon"}).status_code == 400
