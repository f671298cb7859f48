"""Admin for tenancy, keys, credentials and the audit log. Every change made here is audited
(`AuditedAdminMixin`, reusable by other apps' admins). Keys are shown by prefix only; a key's
secret is shown once, on the page that follows its creation or rotation, and never stored."""

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.template.response import TemplateResponse

from . import crypto
from .audit import AuditedAdminMixin
from .models import ApiKey, AuditLog, Membership, ProviderCredential, Source, Tenant
from .selectors import audit_log_for_user, user_is_tenant_admin
from .services import api_key_revoke, api_key_rotate, api_key_set_secret, snapshot

__all__ = ["AuditedAdminMixin"]


@admin.register(Tenant)
class TenantAdmin(AuditedAdminMixin, admin.ModelAdmin):
    list_display = ["slug", "name", "timezone", "cache_enabled", "cache_ttl_s"]


@admin.register(Membership)
class MembershipAdmin(AuditedAdminMixin, admin.ModelAdmin):
    list_display = ["user", "tenant", "role"]
    list_select_related = ["user", "tenant"]


@admin.register(Source)
class SourceAdmin(AuditedAdminMixin, admin.ModelAdmin):
    list_display = ["name", "tenant", "type"]
    list_select_related = ["tenant"]


class ApiKeyForm(forms.ModelForm):
    class Meta:
        model = ApiKey
        fields = ["tenant", "source", "name", "allowed_models", "allowed_endpoints", "rpm", "tpm",
                  "default_budget_id", "cache_enabled", "cache_ttl_s", "expires_at"]

    def clean(self):
        data = super().clean()
        tenant, source = data.get("tenant"), data.get("source")
        if tenant and source and source.tenant_id != tenant.pk:
            raise ValidationError({"source": f"{source} belongs to another tenant."})
        return data


def _show_secrets(request, rows: list[tuple[ApiKey, str]], title: str) -> TemplateResponse:
    """The one page that shows new secrets. Rendered directly (not via messages, which would put the
    secret in a cookie or the session)."""
    response = TemplateResponse(request, "admin/keys/apikey/secret_once.html", {
        **admin.site.each_context(request), "title": title, "rows": rows, "opts": ApiKey._meta,
    })
    response["cache-control"] = "no-store"
    return response


@admin.register(ApiKey)
class ApiKeyAdmin(AuditedAdminMixin, admin.ModelAdmin):
    form = ApiKeyForm
    list_display = ["name", "prefix", "tenant", "source", "revoked_at", "expires_at", "last_used_at"]
    list_filter = ["tenant"]
    list_select_related = ["tenant", "source"]
    search_fields = ["name", "prefix"]
    readonly_fields = ["prefix", "last_used_at", "revoked_at", "previous_digest_expires_at", "created_at"]
    actions = ["revoke_keys", "rotate_keys_now", "rotate_keys_grace_1h", "rotate_keys_grace_24h"]

    def save_model(self, request, obj, form, change):
        if not change:
            request._new_key_secret = api_key_set_secret(key=obj)
        super().save_model(request, obj, form, change)

    def response_add(self, request, obj, post_url_continue=None):
        secret = getattr(request, "_new_key_secret", None)
        if secret is None:
            return super().response_add(request, obj, post_url_continue)
        return _show_secrets(request, [(obj, secret)], "New API key")

    @admin.action(description="Revoke selected keys")
    def revoke_keys(self, request, queryset):
        for key in queryset:
            api_key_revoke(key=key, actor=request.user.get_username(), via="admin")
        self.message_user(request, f"Revoked {queryset.count()} key(s).", messages.SUCCESS)

    def _rotate(self, request, queryset, grace_s: int):
        rows, refused = [], []
        for key in queryset:
            try:
                created = api_key_rotate(key=key, actor=request.user.get_username(), grace_s=grace_s, via="admin")
            except ValidationError:
                refused.append(key.name)
                continue
            rows.append((created.key, created.secret))
        if refused:
            self.message_user(request, f"Not rotated (revoked): {', '.join(refused)}.", messages.WARNING)
        if not rows:
            return None
        grace = f"old secrets work for {grace_s // 3600} h more" if grace_s else "old secrets refused from now"
        return _show_secrets(request, rows, f"Rotated API keys ({grace})")

    @admin.action(description="Rotate selected keys (old secret refused at once)")
    def rotate_keys_now(self, request, queryset):
        return self._rotate(request, queryset, 0)

    @admin.action(description="Rotate selected keys (old secret works 1 more hour)")
    def rotate_keys_grace_1h(self, request, queryset):
        return self._rotate(request, queryset, 3600)

    @admin.action(description="Rotate selected keys (old secret works 24 more hours)")
    def rotate_keys_grace_24h(self, request, queryset):
        return self._rotate(request, queryset, 86400)


class ProviderCredentialForm(forms.ModelForm):
    secret = forms.CharField(
        required=False, strip=True, widget=forms.PasswordInput(render_value=False),
        help_text="Write-only: stored encrypted, never shown again. Leave empty to keep the current one.",
    )

    class Meta:
        model = ProviderCredential
        fields = ["name"]


@admin.register(ProviderCredential)
class ProviderCredentialAdmin(AuditedAdminMixin, admin.ModelAdmin):
    form = ProviderCredentialForm
    list_display = ["name", "updated_at"]

    def save_model(self, request, obj, form, change):
        secret = form.cleaned_data.get("secret")
        request._credential_secret_set = bool(secret)
        if secret:
            obj.encrypted_secret = crypto.encrypt(secret)
        super().save_model(request, obj, form, change)

    def audit_after(self, request, obj, form) -> dict:
        after = snapshot(obj)
        if getattr(request, "_credential_secret_set", False):
            after["secret"] = "(changed)"
        return after


@admin.register(AuditLog)
class AuditLogAdmin(admin.ModelAdmin):
    """Append-only: nobody adds, changes or deletes rows here. Tenant owners and admins read their
    tenants' rows; superusers read all."""

    list_display = ["at", "actor", "via", "tenant", "action", "object_type", "object_id"]
    list_filter = ["action", "via", "object_type"]
    list_select_related = ["tenant"]
    search_fields = ["actor", "object_id", "action"]

    def get_queryset(self, request):
        return audit_log_for_user(user=request.user)

    def has_module_permission(self, request):
        return request.user.is_active and request.user.is_staff and user_is_tenant_admin(user=request.user)

    def has_view_permission(self, request, obj=None):
        return self.has_module_permission(request)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
