"""The Django admin, scoped by tenant and role.

Superusers see and change everything. Any other staff user sees only the tenants they are a
member of: owners and admins manage those tenants' sources, keys, budgets, members and model
access; managers and viewers read. Querysets, foreign-key choices, list filters and object
permissions all follow the same rule (`TenantScopedAdminMixin`); every change is audited."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db import transaction
from django.template.response import TemplateResponse

from apps.core.forms import TenantDefaultBooleanSelect

from . import crypto, services
from .audit import AuditedAdminMixin
from .models import (
    ApiKey,
    AuditLog,
    ManagementToken,
    Membership,
    ProviderCredential,
    Role,
    Source,
    SsoIdentity,
    Tenant,
)
from .selectors import ADMIN_ROLES, READ_ROLES, tenant_ids_for_user, user_may

__all__ = ["AuditedAdminMixin", "TenantScopedAdminMixin"]


def _ids(request, roles: tuple[str, ...]) -> frozenset[int]:
    """Tenant ids where the request's user holds one of `roles`, memoised on the request."""
    memo = request.__dict__.setdefault("_tenant_ids_memo", {})
    if roles not in memo:
        memo[roles] = frozenset(tenant_ids_for_user(user=request.user, roles=roles))
    return memo[roles]


class TenantListFilter(admin.SimpleListFilter):
    """A tenant filter offering only the tenants the user may read (the stock related-field
    filter would list every tenant)."""

    title = "tenant"
    parameter_name = "tenant"

    def lookups(self, request, model_admin):
        qs = Tenant.objects.all() if request.user.is_superuser else Tenant.objects.filter(
            id__in=_ids(request, model_admin.read_roles))
        return [(str(t.id), t.slug) for t in qs.only("id", "slug")]

    def queryset(self, request, queryset):
        if self.value():
            return queryset.filter(**{self.model_admin_path: self.value()})
        return queryset


def tenant_list_filter(path: str):
    return type("TenantFilter", (TenantListFilter,), {"model_admin_path": path})


class TenantScopedAdminMixin(AuditedAdminMixin):
    """Tenant isolation and roles for a ModelAdmin whose model reaches a Tenant by `tenant_path`.

    - read (`read_roles`, default any role): the changelist and read-only change forms;
    - manage (`manage_roles`, default owner/admin): add, change, delete, in those tenants only;
    - FK choices (the tenant itself and anything with a `tenant` field) are the managed tenants';
    - saves and deletes are audited with the user as actor (AuditedAdminMixin).
    """

    tenant_path = "tenant"
    read_roles: tuple[str, ...] = READ_ROLES
    manage_roles: tuple[str, ...] = ADMIN_ROLES

    # --- scoping
    def get_queryset(self, request):
        qs = super().get_queryset(request)
        if request.user.is_superuser:
            return qs
        return qs.filter(**{f"{self.tenant_path}__in": _ids(request, self.read_roles)})

    def tenant_id_of(self, obj) -> int | None:
        target = obj
        for part in self.tenant_path.split("__"):
            if part == "id":
                return target.pk if target is not None else None
            target = getattr(target, part, None)
        return target.pk if target is not None else None

    def get_list_filter(self, request):
        return [tenant_list_filter(f"{self.tenant_path}"), *super().get_list_filter(request)]

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        if not request.user.is_superuser:
            managed = _ids(request, self.manage_roles)
            related = db_field.related_model
            if related is Tenant:
                kwargs["queryset"] = Tenant.objects.filter(id__in=managed)
            elif any(f.name == "tenant" for f in related._meta.get_fields()):
                kwargs["queryset"] = related._default_manager.filter(tenant_id__in=managed)
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    # --- permissions (roles replace Django's model permissions for non-superusers)
    def has_module_permission(self, request):
        if request.user.is_superuser:
            return True
        return bool(_ids(request, self.read_roles))

    def has_view_permission(self, request, obj=None):
        if request.user.is_superuser:
            return True
        if obj is None:
            return bool(_ids(request, self.read_roles))
        return self.tenant_id_of(obj) in _ids(request, self.read_roles)

    def has_add_permission(self, request, *args):
        if request.user.is_superuser:
            return True
        return bool(_ids(request, self.manage_roles))

    def has_change_permission(self, request, obj=None):
        if request.user.is_superuser:
            return True
        if obj is None:
            return bool(_ids(request, self.manage_roles))
        return self.tenant_id_of(obj) in _ids(request, self.manage_roles)

    def has_delete_permission(self, request, obj=None):
        return self.has_change_permission(request, obj)


