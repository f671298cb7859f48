"""The DRF management API: scoped to the caller's tenants, writes by role, audited."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from apps.analytics.services import usage_rollup_recompute
from apps.keys import crypto
from apps.keys.models import ApiKey, AuditLog, Membership
from tests import factories as f

pytestmark = pytest.mark.django_db


def api(user) -> APIClient:
    c = APIClient()
    c.force_authenticate(user)
    return c


def names(resp, field="name"):
    assert resp.status_code == 200, resp.content
    return {r[field] for r in resp.json()["results"]}


def test_anonymous_is_refused():
    assert APIClient().get("/api/keys/").status_code in (401, 403)


@pytest.mark.parametrize(("url", "field", "mine", "theirs"), [
    ("/api/tenants/", "slug", "acme", "globex"),
    ("/api/sources/", "name", "acme-bot", "globex-etl"),
    ("/api/keys/", "name", "acme-key", "globex-key"),
    ("/api/budgets/", "name", "acme-monthly", "globex-monthly"),
    ("/api/members/", "username", "max-manager", "gil-manager"),
])
def test_lists_are_scoped_to_the_callers_tenants(world, url, field, mine, theirs):
    seen = names(api(world.acme_viewer).get(url), field)
    assert mine in seen
    assert theirs not in seen
    assert theirs in names(api(world.root).get(url), field)


def test_foreign_objects_are_404(world):
    c = api(world.acme_admin)
    assert c.get(f"/api/keys/{world.globex_key.pk}/").status_code == 404
    assert c.patch(f"/api/budgets/{world.globex_budget.pk}/", {"limit_usd": "1"}).status_code == 404
    assert c.delete(f"/api/sources/{world.globex_source.pk}/").status_code == 404
    assert c.get("/api/tenants/globex/").status_code == 404


def test_admin_creates_key_and_gets_secret_once(world):
    c = api(world.acme_admin)
    resp = c.post("/api/keys/", {"tenant": "acme", "source": world.acme_source.pk, "name": "api-made",
                                 "allowed_models": ["gpt-4o-mini"], "rpm": 10,
                                 "allowed_endpoints": ["/v1/chat/completions"]}, format="json")
    assert resp.status_code == 201, resp.content
    secret = resp.json()["secret"]
    key = ApiKey.objects.get(name="api-made")
    assert key.digest == crypto.api_key_digest(secret)
    assert key.allowed_models == ["gpt-4o-mini"]
    assert key.allowed_endpoints == ["/v1/chat/completions"]
    assert "secret" not in c.get(f"/api/keys/{key.pk}/").json()
    row = AuditLog.objects.get(object_type="apikey", object_id=str(key.pk), actor="ada-admin")
    assert row.via == "api"
    assert row.after["allowed_endpoints"] == ["/v1/chat/completions"]  # the whole key, in one audited write


def test_key_cannot_be_created_in_or_with_another_tenants_objects(world):
    c = api(world.acme_admin)
    assert c.post("/api/keys/", {"tenant": "globex", "source": world.globex_source.pk, "name": "x"},
                  format="json").status_code == 400
    assert c.post("/api/keys/", {"tenant": "acme", "source": world.globex_source.pk, "name": "x"},
                  format="json").status_code == 400
    assert not ApiKey.objects.filter(name="x").exists()


def test_revoke_is_audited(world):
    resp = api(world.acme_admin).post(f"/api/keys/{world.acme_key.pk}/revoke/")
    assert resp.status_code == 200
    assert resp.json()["revoked_at"]
    assert AuditLog.objects.filter(action="revoke", object_id=str(world.acme_key.pk)).exists()


@pytest.mark.parametrize("persona", ["acme_manager", "acme_viewer"])
def test_managers_and_viewers_cannot_write(world, persona):
    c = api(getattr(world, persona))
    assert c.post("/api/sources/", {"tenant": "acme", "name": "n", "type": "service"},
                  format="json").status_code == 403
    assert c.patch(f"/api/budgets/{world.acme_budget.pk}/", {"limit_usd": "1"}, format="json").status_code == 403
    assert c.post(f"/api/keys/{world.acme_key.pk}/revoke/").status_code == 403
    assert c.delete(f"/api/keys/{world.acme_key.pk}/").status_code == 403


def test_budget_update_is_audited_with_before_and_after(world):
    resp = api(world.acme_admin).patch(f"/api/budgets/{world.acme_budget.pk}/", {"limit_usd": "42"}, format="json")
    assert resp.status_code == 200, resp.content
    entry = AuditLog.objects.get(object_type="budget", action="update")
    assert entry.actor == "ada-admin"
    assert Decimal(entry.after["limit_usd"]) == Decimal("42")


def test_admin_adds_member_and_only_owner_grants_owner(world):
    resp = api(world.acme_admin).post("/api/members/", {"tenant": "acme", "username": "neo", "role": "viewer",
                                                       "password": "long-password-2"}, format="json")
    assert resp.status_code == 201, resp.content
    assert Membership.objects.get(user__username="neo").role == "viewer"
    m = Membership.objects.get(user__username="neo")
    assert api(world.acme_admin).patch(f"/api/members/{m.pk}/", {"role": "owner"}, format="json").status_code == 403
    assert api(world.acme_owner).patch(f"/api/members/{m.pk}/", {"role": "owner"}, format="json").status_code == 200


def test_tenants_are_created_by_superusers_only(world):
    body = {"slug": "initech", "name": "Initech"}
    assert api(world.acme_owner).post("/api/tenants/", body, format="json").status_code == 403
    assert api(world.root).post("/api/tenants/", body, format="json").status_code == 201


def test_models_deployments_and_prices_are_global_and_superuser_written(world):
    d = f.DeploymentFactory()
    f.PriceFactory(model=d.alias.alias)
    c = api(world.acme_viewer)
    models = c.get("/api/models/").json()["results"]
    assert models[0]["deployments"][0]["provider"] == d.provider.name
    assert "credential" not in str(models)
    assert c.get("/api/prices/").json()["results"][0]["model"] == d.alias.alias
    assert c.post("/api/prices/", {"model": "m", "input_usd_per_mtok": "1", "output_usd_per_mtok": "2"},
                  format="json").status_code == 403
    resp = api(world.root).post("/api/prices/", {"model": "m", "input_usd_per_mtok": "1",
                                                 "output_usd_per_mtok": "2"}, format="json")
    assert resp.status_code == 201
    assert AuditLog.objects.filter(object_type="price", actor="root").exists()


def test_audit_log_is_scoped_and_for_admins(world):
    f.AuditLogFactory(tenant=world.acme, object_id="mine")
    f.AuditLogFactory(tenant=world.globex, object_id="theirs")
    assert names(api(world.acme_admin).get("/api/audit-log/"), "object_id") >= {"mine"}
    assert "theirs" not in names(api(world.acme_admin).get("/api/audit-log/"), "object_id")
    assert names(api(world.acme_viewer).get("/api/audit-log/"), "object_id") == set()


@pytest.fixture
def ledger(world):
    now = timezone.now()
    for i in range(3):
        f.UsageEventFactory(tenant=world.acme, api_key=world.acme_key, source_ref="acme-bot",
                            timestamp=now - timedelta(minutes=i), cost=Decimal("0.5"))
    f.UsageEventFactory(tenant=world.globex, source_ref="globex-etl", timestamp=now, cost=Decimal("7"))
    usage_rollup_recompute(since=now - timedelta(hours=1), until=now + timedelta(minutes=1))
    return world


def test_usage_events_in_the_seed_shape_scoped_and_paginated(ledger):
    c = api(ledger.acme_manager)
    page = c.get("/api/usage-events/", {"limit": 2}).json()
    assert len(page["results"]) == 2
    assert page["next"]
    event = page["results"][0]
    assert set(event["usage_event"]) == {"timestamp", "source", "request_type", "tokens", "model", "cost",
                                         "metadata"}
    assert event["tenant"] == "acme"
    rest = c.get(page["next"]).json()["results"]
    assert len(rest) == 1
    assert api(ledger.acme_viewer).get("/api/usage-events/").json()["results"] == []


def test_analytics_dashboard_and_aggregate_json(ledger):
    c = api(ledger.acme_manager)
    data = c.get("/api/analytics/dashboard/").json()
    assert data["totals"]["requests"] == 3
    assert Decimal(data["totals"]["cost"]) == Decimal("1.5")
    agg = c.get("/api/analytics/aggregate/", {"group": "source"}).json()
    assert agg["rows"] == [{"tenant": "acme", "source_type": "application", "source_id": "acme-bot", "requests": 3,
                            "errors": 0, "cache_hits": 0, "prompt_tokens": 30, "completion_tokens": 60,
                            "cost": agg["rows"][0]["cost"], "saved_cost": agg["rows"][0]["saved_cost"]}]
    assert Decimal(agg["rows"][0]["cost"]) == Decimal("1.5")
    assert api(ledger.globex_manager).get("/api/analytics/dashboard/").json()["totals"]["requests"] == 1
    assert c.get("/api/analytics/aggregate/", {"group": "nope"}).status_code == 400


def test_openapi_schema_and_offline_docs(world, client):
    client.force_login(world.acme_viewer)
    schema = client.get("/api/schema/")
    assert schema.status_code == 200
    assert b"/api/keys/" in schema.content
    docs = client.get("/api/docs/").content.decode()
    assert "/static/drf_spectacular_sidecar/swagger-ui-dist/" in docs
    assert "cdn" not in docs.lower()
    assert client.get("/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js").status_code == 200


def test_api_member_add_attaches_existing_user_without_touching_password(world):
    resp = api(world.root).post("/api/members/", {"tenant": "acme", "username": "gil-manager",
                                                 "password": "hijacked-pass", "role": "viewer"},
                                format="json")
    assert resp.status_code == 201
    world.globex_manager.refresh_from_db()
    assert not world.globex_manager.check_password("hijacked-pass")
    owner = Membership.objects.get(user=world.acme_owner)
    assert api(world.acme_admin).delete(f"/api/members/{owner.pk}/").status_code == 403


def test_alerts_are_read_only_and_scoped_to_the_callers_tenants(world):
    mine = f.AlertFactory(budget=world.acme_budget, message="Acme reached 80%.")
    theirs = f.AlertFactory(budget=world.globex_budget, message="Globex reached 80%.")
    c = api(world.acme_viewer)

    listed = c.get("/api/alerts/").json()["results"]

    assert [(a["tenant"], a["budget"], a["message"]) for a in listed] == [("acme", "acme-monthly", "Acme reached 80%.")]
    assert c.get(f"/api/alerts/{mine.pk}/").status_code == 200
    assert c.get(f"/api/alerts/{theirs.pk}/").status_code == 404
    assert api(world.acme_admin).delete(f"/api/alerts/{mine.pk}/").status_code == 405
    assert len(api(world.root).get("/api/alerts/").json()["results"]) == 2
