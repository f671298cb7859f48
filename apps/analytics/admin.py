"""Admin view of the ledger: read-only, scoped to the tenants whose ledger the user may export."""

from django.contrib import admin

from apps.keys.admin import TenantScopedAdminMixin
from apps.keys.audit import AuditedAdminMixin
from apps.keys.selectors import EXPORT_ROLES

from .models import LedgerArchive, LedgerRetention, RequestLog, RequestLogPolicy, UsageEvent, UsageStream


@admin.register(UsageEvent)
class UsageEventAdmin(TenantScopedAdminMixin, admin.ModelAdmin):
    list_display = ["request_id", "timestamp", "tenant", "source_ref", "api_key", "model", "prompt_tokens",
                    "completion_tokens", "cost", "cached", "status", "latency_ms"]
    list_select_related = ["tenant", "api_key"]
    list_filter = ["status", "cached", "request_type"]
    search_fields = ["=request_id", "=batch_id", "=budget_id", "=end_user"]
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


@admin.register(RequestLogPolicy)
class RequestLogPolicyAdmin(TenantScopedAdminMixin, admin.ModelAdmin):
    """A tenant's request logging (the same as `request_log:` in gateway_apply): owners and admins."""

    list_display = ["tenant", "enabled", "bodies", "retention_days"]
    list_select_related = ["tenant"]


@admin.register(RequestLog)
class RequestLogAdmin(TenantScopedAdminMixin, admin.ModelAdmin):
    list_display = ["request_id", "timestamp", "tenant", "model", "provider", "status", "latency_ms"]
    list_select_related = ["tenant"]
    list_filter = ["status", "stream", "cached"]
    search_fields = ["=request_id"]
    show_full_result_count = False
    read_roles = EXPORT_ROLES

    def has_add_permission(self, request, *args):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False



@admin.register(UsageStream)
class UsageStreamAdmin(TenantScopedAdminMixin, admin.ModelAdmin):
    """A tenant's usage events pushed to a webhook (owners and admins subscribe; signed with the
    tenant's webhook secret)."""

    list_display = ["tenant", "url", "is_active", "cursor", "last_delivered_at", "failures", "last_error"]
    list_select_related = ["tenant"]
    fields = ["tenant", "url", "is_active", "cursor", "last_delivered_at", "failures", "last_error"]
    readonly_fields = ["cursor", "last_delivered_at", "failures", "last_error"]
