"""Single sign-on (OpenID Connect) through a real provider on loopback (tests/fakes/oidc_provider.py).

Django's test client follows the redirects: our login page -> /oidc/authenticate/ -> the
provider's /authorize (real HTTP) -> back to /oidc/callback/ -> the dashboard. The backend talks
to the provider's discovery, JWKS, token and userinfo endpoints over real HTTP too."""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import os
import re
import subprocess
import sys
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from django.contrib.auth import get_user_model
from django.utils import timezone

from apps.analytics.services import usage_rollup_recompute
from apps.keys import sso
from apps.keys.models import AuditLog, Membership, SsoIdentity
from tests import factories as f

pytestmark = pytest.mark.django_db

OIDC_BACKEND = "apps.keys.sso.TenantOIDCBackend"


@pytest.fixture
def provider(sso_provider):
    return sso_provider


def password_login_off(settings):
    settings.PASSWORD_LOGIN_ENABLED = False
    settings.AUTHENTICATION_BACKENDS = ["axes.backends.AxesStandaloneBackend", OIDC_BACKEND]


def sso_login(client, provider, *, start: str = "/accounts/login/"):
    """Click "Sign in with SSO" on the login page at `start` and follow every redirect, through the
    provider, to the end. Returns the last response (its `.final_url` is where the browser ended)."""
    page = client.get(start, follow=True)
    assert page.status_code == 200
    link = re.search(r'id="sso-login" href="([^"]+)"', page.content.decode())
    assert link, "no Sign in with SSO link"
    location = link.group(1).replace("&amp;", "&")
    resp = client.get(location)
    for _ in range(10):
        if resp.status_code != 302:
            resp.final_url = location
            return resp
        location = resp["Location"]
        if location.startswith(provider.issuer):  # the provider: real HTTP
            back = requests.get(location, allow_redirects=False, timeout=5)
            assert back.status_code == 302, back.text
            location = back.headers["Location"]
            assert location.startswith("http://testserver/oidc/callback/")
        url = urlsplit(location)
        resp = client.get(f"{url.path}?{url.query}" if url.query else url.path)
    raise AssertionError("too many redirects")


def csv_rows(resp):
    return list(csv.reader(io.StringIO(b"".join(resp.streaming_content).decode())))


def claims(groups, **extra):
    return {"sub": "idp-mia", "email": "mia@acme.test", "email_verified": True, "preferred_username": "mia",
            "groups": groups, **extra}


@pytest.fixture
def usage(world):
    now = timezone.now()
    for cost in ("0.25", "0.50"):
        f.UsageEventFactory(tenant=world.acme, api_key=world.acme_key, source=world.acme_source,
                            source_ref="acme-bot", model="gpt-4o-mini", cost=Decimal(cost), timestamp=now)
    f.UsageEventFactory(tenant=world.globex, api_key=world.globex_key, source=world.globex_source,
                        source_ref="globex-etl", model="globex-secret-model", cost=Decimal("9"), timestamp=now)
    usage_rollup_recompute(since=now - timedelta(days=1), until=now + timedelta(minutes=1))
    return world


# --- logging in ------------------------------------------------------------------------------------


