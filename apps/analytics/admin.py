"""Admin view of the ledger: read-only, scoped to the tenants whose ledger the user may export."""

from django.contrib import admin

from apps.keys.admin import TenantScopedAdminMixin
from apps.keys.audit import AuditedAdminMixin
from apps.keys.selectors import EXPORT_ROLES

from .models import LedgerArchive, LedgerRetention, UsageEvent


@admin.register(UsageEvent)
class UsageEventAdmin(TenantScopedAdminMixin, admin.ModelAdmin):
    list_display = ["request_id", "timestamp", "tenant", "source_ref", "api_key", "model", "prompt_tokens",
                    "completion_tokens", "cost", "cached", "status", "latency_ms"]
    list_select_related = ["tenant", "api_key"]
    list_filter = ["status", "cached", "request_type"]
    search_fields = ["=request_id", "=batch_id", "=budget_id"]
    show_full_result_count = False
    read_roles = EXPORT_ROLES

    def has_add_permission(self, request, *args):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(LedgerRetention)
class LedgerRetentionAdmin(AuditedAdminMixin, admin.ModelAdmin):
    """Per-tenant retention of detailed ledger rows (superusers: it decides what gets dropped)."""

    list_display = ["tenant", "months"]
    list_select_related = ["tenant"]

    def has_module_permission(self, request):
        return request.user.is_superuser


@admin.register(LedgerArchive)
class LedgerArchiveAdmin(AuditedAdminMixin, admin.ModelAdmin):
    list_display = ["month", "tenant", "rows", "cost", "location", "archived_at", "dropped_at"]
    list_select_related = ["tenant"]

    def has_module_permission(self, request):
        return request.user.is_superuser

    def has_add_permission(self, request, *args):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
