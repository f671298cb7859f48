"""Budget alerts, observed on the hot path.

Admission calls `budget_spend_observed` after every settle. It is arithmetic over numbers held in
process: the budgets' thresholds (reloaded at most every BUDGET_ALERT_CONFIG_TTL_S) and a memo of
what this process already enqueued. Only when a threshold is passed, or the linear forecast goes
over the limit, does it publish a Celery task (blocking I/O: run in a worker thread). The task
stores the Alert under a unique constraint, so each threshold fires exactly once per budget and
period however many processes see the crossing; the memo only keeps one process from asking twice.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from django.conf import settings

from .models import AlertKind
from .periods import period_bounds

log = logging.getLogger(__name__)

_thresholds: dict[int, tuple[Decimal, ...]] = {}
_thresholds_loaded_at: float = float("-inf")
_enqueued: set[tuple] = set()
_MEMO_MAX = 100_000
_US = timedelta(microseconds=1)
_ONE = Decimal(1)
_THRESHOLD, _FORECAST = AlertKind.THRESHOLD.value, AlertKind.FORECAST.value
_ttl_s = settings.BUDGET_ALERT_CONFIG_TTL_S


def _in_worker_thread(fn):
    """Run sync `fn` from the hot path in the process' sync thread and give its database
    connection back afterwards (apps.core.db.db_sync). Never a thread of its own: it would hold
    a second pooled connection, and under load every request would wait for a connection only a
    waiting request can give back."""
    from functools import partial

    from apps.core.db import db_sync

    async def run(*args):
        return await db_sync(partial(fn, *args))

    return run


def _thresholds_load() -> dict[int, tuple[Decimal, ...]]:
    from .models import Budget

    out = {}
    for budget_id, values in Budget.objects.values_list("id", "alert_thresholds"):
        parsed = []
        for v in values or ():
            try:
                parsed.append(Decimal(str(v)))
            except ArithmeticError:
                log.warning("budget %s: ignoring alert threshold %r", budget_id, v)
        out[budget_id] = tuple(sorted(t for t in parsed if t > 0))
    return out


async def _thresholds_for(budget_id: int) -> tuple[Decimal, ...]:
    global _thresholds, _thresholds_loaded_at
    age = time.monotonic() - _thresholds_loaded_at
    if age > _ttl_s or (budget_id not in _thresholds and age > 1.0):
        _thresholds = await _in_worker_thread(_thresholds_load)()
        _thresholds_loaded_at = time.monotonic()
    return _thresholds.get(budget_id, ())


def alerts_state_reset() -> None:
    """Forget cached thresholds and the enqueue memo (tests, and after budgets change)."""
    global _thresholds_loaded_at
    _thresholds.clear()
    _thresholds_loaded_at = float("-inf")
    _enqueued.clear()


def forecast_usd(*, spent_usd: Decimal, period_start: datetime, period_end: datetime | None,
                 at: datetime) -> Decimal | None:
    """Spend so far extrapolated linearly to the period end; None for `total` budgets, or before
    BUDGET_FORECAST_MIN_ELAPSED of the period has passed (one early request says nothing)."""
    if period_end is None:
        return None
    total = (period_end - period_start) // _US
    elapsed = (at - period_start) // _US
    if total <= 0 or elapsed <= 0 or elapsed < total * settings.BUDGET_FORECAST_MIN_ELAPSED:
        return None
    return (spent_usd * total / elapsed).quantize(Decimal("0.0000000001"))


def _publish(jobs: list[tuple]) -> None:
    from . import tasks

    for task_name, kwargs in jobs:
        getattr(tasks, task_name).delay(**kwargs)


async def _enqueue(jobs: list[tuple[tuple, str, dict]]) -> None:
    """Publish and remember; on a broker error log it and leave the memo unset, so the next settle
    tries again (an alert is late rather than lost)."""
    try:
        # Publishing is blocking I/O. (With CELERY_TASK_ALWAYS_EAGER the task itself runs here.)
        await _in_worker_thread(_publish)([(name, kw) for _, name, kw in jobs])
    except Exception:
        log.exception("could not enqueue %d budget alert task(s)", len(jobs))
        return
    if len(_enqueued) > _MEMO_MAX:
        _enqueued.clear()
    _enqueued.update(memo for memo, _, _ in jobs)


async def budget_spend_observed(*, budget_id: int, tenant_id: int, period_start: datetime,
                                period_end: datetime | None, limit_usd: Decimal, spent_before: Decimal,
                                spent_after: Decimal) -> None:
    """Called after every settle with the budget's spend before and after it. Enqueues an alert
    for every threshold the spend has reached and for a forecast over the limit, once per process;
    the database keeps it to once overall. A few microseconds when nothing is due."""
    if limit_usd <= 0 or spent_after <= 0:
        return
    due: list[tuple[tuple, str, Decimal | None]] = []
    for t in await _thresholds_for(budget_id):  # ascending
        if spent_after < limit_usd * t:
            break
        memo = (budget_id, period_start, _THRESHOLD, t)
        if memo not in _enqueued:
            due.append((memo, _THRESHOLD, None))
    if period_end is not None and spent_after > spent_before:
        memo = (budget_id, period_start, _FORECAST, _ONE)
        if memo not in _enqueued:
            projected = forecast_usd(spent_usd=spent_after, period_start=period_start, period_end=period_end,
                                     at=datetime.now(UTC))
            if projected is not None and projected > limit_usd:
                due.append((memo, _FORECAST, projected))
    if not due:
        return
    common = {"budget_id": budget_id, "period_start": period_start.isoformat(),
              "period_end": period_end.isoformat() if period_end else None, "limit_usd": str(limit_usd),
              "spent_usd": str(spent_after)}
    await _enqueue([(memo, "budget_alert_fire",
                     {**common, "kind": kind, "threshold": str(memo[3]),
                      **({"forecast_usd": str(projected)} if projected is not None else {})})
                    for memo, kind, projected in due])


async def unpriced_model_observed(*, tenant_id: int, tenant_timezone: str, model: str, at: datetime) -> None:
    """A request of an unpriced model was let through (the tenant allows it): it is recorded with
    cost 0, and the tenant is alerted once per model and day."""
    start, _ = period_bounds(period="daily", tz=tenant_timezone, at=at)
    memo = (tenant_id, start, AlertKind.UNPRICED_MODEL.value, model)
    if memo in _enqueued:
        return
    await _enqueue([(memo, "unpriced_model_alert_fire",
                     {"tenant_id": tenant_id, "model": model, "period_start": start.isoformat()})])
