"""Operational alerts for the operators (not tenants): what is wrong with the service right now.

Conditions, evaluated by `ops_alerts_check` (Celery beat, every OPS_ALERT_CHECK_EVERY_S):
- `provider_errors:<provider>`: over the last OPS_ALERT_WINDOW_S, at least OPS_ALERT_MIN_ATTEMPTS
  upstream calls to the provider (every attempt, failed fallbacks included; from the ledger rows'
  `attempts`) and a failure share of OPS_ALERT_ERROR_RATE or more;
- `provider_latency:<provider>`: the same calls take OPS_ALERT_LATENCY_MS or more on average;
- `deployment_cooldown:<id>`: an active deployment is cooling down after repeated failures;
- `queue_backlog:async` / `queue_backlog:batch`: an async request, or a batch with lines, has been
  waiting for a worker longer than OPS_ALERT_QUEUE_WAIT_S.

Each condition is an incident (`OpsIncident`, at most one open per key): announced once when it
opens and once when it clears ("resolved"), by email (OPS_ALERT_EMAILS), a signed JSON webhook
(OPS_ALERT_WEBHOOK_URL, `X-LLM-Signature` keyed with OPS_ALERT_WEBHOOK_SECRET, through the guarded
client of apps.keys.outbound) and a Slack-compatible incoming webhook (`{"text": ...}`,
OPS_ALERT_SLACK_WEBHOOK_URL). A channel that fails is tried again at the next check until it
took the message (the incident remembers which announcements went out), so each is sent at
least once and, once it succeeded, never again.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

import httpx
import orjson
from asgiref.sync import async_to_sync
from django.conf import settings
from django.core.mail import send_mail
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from apps.analytics.selectors import attempt_stats
from apps.keys import outbound

from . import cooldown
from .models import AsyncRequest, Batch, BatchStatus, Deployment, JobStatus, OpsIncident

log = logging.getLogger(__name__)


def _conditions(now: datetime) -> dict[str, tuple[str, str, str, float | None]]:
    """key -> (kind, subject, message, value) of every condition that holds now."""
    found: dict[str, tuple[str, str, str, float | None]] = {}
    window = settings.OPS_ALERT_WINDOW_S
    for provider, s in attempt_stats(since=now - timedelta(seconds=window), until=now).items():
        calls = s["calls"]
        if calls < settings.OPS_ALERT_MIN_ATTEMPTS:
            continue
        rate = s["failed"] / calls
        if rate >= settings.OPS_ALERT_ERROR_RATE:
            found[f"provider_errors:{provider}"] = (
                "provider_errors", provider,
                f"Provider {provider}: {s['failed']} of {calls} upstream attempts failed in the last {window}s "
                f"({rate:.0%}).", round(rate, 4))
        mean = s["latency_ms_sum"] / calls
        if mean >= settings.OPS_ALERT_LATENCY_MS:
            found[f"provider_latency:{provider}"] = (
                "provider_latency", provider,
                f"Provider {provider}: upstream attempts took {mean:.0f} ms on average in the last {window}s.",
                round(mean, 1))
    deployments = {d.id: d for d in Deployment.objects.filter(is_active=True).select_related("alias", "provider")}
    cooling = async_to_sync(cooldown.cooling)(list(deployments)) if deployments else {}
    for dep_id, seconds in cooling.items():
        d = deployments[dep_id]
        found[f"deployment_cooldown:{dep_id}"] = (
            "deployment_cooldown", str(d),
            f"Deployment {d} ({d.provider.name}) is cooling down after repeated failures ({seconds:.0f}s left).",
            float(seconds))
    wait = timedelta(seconds=settings.OPS_ALERT_QUEUE_WAIT_S)
    oldest = (AsyncRequest.objects.filter(status=JobStatus.QUEUED).order_by("created_at")
              .values_list("created_at", flat=True).first())
    if oldest is not None and now - oldest > wait:
        waited = (now - oldest).total_seconds()
        found["queue_backlog:async"] = ("queue_backlog", "async",
                                        f"Async requests are waiting for a worker: the oldest for {waited:.0f}s.",
                                        waited)
    oldest = (Batch.objects.filter(status=BatchStatus.IN_PROGRESS, lines__status=JobStatus.QUEUED)
              .order_by("created_at").values_list("created_at", flat=True).first())
    if oldest is not None and now - oldest > wait:
        waited = (now - oldest).total_seconds()
        found["queue_backlog:batch"] = ("queue_backlog", "batch",
                                        f"Batches are waiting for a worker: the oldest for {waited:.0f}s.", waited)
    return found


def ops_alerts_check(*, now: datetime | None = None) -> dict[str, int]:
    """Open incidents for new conditions, resolve the ones that cleared, and announce what has not
    been announced yet. Idempotent; safe to run concurrently (one open incident per key)."""
    now = now or timezone.now()
    found = _conditions(now)
    opened = resolved = 0
    open_keys = set(OpsIncident.objects.filter(resolved_at__isnull=True).values_list("key", flat=True))
    for key, (kind, subject, message, value) in found.items():
        if key in open_keys:
            continue
        with transaction.atomic():
            if not OpsIncident.objects.select_for_update().filter(key=key, resolved_at__isnull=True).exists():
                OpsIncident.objects.create(key=key, kind=kind, subject=subject, message=message, value=value,
                                           opened_at=now)
                opened += 1
    for key in open_keys - set(found):
        resolved += OpsIncident.objects.filter(key=key, resolved_at__isnull=True).update(resolved_at=now)
    sent = ops_alerts_announce()
    return {"opened": opened, "resolved": resolved, "announced": sent}


def ops_alerts_announce() -> int:
    """Send the announcements still owed (an opening, a resolution); returns how many went out."""
    sent = 0
    owed = OpsIncident.objects.filter(Q(notified_open=False) | Q(resolved_at__isnull=False, notified_resolved=False))
    for incident in owed.order_by("opened_at"):
        if not incident.notified_open:
            if not _announce(incident, "firing"):
                continue
            OpsIncident.objects.filter(id=incident.id).update(notified_open=True)
            sent += 1
        if incident.resolved_at is not None and not incident.notified_resolved and _announce(incident, "resolved"):
            OpsIncident.objects.filter(id=incident.id).update(notified_resolved=True)
            sent += 1
    return sent


def ops_alert_payload(incident: OpsIncident, state: str) -> dict:
    return {"event": f"ops.alert.{state}", "state": state, "incident": {
        "id": incident.id, "key": incident.key, "kind": incident.kind, "subject": incident.subject,
        "message": incident.message, "value": incident.value, "opened_at": incident.opened_at.isoformat(),
        "resolved_at": incident.resolved_at.isoformat() if incident.resolved_at else None}}


def _announce(incident: OpsIncident, state: str) -> bool:
    """Every configured channel; True when each took it (a failure is retried at the next check;
    channels that already took it may get it again then: at least once)."""
    title = f"[{'RESOLVED' if state == 'resolved' else 'FIRING'}] {incident.kind}: {incident.subject}"
    text = incident.message if state == "firing" else f"Resolved: {incident.message}"
    ok = True
    if settings.OPS_ALERT_EMAILS:
        try:
            send_mail(title, text, None, settings.OPS_ALERT_EMAILS)
        except Exception:  # noqa: BLE001 - logged; retried at the next check
            log.exception("ops alert %s: email failed", incident.key)
            ok = False
    body = orjson.dumps(ops_alert_payload(incident, state))
    hooks = []
    if settings.OPS_ALERT_WEBHOOK_URL:
        headers = {"Content-Type": "application/json", "User-Agent": "llm-service-alerts/1",
                   "X-LLM-Event": f"ops.alert.{state}", "X-LLM-Delivery": f"{incident.id}-{state}"}
        if settings.OPS_ALERT_WEBHOOK_SECRET:
            headers[outbound.SIGNATURE_HEADER] = outbound.signature_header(body=body,
                                                                         secret=settings.OPS_ALERT_WEBHOOK_SECRET)
        hooks.append((settings.OPS_ALERT_WEBHOOK_URL, body, headers))
    if settings.OPS_ALERT_SLACK_WEBHOOK_URL:
        emoji = ":white_check_mark:" if state == "resolved" else ":rotating_light:"
        hooks.append((settings.OPS_ALERT_SLACK_WEBHOOK_URL, orjson.dumps({"text": f"{emoji} *{title}*\n{text}"}),
                      {"Content-Type": "application/json"}))
    for url, payload, headers in hooks:
        try:
            resp = outbound.post(url, body=payload, headers=headers, timeout=settings.ALERT_WEBHOOK_TIMEOUT_S)
            if resp.status_code >= 300:
                raise httpx.HTTPStatusError(f"HTTP {resp.status_code}", request=resp.request, response=resp)
        except (httpx.HTTPError, outbound.DestinationRefused) as exc:
            log.warning("ops alert %s: webhook %s failed: %s", incident.key, url, exc)
            ok = False
    return ok
