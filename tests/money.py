"""Helpers of the money-truth tests: a budget's spend by the one read, and a worker stopped at a
chosen point of its work."""

from __future__ import annotations

from decimal import Decimal

from asgiref.sync import async_to_sync
from django.conf import settings
from django.utils import timezone

from apps.billing.budgets import budget_spend
from apps.billing.models import Budget
from apps.billing.selectors import budget_ref

# The state backend's settle, whichever one the tests run on.
SETTLE = "apps.core.state.RedisState.settle" if settings.REDIS_URL else "apps.core.state.SqliteState.settle"


def spend(budget) -> tuple[Decimal, Decimal]:
    """(spent, held) of a budget by the one budget_spend read."""
    ref = budget_ref(Budget.objects.select_related("tenant").get(pk=budget.pk))
    return async_to_sync(budget_spend)(budgets=[ref], at=timezone.now())[ref.id]


class WorkerStopped(BaseException):
    """The worker process ends at this point, as a SIGKILL would end it: nothing after it runs
    (no handler of ours catches a BaseException that is not a cancellation)."""


def stops_the_worker(*args, **kwargs):
    """Patched over a step (monkeypatch.setattr): the worker stops there."""
    raise WorkerStopped
