"""Every control-plane change leaves an audit row, from the admin, the management API and the
command line; security events are audited per burst; tenant admins read their tenant's rows."""

from datetime import UTC, datetime, timedelta

import orjson
import pytest
import time_machine
from django.contrib import admin
from django.core.management import call_command
from rest_framework import serializers, viewsets
from rest_framework.test import APIRequestFactory, force_authenticate

from apps.keys import crypto
from apps.keys.audit import AuditedAdminMixin, AuditedViewSetMixin
from apps.keys.models import ApiKey, AuditLog, ProviderCredential, Source, Tenant
from apps.keys.services import api_key_revoke, cli_actor
from tests import factories as f

pytestmark = pytest.mark.django_db


@pytest.fixture
def root(client):
    user = f.UserFactory(username="root", is_superuser=True)
    client.force_login(user)
    return client


def rows(**filters):
    return list(AuditLog.objects.filter(**filters).order_by("id"))


# --- admin ------------------------------------------------------------------------------------


def test_every_admin_of_a_control_plane_model_is_audited():
    ours = {m: a for m, a in admin.site._registry.items() if m.__module__.startswith("apps.")}
    assert ours
    unaudited = [m.__name__ for m, a in ours.items() if m is not AuditLog and not isinstance(a, AuditedAdminMixin)]
    assert unaudited == []


def test_admin_add_change_delete_of_a_tenant_are_audited(root):
    data = {"slug": "globex", "name": "Globex", "timezone": "UTC", "allowed_regions": "[]", "cache_enabled": "on",
            "cache_ttl_s": "3600"}
    assert root.post("/admin/keys/tenant/add/", data).status_code == 302
    tenant = Tenant.objects.get(slug="globex")
    assert root.post(f"/admin/keys/tenant/{tenant.pk}/change/", {**data, "name": "Globex Corp"}).status_code == 302
    assert root.post(f"/admin/keys/tenant/{tenant.pk}/change/", {**data, "name": "Globex Corp"}).status_code == 302
    assert root.post(f"/admin/keys/tenant/{tenant.pk}/delete/", {"post": "yes"}).status_code == 302

    log = rows(object_type="tenant", object_id=str(tenant.pk))
    assert [(r.action, r.actor, r.via) for r in log] == [("create", "root", "admin"), ("update", "root", "admin"),
                                                         ("delete", "root", "admin")]
    assert (log[1].before["name"], log[1].after["name"]) == ("Globex", "Globex Corp")
    assert log[2].before["slug"] == "globex"
    assert log[0].tenant_id is None  # the tenant is gone; the rows stay


def test_admin_bulk_delete_audits_each_object(root):
    tenant = f.TenantFactory()
    sources = [f.SourceFactory(tenant=tenant) for _ in range(2)]

    root.post("/admin/keys/source/", {"action": "delete_selected", "_selected_action": [s.pk for s in sources],
                                      "post": "yes"})

    assert not Source.objects.filter(pk__in=[s.pk for s in sources]).exists()
    assert sorted(r.object_id for r in rows(action="delete", object_type="source")) == \
        sorted(str(s.pk) for s in sources)
    assert {r.tenant_id for r in rows(action="delete")} == {tenant.pk}


def test_admin_key_creation_shows_the_secret_once_and_audits_no_secret(root):
    source = f.SourceFactory()
    resp = root.post("/admin/keys/apikey/add/", {
        "tenant": source.tenant_id, "source": source.pk, "name": "from-admin",
        "default_budget_id": "", "cache_enabled": "unknown",
    })

    assert resp.status_code == 200
    key = ApiKey.objects.get(name="from-admin")
    secret = resp.context["rows"][0][1]
    assert crypto.api_key_digest(secret) == key.digest
    assert secret in resp.content.decode()
    assert "no-store" in resp["cache-control"]
    listing = root.get("/admin/keys/apikey/").content.decode() + \
        root.get(f"/admin/keys/apikey/{key.pk}/change/").content.decode()
    assert key.prefix in listing
    assert secret not in listing
    assert key.digest not in listing
    row = AuditLog.objects.get(action="create", object_type="apikey")
    assert (row.actor, row.via, row.tenant_id) == ("root", "admin", source.tenant_id)
    assert secret not in orjson.dumps(row.after).decode()
    assert key.digest not in orjson.dumps(row.after).decode()


