"""Celery entry points of billing: store alerts once and deliver them, retried with backoff.
Tasks take ids and JSON-safe values and are idempotent."""

from __future__ import annotations

import logging
from datetime import datetime
from decimal import Decimal

from celery import shared_task
from django.conf import settings

from apps.keys.outbound import DestinationRefused

from . import delivery, services
from .models import DeliveryStatus

log = logging.getLogger(__name__)


def _backoff_s(retries: int) -> int:
    return min(settings.ALERT_RETRY_MAX_S, settings.ALERT_RETRY_BASE_S * 2**retries)


def _dec(value: str | None) -> Decimal | None:
    return None if value is None else Decimal(value)


def _dt(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


@shared_task(name="billing.budget_alert_fire")
def budget_alert_fire(*, budget_id: int, kind: str, period_start: str, threshold: str = "0", spent_usd: str,
                      limit_usd: str, forecast_usd: str | None = None, period_end: str | None = None) -> int | None:
    alert = services.budget_alert_create(
        budget_id=budget_id, kind=kind, period_start=_dt(period_start), period_end=_dt(period_end),
        threshold=Decimal(threshold), spent_usd=Decimal(spent_usd), limit_usd=Decimal(limit_usd),
        forecast_usd=_dec(forecast_usd),
    )
    return alert.id if alert else None


@shared_task(name="billing.unpriced_model_alert_fire")
def unpriced_model_alert_fire(*, tenant_id: int, model: str, period_start: str) -> int | None:
    alert = services.unpriced_model_alert_create(tenant_id=tenant_id, model=model, period_start=_dt(period_start))
    return alert.id if alert else None


def _deliver(task, alert_id: int, channel: str, send) -> None:
    """Run one channel's delivery. The tenant-visible status says only the outcome; why it failed
    (addresses, ports, HTTP statuses, error texts) goes to the log, for the operator."""
    try:
        send(alert_id=alert_id)
    except DestinationRefused as exc:
        log.warning("alert %s: %s delivery refused, not retried: %s", alert_id, channel, exc)
        services.alert_delivery_mark(alert_id=alert_id, channel=channel, status=DeliveryStatus.REFUSED)
    except services.AlertDeliveryError as exc:
        final = task.request.retries >= task.max_retries
        log.warning("alert %s: %s delivery failed (attempt %d%s): %s", alert_id, channel, task.request.retries + 1,
                    ", giving up" if final else ", will retry", exc)
        services.alert_delivery_mark(alert_id=alert_id, channel=channel,
                                     status=DeliveryStatus.FAILED if final else DeliveryStatus.RETRYING)
        if not final:
            raise task.retry(exc=exc, countdown=_backoff_s(task.request.retries))


@shared_task(bind=True, name="billing.alert_deliver_email", max_retries=8)
def alert_deliver_email(self, alert_id: int) -> None:
    _deliver(self, alert_id, "email", services.alert_email_send)


@shared_task(bind=True, name="billing.alert_deliver_webhook", max_retries=8)
def alert_deliver_webhook(self, alert_id: int) -> None:
    _deliver(self, alert_id, "webhook", delivery.alert_webhook_send)


@shared_task(name="billing.budget_counters_reconcile", ignore_result=True)
def budget_counters_reconcile() -> int:
    """Beat: raise every budget counter the ledger shows to be low (lost Redis state, a settle that
    never reached it). Returns how many were raised."""
    from asgiref.sync import async_to_sync
    from django.utils import timezone

    from .budgets import budget_counters_reconcile as reconcile
    from .models import Budget
    from .selectors import budget_ref

    refs = [budget_ref(b) for b in Budget.objects.select_related("tenant")]
    return len(async_to_sync(reconcile)(budgets=refs, at=timezone.now()))
