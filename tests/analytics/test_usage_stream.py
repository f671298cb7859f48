"""The usage-event stream: a tenant's usage events pushed to its webhook in signed batches, retried,
every event of a burst delivered, and exactly once per request id when the receiver acknowledges."""

from datetime import timedelta

import orjson
import pytest
from django.utils import timezone

from apps.analytics.models import UsageEvent, UsageStream
from apps.analytics.usage_stream import usage_streams_deliver
from apps.keys.outbound import signature_verify
from apps.keys.services import tenant_webhook_secret
from tests import factories as f
from tests.gateway.conftest import WebhookReceiver

pytestmark = pytest.mark.django_db


@pytest.fixture
def receiver(settings):
    settings.WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]
    settings.USAGE_STREAM_BATCH_MAX = 500
    with WebhookReceiver(fail_first=1) as r:
        yield r


def _burst(tenant, n, prefix):
    now = timezone.now()
    UsageEvent.objects.bulk_create([
        UsageEvent(request_id=f"{prefix}-{i}", timestamp=now, tenant=tenant, source_type="application",
                   source_ref="bot", model="m", status=200, prompt_tokens=i, completion_tokens=1)
        for i in range(n)])
    return {f"{prefix}-{i}" for i in range(n)}


def test_the_usage_webhook_receives_every_event_of_a_burst_exactly_once_by_request_id(receiver):
    tenant, other = f.TenantFactory(), f.TenantFactory()
    stream = UsageStream.objects.create(tenant=tenant, url=receiver.url)
    _burst(tenant, 3, "before")  # recorded before the stream's first run: not sent
    now = timezone.now()
    usage_streams_deliver(now=now)  # starts the stream here
    expected = _burst(tenant, 1200, "burst")
    _burst(other, 50, "other")

    usage_streams_deliver(now=now)  # sees the burst (horizon), sends nothing yet
    assert receiver.calls == []
    usage_streams_deliver(now=now)  # the receiver refuses the first batch: retried later, with backoff
    assert len(receiver.calls) == 1
    assert UsageStream.objects.get().failures == 1
    usage_streams_deliver(now=now)  # not yet due
    assert len(receiver.calls) == 1
    usage_streams_deliver(now=now + timedelta(minutes=10))

    acknowledged = receiver.calls[1:]  # the first call got a 500
    batches = [orjson.loads(c["body"]) for c in acknowledged]
    ids = [e["request_id"] for b in batches for e in b["events"]]
    assert len(ids) == len(set(ids)) == 1200 and set(ids) == expected
    assert [len(b["events"]) for b in batches] == [500, 500, 200]
    assert batches[0]["events"][0]["usage_event"]["tokens"] == {"prompt": 0, "completion": 1}
    secret = tenant_webhook_secret(tenant_id=tenant.id)
    assert all(signature_verify(header=c["headers"]["X-LLM-Signature"], body=c["body"], secret=secret)
               for c in acknowledged)
    assert all(c["headers"]["X-LLM-Event"] == "usage.batch" for c in acknowledged)

    usage_streams_deliver(now=now + timedelta(minutes=11))  # caught up: nothing again
    assert len(receiver.calls) == 4
    stream.refresh_from_db()
    assert stream.failures == 0 and stream.last_error == ""
