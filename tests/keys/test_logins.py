"""Password guessing: every login path (admin, /accounts/login/, HTTP Basic on /api/) is throttled
by username and by client address (django-axes), lockouts are audited, the cool-off lets it go."""

from __future__ import annotations

import base64
from datetime import timedelta

import orjson
import pytest
import time_machine
from django.utils import timezone

from apps.keys.models import AuditLog
from tests import factories as f

pytestmark = pytest.mark.django_db

LIMIT = 5
RIGHT = "pw-12345678"  # the factories' password


@pytest.fixture(autouse=True)
def _limits(settings):
    settings.AXES_FAILURE_LIMIT = LIMIT
    settings.AXES_COOLOFF_TIME = timedelta(minutes=15)


def admin_login(client, username, password, ip="10.9.0.1"):
    return client.post("/admin/login/?next=/admin/", {"username": username, "password": password}, REMOTE_ADDR=ip)


def dashboard_login(client, username, password, ip="10.9.0.1"):
    return client.post("/accounts/login/", {"username": username, "password": password}, REMOTE_ADDR=ip)


def basic(client, username, password, ip="10.9.0.1"):
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return client.get("/api/tenants/", HTTP_AUTHORIZATION=f"Basic {token}", REMOTE_ADDR=ip)


def logged_in(client) -> bool:
    return "_auth_user_id" in client.session


def lockouts():
    return list(AuditLog.objects.filter(action="login_lockout").order_by("id"))


def test_admin_login_refuses_the_right_password_after_the_failure_limit(client):
    f.UserFactory(username="ann")
    for _ in range(LIMIT - 1):
        assert admin_login(client, "ann", "guess").status_code == 200  # the form again, with an error
    assert admin_login(client, "ann", "guess").status_code == 429  # the one that reaches the limit

    resp = admin_login(client, "ann", RIGHT)

    assert resp.status_code == 429
    assert b"Too many failed logins" in resp.content
    assert not logged_in(client)


def test_the_lockout_is_audited_once(client):
    f.UserFactory(username="ann")
    for _ in range(LIMIT + 3):
        admin_login(client, "ann", "guess-secret-pw")
    admin_login(client, "ann", RIGHT)

    [row] = lockouts()
    assert (row.actor, row.via, row.object_type, row.object_id) == ("system", "system", "user", "ann")
    assert row.after["username"] == "ann"
    assert row.after["client_ip"] == "10.9.0.1"
    assert row.after["failures"] == LIMIT
    assert row.after["path"] == "/admin/login/"
    assert row.after["cool_off_s"] == 900
    assert "guess-secret-pw" not in orjson.dumps(row.after).decode()


def test_one_username_is_locked_out_whatever_the_address(client):
    f.UserFactory(username="ann")
    for i in range(LIMIT):
        admin_login(client, "ann", "guess", ip=f"10.9.1.{i}")

    assert admin_login(client, "ann", RIGHT, ip="10.9.2.99").status_code == 429
    assert not logged_in(client)


def test_one_address_is_locked_out_whatever_the_username(client):
    f.UserFactory(username="ann")
    f.UserFactory(username="bob")
    for i in range(LIMIT):
        admin_login(client, f"user-{i}", "guess", ip="10.9.3.3")

    assert admin_login(client, "ann", RIGHT, ip="10.9.3.3").status_code == 429
    assert not logged_in(client)
    assert admin_login(client, "bob", RIGHT, ip="10.9.3.4").status_code == 302  # another address: fine
    assert logged_in(client)


def test_the_cool_off_lets_the_owner_back_in(client):
    f.UserFactory(username="ann")
    with time_machine.travel(timezone.now(), tick=False) as clock:
        for _ in range(LIMIT):
            admin_login(client, "ann", "guess")
        assert admin_login(client, "ann", RIGHT).status_code == 429
        clock.shift(timedelta(minutes=10))
        assert admin_login(client, "ann", "guess").status_code == 429  # refused attempts do not extend it
        clock.shift(timedelta(minutes=6))

        resp = admin_login(client, "ann", RIGHT)

    assert resp.status_code == 302
    assert logged_in(client)


def test_dashboard_login_is_throttled_too(client):
    f.UserFactory(username="max")
    for _ in range(LIMIT - 1):
        assert dashboard_login(client, "max", "guess").status_code == 200
    assert dashboard_login(client, "max", "guess").status_code == 429

    resp = dashboard_login(client, "max", RIGHT)

    assert resp.status_code == 429
    assert not logged_in(client)
    assert len(lockouts()) == 1


def test_http_basic_on_the_api_is_throttled_with_a_clear_answer(client):
    f.UserFactory(username="ann", is_superuser=True)
    assert basic(client, "ann", RIGHT).status_code == 200
    for _ in range(LIMIT - 1):
        assert basic(client, "ann", "guess").status_code == 403  # DRF: "Invalid username/password."
    assert basic(client, "ann", "guess").status_code == 429

    resp = basic(client, "ann", RIGHT)

    assert resp.status_code == 429
    assert "Too many failed logins" in resp.json()["detail"]
    assert resp["Retry-After"] == "900"
    [row] = lockouts()
    assert row.after["path"] == "/api/tenants/"


def test_http_basic_failures_count_for_the_admin_login_of_that_address(client):
    f.UserFactory(username="ann")
    for i in range(LIMIT):
        basic(client, f"nobody-{i}", "guess", ip="10.9.4.4")

    assert admin_login(client, "ann", RIGHT, ip="10.9.4.4").status_code == 429
