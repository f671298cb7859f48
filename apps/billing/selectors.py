"""Reads of prices and budgets."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from apps.core.money import money_str

from .models import Price


@dataclass(frozen=True, slots=True)
class PriceInfo:
    id: int
    model: str
    input_usd_per_mtok: Decimal
    output_usd_per_mtok: Decimal
    cached_input_usd_per_mtok: Decimal | None
    cache_write_usd_per_mtok: Decimal | None
    batch_discount: Decimal
    effective_from: datetime
    source: str = ""


def price_versions_by_model() -> dict[str, list[PriceInfo]]:
    """Every price version, newest first, by model alias."""
    out: dict[str, list[PriceInfo]] = {}
    for p in Price.objects.order_by("model", "-effective_from"):
        out.setdefault(p.model, []).append(
            PriceInfo(
                id=p.id,
                model=p.model,
                input_usd_per_mtok=p.input_usd_per_mtok,
                output_usd_per_mtok=p.output_usd_per_mtok,
                cached_input_usd_per_mtok=p.cached_input_usd_per_mtok,
                cache_write_usd_per_mtok=p.cache_write_usd_per_mtok,
                batch_discount=p.batch_discount,
                effective_from=p.effective_from,
                source=p.source,
            )
        )
    return out


def price_in_force(versions: list[PriceInfo] | None, at: datetime) -> PriceInfo | None:
    for v in versions or ():
        if v.effective_from <= at:
            return v
    return None


def price_for_model(*, model: str, at: datetime) -> PriceInfo | None:
    return price_in_force(price_versions_by_model().get(model), at)


@dataclass(frozen=True, slots=True)
class BudgetRef:
    """A budget as admission needs it; cached in process with the tenant's policy."""

    id: int
    tenant_id: int
    name: str
    scope: str
    scope_value: str
    limit_usd: Decimal
    period: str
    hard: bool
    shrink_max_tokens: bool

    def applies(self, *, source_name: str, key_name: str, budget_id: str) -> bool:
        if self.scope == "tenant":
            return True
        if self.scope == "source":
            return self.scope_value == source_name
        if self.scope == "key":
            return self.scope_value == key_name
        if self.scope == "budget_id":
            return bool(budget_id) and self.scope_value == budget_id
        return False


def budget_refs_for_tenant(*, tenant_id: int) -> list[BudgetRef]:
    from .models import Budget

    return [
        BudgetRef(id=b.id, tenant_id=b.tenant_id, name=b.name, scope=b.scope, scope_value=b.scope_value,
                  limit_usd=b.limit_usd, period=b.period, hard=b.enforcement == "hard",
                  shrink_max_tokens=b.shrink_max_tokens)
        for b in Budget.objects.filter(tenant_id=tenant_id)
    ]


# --- budgets ----------------------------------------------------------------------------------


def budgets_for_key(*, auth, budget_id: str | None = None):
    """The budgets that apply to a request with this key (a `KeyAuth`): the tenant's, its source's,
    its own, and the budget_id budgets of the key's default_budget_id and of `budget_id`."""
    from django.db.models import Q

    from .models import Budget, BudgetScope

    ids = {v for v in (auth.default_budget_id, budget_id) if v}
    match = (Q(scope=BudgetScope.TENANT) | Q(scope=BudgetScope.SOURCE, scope_value=auth.source_name)
             | Q(scope=BudgetScope.KEY, scope_value=auth.key_name)
             | Q(scope=BudgetScope.BUDGET_ID, scope_value__in=ids))
    return Budget.objects.filter(match, tenant_id=auth.tenant_id).select_related("tenant").order_by("name", "id")


def budget_spent_from_ledger(*, budget, start: datetime, end: datetime | None) -> Decimal:
    """What the ledger says the budget's scope spent in [start, end): the truth the fast counters
    are a copy of."""
    from django.db.models import Sum

    from apps.analytics.selectors import usage_events

    filters = {"source": {"source__name": budget.scope_value}, "key": {"api_key__name": budget.scope_value},
               "budget_id": {"budget_id": budget.scope_value}}.get(budget.scope, {})
    qs = usage_events(tenant_ids=[budget.tenant_id], since=start, until=end, **filters)
    return qs.aggregate(total=Sum("cost"))["total"] or Decimal(0)