# --- tenants --------------------------------------------------------------------------------

@admin.register(Tenant)
class TenantAdmin(TenantScopedAdminMixin, admin.ModelAdmin):
    """Owners and admins edit their tenant's settings (model access by region, pricing policy,
    cache); only superusers create or delete tenants."""

    tenant_path = "id"
    list_display = ["slug", "name", "timezone", "cache_enabled", "allow_unpriced_models"]
    search_fields = ["slug", "name"]

    def get_list_filter(self, request):
        return []

    actions = ["show_webhook_secret", "rotate_webhook_secret"]

    def get_readonly_fields(self, request, obj=None):
        return [] if request.user.is_superuser else ["slug"]

    def has_add_permission(self, request, *args):
        return request.user.is_superuser

    def has_delete_permission(self, request, obj=None):
        return request.user.is_superuser

    def _webhook_secrets(self, request, queryset, *, rotate: bool):
        """Owners and admins (superusers: any tenant) read or rotate the secret that signs their
        tenant's webhooks; rendered directly, never via messages (a cookie or the session)."""
        managed = _ids(request, ADMIN_ROLES)
        rows = []
        for tenant in queryset:
            if not (request.user.is_superuser or tenant.pk in managed):
                continue
            secret = (services.tenant_webhook_secret_rotate(tenant=tenant, actor=request.user.get_username(),
                                                            via="admin")
                      if rotate else services.tenant_webhook_secret(tenant_id=tenant.pk))
            rows.append((tenant, secret))
        if not rows:
            self.message_user(request, "Only owners and admins of a tenant see its webhook secret.", messages.WARNING)
            return None
        context = {**self.admin_site.each_context(request), "opts": self.opts, "rows": rows,
                   "title": "Webhook secret rotated (the old one no longer verifies)" if rotate else "Webhook secret"}
        response = TemplateResponse(request, "admin/keys/tenant/webhook_secret.html", context)
        response["Cache-Control"] = "no-store"
        return response

    @admin.action(description="Show the webhook signing secret")
    def show_webhook_secret(self, request, queryset):
        return self._webhook_secrets(request, queryset, rotate=False)

    @admin.action(description="Rotate the webhook signing secret (old one refused at once)")
    def rotate_webhook_secret(self, request, queryset):
        return self._webhook_secrets(request, queryset, rotate=True)


# --- members --------------------------------------------------------------------------------

class MembershipAddForm(forms.ModelForm):
    """Add a member by username: a new user is created; an existing one is attached if the admin
    already administers them in another tenant (superusers: anyone)."""

    username = forms.CharField(max_length=150)
    email = forms.EmailField(required=False)
    password = forms.CharField(required=False, min_length=8, widget=forms.PasswordInput,
                               help_text="For a new user; leave empty to keep an existing user's password.")

    class Meta:
        model = Membership
        fields = ["tenant", "role"]


