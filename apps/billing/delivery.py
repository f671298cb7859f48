"""Webhook delivery of budget alerts, through the guarded client of apps.keys.outbound (public
addresses only, checked where the socket opens) and signed with the tenant's webhook secret.

What went wrong on the network (connection refused, a 404, a timeout) is logged for the operator
and never stored where tenants read it: the tasks store one of DeliveryStatus."""

from __future__ import annotations

import logging

import httpx
import orjson
from django.conf import settings

from apps.keys import outbound
from apps.keys.services import tenant_webhook_secret

from .models import Alert, DeliveryStatus
from .services import AlertDeliveryError, _alert_targets, alert_delivery_mark, alert_payload

log = logging.getLogger(__name__)


def alert_webhook_send(*, alert_id: int) -> None:
    """POST the alert as JSON to every webhook URL of its budgets (idempotent: once sent, no-op).
    Raises AlertDeliveryError when a receiver may take it on a retry, DestinationRefused when
    every failure is a destination that is not allowed (a retry cannot help)."""
    alert = Alert.objects.select_related("tenant", "budget").get(id=alert_id)
    if alert.webhook_status == DeliveryStatus.SENT:
        return
    _, hooks = _alert_targets(alert)
    if not hooks:
        alert_delivery_mark(alert_id=alert.id, channel="webhook", status=DeliveryStatus.NO_WEBHOOK)
        return
    body = orjson.dumps(alert_payload(alert))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "llm-service-alerts/1",
        "X-LLM-Event": f"budget.alert.{alert.kind}",
        "X-LLM-Delivery": str(alert.id),
        outbound.SIGNATURE_HEADER: outbound.signature_header(
            body=body, secret=tenant_webhook_secret(tenant_id=alert.tenant_id)),
    }
    retryable, refused = [], []
    with outbound.client(timeout=settings.ALERT_WEBHOOK_TIMEOUT_S) as http:
        for url in hooks:
            try:
                resp = outbound.post(url, body=body, headers=headers, timeout=settings.ALERT_WEBHOOK_TIMEOUT_S,
                                     http=http)
            except outbound.DestinationRefused as exc:
                refused.append(f"{url}: {exc}")
                continue
            except httpx.HTTPError as exc:
                retryable.append(f"{url}: {type(exc).__name__}: {exc}")
                continue
            if resp.status_code >= 300:
                retryable.append(f"{url}: HTTP {resp.status_code}")
    for why in refused:
        log.warning("alert %s webhook refused: %s", alert.id, why)
    if retryable:
        raise AlertDeliveryError("; ".join(retryable))
    if refused:
        raise outbound.DestinationRefused("; ".join(refused))
    alert_delivery_mark(alert_id=alert.id, channel="webhook", status=DeliveryStatus.SENT)