def test_manager_logs_in_lands_on_own_dashboard_and_sees_nothing_of_the_other_tenant(client, provider, usage,
                                                                                      caplog):
    provider.claims = claims(["acme:manager", "nosuch:admin", "everyone"])

    with caplog.at_level(logging.INFO, logger="apps.keys.sso"):
        resp = sso_login(client, provider)

    assert resp.status_code == 200
    assert urlsplit(resp.final_url).path == "/dashboard/"
    html = resp.content.decode()
    assert resp.context["data"]["totals"]["requests"] == 2
    assert resp.context["data"]["totals"]["cost"] == Decimal("0.75")
    assert "acme-monthly" in html
    for leak in ("globex", "Globex", "globex-secret-model", "globex-etl"):
        assert leak not in html
    body = csv_rows(client.get("/dashboard/usage.csv"))
    assert len(body) == 3
    assert {r[2] for r in body[1:]} == {"acme"}

    user = get_user_model().objects.get(sso_identities__subject="idp-mia")
    assert user.username == "mia"
    assert user.email == "mia@acme.test"
    assert not user.has_usable_password()
    assert user.is_staff and not user.is_superuser
    assert dict(Membership.objects.filter(user=user).values_list("tenant__slug", "role")) == {"acme": "manager"}
    assert "unknown tenant 'nosuch'" in caplog.text
    assert "everyone" in caplog.text  # not of the form tenant:role

    # The protocol was the real one: nonce and PKCE sent, code exchanged with the client secret.
    authorize = next(r for r in provider.requests if r["path"] == "/authorize")["params"]
    assert authorize["nonce"] and authorize["code_challenge_method"] == "S256"
    assert set(authorize["scope"].split()) == {"openid", "email", "profile", "groups"}
    token = next(r for r in provider.requests if r["path"] == "/token")["params"]
    assert token["code_verifier"] and token["grant_type"] == "authorization_code"


def test_provisioning_and_login_are_audited(client, provider, usage):
    provider.claims = claims(["acme:manager", "nosuch:viewer"])

    sso_login(client, provider)

    user = get_user_model().objects.get(username="mia")
    rows = list(AuditLog.objects.filter(via="sso").order_by("id").values_list("actor", "action", "object_type",
                                                                               "tenant__slug"))
    assert rows == [
        ("sso", "sso_provision", "user", None),
        ("sso", "create", "membership", "acme"),
        ("sso", "update", "user", None),  # is_staff: a member now
        ("mia", "sso_login", "user", "acme"),
    ]
    login = AuditLog.objects.get(action="sso_login")
    assert login.object_id == str(user.pk)
    assert login.after["tenants"] == {"acme": "manager"}
    assert login.after["unknown_tenants"] == ["nosuch"]
    assert login.after["issuer"] == provider.issuer

    client.logout()
    sso_login(client, provider)  # nothing changed: only the login is recorded
    assert list(AuditLog.objects.filter(via="sso").order_by("-id").values_list("action", flat=True)[:2]) == [
        "sso_login", "sso_login"]
    assert AuditLog.objects.filter(action="sso_provision").count() == 1


def test_a_changed_claim_changes_the_role_and_removes_tenants_no_longer_listed(client, provider, usage):
    provider.claims = claims(["acme:viewer", "globex:manager"])
    sso_login(client, provider)
    user = get_user_model().objects.get(username="mia")
    assert dict(Membership.objects.filter(user=user).values_list("tenant__slug", "role")) == {
        "acme": "viewer", "globex": "manager"}
    assert client.get("/dashboard/usage.csv").status_code == 200  # globex: manager may export

    client.logout()
    provider.claims = claims(["acme:admin", "acme:viewer"], email="mia.new@acme.test")  # the higher role wins
    resp = sso_login(client, provider)

    assert urlsplit(resp.final_url).path == "/dashboard/"
    assert get_user_model().objects.filter(sso_identities__subject="idp-mia").count() == 1
    user.refresh_from_db()
    assert user.email == "mia.new@acme.test"
    assert dict(Membership.objects.filter(user=user).values_list("tenant__slug", "role")) == {"acme": "admin"}
    assert "globex" not in resp.content.decode()
    changes = set(AuditLog.objects.filter(via="sso", object_type="membership").values_list("action", "tenant__slug"))
    assert changes == {("create", "acme"), ("create", "globex"), ("update", "acme"), ("delete", "globex")}
    assert client.get("/admin/keys/apikey/add/").status_code == 200  # admin of acme now

    client.logout()
    provider.claims = claims([])
    sso_login(client, provider)
    user.refresh_from_db()
    assert not Membership.objects.filter(user=user).exists()
    assert not user.is_staff
    assert client.get("/admin/").status_code == 302


