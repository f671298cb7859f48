"""Admin for budgets (tenant-scoped: owners and admins manage) and prices (global, versioned)."""

from django.contrib import admin

from apps.keys.admin import AuditedAdminMixin, TenantScopedAdminMixin

from .models import Budget, Price


@admin.register(Budget)
class BudgetAdmin(TenantScopedAdminMixin, admin.ModelAdmin):
    list_display = ["name", "tenant", "scope", "scope_value", "limit_usd", "period", "enforcement"]
    list_select_related = ["tenant"]
    list_filter = ["period", "enforcement", "scope"]
    search_fields = ["name", "scope_value"]


@admin.register(Price)
class PriceAdmin(AuditedAdminMixin, admin.ModelAdmin):
    """Anyone with a tenant role reads prices; superusers add versions. A version is never edited."""

    list_display = ["model", "input_usd_per_mtok", "output_usd_per_mtok", "effective_from", "source"]
    search_fields = ["model"]

    def has_module_permission(self, request):
        from apps.keys.selectors import tenant_roles_for_user

        return request.user.is_superuser or bool(tenant_roles_for_user(user=request.user))

    def has_view_permission(self, request, obj=None):
        return self.has_module_permission(request)

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def save_model(self, request, obj, form, change):
        from apps.keys.services import audit_record, snapshot

        super().save_model(request, obj, form, change)
        audit_record(actor=request.user.get_username(), action="create", obj=obj, after=snapshot(obj))
