"""Async-request callbacks (`callback_url`) go to public addresses only: refused with an
OpenAI-shaped 400 when the request names a forbidden address, and refused where the delivery
connects (names, DNS rebinding) without a retry."""

from __future__ import annotations

import orjson
import pytest
from django.utils import timezone

from apps.gateway import async_requests
from apps.gateway.models import AsyncRequest
from apps.keys import outbound
from apps.keys.services import tenant_webhook_secret
from tests.billing.conftest import WebhookReceiver

pytestmark = pytest.mark.django_db


@pytest.fixture
def receiver():
    r = WebhookReceiver()
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/hook", "http://localhost/hook", "http://10.0.0.1/hook",
                                 "http://169.254.169.254/latest/meta-data/", "http://[::1]/hook",
                                 "http://[::ffff:127.0.0.1]/hook", "http://2130706433/hook",
                                 "http://0x7f000001/hook", "http://0177.0.0.1/hook"])
def test_a_callback_url_to_a_forbidden_address_is_a_400(client, setup, settings, url):
    settings.WEBHOOK_ALLOWED_HOSTS = []
    body = {"model": setup.alias, "messages": [{"role": "user", "content": "x"}], "async": True, "callback_url": url}

    resp = client.post("/v1/chat/completions", data=orjson.dumps(body), content_type="application/json",
                       HTTP_AUTHORIZATION=f"Bearer {setup.secret}")

    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "callback_url"
    assert "not a public address" in error["message"] or "loopback" in error["message"]
    assert not AsyncRequest.objects.exists()


def finished_request(setup, url: str) -> AsyncRequest:
    return AsyncRequest.objects.create(id="req_cb", tenant=setup.tenant, body={}, status="completed",
                                       result={"ok": True}, callback_url=url, completed_at=timezone.now())


def test_a_callback_to_loopback_is_not_delivered_nor_retried(setup, receiver, settings):
    settings.WEBHOOK_ALLOWED_HOSTS = []
    finished_request(setup, receiver.url)

    async_requests.async_request_notify(request_id="req_cb")  # no WebhookError: nothing to retry

    assert receiver.requests == []
    assert AsyncRequest.objects.get(id="req_cb").webhook_delivered_at is None


def test_a_callback_name_rebound_to_loopback_fails_at_connect_time(setup, receiver, settings, monkeypatch):
    settings.WEBHOOK_ALLOWED_HOSTS = []
    answers = iter([["93.184.216.34"], ["127.0.0.1"]])
    monkeypatch.setattr(outbound, "_resolve", lambda host, port: next(answers))
    url = f"http://rebind.example.test:{receiver.server.server_address[1]}/hook"
    outbound.url_check(url)  # public when it was accepted
    finished_request(setup, url)

    async_requests.async_request_notify(request_id="req_cb")

    assert receiver.requests == []
    assert AsyncRequest.objects.get(id="req_cb").webhook_delivered_at is None


def test_an_allow_listed_callback_is_delivered_signed_with_the_tenants_secret(setup, receiver, settings):
    settings.WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]
    finished_request(setup, receiver.url)

    async_requests.async_request_notify(request_id="req_cb")

    (request,) = receiver.requests
    assert outbound.signature_verify(header=request["headers"]["x-llm-signature"], body=request["body"],
                                     secret=tenant_webhook_secret(tenant_id=setup.tenant.pk))
    assert AsyncRequest.objects.get(id="req_cb").webhook_delivered_at is not None