def test_superuser_value_grants_and_takes_away_superuser(client, provider, usage, settings):
    settings.OIDC_SUPERUSER_VALUE = "llm:superuser"
    provider.claims = claims(["llm:superuser"])
    sso_login(client, provider)
    user = get_user_model().objects.get(username="mia")
    assert user.is_superuser and user.is_staff
    tenants = client.get("/admin/keys/tenant/")
    assert tenants.status_code == 200
    assert "globex" in tenants.content.decode()  # every tenant, though no membership names it

    client.logout()
    provider.claims = claims(["acme:viewer"])
    sso_login(client, provider)
    user.refresh_from_db()
    assert not user.is_superuser
    assert user.is_staff


def test_a_verified_email_links_the_existing_user_an_unverified_one_does_not(client, provider, usage):
    existing = usage.acme_manager  # max-manager@example.test, a password user
    viewer = usage.acme_viewer
    provider.claims = {"sub": "idp-vic", "email": viewer.email, "email_verified": False,
                       "groups": ["acme:manager"]}
    sso_login(client, provider)
    stranger = get_user_model().objects.get(sso_identities__subject="idp-vic")
    assert stranger != viewer
    assert Membership.objects.get(user=viewer).role == "viewer"  # untouched

    client.logout()
    provider.claims = {"sub": "idp-max-2", "email": existing.email.upper(), "email_verified": True,
                       "preferred_username": "max", "groups": ["acme:viewer"]}
    sso_login(client, provider)
    assert SsoIdentity.objects.get(subject="idp-max-2").user == existing
    assert Membership.objects.get(user=existing).role == "viewer"
    assert AuditLog.objects.filter(action="sso_link", object_id=str(existing.pk)).exists()


def test_an_inactive_user_is_refused(client, provider, usage):
    provider.claims = claims(["acme:manager"])
    sso_login(client, provider)
    user = get_user_model().objects.get(username="mia")
    user.is_active = False
    user.save()
    assert client.get("/dashboard/").status_code == 302  # the session of an inactive user ends

    client.logout()
    resp = sso_login(client, provider)
    assert "sso_error" in resp.final_url
    assert client.get("/dashboard/").status_code == 302
    assert AuditLog.objects.filter(action="sso_login_refused", object_id=str(user.pk)).exists()


# --- refused tokens --------------------------------------------------------------------------------


@pytest.mark.parametrize("tamper", ["bad_signature", "wrong_issuer", "wrong_nonce", "wrong_audience", "expired"])
def test_a_forged_or_misdirected_id_token_is_refused(client, provider, usage, tamper):
    provider.claims = claims(["acme:owner"])
    provider.tamper = tamper

    resp = sso_login(client, provider)

    assert resp.status_code == 200
    assert urlsplit(resp.final_url).path == "/accounts/login/"
    assert b"Single sign-on did not succeed" in resp.content
    assert client.get("/dashboard/").status_code == 302
    assert not SsoIdentity.objects.exists()
    assert not get_user_model().objects.filter(username="mia").exists()
    refused = AuditLog.objects.get(action="sso_login_refused")
    assert refused.via == "system"
    assert "id_token" in refused.after["reason"] or "Nonce" in refused.after["reason"]


def test_a_replayed_callback_is_refused(client, provider, usage):
    provider.claims = claims(["acme:manager"])
    page = client.get("/oidc/authenticate/")
    back = requests.get(page["Location"], allow_redirects=False, timeout=5).headers["Location"]
    callback = urlsplit(back)
    assert client.get(f"{callback.path}?{callback.query}")["Location"] == "/dashboard/"
    client.logout()
    # The same code and state again (a stolen callback URL): the state is spent, the code too.
    resp = client.get(f"{callback.path}?{callback.query}")
    assert resp.status_code in (302, 400)
    assert client.get("/dashboard/").status_code == 302


# --- password login switched off ------------------------------------------------------------------