class MembershipAdmin(TenantScopedAdminMixin, admin.ModelAdmin):
    list_display = ["user", "tenant", "role"]
    list_select_related = ["user", "tenant"]
    search_fields = ["user__username", "user__email"]

    def get_form(self, request, obj=None, change=False, **kwargs):
        if obj is None:
            kwargs["form"] = MembershipAddForm
            kwargs["fields"] = ["tenant", "username", "email", "password", "role"]
        else:
            kwargs["fields"] = ["role"]
        return super().get_form(request, obj, change=change, **kwargs)

    def get_fields(self, request, obj=None):
        if obj is None:
            return ["tenant", "username", "email", "password", "role"]
        return ["user", "tenant", "role"]

    def get_readonly_fields(self, request, obj=None):
        return ["user", "tenant"] if obj is not None else []

    def has_delete_permission(self, request, obj=None):
        if obj is not None and obj.role == Role.OWNER and not self._may_touch_owner(request, obj.tenant_id):
            return False
        return super().has_delete_permission(request, obj)

    def _may_touch_owner(self, request, tenant_id) -> bool:
        return user_may(user=request.user, tenant_id=tenant_id, roles=(Role.OWNER,))

    def save_model(self, request, obj, form, change):
        touches_owner = obj.role == Role.OWNER or (change and form.initial.get("role") == Role.OWNER)
        if touches_owner and not self._may_touch_owner(request, obj.tenant_id):
            raise PermissionError("Only owners grant or change the owner role.")
        if change:
            return super().save_model(request, obj, form, change)
        d = form.cleaned_data
        try:
            saved = services.member_add(tenant=obj.tenant, username=d["username"], email=d.get("email") or "",
                                        role=obj.role, password=d.get("password") or None,
                                        actor=request.user.get_username(), by=request.user)
        except ValidationError as exc:
            raise PermissionError(" ".join(exc.messages)) from exc
        obj.pk, obj.user = saved.pk, saved.user
        obj._state.adding = False
        request._audit_recorded = True  # member_add audited it
        return None

    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        try:
            return super().changeform_view(request, object_id, form_url, extra_context)
        except PermissionError as exc:
            self.message_user(request, str(exc), messages.ERROR)
            from django.http import HttpResponseRedirect

            return HttpResponseRedirect(request.path)


admin.site.register(Membership, MembershipAdmin)


# --- sources --------------------------------------------------------------------------------

@admin.register(Source)
class SourceAdmin(TenantScopedAdminMixin, admin.ModelAdmin):
    list_display = ["name", "type", "tenant", "created_at"]
    list_select_related = ["tenant"]
    list_filter = ["type"]
    search_fields = ["name"]


# --- keys -----------------------------------------------------------------------------------

_model_names = None  # set by the gateway app (keys does not know where models come from)


def model_names_provider(fn) -> None:
    """`fn() -> [alias, ...]`: the models a key's access can be limited to."""
    global _model_names
    _model_names = fn


def _model_choices():
    return [(a, a) for a in (_model_names() if _model_names else ())]


# The /v1 endpoints a key can be limited to (a trailing * covers the paths below it).
V1_ENDPOINTS = [
    ("/v1/chat/completions", "Chat completions (/v1/chat/completions)"),
    ("/v1/embeddings", "Embeddings (/v1/embeddings)"),
    ("/v1/requests*", "Seed envelope and async polling (/v1/requests)"),
    ("/v1/files*", "Files (/v1/files)"),
    ("/v1/batches*", "Batches (/v1/batches)"),
    ("/v1/models", "Model list (/v1/models)"),
    ("/v1/budget", "Budget status (/v1/budget)"),
]


