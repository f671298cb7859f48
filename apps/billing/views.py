"""Budget pages for people (the dashboard links here): a budget's numbers and its burn-down."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import render

from apps.keys.selectors import tenant_ids_for_user

from . import selectors
from .models import Budget


@login_required
def budget_detail(request, budget_pk: int):
    """Any member of the budget's tenant may read it; anyone else gets 404."""
    budget = (Budget.objects.select_related("tenant")
              .filter(pk=budget_pk, tenant_id__in=tenant_ids_for_user(user=request.user)).first())
    if budget is None:
        raise Http404("No such budget.")
    data = selectors.budget_burndown(budget=budget)
    return render(request, "billing/budget_detail.html", {"budget": budget, **data})