def test_password_login_refused_when_switched_off(client, provider, usage, settings):
    assert client.post("/accounts/login/", {"username": "max-manager", "password": "pw-12345678"}).status_code == 302
    assert client.get("/dashboard/").status_code == 200
    password_login_off(settings)
    assert client.get("/dashboard/").status_code == 302  # a password session ends

    page = client.get("/accounts/login/")
    html = page.content.decode()
    assert "Sign in with SSO" in html
    assert 'name="password"' not in html

    resp = client.post("/accounts/login/", {"username": "max-manager", "password": "pw-12345678"})
    assert resp.status_code == 403
    assert b"Password login is switched off" in resp.content
    assert client.get("/dashboard/").status_code == 302

    # Nor through the admin's login form or the API's basic auth.
    resp = client.post("/admin/login/", {"username": "root", "password": "pw-12345678"})
    assert resp.status_code == 302 and resp["Location"].startswith("/accounts/login/")
    assert client.get("/admin/").status_code == 302
    basic = base64.b64encode(b"max-manager:pw-12345678").decode()
    assert client.get("/api/tenants/", HTTP_AUTHORIZATION=f"Basic {basic}").status_code in (401, 403)


def test_admin_login_goes_through_sso_when_password_login_is_off(client, provider, usage, settings):
    password_login_off(settings)
    provider.claims = claims(["acme:admin"])

    first = client.get("/admin/keys/apikey/")
    assert first.status_code == 302
    resp = sso_login(client, provider, start=first["Location"])

    assert urlsplit(resp.final_url).path == "/admin/keys/apikey/"
    assert resp.status_code == 200
    assert "acme-key" in resp.content.decode()
    assert "globex-key" not in resp.content.decode()


def test_admin_login_page_offers_sso_beside_the_password(client, provider):
    html = client.get("/admin/login/?next=/admin/").content.decode()
    assert 'name="password"' in html
    assert 'id="sso-login"' in html
    assert "/oidc/authenticate/?next=/admin/" in html.replace("%2F", "/")


# --- off without OIDC_ISSUER and discovery -------------------------------------------------------------


def test_everything_is_off_without_an_issuer(client, world, settings):
    assert settings.SSO_ENABLED is False  # the test environment sets no OIDC_ISSUER
    assert settings.PASSWORD_LOGIN_ENABLED is True
    assert "django.contrib.auth.backends.ModelBackend" in settings.AUTHENTICATION_BACKENDS
    assert OIDC_BACKEND not in settings.AUTHENTICATION_BACKENDS
    html = client.get("/accounts/login/").content.decode()
    assert "Sign in with SSO" not in html
    assert 'name="password"' in html
    assert client.get("/oidc/authenticate/").status_code == 404
    assert client.get("/oidc/callback/?code=x&state=y").status_code == 404
    resp = client.post("/accounts/login/", {"username": "max-manager", "password": "pw-12345678"})
    assert resp["Location"] == "/dashboard/"


def test_discovery_is_fetched_once_and_explicit_endpoints_need_none(client, provider, usage, settings):
    provider.claims = claims(["acme:manager"])
    sso_login(client, provider)
    client.logout()
    sso_login(client, provider)
    assert sum(r["path"] == "/.well-known/openid-configuration" for r in provider.requests) == 1

    sso.discovery_reset()
    provider.requests.clear()
    doc = provider.discovery()
    settings.OIDC_OP_AUTHORIZATION_ENDPOINT = doc["authorization_endpoint"]
    settings.OIDC_OP_TOKEN_ENDPOINT = doc["token_endpoint"]
    settings.OIDC_OP_USER_ENDPOINT = doc["userinfo_endpoint"]
    settings.OIDC_OP_JWKS_ENDPOINT = doc["jwks_uri"]
    client.logout()
    resp = sso_login(client, provider)
    assert urlsplit(resp.final_url).path == "/dashboard/"
    assert not any(r["path"] == "/.well-known/openid-configuration" for r in provider.requests)


def test_an_unreachable_provider_sends_back_to_the_login_page(client, provider, settings):
    settings.OIDC_ISSUER = "http://127.0.0.1:9/nothing-listens"
    resp = client.get("/oidc/authenticate/")
    assert resp.status_code == 302
    assert resp["Location"] == "/accounts/login/?sso_error=1"