def test_admin_key_from_another_tenants_source_is_refused(root):
    resp = root.post("/admin/keys/apikey/add/", {
        "tenant": f.TenantFactory().pk, "source": f.SourceFactory().pk, "name": "x", "allowed_models": "[]",
        "cache_enabled": "unknown"})

    assert resp.status_code == 200
    assert "belongs to another tenant" in resp.content.decode()
    assert not ApiKey.objects.filter(name="x").exists()


def test_admin_rotate_and_revoke_actions(root):
    key = f.ApiKeyFactory()

    resp = root.post("/admin/keys/apikey/", {"action": "rotate_keys_grace_1h", "_selected_action": [key.pk]})
    secret = resp.context["rows"][0][1]
    key.refresh_from_db()
    assert key.digest == crypto.api_key_digest(secret)
    assert key.previous_digest_expires_at is not None
    root.post("/admin/keys/apikey/", {"action": "revoke_keys", "_selected_action": [key.pk]})

    assert [(r.action, r.via) for r in rows(object_id=str(key.pk))] == [("rotate", "admin"), ("revoke", "admin")]


def test_admin_provider_credential_secret_is_write_only(root):
    resp = root.post("/admin/keys/providercredential/add/", {"name": "openai", "secret": "sk-upstream-9f8e7d"})

    assert resp.status_code == 302
    cred = ProviderCredential.objects.get(name="openai")
    assert cred.reveal() == "sk-upstream-9f8e7d"
    page = root.get(f"/admin/keys/providercredential/{cred.pk}/change/").content.decode()
    assert "sk-upstream-9f8e7d" not in page
    assert cred.encrypted_secret not in page
    root.post(f"/admin/keys/providercredential/{cred.pk}/change/", {"name": "openai", "secret": ""})
    assert ProviderCredential.objects.get(pk=cred.pk).reveal() == "sk-upstream-9f8e7d"  # empty keeps it
    row = AuditLog.objects.get(object_type="providercredential", action="create")
    assert row.after["secret"] == "(changed)"
    assert "sk-upstream-9f8e7d" not in orjson.dumps(list(AuditLog.objects.values("before", "after"))).decode()


# --- audit log visibility -------------------------------------------------------------------


def test_tenant_admins_read_their_tenants_audit_rows_only(client):
    mine, theirs = f.TenantFactory(), f.TenantFactory()
    f.AuditLogFactory(tenant=mine, object_id="mine-1")
    f.AuditLogFactory(tenant=theirs, object_id="theirs-1")
    owner = f.MembershipFactory(tenant=mine, role="admin").user
    manager = f.MembershipFactory(tenant=mine, role="manager").user

    client.force_login(owner)
    page = client.get("/admin/keys/auditlog/")
    assert page.status_code == 200
    assert "mine-1" in page.content.decode()
    assert "theirs-1" not in page.content.decode()
    row = AuditLog.objects.get(object_id="mine-1")
    assert client.post(f"/admin/keys/auditlog/{row.pk}/delete/", {"post": "yes"}).status_code == 403
    assert client.get("/admin/keys/auditlog/add/").status_code == 403
    assert AuditLog.objects.filter(pk=row.pk).exists()

    client.force_login(manager)
    assert client.get("/admin/keys/auditlog/").status_code == 403


# --- management API -------------------------------------------------------------------------


class SourceSerializer(serializers.ModelSerializer):
    class Meta:
        model = Source
        fields = ["id", "tenant", "name", "type"]


class SourceViewSet(AuditedViewSetMixin, viewsets.ModelViewSet):
    queryset = Source.objects.all()
    serializer_class = SourceSerializer


