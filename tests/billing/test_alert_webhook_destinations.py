"""Budget alert webhooks go to public addresses only (configuration and delivery), and what tenants
see of a delivery says how it went, never what the network answered (that would be a port scanner)."""

from __future__ import annotations

import logging
from decimal import Decimal

import pytest
from rest_framework.test import APIClient

from apps.billing import tasks
from apps.billing.models import Budget
from apps.billing.services import AlertDeliveryError
from apps.keys import outbound
from tests import factories as f
from tests.billing.conftest import WebhookReceiver

pytestmark = pytest.mark.django_db

NETWORK_DETAIL = ("127.0.0.1", "ConnectError", "HTTP", "404", "refused:", "Connection", "timeout")


@pytest.fixture
def receiver():
    r = WebhookReceiver()
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


def api(user) -> APIClient:
    c = APIClient()
    c.force_authenticate(user)
    return c


def tenant_sees(world, alert_id: int) -> dict:
    resp = api(world.acme_viewer).get(f"/api/alerts/{alert_id}/")
    assert resp.status_code == 200, resp.content
    return resp.json()


def test_a_forbidden_destination_is_refused_once_without_detail_for_the_tenant(receiver, world, settings, caplog):
    settings.WEBHOOK_ALLOWED_HOSTS = []
    alert = f.AlertFactory(budget=world.acme_budget, webhook_status="pending")
    Budget.objects.filter(pk=world.acme_budget.pk).update(alert_webhook_url=receiver.url)

    with caplog.at_level(logging.WARNING):
        tasks.alert_deliver_webhook.run(alert.id)  # no retry: a refusal is permanent

    assert receiver.requests == []
    status = tenant_sees(world, alert.id)["webhook_status"]
    assert status == "refused: destination not allowed"
    assert "127.0.0.1" in caplog.text  # the operator's log has the detail


@pytest.mark.parametrize("answer", [404, 500])
def test_a_failing_receiver_shows_failed_will_retry_not_its_status_code(receiver, world, settings, caplog, answer):
    settings.WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]
    receiver.statuses.append(answer)
    alert = f.AlertFactory(budget=world.acme_budget, webhook_status="pending")
    Budget.objects.filter(pk=world.acme_budget.pk).update(alert_webhook_url=receiver.url)

    with caplog.at_level(logging.WARNING), pytest.raises(AlertDeliveryError):
        tasks.alert_deliver_webhook.run(alert.id)  # called directly, retry() re-raises

    status = tenant_sees(world, alert.id)["webhook_status"]
    assert status == "failed (will retry)"
    assert f"HTTP {answer}" in caplog.text


def test_a_closed_port_looks_like_any_other_failure(world, settings, caplog, eager_celery_retrying):
    import socket

    settings.WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    alert = f.AlertFactory(budget=world.acme_budget, webhook_status="pending")
    Budget.objects.filter(pk=world.acme_budget.pk).update(alert_webhook_url=f"http://127.0.0.1:{closed}/x")

    with caplog.at_level(logging.WARNING):
        tasks.alert_deliver_webhook.delay(alert.id)

    seen = tenant_sees(world, alert.id)
    assert seen["webhook_status"] == "failed"
    assert not any(word in str(seen) for word in NETWORK_DETAIL)
    assert "ConnectError" in caplog.text


def test_a_delivered_alert_is_signed_with_the_tenants_secret(receiver, world, settings):
    from apps.keys.services import tenant_webhook_secret

    settings.WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]
    alert = f.AlertFactory(budget=world.acme_budget, webhook_status="pending")
    Budget.objects.filter(pk=world.acme_budget.pk).update(alert_webhook_url=receiver.url)

    tasks.alert_deliver_webhook.run(alert.id)

    (request,) = receiver.requests
    sig = request["headers"]["x-llm-signature"]
    assert outbound.signature_verify(header=sig, body=request["body"],
                                     secret=tenant_webhook_secret(tenant_id=world.acme.pk))
    assert not outbound.signature_verify(header=sig, body=request["body"],
                                         secret=tenant_webhook_secret(tenant_id=world.globex.pk))
    assert tenant_sees(world, alert.id)["webhook_status"] == "sent"


# --- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379/", "http://169.254.169.254/latest/meta-data/",
                                 "http://[::ffff:127.0.0.1]/", "http://2130706433/", "http://localhost:8000/",
                                 "http://10.0.0.5/hook", "ftp://example.com/hook"])
