"""The usage-event stream: a tenant's usage events pushed to its webhook, not only pulled.

A tenant subscribes a URL (`UsageStream`, in the admin). Celery beat runs `usage_streams_deliver`
every USAGE_STREAM_EVERY_S; for each stream it POSTs the tenant's new ledger rows in the seed's
usage-event shape (each with its `request_id`, for deduplication), up to USAGE_STREAM_BATCH_MAX per
request, in ledger order:

    {"stream_id": 3, "events": [{"usage_event": {...}, "request_id": "req_...", ...}, ...]}

signed like every webhook (`X-LLM-Signature`, keyed with the tenant's webhook secret; header
`X-LLM-Event: usage.batch`). A batch is acknowledged by any 2xx; only then does the cursor move
past it. A failure is retried with exponential backoff (up to USAGE_STREAM_BACKOFF_MAX_S) from the
same cursor: delivery is at least once, so receivers deduplicate by request id.

Ordering and completeness: the ledger id is assigned when a row is inserted, and concurrent inserts
may commit out of id order. A run therefore delivers only ids up to the highest id it saw at the
previous run (`horizon`), by when every insert that had taken a lower id has committed. A new
stream starts with the events recorded after its first run (no backfill). Each run claims each
stream with a short lease, so overlapping runs do not send a batch twice.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

import httpx
import orjson
from django.conf import settings
from django.db.models import Max, Q
from django.utils import timezone

from apps.keys import outbound
from apps.keys.services import tenant_webhook_secret

from .models import UsageEvent, UsageStream
from .selectors import EXPORT_FIELDS, seed_usage_event

log = logging.getLogger(__name__)

LEASE_S = 120


def _claim(stream_id: int, now: datetime) -> bool:
    return bool(UsageStream.objects.filter(id=stream_id).filter(Q(lease_until__isnull=True) | Q(lease_until__lt=now))
                .update(lease_until=now + timedelta(seconds=LEASE_S)))


def usage_stream_deliver(*, stream: UsageStream, now: datetime, max_batches: int = 20) -> int:
    """Deliver what is due on one claimed stream; returns how many events were acknowledged."""
    top = UsageEvent.objects.aggregate(m=Max("id"))["m"] or 0
    if stream.cursor is None:  # a new stream: from now on
        UsageStream.objects.filter(id=stream.id).update(cursor=top, horizon=top)
        return 0
    horizon = stream.horizon if stream.horizon is not None else stream.cursor
    cursor, sent, error = stream.cursor, 0, ""
    secret = tenant_webhook_secret(tenant_id=stream.tenant_id)
    with outbound.client(timeout=settings.USAGE_STREAM_TIMEOUT_S) as http:
        for _ in range(max_batches):
            qs = UsageEvent.objects.filter(tenant_id=stream.tenant_id, id__gt=cursor, id__lte=horizon).order_by("id")
            rows = list(qs.values("id", *EXPORT_FIELDS)[:settings.USAGE_STREAM_BATCH_MAX])
            if not rows:
                break
            body = orjson.dumps({"stream_id": stream.id, "events": [seed_usage_event(r) for r in rows]})
            headers = {"Content-Type": "application/json", "User-Agent": "llm-service-usage/1",
                       "X-LLM-Event": "usage.batch", "X-LLM-Delivery": f"{stream.id}-{rows[0]['id']}-{rows[-1]['id']}",
                       outbound.SIGNATURE_HEADER: outbound.signature_header(body=body, secret=secret)}
            try:
                resp = outbound.post(stream.url, body=body, headers=headers, timeout=settings.USAGE_STREAM_TIMEOUT_S,
                                     http=http)
            except (httpx.HTTPError, outbound.DestinationRefused) as exc:
                error = f"{type(exc).__name__}: {exc}"[:200]
                break
            if resp.status_code >= 300:
                error = f"HTTP {resp.status_code}"
                break
            cursor = rows[-1]["id"]
            sent += len(rows)
            UsageStream.objects.filter(id=stream.id).update(cursor=cursor, last_delivered_at=now, failures=0,
                                                            last_error="", next_attempt_at=None)
    if error:
        failures = stream.failures + 1
        wait = min(settings.USAGE_STREAM_BACKOFF_MAX_S, 2 ** min(failures, 16))
        log.warning("usage stream %s: delivery failed (%s); retry in %ss", stream.id, error, wait)
        UsageStream.objects.filter(id=stream.id).update(failures=failures, last_error=error,
                                                        next_attempt_at=now + timedelta(seconds=wait))
    else:
        UsageStream.objects.filter(id=stream.id).update(horizon=max(top, horizon))
    return sent


def usage_streams_deliver(*, now: datetime | None = None) -> int:
    """The beat task: every active stream that is due; returns the events acknowledged."""
    now = now or timezone.now()
    total = 0
    due = UsageStream.objects.filter(Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now), is_active=True)
    for stream in due:
        if not _claim(stream.id, now):
            continue
        try:
            stream.refresh_from_db()
            total += usage_stream_deliver(stream=stream, now=now)
        finally:
            UsageStream.objects.filter(id=stream.id).update(lease_until=None)
    return total
