"""Operational alerts: a provider outage fires once and resolves once, on every channel (email,
signed webhook, Slack-compatible payload); cooldowns and queue backlogs too."""

from datetime import timedelta

import orjson
import pytest
from asgiref.sync import async_to_sync
from django.core import mail
from django.utils import timezone

from apps.gateway import cooldown
from apps.gateway.models import AsyncRequest, OpsIncident
from apps.gateway.ops_alerts import ops_alerts_check
from apps.keys.outbound import signature_verify
from tests import factories as f
from tests.gateway.conftest import WebhookReceiver

pytestmark = pytest.mark.django_db


@pytest.fixture
def channels(settings):
    settings.WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]
    settings.OPS_ALERT_EMAILS = ["oncall@example.test"]
    settings.OPS_ALERT_WEBHOOK_SECRET = "ops-secret"
    settings.OPS_ALERT_MIN_ATTEMPTS = 4
    settings.OPS_ALERT_ERROR_RATE = 0.5
    with WebhookReceiver() as hook, WebhookReceiver() as slack:
        settings.OPS_ALERT_WEBHOOK_URL = hook.url
        settings.OPS_ALERT_SLACK_WEBHOOK_URL = slack.url
        yield {"hook": hook, "slack": slack}


def _traffic(at, provider, outcomes):
    tenant = f.TenantFactory()
    for outcome in outcomes:
        f.UsageEventFactory(tenant=tenant, timestamp=at, provider="fallback", attempts=[
            {"deployment_id": 1, "provider": provider, "model": "m", "outcome": outcome, "status": None,
             "error": "" if outcome == "ok" else "upstream_error", "start_ms": 0.0, "latency_ms": 30.0}])


def test_an_outage_alert_fires_once_and_resolves_once(channels):
    now = timezone.now()
    _traffic(now - timedelta(seconds=30), "up-openai", ["error"] * 5)  # failing behind a fallback

    ops_alerts_check(now=now)
    ops_alerts_check(now=now + timedelta(seconds=60))  # still failing: nothing new

    incident = OpsIncident.objects.get()
    assert (incident.key, incident.resolved_at) == ("provider_errors:up-openai", None)
    assert len(mail.outbox) == 1 and "FIRING" in mail.outbox[0].subject and "5 of 5" in mail.outbox[0].body
    assert len(channels["hook"].calls) == 1 and len(channels["slack"].calls) == 1
    call = channels["hook"].calls[0]
    assert signature_verify(header=call["headers"]["X-LLM-Signature"], body=call["body"], secret="ops-secret")
    assert orjson.loads(call["body"])["event"] == "ops.alert.firing"
    assert "up-openai" in orjson.loads(channels["slack"].calls[0]["body"])["text"]

    later = now + timedelta(minutes=10)  # the failures left the window; healthy calls since
    _traffic(later - timedelta(seconds=30), "up-openai", ["ok"] * 5)
    ops_alerts_check(now=later)
    ops_alerts_check(now=later + timedelta(seconds=60))

    assert OpsIncident.objects.get().resolved_at is not None
    assert [m.subject.split("]")[0] for m in mail.outbox] == ["[FIRING", "[RESOLVED"]
    assert [orjson.loads(c["body"])["event"] for c in channels["hook"].calls] == ["ops.alert.firing",
                                                                                  "ops.alert.resolved"]
    assert len(channels["slack"].calls) == 2 and "Resolved" in orjson.loads(channels["slack"].calls[1]["body"])["text"]


def test_a_failed_delivery_is_retried_at_the_next_check(channels):
    channels["hook"].fail_first = 1
    now = timezone.now()
    _traffic(now, "up-openai", ["error"] * 4)

    ops_alerts_check(now=now + timedelta(seconds=1))
    assert not OpsIncident.objects.get().notified_open
    ops_alerts_check(now=now + timedelta(seconds=2))

    assert OpsIncident.objects.get().notified_open
    assert [orjson.loads(c["body"])["event"] for c in channels["hook"].calls] == ["ops.alert.firing"] * 2


def test_few_attempts_or_a_low_error_rate_do_not_alert(channels):
    now = timezone.now()
    _traffic(now, "quiet", ["error"] * 3)  # below OPS_ALERT_MIN_ATTEMPTS
    _traffic(now, "mostly-fine", ["ok"] * 8 + ["error"] * 2)

    ops_alerts_check(now=now + timedelta(seconds=1))

    assert not OpsIncident.objects.exists() and not mail.outbox


def test_a_cooling_deployment_and_a_waiting_queue_alert(channels, settings):
    settings.OPS_ALERT_QUEUE_WAIT_S = 60
    dep = f.DeploymentFactory()
    for _ in range(10):
        if async_to_sync(cooldown.failure_record)(dep.id):
            break
    key = f.ApiKeyFactory()
    AsyncRequest.objects.create(id="req_waiting", tenant=key.tenant, api_key=key, body={})
    AsyncRequest.objects.filter(id="req_waiting").update(created_at=timezone.now() - timedelta(minutes=5))

    ops_alerts_check()

    assert set(OpsIncident.objects.values_list("key", flat=True)) == {f"deployment_cooldown:{dep.id}",
                                                                      "queue_backlog:async"}
