"""Settings that guard the deployment: the SECRET_KEY refusal, allowed hosts, transport security.

The start-up checks run `manage.py check` in a subprocess with a clean environment, as an operator
would start the service."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from django.conf import settings
from django.core import mail

from tests import factories as f

STRONG_KEY = "s3cr3t-" + "k9Q!x7#Lm2$vB8@pR4%tY6^wZ1&nC5*jH3(dF0)gA" * 2


def manage(*args: str, **env: str) -> subprocess.CompletedProcess:
    """`python manage.py ARGS` with only PATH, a throwaway SQLite file and `env` in its environment."""
    clean = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"),
             "DATABASE_URL": f"sqlite:///{settings.VAR_DIR / 'settings-check.sqlite3'}", **env}
    return subprocess.run([sys.executable, "manage.py", *args], cwd=settings.BASE_DIR, env=clean,
                          capture_output=True, text=True, timeout=120, check=False)


# --- SECRET_KEY ---------------------------------------------------------------------------------


def test_the_server_refuses_to_start_without_a_secret_key():
    done = manage("check", DEBUG="false")

    assert done.returncode != 0
    assert "ImproperlyConfigured" in done.stderr
    assert "SECRET_KEY is not set" in done.stderr


def test_the_embedded_demo_asks_for_the_demo_key_and_starts():
    done = manage("check", DEBUG="false", LLMS_DEMO="1")

    assert done.returncode == 0, done.stderr
    assert "no issues" in done.stdout


def test_debug_may_use_the_demo_key_but_the_production_profile_never():
    assert manage("check", DEBUG="true").returncode == 0
    done = manage("check", DJANGO_PROFILE="production", LLMS_DEMO="1", ALLOWED_HOSTS="llm.example.com")
    assert done.returncode != 0 and "SECRET_KEY is not set" in done.stderr


def test_the_demo_key_is_not_used_when_a_secret_key_is_set():
    code = "from django.conf import settings; print(settings.SECRET_KEY == settings.DEMO_SECRET_KEY)"
    done = manage("shell", "-c", code, LLMS_DEMO="1", SECRET_KEY=STRONG_KEY)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_a_mistyped_upstream_transport_stops_the_start_with_the_choices():
    done = manage("check", LLMS_DEMO="1", GATEWAY_HTTP_TRANSPORT="aihttp")

    assert done.returncode != 0
    assert "GATEWAY_HTTP_TRANSPORT='aihttp': native, aiohttp, httpx-aiohttp or httpx" in done.stderr


# --- transport: the production profile ---------------------------------------------------------


def test_the_production_profile_passes_the_deploy_check():
    env = {"DJANGO_PROFILE": "production", "SECRET_KEY": STRONG_KEY, "ALLOWED_HOSTS": "llm.example.com"}
    done = manage("check", "--deploy", "--fail-level", "WARNING", **env)

    assert done.returncode == 0, done.stderr
    assert "System check identified no issues (0 silenced)." in done.stdout


def test_the_transport_switches_read_the_environment():
    code = ("from django.conf import settings as s; print(s.SECURE_HSTS_SECONDS, s.SECURE_HSTS_INCLUDE_SUBDOMAINS, "
            "s.SECURE_HSTS_PRELOAD, s.SECURE_SSL_REDIRECT, s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE, "
            "s.SECURE_PROXY_SSL_HEADER, s.CSRF_TRUSTED_ORIGINS)")
    done = manage("shell", "-c", code, SECRET_KEY=STRONG_KEY, SECURE_HSTS_SECONDS="600",
                  SECURE_HSTS_INCLUDE_SUBDOMAINS="true", SECURE_HSTS_PRELOAD="false", SECURE_SSL_REDIRECT="true",
                  SESSION_COOKIE_SECURE="true", CSRF_COOKIE_SECURE="false",
                  SECURE_PROXY_SSL_HEADER="HTTP_X_FORWARDED_PROTO,https",
                  CSRF_TRUSTED_ORIGINS="https://llm.example.com")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == (
        "600 True False True True False ('HTTP_X_FORWARDED_PROTO', 'https') ['https://llm.example.com']")


PROXY = {"SECURE_SSL_REDIRECT": True, "SECURE_PROXY_SSL_HEADER": ("HTTP_X_FORWARDED_PROTO", "https"),
         "SECURE_HSTS_SECONDS": 31_536_000}


@pytest.mark.django_db
def test_behind_a_tls_proxy_probes_answer_over_http_and_the_rest_is_https(client, settings, setup):
    for name, value in PROXY.items():
        setattr(settings, name, value)

    # the load balancer probes over plain HTTP: no redirect
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    # a browser over plain HTTP is sent to HTTPS; through the proxy (X-Forwarded-Proto: https) it is served
    assert client.get("/accounts/login/").status_code == 301
    through_proxy = client.get("/accounts/login/", HTTP_X_FORWARDED_PROTO="https")
    assert through_proxy.status_code == 200
    assert through_proxy["Strict-Transport-Security"].startswith("max-age=31536000")
    # the data plane through the proxy
    resp = client.get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {setup.secret}", HTTP_X_FORWARDED_PROTO="https")
    assert resp.status_code == 200
    assert setup.alias in [m["id"] for m in resp.json()["data"]]


def test_the_lean_data_plane_serves_v1_behind_the_tls_proxy(live_gateway, live_setup, settings):
    import httpx

    for name, value in PROXY.items():
        setattr(settings, name, value)
    resp = httpx.get(f"{live_gateway}/v1/models", headers={"Authorization": f"Bearer {live_setup.secret}",
                                                             "X-Forwarded-Proto": "https"})
    assert resp.status_code == 200
    assert live_setup.alias in [m["id"] for m in resp.json()["data"]]


# --- allowed hosts -----------------------------------------------------------------------------


def test_the_default_hosts_are_loopback_names_only():
    done = manage("shell", "-c", "from django.conf import settings; print(settings.ALLOWED_HOSTS)", LLMS_DEMO="1")
    assert done.stdout.strip().splitlines()[-1] == "['localhost', '127.0.0.1', '[::1]']"


@pytest.mark.django_db
def test_a_request_for_another_host_gets_400(client):
    assert client.get("/healthz", HTTP_HOST="evil.example").status_code == 400
    assert client.get("/accounts/login/", HTTP_HOST="evil.example").status_code == 400
    assert client.get("/healthz", HTTP_HOST="localhost").status_code == 200


@pytest.mark.django_db
def test_a_password_reset_mail_never_links_to_the_host_a_client_sends(client):
    user = f.UserFactory(username="resetme", email="resetme@example.test")

    poisoned = client.post("/accounts/password_reset/", {"email": user.email}, HTTP_HOST="evil.example")
    assert poisoned.status_code == 400
    assert mail.outbox == []

    client.post("/accounts/password_reset/", {"email": user.email}, HTTP_HOST="localhost:8000")
    assert len(mail.outbox) == 1
    assert "http://localhost:8000/accounts/reset/" in mail.outbox[0].body
    assert "evil.example" not in mail.outbox[0].body
