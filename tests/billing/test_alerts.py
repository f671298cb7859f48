"""Budget alerts: each threshold fires exactly once per budget and period (sequentially, from
concurrent coroutines and from concurrent threads), by email and by a signed webhook."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime
from decimal import Decimal

import orjson
import pytest
import time_machine
from asgiref.sync import async_to_sync
from django.db import connection

from apps.billing import alerts, tasks
from apps.billing.models import Alert
from apps.billing.periods import period_bounds
from apps.billing.selectors import alerts_for_tenants
from apps.keys.outbound import signature_verify
from apps.keys.services import tenant_webhook_secret
from tests import factories as f

D = Decimal
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def no_forecast(settings):
    settings.BUDGET_FORECAST_MIN_ELAPSED = 2  # never: these tests look at thresholds only


@pytest.fixture
def budget(webhook):
    tenant = f.TenantFactory(timezone="Europe/Berlin")
    return f.BudgetFactory(tenant=tenant, name="acme-monthly", limit_usd=D("10"), period="monthly",
                           alert_thresholds=["0.5", "0.8", "1.0"], alert_emails=["ops@acme.test", "cfo@acme.test"],
                           alert_webhook_url=webhook.url)


def bounds(budget, at=None):
    return period_bounds(period=budget.period, tz=budget.tenant.timezone, at=at or datetime.now(UTC))


async def aobserve(budget, before, after, at=None):
    start, end = bounds(budget, at)
    await alerts.budget_spend_observed(budget_id=budget.id, tenant_id=budget.tenant_id, period_start=start,
                                       period_end=end, limit_usd=budget.limit_usd, spent_before=D(before),
                                       spent_after=D(after))


def observe(budget, before, after, at=None):
    async_to_sync(aobserve)(budget, before, after, at)


def verify(request) -> dict:
    """Check the delivery as a receiver would, with the tenant's webhook secret."""
    payload = orjson.loads(request["body"])
    tenant = Alert.objects.get(id=payload["alert"]["id"]).tenant_id
    assert signature_verify(header=request["headers"]["x-llm-signature"], body=request["body"],
                            secret=tenant_webhook_secret(tenant_id=tenant))
    return payload


def alert_rows(budget):
    return list(Alert.objects.filter(budget=budget).order_by("threshold").values_list("kind", "threshold"))


def test_each_threshold_fires_once_by_email_and_signed_webhook(budget, webhook, eager_celery, mailoutbox,
                                                                     no_forecast):
    for before, after in [("0", "1"), ("1", "4.99"), ("4.99", "5"), ("5", "6"), ("6", "8.5"), ("8.5", "9"),
                          ("9", "9.5"), ("8.5", "9"), ("4.99", "5")]:
        observe(budget, before, after)

    assert alert_rows(budget) == [("threshold", D("0.5")), ("threshold", D("0.8"))]
    assert len(mailoutbox) == 2
    assert sorted(mailoutbox[0].to) == ["cfo@acme.test", "ops@acme.test"]
    assert "reached 50% of its limit: $5.0000 of $10.0000 spent" in mailoutbox[0].body
    assert "80%" in mailoutbox[1].body
    assert len(webhook.requests) == 2
    payloads = [verify(r) for r in webhook.requests]
    assert [p["alert"]["threshold"] for p in payloads] == ["0.5", "0.8"]
    assert payloads[1]["type"] == "budget.alert.threshold"
    assert payloads[1]["alert"]["budget"] == "acme-monthly"
    assert payloads[1]["alert"]["spent_usd"] == "8.5"
    assert webhook.requests[1]["headers"]["x-llm-delivery"] == str(Alert.objects.get(threshold=D("0.8")).id)
    assert all(a.delivery == {"email": "sent", "webhook": "sent"} for a in Alert.objects.all())


def test_concurrent_observations_store_one_alert_per_threshold(budget, webhook, eager_celery, mailoutbox,
                                                                     no_forecast):
    async def many():
        await asyncio.gather(*(aobserve(budget, "7.9", "8.1") for _ in range(40)))

    async_to_sync(many)()

    assert alert_rows(budget) == [("threshold", D("0.5")), ("threshold", D("0.8"))]
    assert len(mailoutbox) == 2
    assert len(webhook.requests) == 2


def test_concurrent_workers_store_the_alert_once(budget, webhook, eager_celery, mailoutbox):
    """The unique constraint decides between processes: here, threads with their own connections."""
    start, end = bounds(budget)
    barrier = threading.Barrier(8)
    results, errors = [], []

    def worker():
        try:
            barrier.wait(5)
            results.append(tasks.budget_alert_fire(
                budget_id=budget.id, kind="threshold", threshold="0.8", period_start=start.isoformat(),
                period_end=end.isoformat(), spent_usd="8.2", limit_usd="10"))
        except Exception as exc:  # surfaced below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    assert errors == []
    assert len([r for r in results if r is not None]) == 1
    assert Alert.objects.filter(budget=budget).count() == 1
    assert len(mailoutbox) == 1
    assert len(webhook.requests) == 1


