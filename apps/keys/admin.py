from django.contrib import admin

from .models import ApiKey, AuditLog, Membership, ProviderCredential, Source, Tenant


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = ["slug", "name", "timezone"]


admin.site.register(Membership)
admin.site.register(Source)


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ["name", "prefix", "tenant", "source", "revoked_at", "expires_at"]
    list_select_related = ["tenant", "source"]
    exclude = ["digest", "previous_digest"]
    readonly_fields = ["prefix", "last_used_at"]


@admin.register(ProviderCredential)
class ProviderCredentialAdmin(admin.ModelAdmin):
    list_display = ["name", "updated_at"]
    exclude = ["encrypted_secret"]


@admin.register(AuditLog)
class AuditLogAdmin(admin.ModelAdmin):
    list_display = ["at", "actor", "tenant", "action", "object_type", "object_id"]
    list_select_related = ["tenant"]

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