def test_management_api_create_update_delete_are_audited():
    tenant, user = f.TenantFactory(), f.UserFactory(username="api-ann")
    factory = APIRequestFactory()

    def call(method, action, data=None, pk=None):
        request = getattr(factory, method)("/api/sources/", data or {}, format="json")
        force_authenticate(request, user=user)
        view = SourceViewSet.as_view({method: action})
        return view(request, pk=pk) if pk else view(request)

    created = call("post", "create", {"tenant": tenant.pk, "name": "crm", "type": "application"})
    pk = created.data["id"]
    call("patch", "partial_update", {"type": "service"}, pk=pk)
    call("delete", "destroy", pk=pk)

    log = rows(object_type="source", object_id=str(pk))
    assert [(r.action, r.actor, r.via, r.tenant_id) for r in log] == [
        ("create", "api-ann", "api", tenant.pk), ("update", "api-ann", "api", tenant.pk),
        ("delete", "api-ann", "api", tenant.pk)]
    assert (log[1].before["type"], log[1].after["type"]) == ("application", "service")


# --- command line -----------------------------------------------------------------------------


def test_gateway_apply_audits_each_change_once(tmp_path, monkeypatch):
    monkeypatch.setenv("T_UPSTREAM_KEY", "sk-upstream-cli-1234")
    path = tmp_path / "gw.yaml"
    path.write_text("""
providers: [{name: up, kind: openai_compatible, api_base: "http://127.0.0.1:9/v1", api_key_env: T_UPSTREAM_KEY}]
models: [{alias: m1, deployments: [{provider: up, model: m1-up}]}]
tenants: [{slug: initech, name: Initech, sources: [{name: tps, type: service}]}]
""")
    call_command("gateway_apply", str(path))
    first = AuditLog.objects.count()
    call_command("gateway_apply", str(path))

    assert AuditLog.objects.count() == first  # idempotent: nothing changed, nothing audited
    assert {r.object_type for r in rows(actor=cli_actor(), via="cli")} >= {
        "tenant", "source", "provider", "providercredential", "modelalias", "deployment"}
    assert "sk-upstream-cli-1234" not in orjson.dumps(list(AuditLog.objects.values("before", "after"))).decode()


# --- security events --------------------------------------------------------------------------


def post(client, secret, **extra):
    return client.post("/v1/chat/completions", data=b"{}", content_type="application/json",
                       HTTP_AUTHORIZATION=f"Bearer {secret}", **extra)


def test_a_burst_of_failed_authentications_leaves_one_row_per_window(client, settings):
    settings.GATEWAY_AUTH_FAILURE_BURST = 5
    settings.GATEWAY_AUTH_FAILURE_WINDOW_S = 60
    wrong = "sk-wrongwrongwrongwrong"
    with time_machine.travel(datetime(2031, 1, 1, tzinfo=UTC), tick=False) as clock:
        for _ in range(12):
            assert post(client, wrong, REMOTE_ADDR="10.0.0.7").status_code == 401
        assert len(rows(action="auth_failure_burst")) == 1
        clock.shift(timedelta(seconds=60))
        for _ in range(5):
            post(client, wrong, REMOTE_ADDR="10.0.0.7")

    burst = rows(action="auth_failure_burst")
    assert len(burst) == 2
    assert burst[0].after["key_prefix"] == wrong[:6]
    assert burst[0].after["client_ip"] == "10.0.0.7"
    assert burst[0].after["reasons"] == {"unknown_key": 5}
    assert wrong not in orjson.dumps(burst[0].after).decode()


def test_a_few_failures_are_not_a_burst(client, settings):
    settings.GATEWAY_AUTH_FAILURE_BURST = 5
    for _ in range(4):
        post(client, "sk-typo-typo-typo", REMOTE_ADDR="10.0.0.8")

    assert rows(action="auth_failure_burst") == []


def test_a_revoked_key_hammering_is_a_burst_of_its_tenant(client, settings):
    settings.GATEWAY_AUTH_FAILURE_BURST = 3
    key = f.ApiKeyFactory()
    api_key_revoke(key=key, actor="ann")
    for _ in range(3):
        assert post(client, key.secret).status_code == 401

    row = AuditLog.objects.get(action="auth_failure_burst")
    assert (row.tenant_id, row.object_id, row.after["key_prefix"]) == (key.tenant_id, str(key.pk), key.prefix)
    assert row.after["reasons"] == {"revoked": 3}