def test_a_new_period_fires_the_threshold_again(budget, eager_celery, mailoutbox, no_forecast):
    january = datetime(2026, 1, 20, tzinfo=UTC)
    february = datetime(2026, 2, 20, tzinfo=UTC)

    observe(budget, "7", "8", at=january)
    observe(budget, "7", "8", at=january)
    observe(budget, "7", "8", at=february)

    periods = sorted(Alert.objects.filter(budget=budget, threshold=D("0.8")).values_list("period_start", flat=True))
    assert periods == [datetime(2025, 12, 31, 23, tzinfo=UTC), datetime(2026, 1, 31, 23, tzinfo=UTC)]


def test_soft_budget_alerts_past_its_limit(eager_celery, mailoutbox, no_forecast):
    soft = f.BudgetFactory(enforcement="soft", limit_usd=D("2"), alert_thresholds=[1.0, 1.5],
                           alert_emails=["dev@x.test"])

    observe(soft, "1.9", "3.2")

    assert alert_rows(soft) == [("threshold", D("1.0")), ("threshold", D("1.5"))]
    assert "reached 150% of its limit" in mailoutbox[1].body


def test_forecast_fires_once_when_the_extrapolation_passes_the_limit(budget, eager_celery, mailoutbox):
    budget.period = "daily"
    budget.alert_thresholds = []
    budget.save()
    start, end = bounds(budget, datetime(2026, 6, 10, 12, tzinfo=UTC))

    with time_machine.travel(start + (end - start) * 2 / 5, tick=False):  # 40% of the day gone
        observe(budget, "5.9", "6")
        observe(budget, "6", "6.2")

    alert = Alert.objects.get(budget=budget)
    assert alert.kind == "forecast"
    assert alert.forecast_usd == D("15")
    assert "forecast to reach $15.0000" in alert.message
    assert len(mailoutbox) == 1


def test_no_forecast_below_the_limit_or_too_early(budget, eager_celery):
    budget.alert_thresholds = []
    budget.save()
    start, end = bounds(budget, datetime(2026, 6, 10, 12, tzinfo=UTC))

    with time_machine.travel(start + (end - start) / 2, tick=False):
        observe(budget, "4", "4.9")  # on course for 9.8 of 10
    with time_machine.travel(start + (end - start) / 20, tick=False):
        observe(budget, "0", "1")  # would project 20, but 5% of the month says little

    assert Alert.objects.count() == 0


def test_webhook_is_retried_until_the_receiver_takes_it(budget, webhook, eager_celery_retrying):
    webhook.statuses.extend([500, 503])
    start, end = bounds(budget)

    tasks.budget_alert_fire(budget_id=budget.id, kind="threshold", threshold="1.0", period_start=start.isoformat(),
                            period_end=end.isoformat(), spent_usd="10", limit_usd="10")

    alert = Alert.objects.get(budget=budget)
    assert alert.delivery["webhook"] == "sent"
    assert len(webhook.requests) == 3
    assert len({r["body"] for r in webhook.requests}) == 1  # the same signed body each time
    verify(webhook.requests[-1])


def test_a_webhook_that_never_answers_is_marked_failed(budget, webhook, eager_celery_retrying):
    webhook.statuses.extend([500] * 20)
    start, end = bounds(budget)

    tasks.budget_alert_fire(budget_id=budget.id, kind="threshold", threshold="0.5", period_start=start.isoformat(),
                            period_end=end.isoformat(), spent_usd="5", limit_usd="10")

    alert = Alert.objects.get(budget=budget)
    assert alert.delivery["webhook"] == "failed"
    assert alert.delivery["email"] == "sent"
    assert len(webhook.requests) == tasks.alert_deliver_webhook.max_retries + 1


def test_alerts_for_tenants_lists_only_those_tenants():
    mine = f.AlertFactory()
    f.AlertFactory()  # another tenant's

    assert list(alerts_for_tenants(tenant_ids=[mine.tenant_id])) == [mine]


def test_alert_without_channels_is_still_stored(eager_celery, no_forecast):
    quiet = f.BudgetFactory(limit_usd=D("1"), alert_thresholds=["0.8"])

    observe(quiet, "0.7", "0.9")

    alert = Alert.objects.get(budget=quiet)
    assert alert.delivery == {}
    assert alert.period_start == bounds(quiet)[0]


def test_the_hot_path_is_arithmetic_until_something_crosses(budget, monkeypatch, no_forecast):
    loads, published = [], []
    real_load = alerts._thresholds_load
    monkeypatch.setattr(alerts, "_thresholds_load", lambda: loads.append(1) or real_load())
    monkeypatch.setattr(alerts, "_publish", lambda jobs: published.extend(jobs))

    async def settle_many():
        for i in range(200):
            await aobserve(budget, D(i) / 100, D(i + 1) / 100)  # up to $2.00 of $10: below 50%

    async_to_sync(settle_many)()
    assert (len(loads), published) == (1, [])

    observe(budget, "4.99", "5.01")
    assert [kw["threshold"] for _, kw in published] == ["0.5"]


def test_a_broker_error_is_logged_and_retried_on_the_next_settle(budget, monkeypatch, no_forecast, caplog):
    def broken(jobs):
        raise ConnectionError("broker down")

    monkeypatch.setattr(alerts, "_publish", broken)
    observe(budget, "4.9", "5.1")
    sent = []
    monkeypatch.setattr(alerts, "_publish", lambda jobs: sent.extend(jobs))
    observe(budget, "5.1", "5.2")

    assert "could not enqueue" in caplog.text
    assert [kw["threshold"] for _, kw in sent] == ["0.5"]