class ApiKeyForm(forms.ModelForm):
    allowed_models = forms.MultipleChoiceField(
        required=False, widget=forms.CheckboxSelectMultiple, label="Model access",
        help_text="None ticked: every model.")
    allowed_endpoints = forms.MultipleChoiceField(
        required=False, widget=forms.CheckboxSelectMultiple, label="Endpoint access",
        help_text="None ticked: every endpoint.")
    cache_enabled = forms.NullBooleanField(required=False, widget=TenantDefaultBooleanSelect(),
                                           label="Response cache",
                                           help_text="Tenant default: whatever the tenant's setting says.")
    semantic_cache_enabled = forms.NullBooleanField(
        required=False, widget=TenantDefaultBooleanSelect(), label="Semantic cache",
        help_text="Tenant default: whatever the tenant's setting says. See docs/cache-and-keys.md.")
    expires_days = forms.IntegerField(required=False, min_value=1, help_text="Days until the key expires.")

    class Meta:
        model = ApiKey
        fields = ["tenant", "source", "name", "allowed_models", "allowed_endpoints", "rpm", "tpm",
                  "default_budget_id", "cache_enabled", "cache_ttl_s", "semantic_cache_enabled",
                  "semantic_cache_embedding_alias", "semantic_cache_threshold", "expires_days"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["allowed_models"].choices = _model_choices()
        # Values set elsewhere (API, command) that are not in the list stay ticked and kept.
        current = list(self.initial.get("allowed_endpoints") or [])
        known = [v for v, _ in V1_ENDPOINTS]
        self.fields["allowed_endpoints"].choices = V1_ENDPOINTS + [(v, v) for v in current if v not in known]

    def clean(self):
        data = super().clean()
        tenant = data.get("tenant") or getattr(self.instance, "tenant", None)
        source = data.get("source")
        if tenant is not None and source is not None and source.tenant_id != tenant.id:
            self.add_error("source", "This source belongs to another tenant.")
        return data


@admin.action(description="Revoke selected keys")
def revoke_keys(modeladmin, request, queryset):
    managed = _ids(request, ADMIN_ROLES)
    n = 0
    for key in queryset.filter(revoked_at__isnull=True):
        if request.user.is_superuser or key.tenant_id in managed:
            services.api_key_revoke(key=key, actor=request.user.get_username(), via="admin")
            n += 1
    modeladmin.message_user(request, f"Revoked {n} key(s).", messages.SUCCESS)


@admin.register(ApiKey)
class ApiKeyAdmin(TenantScopedAdminMixin, admin.ModelAdmin):
    """Creating a key shows its secret once, on the page that answers the save; it is never
    stored (only its HMAC digest is)."""

    form = ApiKeyForm
    list_display = ["name", "prefix", "tenant", "source", "revoked_at", "expires_at", "last_used_at"]
    list_select_related = ["tenant", "source__tenant"]
    search_fields = ["name", "prefix"]
    actions = [revoke_keys, "rotate_keys_now", "rotate_keys_grace_1h", "rotate_keys_grace_24h"]

    def get_fields(self, request, obj=None):
        if obj is None:
            return ["tenant", "source", "name", "allowed_models", "allowed_endpoints", "rpm", "tpm",
                    "default_budget_id", "cache_enabled", "cache_ttl_s", "semantic_cache_enabled",
                  "semantic_cache_embedding_alias", "semantic_cache_threshold", "expires_days"]
        return ["tenant", "source", "name", "prefix", "allowed_models", "allowed_endpoints", "rpm", "tpm",
                "default_budget_id", "cache_enabled", "cache_ttl_s", "semantic_cache_enabled",
                "semantic_cache_embedding_alias", "semantic_cache_threshold", "expires_at", "revoked_at",
                "previous_digest_expires_at", "last_used_at", "created_at"]

    def get_readonly_fields(self, request, obj=None):
        if obj is None:
            return []
        return ["tenant", "prefix", "expires_at", "revoked_at", "previous_digest_expires_at", "last_used_at",
                "created_at"]

    def get_actions(self, request):
        actions = super().get_actions(request)
        if not self.has_change_permission(request):
            for name in ("revoke_keys", "rotate_keys_now", "rotate_keys_grace_1h", "rotate_keys_grace_24h"):
                actions.pop(name, None)
        return actions

    def save_model(self, request, obj, form, change):
        if change:
            return super().save_model(request, obj, form, change)
        d = form.cleaned_data
        with transaction.atomic():
            created = services.api_key_create(
                tenant=obj.tenant, source=obj.source, name=obj.name, actor=request.user.get_username(),
                allowed_models=obj.allowed_models, rpm=obj.rpm, tpm=obj.tpm, expires_days=d.get("expires_days"),
                default_budget_id=obj.default_budget_id, allowed_endpoints=obj.allowed_endpoints or [],
                cache_enabled=obj.cache_enabled, cache_ttl_s=obj.cache_ttl_s,
                semantic_cache_enabled=obj.semantic_cache_enabled,
                semantic_cache_embedding_alias=obj.semantic_cache_embedding_alias,
                semantic_cache_threshold=obj.semantic_cache_threshold, via="admin",
            )
        for field in ("id", "digest", "prefix", "expires_at", "created_at"):
            setattr(obj, field, getattr(created.key, field))
        obj._state.adding = False
        obj._shown_once_secret = created.secret
        request._audit_recorded = True  # api_key_create audited it
        return None

    def response_add(self, request, obj, post_url_continue=None):
        secret = getattr(obj, "_shown_once_secret", None)
        if secret is None:
            return super().response_add(request, obj, post_url_continue)
        return _show_secrets(self, request, [(obj, secret)], "API key created")

    def _rotate(self, request, queryset, grace_s: int):
        from django.core.exceptions import ValidationError

        managed = _ids(request, ADMIN_ROLES)
        rows, refused = [], []
        for key in queryset:
            if not (request.user.is_superuser or key.tenant_id in managed):
                continue
            try:
                created = services.api_key_rotate(key=key, actor=request.user.get_username(), grace_s=grace_s,
                                                  via="admin")
            except ValidationError:
                refused.append(key.name)
                continue
            rows.append((created.key, created.secret))
        if refused:
            self.message_user(request, f"Not rotated (revoked): {', '.join(refused)}.", messages.WARNING)
        if not rows:
            return None
        grace = f"old secrets work for {grace_s // 3600} h more" if grace_s else "old secrets refused from now"
        return _show_secrets(self, request, rows, f"Rotated API keys ({grace})")

    @admin.action(description="Rotate selected keys (old secret refused at once)")
    def rotate_keys_now(self, request, queryset):
        return self._rotate(request, queryset, 0)

    @admin.action(description="Rotate selected keys (old secret works 1 more hour)")
    def rotate_keys_grace_1h(self, request, queryset):
        return self._rotate(request, queryset, 3600)

    @admin.action(description="Rotate selected keys (old secret works 24 more hours)")
    def rotate_keys_grace_24h(self, request, queryset):
        return self._rotate(request, queryset, 86400)


def _show_secrets(model_admin, request, rows: list[tuple], title: str, usage: str = "") -> TemplateResponse:
    """The one page that shows new secrets, rendered directly (never via messages, which would put
    a secret in a cookie or the session)."""
    context = {**model_admin.admin_site.each_context(request), "opts": model_admin.opts, "rows": rows,
               "title": title, "usage": usage}
    response = TemplateResponse(request, "admin/keys/apikey/secret_once.html", context)
    response["Cache-Control"] = "no-store"
    return response


# --- management API tokens ----------------------------------------------------------------------

class ManagementTokenForm(forms.ModelForm):
    expires_days = forms.IntegerField(initial=90, min_value=1, max_value=services.MANAGEMENT_TOKEN_MAX_DAYS,
                                      label="Expires in (days)")

    class Meta:
        model = ManagementToken
        fields = ["tenant", "name", "kind", "role", "expires_days"]
        help_texts = {"kind": "Personal: acts as you, never above your own role. Service: a service identity "
                              "for scripts and CI, with the token's role."}


@admin.action(description="Revoke selected tokens")
def revoke_tokens(modeladmin, request, queryset):
    managed = _ids(request, ADMIN_ROLES)
    n = 0
    for token in queryset.filter(revoked_at__isnull=True):
        if request.user.is_superuser or token.tenant_id in managed or token.user_id == request.user.pk:
            services.management_token_revoke(token=token, actor=request.user.get_username(), via="admin")
            n += 1
    modeladmin.message_user(request, f"Revoked {n} token(s).", messages.SUCCESS)


@admin.register(ManagementToken)
class ManagementTokenAdmin(TenantScopedAdminMixin, admin.ModelAdmin):
    """Tokens for the management API (/api/). The secret is shown once, on the page that answers
    the save; only its HMAC digest is stored. Owners and admins of the tenant manage them."""

    form = ManagementTokenForm
    list_display = ["name", "prefix", "tenant", "kind", "role", "user", "expires_at", "revoked_at", "last_used_at"]
    list_select_related = ["tenant", "user"]
    list_filter = ["kind", "role"]
    search_fields = ["name", "prefix", "user__username"]
    actions = [revoke_tokens]
    read_roles = ADMIN_ROLES

    def get_fields(self, request, obj=None):
        if obj is None:
            return ["tenant", "name", "kind", "role", "expires_days"]
        return ["tenant", "name", "kind", "role", "user", "prefix", "created_by", "created_at", "expires_at",
                "revoked_at", "last_used_at"]

    def get_readonly_fields(self, request, obj=None):
        return [] if obj is None else self.get_fields(request, obj)

    def has_change_permission(self, request, obj=None):
        return obj is None and super().has_change_permission(request, obj)

    def save_model(self, request, obj, form, change):
        d = form.cleaned_data
        service = d["kind"] == ManagementToken.Kind.SERVICE
        try:
            created = services.management_token_create(
                tenant=d["tenant"], name=d["name"], role=d["role"], actor=request.user.get_username(),
                expires_days=d["expires_days"], user=None if service else request.user, service=service,
                by=request.user, via="admin")
        except ValidationError as exc:
            raise PermissionError(" ".join(exc.messages)) from exc
        obj.pk = created.token.pk
        obj._state.adding = False
        obj._shown_once_secret = created.secret
        request._audit_recorded = True  # management_token_create audited it

    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        try:
            return super().changeform_view(request, object_id, form_url, extra_context)
        except PermissionError as exc:
            self.message_user(request, str(exc), messages.ERROR)
            from django.http import HttpResponseRedirect

            return HttpResponseRedirect(request.path)

    def response_add(self, request, obj, post_url_continue=None):
        secret = getattr(obj, "_shown_once_secret", None)
        if secret is None:
            return super().response_add(request, obj, post_url_continue)
        obj = ManagementToken.objects.select_related("tenant").get(pk=obj.pk)
        return _show_secrets(self, request, [(obj, secret)], "Management API token created",
                             usage="Use it on the management API: curl -H 'Authorization: Bearer <token>' "
                                   "https://<host>/api/keys/")


# --- provider credentials (global; superusers only) -------------------------------------------

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

    def has_module_permission(self, request):
        return request.user.is_superuser

    def save_model(self, request, obj, form, change):
        secret = form.cleaned_data.get("secret")
        request._credential_secret_set = bool(secret)
        if secret:
            obj.encrypted_secret = crypto.encrypt(secret)
        super().save_model(request, obj, form, change)

    def audit_after(self, request, obj, form) -> dict:
        after = services.snapshot(obj)
        if getattr(request, "_credential_secret_set", False):
            after["secret"] = "(changed)"
        return after


# --- audit log (read-only; owners and admins of the tenant) -----------------------------------

@admin.register(AuditLog)
class AuditLogAdmin(TenantScopedAdminMixin, admin.ModelAdmin):
    list_display = ["at", "actor", "via", "tenant", "action", "object_type", "object_id"]
    list_select_related = ["tenant"]
    list_filter = ["action", "via", "object_type"]
    search_fields = ["actor", "object_id"]
    read_roles = ADMIN_ROLES

    def has_add_permission(self, request, *args):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False




# --- SSO identities (superusers: delete one to unlink a user from its provider account) ---------
@admin.register(SsoIdentity)
class SsoIdentityAdmin(AuditedAdminMixin, admin.ModelAdmin):
    list_display = ["subject", "user", "issuer", "created_at", "last_login_at"]
    list_select_related = ["user"]
    search_fields = ["subject", "user__username", "user__email"]
    readonly_fields = ["user", "issuer", "subject", "created_at", "last_login_at"]

    def has_module_permission(self, request):
        return request.user.is_superuser

    def has_view_permission(self, request, obj=None):
        return request.user.is_superuser

    def has_add_permission(self, request, *args):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return request.user.is_superuser
