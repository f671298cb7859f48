"""`{% budget_table tenant_ids %}`: the budgets panel of the dashboard, with the numbers of
`budget_spend` (the same ones admission enforces), so the analytics view need not ask billing."""

from django import template

from apps.billing.budgets import budget_statuses_for_tenants
from apps.core.money import usd_display

register = template.Library()


@register.filter
def usd(value):
    """Money for people: "$50.00", "$0.0042" (never "$0.00" for a small non-zero amount)."""
    return usd_display(value)


@register.inclusion_tag("billing/budget_table.html")
def budget_table(tenant_ids, tenants=None):
    slugs = {t.id: t.slug for t in tenants or ()}
    rows = [(slugs.get(s.tenant_id, ""), s) for s in budget_statuses_for_tenants(tenant_ids=list(tenant_ids))]
    return {"rows": rows}