# --- reading the claim ----------------------------------------------------------------------------------


def test_tenant_claim_values():
    grants = sso.grants_from_claim(
        ["acme:manager", "acme:viewer", "globex:OWNER", "other:boss", "plain", ":admin", "llm:superuser"],
        superuser_value="llm:superuser")
    assert grants.roles == {"acme": "manager", "globex": "owner"}
    assert grants.superuser is True
    assert grants.invalid == ("other:boss", "plain", ":admin")
    assert sso.claim_values("acme:admin, globex:viewer") == ["acme:admin", "globex:viewer"]
    assert sso.claim_values(None) == []
    assert sso.claim_values(["a:viewer", 3]) == ["a:viewer"]
    assert sso.grants_from_claim(["llm:superuser"]).superuser is False  # no superuser value configured


def test_userinfo_cannot_name_another_subject(client, provider, usage, monkeypatch):
    provider.claims = claims(["acme:owner"])
    original = provider.userinfo

    def other_subject(authorization):
        status, headers, _ = original(authorization)
        return status, headers, json.dumps({"sub": "someone-else", "groups": ["acme:owner"]}).encode()

    monkeypatch.setattr(provider, "userinfo", other_subject)
    resp = sso_login(client, provider)
    assert "sso_error" in resp.final_url
    assert not SsoIdentity.objects.exists()



# --- configuration from the environment -------------------------------------------------------------


def _settings_in_subprocess(env: dict) -> subprocess.CompletedProcess:
    code = ("import django, json; django.setup(); from django.conf import settings as s; "
            "print(json.dumps([s.SSO_ENABLED, s.PASSWORD_LOGIN_ENABLED, s.AUTHENTICATION_BACKENDS, s.OIDC_RP_SCOPES, "
            "s.OIDC_TENANT_CLAIM]))")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OIDC_", "PASSWORD_LOGIN"))}
    return subprocess.run([sys.executable, "-c", code], env={**clean, "DJANGO_SETTINGS_MODULE": "config.settings",
                                                              **env},
                          cwd=str(Path(__file__).resolve().parents[2]), capture_output=True, text=True, timeout=60)


def test_settings_from_the_environment():
    on = _settings_in_subprocess({"OIDC_ISSUER": "https://idp.example.test/realms/x", "OIDC_CLIENT_ID": "llm",
                                  "OIDC_CLIENT_SECRET": "s", "PASSWORD_LOGIN_ENABLED": "false",
                                  "OIDC_SCOPES": "openid email groups", "OIDC_TENANT_CLAIM": "roles"})
    assert on.returncode == 0, on.stderr
    axes = "axes.backends.AxesStandaloneBackend"  # first: it counts failed logins on every path
    assert json.loads(on.stdout) == [True, False, [axes, OIDC_BACKEND], "openid email groups", "roles"]

    # Password login cannot be switched off without SSO: nobody could log in.
    off = _settings_in_subprocess({"PASSWORD_LOGIN_ENABLED": "false"})
    assert json.loads(off.stdout)[:3] == [False, True, [axes, "django.contrib.auth.backends.ModelBackend"]]

    missing = _settings_in_subprocess({"OIDC_ISSUER": "https://idp.example.test"})
    assert missing.returncode != 0
    assert "OIDC_CLIENT_ID" in missing.stderr


def test_superusers_manage_sso_identities_tenant_admins_do_not_see_them(client, provider, usage):
    provider.claims = claims(["acme:admin"])
    sso_login(client, provider)
    identity = SsoIdentity.objects.get()
    assert client.get("/admin/keys/ssoidentity/").status_code == 403

    client.force_login(usage.root)
    page = client.get("/admin/keys/ssoidentity/")
    assert page.status_code == 200 and "idp-mia" in page.content.decode()
    resp = client.post(f"/admin/keys/ssoidentity/{identity.pk}/delete/", {"post": "yes"})
    assert resp.status_code == 302
    assert not SsoIdentity.objects.exists()
    assert AuditLog.objects.filter(action="delete", object_type="ssoidentity", actor="root").exists()
