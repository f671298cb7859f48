"""Parsing of the dashboard's, the CSVs' and the analytics API's filters."""

from __future__ import annotations

from datetime import timedelta

from django import forms
from django.utils import timezone

from .selectors import UsageFilters

DEFAULT_DAYS = 7
MAX_DAYS = 400


class UsageFilterForm(forms.Form):
    since = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))
    until = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))
    tenant = forms.CharField(required=False)
    source = forms.CharField(required=False, max_length=100)
    model = forms.CharField(required=False, max_length=200)
    tag = forms.CharField(required=False, max_length=64)
    user = forms.CharField(required=False, max_length=256, label="End user")
    granularity = forms.ChoiceField(required=False, choices=[("", "auto"), ("hour", "hourly"), ("day", "daily")])

    def clean(self):
        data = super().clean()
        today = timezone.now().date()
        until = data.get("until") or today
        since = data.get("since") or until - timedelta(days=DEFAULT_DAYS - 1)
        if since > until:
            raise forms.ValidationError("The start date is after the end date.")
        if (until - since).days > MAX_DAYS:
            raise forms.ValidationError(f"Choose at most {MAX_DAYS} days.")
        if data.get("tag") and data.get("user"):
            raise forms.ValidationError("Filter by a tag or by an end user, not both at once.")
        data["since"], data["until"] = since, until
        return data

    def usage_filters(self, tenant_ids) -> UsageFilters:
        d = self.cleaned_data
        return UsageFilters(tenant_ids=tuple(tenant_ids), since=d["since"], until=d["until"],
                            source=d.get("source") or "", model=d.get("model") or "",
                            granularity=d.get("granularity") or "", tag=d.get("tag") or "",
                            end_user=d.get("user") or "")


def usage_filters_from(params, *, tenants) -> tuple[UsageFilterForm, UsageFilters | None]:
    """Validate query parameters against the tenants the caller may read (a queryset or list of
    Tenant); an unknown or foreign `tenant` slug selects nothing."""
    form = UsageFilterForm(params)
    if not form.is_valid():
        return form, None
    ids = [t.id for t in tenants]
    slug = form.cleaned_data.get("tenant")
    if slug:
        ids = [t.id for t in tenants if t.slug == slug]
    return form, form.usage_filters(ids)