def test_the_api_refuses_a_forbidden_webhook_url_with_a_clear_400(world, settings, url):
    settings.WEBHOOK_ALLOWED_HOSTS = []

    resp = api(world.acme_admin).patch(f"/api/budgets/{world.acme_budget.pk}/", {"alert_webhook_url": url},
                                       format="json")

    assert resp.status_code == 400
    assert "Webhook URL not allowed" in resp.json()["alert_webhook_url"][0]
    world.acme_budget.refresh_from_db()
    assert world.acme_budget.alert_webhook_url == ""


def test_the_api_refuses_a_name_that_resolves_to_a_private_address(world, settings, monkeypatch):
    settings.WEBHOOK_ALLOWED_HOSTS = []
    monkeypatch.setattr(outbound, "_resolve", lambda host, port: ["10.1.2.3"])

    resp = api(world.acme_admin).patch(f"/api/budgets/{world.acme_budget.pk}/",
                                       {"alert_webhook_url": "https://hooks.acme.test/alerts"}, format="json")

    assert resp.status_code == 400
    assert "10.1.2.3" not in resp.content.decode()


def test_the_api_accepts_a_public_or_allow_listed_webhook_url(world, settings, monkeypatch):
    settings.WEBHOOK_ALLOWED_HOSTS = ["alerts.corp.internal"]
    monkeypatch.setattr(outbound, "_resolve", lambda host, port: ["93.184.216.34"])
    c = api(world.acme_admin)
    url = f"/api/budgets/{world.acme_budget.pk}/"

    assert c.patch(url, {"alert_webhook_url": "https://hooks.acme.test/alerts"}, format="json").status_code == 200
    assert c.patch(url, {"alert_webhook_url": "http://alerts.corp.internal/x"}, format="json").status_code == 200


def test_the_admin_form_refuses_a_forbidden_webhook_url(client, world, settings):
    settings.WEBHOOK_ALLOWED_HOSTS = []
    client.force_login(world.acme_admin)

    resp = client.post(f"/admin/billing/budget/{world.acme_budget.pk}/change/", {
        "tenant": world.acme.pk, "name": "acme-monthly", "scope": "tenant", "scope_value": "", "limit_usd": "25",
        "period": "monthly", "enforcement": "hard", "alert_thresholds": "", "alert_emails": "",
        "alert_webhook_url": "http://169.254.169.254/latest/meta-data/"})

    assert resp.status_code == 200  # the form again, with the error
    assert "Webhook URL not allowed" in resp.content.decode()
    world.acme_budget.refresh_from_db()
    assert world.acme_budget.limit_usd != Decimal("25")


def test_gateway_apply_refuses_a_forbidden_webhook_url(settings):
    from pydantic import ValidationError

    from apps.gateway.config_schema import BudgetSpec

    settings.WEBHOOK_ALLOWED_HOSTS = []
    with pytest.raises(ValidationError, match="not a public address"):
        BudgetSpec(name="b", limit_usd=1, alert_webhook_url="http://0x7f000001/")


# --- the webhook secret, for tenant admins only -------------------------------------------------


def test_tenant_admins_read_and_rotate_their_webhook_secret_others_do_not(world):
    admin = api(world.acme_admin)

    shown = admin.get("/api/tenants/acme/webhook-secret/")
    rotated = admin.post("/api/tenants/acme/webhook-secret/rotate/")

    assert shown.status_code == 200 and shown.json()["webhook_secret"].startswith("whsec_")
    assert rotated.status_code == 200 and rotated.json()["webhook_secret"] != shown.json()["webhook_secret"]
    assert admin.get("/api/tenants/acme/webhook-secret/").json()["webhook_secret"] == rotated.json()["webhook_secret"]
    assert api(world.acme_manager).get("/api/tenants/acme/webhook-secret/").status_code == 403
    assert api(world.acme_viewer).post("/api/tenants/acme/webhook-secret/rotate/").status_code == 403
    assert api(world.globex_admin).get("/api/tenants/acme/webhook-secret/").status_code == 404
    assert "webhook_secret" not in str(admin.get("/api/tenants/acme/").json())


def test_tenant_admins_see_their_webhook_secret_in_the_admin(client, world):
    from apps.keys.services import tenant_webhook_secret

    client.force_login(world.acme_admin)
    resp = client.post("/admin/keys/tenant/", {"action": "show_webhook_secret", "_selected_action": [world.acme.pk]})

    assert resp.status_code == 200
    assert tenant_webhook_secret(tenant_id=world.acme.pk) in resp.content.decode()
    assert "no-store" in resp["Cache-Control"]
