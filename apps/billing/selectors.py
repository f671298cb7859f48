"""Reads of prices and budgets."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

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


def budget_spent_from_ledger(*, budget: BudgetRef, start: datetime, end: datetime | None) -> Decimal:
    """What the ledger says was spent against a budget in a period: the source of truth from
    which the fast counters are rebuilt."""
    from django.db.models import Sum

    from apps.analytics.models import UsageEvent

    qs = UsageEvent.objects.filter(tenant_id=budget.tenant_id, timestamp__gte=start)
    if end is not None:
        qs = qs.filter(timestamp__lt=end)
    if budget.scope == "source":
        qs = qs.filter(source__name=budget.scope_value)
    elif budget.scope == "key":
        qs = qs.filter(api_key__name=budget.scope_value)
    elif budget.scope == "budget_id":
        qs = qs.filter(budget_id=budget.scope_value)
    return qs.aggregate(total=Sum("cost"))["total"] or Decimal(0)
