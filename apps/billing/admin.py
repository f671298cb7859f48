"""Admin for prices (global and versioned: a "change" saves a new version), budgets (tenant-scoped,
with their live spend) and alerts (tenant-scoped, read-only)."""

from django import forms
from django.contrib import admin, messages
from django.utils import timezone

from apps.core.forms import EmailListField, PercentListField
from apps.core.money import usd_display
from apps.keys.admin import AuditedAdminMixin, TenantScopedAdminMixin

from . import services
from .budgets import budget_statuses_sync
from .models import Alert, Budget, Price, PriceSource


@admin.register(Price)
class PriceAdmin(AuditedAdminMixin, admin.ModelAdmin):
    """Saving a price, new or changed, adds a version effective from `effective_from`; the version
    it replaces stays as it was, because ledger rows point at it."""

    list_display = ["model", "effective_from", "input_usd_per_mtok", "output_usd_per_mtok",
                    "cached_input_usd_per_mtok", "cache_write_usd_per_mtok", "batch_discount", "source", "source_ref"]
    list_filter = ["source"]
    search_fields = ["model"]
    fields = ["model", "effective_from", "input_usd_per_mtok", "output_usd_per_mtok", "cached_input_usd_per_mtok",
              "cache_write_usd_per_mtok", "batch_discount"]

    def get_changeform_initial_data(self, request):
        return {**super().get_changeform_initial_data(request), "effective_from": timezone.now()}

    def get_form(self, request, obj=None, change=False, **kwargs):
        form = super().get_form(request, obj, change=change, **kwargs)
        if obj is not None:
            form.base_fields["effective_from"].help_text = (
                "Saving adds a new price version from this moment; this version is kept unchanged.")
        return form

    def save_model(self, request, obj, form, change):
        effective_from = obj.effective_from
        if change and "effective_from" not in form.changed_data:
            effective_from = timezone.now()
        new = services.price_version_create(
            model=obj.model, input_usd_per_mtok=obj.input_usd_per_mtok, output_usd_per_mtok=obj.output_usd_per_mtok,
            cached_input_usd_per_mtok=obj.cached_input_usd_per_mtok,
            cache_write_usd_per_mtok=obj.cache_write_usd_per_mtok, batch_discount=obj.batch_discount,
            effective_from=effective_from, source=PriceSource.ADMIN, actor=request.user.get_username(),
        )
        request._audit_recorded = True  # price_version_create audited the new version
        if change:
            obj.refresh_from_db()  # the edited version is untouched
            messages.info(request, f"Saved as a new price version (#{new.pk}) "
                                   f"from {new.effective_from:%Y-%m-%d %H:%M}.")
        else:
            obj.pk, obj.id = new.pk, new.pk

    def has_module_permission(self, request):
        """Anyone with a tenant role reads prices; only superusers add versions."""
        from apps.keys.selectors import tenant_roles_for_user

        return request.user.is_superuser or bool(tenant_roles_for_user(user=request.user))

    def has_view_permission(self, request, obj=None):
        return self.has_module_permission(request)

    def has_add_permission(self, request):
        return request.user.is_superuser

    def has_change_permission(self, request, obj=None):
        return request.user.is_superuser

    def has_delete_permission(self, request, obj=None):
        return False


class BudgetForm(forms.ModelForm):
    alert_thresholds = PercentListField(
        required=False, label="Alert thresholds (%)",
        help_text="Percentages of the limit that send an alert, comma-separated, e.g. 50, 80, 100.")
    alert_emails = EmailListField(required=False, label="Alert e-mails", help_text="One address a line.")

    class Meta:
        model = Budget
        fields = ["tenant", "name", "scope", "scope_value", "limit_usd", "period", "enforcement", "alert_thresholds",
                  "shrink_max_tokens", "alert_emails", "alert_webhook_url"]


@admin.register(Budget)
class BudgetAdmin(TenantScopedAdminMixin, admin.ModelAdmin):
    """Budgets with their live numbers (from `budget_statuses_sync`, the one budget spend read).
    The list keeps to columns that fit a 1400 px screen: scope and value, period and enforcement
    share one each."""

    form = BudgetForm
    list_display = ["name", "tenant", "applies_to", "period_enforcement", "limit", "spent", "held", "remaining",
                    "resets_at"]
    list_filter = ["period", "enforcement", "scope"]
    list_select_related = ["tenant"]
    search_fields = ["name", "scope_value"]

    def changelist_view(self, request, extra_context=None):
        """The live numbers need the room of the navigation sidebar (Home and the breadcrumbs
        still lead everywhere): no horizontal scrolling at 1400 px."""
        return super().changelist_view(request, {"is_nav_sidebar_enabled": False, **(extra_context or {})})

    def get_list_display(self, request):
        """The tenant column only for people who see more than one tenant."""
        columns = list(super().get_list_display(request))
        if not request.user.is_superuser and len(self._tenant_ids_read(request)) < 2:
            columns.remove("tenant")
        return columns

    def _tenant_ids_read(self, request):
        from apps.keys.admin import _ids

        return _ids(request, self.read_roles)

    @admin.display(description="applies to", ordering="scope")
    def applies_to(self, obj):
        return obj.scope if not obj.scope_value else f"{obj.scope}: {obj.scope_value}"

    @admin.display(description="period", ordering="period")
    def period_enforcement(self, obj):
        return f"{obj.period}, {obj.enforcement}"

    @admin.display(description="limit", ordering="limit_usd")
    def limit(self, obj):
        return usd_display(obj.limit_usd)

    def get_changelist_instance(self, request):
        """Fetch the live numbers of the page's budgets in one call, not one per row."""
        cl = super().get_changelist_instance(request)
        page = list(cl.result_list)
        statuses = {s.id: s for s in budget_statuses_sync(budgets=page)}
        for b in page:
            b.status = statuses.get(b.id)
        return cl

    @admin.display(description="spent")
    def spent(self, obj):
        return usd_display(obj.status.spent_usd) if getattr(obj, "status", None) else "-"

    @admin.display(description="held")
    def held(self, obj):
        return usd_display(obj.status.held_usd) if getattr(obj, "status", None) else "-"

    @admin.display(description="remaining")
    def remaining(self, obj):
        return usd_display(obj.status.remaining_usd) if getattr(obj, "status", None) else "-"

    @admin.display(description="resets at")
    def resets_at(self, obj):
        status = getattr(obj, "status", None)
        if status is None:
            return "-"
        return status.resets_at.strftime("%Y-%m-%d %H:%M %Z") if status.resets_at else "never"


@admin.register(Alert)
class AlertAdmin(TenantScopedAdminMixin, admin.ModelAdmin):
    list_display = ["created_at", "tenant", "kind", "budget", "threshold", "model", "period_start", "message",
                    "email_status", "webhook_status"]
    list_filter = ["kind"]
    list_select_related = ["tenant", "budget"]

    def has_add_permission(self, request, *args):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
