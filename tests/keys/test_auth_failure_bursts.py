"""Bursts of failed API-key authentications are counted per client address as well as per key
prefix, and across gateway instances (Redis) when REDIS_URL is set."""

from __future__ import annotations

import secrets

import httpx
import pytest
from asgiref.sync import async_to_sync
from django.conf import settings as django_settings

from apps.core import caches
from apps.keys import security
from apps.keys.models import AuditLog
from tests.conftest import requires_shared_state

requires_redis = pytest.mark.skipif(not django_settings.REDIS_URL, reason="the shared count needs REDIS_URL")
ONE_WINDOW = 1_000_000_000  # seconds: every failure of a test falls in the same window


@pytest.fixture(autouse=True)
def _burst(settings):
    settings.GATEWAY_AUTH_FAILURE_BURST = 5
    settings.GATEWAY_AUTH_FAILURE_WINDOW_S = ONE_WINDOW


def post(client, secret, ip):
    return client.post("/v1/chat/completions", data=b"{}", content_type="application/json",
                       HTTP_AUTHORIZATION=f"Bearer {secret}", REMOTE_ADDR=ip)


def bursts():
    return list(AuditLog.objects.filter(action="auth_failure_burst").order_by("id"))


note = async_to_sync(security.auth_failure_note)


@pytest.mark.django_db
def test_random_key_prefixes_from_one_address_are_a_burst(client):
    for _ in range(7):
        assert post(client, f"sk-{secrets.token_hex(12)}", "10.0.5.5").status_code == 401

    [row] = bursts()
    assert row.after["scope"] == "client_ip"
    assert row.after["client_ip"] == "10.0.5.5"
    assert row.after["failures"] == 5
    assert row.after["reasons"] == {"unknown_key": 5}
    assert row.tenant_id is None


@pytest.mark.django_db
def test_one_prefix_from_many_addresses_is_no_burst(client):
    for i in range(6):
        post(client, "sk-same-prefix-but-wrong", f"10.0.6.{i}")

    assert bursts() == []


@pytest.mark.django_db
def test_one_prefix_and_address_is_one_row_not_two(client):
    for _ in range(9):
        post(client, "sk-guess-guess-guess", "10.0.7.7")

    [row] = bursts()
    assert (row.after["scope"], row.after["key_prefix"], row.after["failures"]) == ("key_prefix", "sk-gue", 5)


@requires_redis
@pytest.mark.django_db
def test_the_count_lives_in_redis_not_in_the_process():
    for _ in range(3):
        note(prefix="sk-abc", ip="10.0.8.8", reason="unknown_key")
    security.reset()  # what this process counted is gone: as if the next failures reached another instance
    for _ in range(2):
        note(prefix="sk-xyz", ip="10.0.8.8", reason="unknown_key")

    [row] = bursts()
    assert (row.after["scope"], row.after["failures"]) == ("client_ip", 5)


@pytest.mark.django_db
def test_without_redis_failures_are_still_counted_in_process(settings):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    try:
        for _ in range(5):
            note(prefix="sk-abc", ip="10.0.9.9", reason="unknown_key")
    finally:
        caches.reset_all()  # forget the Redis breaker this opened

    [row] = bursts()
    assert row.after["failures"] == 5


@requires_shared_state
def test_two_gateway_instances_share_the_count(gateway_instances):
    a, b = gateway_instances(2, GATEWAY_AUTH_FAILURE_BURST=5, GATEWAY_AUTH_FAILURE_WINDOW_S=ONE_WINDOW)
    for i in range(5):
        resp = httpx.post(f"{(a, b)[i % 2]}/v1/chat/completions", json={},
                          headers={"Authorization": f"Bearer sk-{secrets.token_hex(12)}"})
        assert resp.status_code == 401

    [row] = bursts()
    assert (row.after["scope"], row.after["client_ip"], row.after["failures"]) == ("client_ip", "127.0.0.1", 5)