def budgets_spent_from_ledger(*, items) -> dict[int, Decimal]:
    """budget id -> what the ledger says it spent, for many (budget, start, end) at once: one query."""
    from django.db.models import Q, Sum

    from apps.analytics.models import UsageEvent

    items = list(items)
    if not items:
        return {}
    sums = {}
    for b, start, end in items:
        q = Q(tenant_id=b.tenant_id, timestamp__gte=start)
        if end is not None:
            q &= Q(timestamp__lt=end)
        if b.scope == "source":
            q &= Q(source__name=b.scope_value)
        elif b.scope == "key":
            q &= Q(api_key__name=b.scope_value)
        elif b.scope == "budget_id":
            q &= Q(budget_id=b.scope_value)
        sums[f"b{b.id}"] = Sum("cost", filter=q)
    row = UsageEvent.objects.filter(tenant_id__in={b.tenant_id for b, _, _ in items},
                                    timestamp__gte=min(start for _, start, _ in items)).aggregate(**sums)
    return {b.id: row[f"b{b.id}"] or Decimal(0) for b, _, _ in items}


async def budget_usage(*, budgets, at: datetime) -> dict[int, tuple[Decimal, Decimal]]:
    """budget id -> (spent, held) in the period containing `at`, from admission's counters."""
    from apps.gateway.admission import budget_usage as admission_budget_usage

    return await admission_budget_usage(budgets=budgets, at=at)


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    id: int
    name: str
    scope: str
    scope_value: str
    period: str
    enforcement: str
    limit_usd: Decimal
    spent_usd: Decimal
    held_usd: Decimal
    remaining_usd: Decimal
    period_start: datetime  # in the tenant's time zone
    resets_at: datetime | None  # None: a `total` budget never resets
    timezone: str

    def as_json(self) -> dict:
        """Money as decimal strings (exact), datetimes ISO 8601 with the tenant's UTC offset."""
        return {
            "id": self.id, "object": "budget", "name": self.name, "scope": self.scope,
            "scope_value": self.scope_value or None, "period": self.period, "enforcement": self.enforcement,
            "currency": "USD", "limit_usd": money_str(self.limit_usd), "spent_usd": money_str(self.spent_usd),
            "held_usd": money_str(self.held_usd), "remaining_usd": money_str(self.remaining_usd),
            "period_start": self.period_start.isoformat() if self.period != "total" else None,
            "resets_at": self.resets_at.isoformat() if self.resets_at else None, "timezone": self.timezone,
        }


async def budget_statuses(*, budgets, at: datetime) -> list[BudgetStatus]:
    """Limit, spent, held, remaining and reset time of each budget (tenants select_related)."""
    from zoneinfo import ZoneInfo

    from .periods import period_bounds

    budgets = list(budgets)
    usage = await budget_usage(budgets=budgets, at=at) if budgets else {}
    out = []
    for b in budgets:
        tz = b.tenant.timezone
        zone = ZoneInfo(tz)
        start, end = period_bounds(period=b.period, tz=tz, at=at)
        spent, held = usage.get(b.id, (Decimal(0), Decimal(0)))
        out.append(BudgetStatus(
            id=b.id, name=b.name, scope=b.scope, scope_value=b.scope_value, period=b.period,
            enforcement=b.enforcement, limit_usd=b.limit_usd, spent_usd=spent, held_usd=held,
            remaining_usd=max(Decimal(0), b.limit_usd - spent - held), period_start=start.astimezone(zone),
            resets_at=end.astimezone(zone) if end else None, timezone=tz,
        ))
    return out


async def budget_statuses_for_key(*, auth, budget_id: str | None = None, at: datetime) -> list[BudgetStatus]:
    """`GET /v1/budget`: the status of every budget that applies to the key."""
    from apps.core.db import db_sync

    budgets = await db_sync(lambda: list(budgets_for_key(auth=auth, budget_id=budget_id)))
    return await budget_statuses(budgets=budgets, at=at)


def budget_statuses_sync(*, budgets, at: datetime | None = None) -> list[BudgetStatus]:
    """The same numbers for sync callers (admin, management API)."""
    from asgiref.sync import async_to_sync
    from django.utils import timezone

    budgets = list(budgets.select_related("tenant") if hasattr(budgets, "select_related") else budgets)
    return async_to_sync(budget_statuses)(budgets=budgets, at=at or timezone.now())


# --- alerts -----------------------------------------------------------------------------------


def alerts_for_tenants(*, tenant_ids, kind: str | None = None, budget_id: int | None = None):
    """Every stored alert of these tenants, newest first (the tenant-scoped admin and API list them)."""
    from .models import Alert

    qs = Alert.objects.filter(tenant_id__in=tenant_ids).select_related("tenant", "budget")
    if kind:
        qs = qs.filter(kind=kind)
    if budget_id is not None:
        qs = qs.filter(budget_id=budget_id)
    return qs.order_by("-created_at", "-id")
