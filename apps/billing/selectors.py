"""Reads of prices and budgets."""

from __future__ import annotations

from dataclasses import dataclass, replace
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
    timezone: str = "UTC"  # the tenant's: periods are calendar-aligned there
    budget_id: str = ""  # the string a client sends as metadata.budget_id (scope budget_id)
    # A `user:*` budget counted for one end user (each end user has a counter of their own); "" for
    # every other budget, and for a `user:*` budget read as a whole (the sum over its end users).
    subject: str = ""

    @property
    def per_end_user(self) -> bool:
        """A `user:*` budget: the limit applies to each end user on their own."""
        return self.scope == "user" and self.scope_value == "*"

    @property
    def spend_key(self) -> int | str:
        """What `budget_spend` keys this budget's numbers by: its id, with the end user for a
        `user:*` budget counted for one."""
        return f"{self.id}:{self.subject}" if self.subject else self.id

    @property
    def ledger_value(self) -> str:
        """The scope value the ledger is read by: the end user of a per-end-user counter."""
        return self.subject or self.scope_value

    def applies(self, *, source_name: str, key_name: str, budget_id: str, tags=(), end_user: str = "") -> bool:
        if self.scope == "tenant":
            return True
        if self.scope == "source":
            return self.scope_value == source_name
        if self.scope == "key":
            return self.scope_value == key_name
        if self.scope == "budget_id":
            return bool(budget_id) and self.scope_value == budget_id
        if self.scope == "tag":
            return self.scope_value in tags
        if self.scope == "user":
            return bool(end_user) and self.scope_value == end_user
        return False


def budgets_applying(refs, *, source_name: str, key_name: str, budget_id: str, tags=(),
                     end_user: str = "") -> list[BudgetRef]:
    """The budgets that apply to a request. A `user:*` budget applies to every end user who has no
    `user:<id>` budget of their own, each on a counter of their own (`subject`)."""
    explicit = {r.scope_value for r in refs if r.scope == "user" and not r.per_end_user}
    out = []
    for ref in refs:
        if ref.per_end_user:
            if end_user and end_user not in explicit:
                out.append(replace(ref, subject=end_user))
        elif ref.applies(source_name=source_name, key_name=key_name, budget_id=budget_id, tags=tags,
                         end_user=end_user):
            out.append(ref)
    return out


def budget_refs_for_tenant(*, tenant_id: int) -> list[BudgetRef]:
    from .models import Budget

    return [
        budget_ref(b) for b in Budget.objects.filter(tenant_id=tenant_id).select_related("tenant")
    ]


def budget_ref(b) -> BudgetRef:
    """A Budget row (with its tenant loaded) as admission and budget_spend take it."""
    return BudgetRef(id=b.id, tenant_id=b.tenant_id, name=b.name, scope=b.scope, scope_value=b.scope_value,
                     limit_usd=b.limit_usd, period=b.period, hard=b.enforcement == "hard",
                     shrink_max_tokens=b.shrink_max_tokens, timezone=b.tenant.timezone,
                     budget_id=b.scope_value if b.scope == "budget_id" else "")


# --- budgets ----------------------------------------------------------------------------------


def budgets_for_key(*, auth, budget_id: str | None = None, tags=(), end_user: str = ""):
    """The budgets that apply to a request with this key (a `KeyAuth`): the tenant's, its source's,
    its own, the budget_id budgets of the key's default_budget_id and of `budget_id`, those of
    `tags`, and the end user's (`user:<id>`, else `user:*`; budget_statuses counts them for them)."""
    from django.db.models import Q

    from .models import Budget, BudgetScope

    ids = {v for v in (auth.default_budget_id, budget_id) if v}
    match = (Q(scope=BudgetScope.TENANT) | Q(scope=BudgetScope.SOURCE, scope_value=auth.source_name)
             | Q(scope=BudgetScope.KEY, scope_value=auth.key_name)
             | Q(scope=BudgetScope.BUDGET_ID, scope_value__in=ids))
    if tags:
        match |= Q(scope=BudgetScope.TAG, scope_value__in=list(tags))
    if end_user:
        match |= Q(scope=BudgetScope.USER, scope_value__in=[end_user, "*"])
    return Budget.objects.filter(match, tenant_id=auth.tenant_id).select_related("tenant").order_by("name", "id")


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


def budget_burndown(*, budget, at: datetime | None = None) -> dict:
    """A budget's page: its status (from `budget_statuses_sync`, the one budget spend read: the same
    numbers admission enforces) and the burn-down over its current period.

    Points: cumulative spend at each step (hourly for a daily budget, else daily, in the tenant's
    time zone) from the period start up to now, summed from the ledger in one query
    (`ledger_cost_sums`, the read the budget counters reconcile from); the last point is the status's
    spend. Forecast: the average pace so far carried to the period's end (not for `total` budgets)."""
    from datetime import timedelta
    from zoneinfo import ZoneInfo

    from django.utils import timezone

    from apps.analytics.selectors import ledger_cost_sums

    from .budgets import budget_statuses_sync

    at = at or timezone.now()
    status = budget_statuses_sync(budgets=[budget], at=at)[0]
    zone = ZoneInfo(status.timezone)
    end = status.resets_at
    start = status.period_start
    if status.period == "total":  # from its first day of use (at most 90 days shown)
        start = max(budget.created_at, at - timedelta(days=90)).astimezone(zone)
        start = start.replace(hour=0, minute=0, second=0, microsecond=0)
    step = timedelta(hours=1) if status.period == "daily" else timedelta(days=1)
    horizon = end or at
    ticks = []
    t = start
    while t < horizon and len(ticks) < 400:
        t = t + step
        ticks.append(min(t, horizon))
    past = [t for t in ticks if t <= at]
    items = [(i, budget.tenant_id, status.scope, status.end_user or status.scope_value, status.period_start,
              min(t, at))
             for i, t in enumerate(past)]
    sums = ledger_cost_sums(items=items) if items else {}
    spent = [sums.get(i, Decimal(0)) for i in range(len(past))]
    if spent:
        spent[-1] = status.spent_usd  # now: the same number the status shows
    labels = [t.astimezone(zone).strftime("%Y-%m-%d %H:%M" if step < timedelta(days=1) else "%Y-%m-%d")
              for t in ticks]
    forecast_end = None
    forecast = [None] * len(ticks)
    elapsed = (at - status.period_start).total_seconds()
    if end is not None and elapsed > 0 and past:
        length = (end - status.period_start).total_seconds()
        rate = status.spent_usd / Decimal(elapsed)  # USD per second so far
        forecast_end = (rate * Decimal(length)).quantize(Decimal("0.000001"))
        n = len(past) - 1
        forecast[n] = status.spent_usd
        for i in range(n + 1, len(ticks)):
            forecast[i] = (rate * Decimal((ticks[i] - status.period_start).total_seconds())).quantize(
                Decimal("0.000001"))
    runs_out_at = None
    if forecast_end is not None and forecast_end > status.limit_usd > status.spent_usd and status.spent_usd > 0:
        seconds = (status.limit_usd / (status.spent_usd / Decimal(elapsed)))
        runs_out_at = (status.period_start + timedelta(seconds=float(seconds))).astimezone(zone)
    return {
        "status": status,
        "chart": {"labels": labels, "spent": [str(v) for v in spent], "forecast": [None if v is None else str(v)
                                                                                   for v in forecast],
                  "limit": str(status.limit_usd), "granularity": "hour" if step < timedelta(days=1) else "day"},
        "forecast_end_usd": forecast_end,
        "runs_out_at": runs_out_at,
    }
