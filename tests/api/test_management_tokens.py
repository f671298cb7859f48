"""Management API tokens: `Authorization: Bearer <token>` (or `Token <token>`) on /api/, confined
to one tenant and a role, expiring, revocable, stored as a digest only, audited."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.test import override_settings
from django.utils import timezone
from rest_framework.test import APIClient

from apps.keys import crypto, services
from apps.keys.models import AuditLog, ManagementToken, Membership

pytestmark = pytest.mark.django_db


def bearer(secret: str, keyword: str = "Bearer") -> APIClient:
    c = APIClient()
    c.credentials(HTTP_AUTHORIZATION=f"{keyword} {secret}")
    return c


def names(resp, field="name"):
    assert resp.status_code == 200, resp.content
    return {r[field] for r in resp.json()["results"]}


def token_for(world, *, user=None, role="admin", service=False, tenant=None, name="ci", days=30):
    return services.management_token_create(tenant=tenant or world.acme, name=name, role=role, actor="test",
                                            expires_days=days, user=user, service=service)


def test_token_reads_its_tenant_only_even_for_a_superuser(world):
    Membership.objects.create(user=world.root, tenant=world.acme, role="owner")
    secret = token_for(world, user=world.root, role="admin").secret

    for keyword in ("Bearer", "Token"):
        client = bearer(secret, keyword)
        assert names(client.get("/api/keys/")) == {"acme-key"}
        assert names(client.get("/api/tenants/"), "slug") == {"acme"}
    # The superuser's powers stay with the person: a token is confined to its tenant.
    assert bearer(secret).post("/api/tenants/", {"slug": "new", "name": "New"}, format="json").status_code == 403


def test_role_limits_apply_viewer_token_cannot_write(world):
    secret = token_for(world, user=world.acme_owner, role="viewer").secret
    client = bearer(secret)
    assert names(client.get("/api/sources/")) == {"acme-bot"}
    resp = client.post("/api/keys/", {"tenant": "acme", "source": world.acme_source.pk, "name": "x"}, format="json")
    assert resp.status_code in (400, 403)
    assert client.get("/api/audit-log/").status_code == 200 and names(client.get("/api/audit-log/"), "id") == set()


def test_personal_token_never_exceeds_its_users_current_role(world):
    secret = token_for(world, user=world.acme_admin, role="admin").secret
    Membership.objects.filter(user=world.acme_admin, tenant=world.acme).update(role="viewer")
    resp = bearer(secret).post("/api/sources/", {"tenant": "acme", "name": "new-src"}, format="json")
    assert resp.status_code in (400, 403)
    Membership.objects.filter(user=world.acme_admin, tenant=world.acme).delete()
    assert bearer(secret).get("/api/keys/").status_code == 401


def test_service_token_automates_key_creation_and_is_audited_as_the_token(world):
    created = token_for(world, service=True, role="admin", name="deploy-bot")
    resp = bearer(created.secret).post("/api/keys/", {"tenant": "acme", "source": world.acme_source.pk,
                                                      "name": "from-ci"}, format="json")
    assert resp.status_code == 201, resp.content
    assert resp.json()["secret"].startswith("sk-")
    row = AuditLog.objects.get(object_type="apikey", action="create", object_id=str(resp.json()["id"]))
    assert row.actor == f"svc-acme-deploy-bot [token {created.token.prefix}]"
    assert row.via == "api"
    # the service identity cannot log in with a password
    assert not created.token.user.has_usable_password()


def test_expired_and_revoked_tokens_are_refused(world):
    expired = token_for(world, user=world.acme_admin, name="old")
    ManagementToken.objects.filter(pk=expired.token.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    resp = bearer(expired.secret).get("/api/keys/")
    assert resp.status_code == 401 and "expired" in resp.json()["detail"]

    revoked = token_for(world, user=world.acme_admin, name="gone")
    services.management_token_revoke(token=revoked.token, actor="test")
    resp = bearer(revoked.secret).get("/api/keys/")
    assert resp.status_code == 401 and "revoked" in resp.json()["detail"]
    assert bearer("llmt_not-a-token").get("/api/keys/").status_code == 401
    assert bearer(world.acme_key.prefix + "x" * 30).get("/api/keys/").status_code == 401  # an API key is not one


def test_secret_is_never_stored_only_its_digest(world):
    created = token_for(world, user=world.acme_admin)
    token = ManagementToken.objects.get(pk=created.token.pk)
    stored = " ".join(str(getattr(token, f.attname)) for f in token._meta.concrete_fields)
    assert created.secret not in stored
    assert token.digest == crypto.api_key_digest(created.secret)
    audit = AuditLog.objects.get(object_type="managementtoken", action="create")
    assert created.secret not in str(audit.after) and "digest" not in audit.after


def test_tenant_admin_creates_and_revokes_tokens_through_the_api(world):
    admin = APIClient()
    admin.force_authenticate(world.acme_admin)
    resp = admin.post("/api/tokens/", {"tenant": "acme", "name": "ci", "kind": "service", "role": "manager",
                                       "expires_days": 7}, format="json")
    assert resp.status_code == 201, resp.content
    body = resp.json()
    assert body["secret"].startswith("llmt_") and body["role"] == "manager"
    assert "secret" not in admin.get(f"/api/tokens/{body['id']}/").json()
    # more than the creator's own role: refused
    assert admin.post("/api/tokens/", {"tenant": "acme", "name": "up", "role": "owner"},
                      format="json").status_code == 400
    # another tenant: refused
    assert admin.post("/api/tokens/", {"tenant": "globex", "name": "x"}, format="json").status_code == 400
    # a manager may not create tokens
    manager = APIClient()
    manager.force_authenticate(world.acme_manager)
    assert manager.post("/api/tokens/", {"tenant": "acme", "name": "m"}, format="json").status_code == 400
    # a token cannot mint tokens
    assert bearer(body["secret"]).post("/api/tokens/", {"tenant": "acme", "name": "t2"},
                                       format="json").status_code == 403
    assert admin.post(f"/api/tokens/{body['id']}/revoke/").status_code == 200
    assert bearer(body["secret"]).get("/api/keys/").status_code == 401
    assert AuditLog.objects.filter(object_type="managementtoken", action="revoke", via="api").count() == 1
    other = APIClient()
    other.force_authenticate(world.globex_admin)
    assert names(other.get("/api/tokens/")) == set()


def test_command_prints_the_token_alone(world):
    out = StringIO()
    call_command("api_token_create", "--tenant", "acme", "--name", "cli-bot", "--service", "--role", "viewer",
                 stdout=out)
    secret = out.getvalue().strip()
    assert secret.startswith("llmt_") and "\n" not in secret
    assert names(bearer(secret).get("/api/keys/")) == {"acme-key"}
    row = AuditLog.objects.get(object_type="managementtoken", action="create")
    assert row.via == "cli"


def test_basic_auth_is_off_by_default_in_production():
    import subprocess
    import sys

    code = ("import django, os; django.setup(); from django.conf import settings; "
            "print(any('Basic' in c for c in settings.REST_FRAMEWORK['DEFAULT_AUTHENTICATION_CLASSES']), "
            "settings.API_BASIC_AUTH_ENABLED)")
    env_base = {"DJANGO_SETTINGS_MODULE": "config.settings", "SECRET_KEY": "x" * 50, "PATH": "/usr/bin:/bin"}
    prod = subprocess.run([sys.executable, "-c", code], env={**env_base, "DJANGO_PROFILE": "production"},
                          capture_output=True, text=True, check=True)
    assert prod.stdout.split() == ["False", "False"]
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                        env={**env_base, "DJANGO_PROFILE": "production", "API_BASIC_AUTH_ENABLED": "true"})
    assert on.stdout.split() == ["True", "True"]
    embedded = subprocess.run([sys.executable, "-c", code], env=env_base, capture_output=True, text=True, check=True)
    assert embedded.stdout.split() == ["True", "True"]


@override_settings()
def test_admin_creates_a_token_and_shows_it_once(world, client):
    client.force_login(world.acme_owner)
    world.acme_owner.is_staff = True
    world.acme_owner.save()
    resp = client.post("/admin/keys/managementtoken/add/", {"tenant": world.acme.pk, "name": "from-admin",
                                                           "kind": "personal", "role": "admin", "expires_days": 30})
    assert resp.status_code == 200, resp.content[:2000]
    page = resp.content.decode()
    token = ManagementToken.objects.get(name="from-admin")
    assert token.user == world.acme_owner and token.prefix in page
    secret = page.split('id="api-key-secret"', 1)[1].split(">", 1)[1].split("<", 1)[0]
    assert names(bearer(secret).get("/api/keys/")) == {"acme-key"}
