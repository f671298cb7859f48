"""Budget gauges for /metrics, computed at scrape time with `budget_spend` (the numbers admission
enforces): llm_budget_utilisation{tenant,budget,period} and llm_budget_spend_usd."""

from __future__ import annotations

from prometheus_client.core import GaugeMetricFamily


class BudgetCollector:
    def collect(self):
        from apps.keys.models import Tenant

        from .budgets import budget_statuses_for_tenants

        slugs = dict(Tenant.objects.values_list("id", "slug"))
        util = GaugeMetricFamily("llm_budget_utilisation", "Budget spend / limit in the current period.",
                                 labels=["tenant", "budget", "period"])
        spend = GaugeMetricFamily("llm_budget_spend_usd", "Budget spend in the current period (USD).",
                                  labels=["tenant", "budget", "period"])
        held = GaugeMetricFamily("llm_budget_held_usd", "Open holds on the budget (USD).",
                                 labels=["tenant", "budget", "period"])
        for s in budget_statuses_for_tenants(tenant_ids=list(slugs)):
            labels = [slugs.get(s.tenant_id, ""), s.name, s.period]
            util.add_metric(labels, float(s.utilisation))
            spend.add_metric(labels, float(s.spent_usd))
            held.add_metric(labels, float(s.held_usd))
        yield util
        yield spend
        yield held
