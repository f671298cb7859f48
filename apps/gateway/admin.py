"""Django admin for providers, model aliases and deployments. Every change is audited; a
provider's credential is shown by name only, never decrypted."""

from django.contrib import admin
from django.db import models

from apps.core.forms import MoneyInput
from apps.keys.audit import AuditedAdminMixin
from apps.keys.services import audit_record, snapshot

from .capabilities import alias_capabilities
from .models import Deployment, DeploymentHealth, ModelAlias, OpsIncident, Provider
from .selectors import routing_table_invalidate
from .services import alias_pin_audit, alias_pins


class AuditedAdmin(AuditedAdminMixin, admin.ModelAdmin):
    """Every save and delete is audited (AuditedAdminMixin); the routing table is reloaded."""

    def save_related(self, request, form, formsets, change):
        super().save_related(request, form, formsets, change)
        routing_table_invalidate()

    def delete_model(self, request, obj):
        super().delete_model(request, obj)
        routing_table_invalidate()

    def delete_queryset(self, request, queryset):
        super().delete_queryset(request, queryset)
        routing_table_invalidate()


class DeploymentInline(admin.TabularInline):
    model = Deployment
    extra = 0
    formfield_overrides = {models.DecimalField: {"widget": MoneyInput}}
    fields = ["provider", "upstream_model", "priority", "weight", "region", "rpm", "tpm", "input_usd_per_mtok",
              "output_usd_per_mtok", "provider_batch", "is_active"]


@admin.register(Provider)
class ProviderAdmin(AuditedAdmin):
    list_display = ["name", "kind", "api_base", "credential_name"]
    list_select_related = ["credential"]
    list_filter = ["kind"]
    search_fields = ["name"]

    @admin.display(description="credential")
    def credential_name(self, obj):
        return obj.credential.name if obj.credential else "-"


@admin.register(ModelAlias)
class ModelAliasAdmin(AuditedAdmin):
    list_display = ["alias", "strategy", "context_window", "chat", "supports_streaming", "embeddings"]
    list_filter = ["strategy"]
    search_fields = ["alias"]
    inlines = [DeploymentInline]

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("deployments__provider")

    def _capabilities(self, obj) -> tuple[bool, bool]:
        models = [(d.upstream_model, d.provider.kind) for d in obj.deployments.all() if d.is_active]
        return alias_capabilities(alias=obj.alias, models=models, supports_embeddings=obj.supports_embeddings,
                                  supports_chat=obj.supports_chat)

    @admin.display(description="Embeddings")
    def embeddings(self, obj) -> str:
        value = self._capabilities(obj)[0]
        return ("yes" if value else "no") + (" (inferred)" if obj.supports_embeddings is None else "")

    @admin.display(description="Chat")
    def chat(self, obj) -> str:
        value = self._capabilities(obj)[1]
        return ("yes" if value else "no") + (" (inferred)" if obj.supports_chat is None else "")

    def save_formset(self, request, form, formset, change):
        super().save_formset(request, form, formset, change)
        actor = f"admin:{request.user.username}"
        for obj in formset.new_objects:
            audit_record(actor=actor, action="create", obj=obj, after=snapshot(obj))
        for obj, fields in formset.changed_objects:
            audit_record(actor=actor, action="update", obj=obj, after={**snapshot(obj), "_changed": fields})
        for obj in formset.deleted_objects:
            audit_record(actor=actor, action="delete", object_type="deployment", object_id=obj.upstream_model,
                         before=snapshot(obj))

    def save_related(self, request, form, formsets, change):
        before = alias_pins(alias=form.instance) if change else []
        super().save_related(request, form, formsets, change)
        alias_pin_audit(alias=form.instance, before=before, actor=f"admin:{request.user.username}")
        routing_table_invalidate()


@admin.register(Deployment)
class DeploymentAdmin(AuditedAdmin):
    list_display = ["alias", "provider", "upstream_model", "priority", "weight", "region", "rpm", "tpm",
                    "provider_batch", "is_active"]
    list_select_related = ["alias", "provider"]
    list_filter = ["is_active", "region", "provider__kind", "provider_batch"]
    search_fields = ["alias__alias", "upstream_model"]

    def save_model(self, request, obj, form, change):
        before = alias_pins(alias=obj.alias)
        super().save_model(request, obj, form, change)
        alias_pin_audit(alias=obj.alias, before=before, actor=f"admin:{request.user.username}")


@admin.register(DeploymentHealth)
class DeploymentHealthAdmin(AuditedAdminMixin, admin.ModelAdmin):
    list_display = ["deployment", "checked_at", "ok", "latency_ms", "error"]
    list_select_related = ["deployment__alias", "deployment__provider"]
    list_filter = ["ok"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(OpsIncident)
class OpsIncidentAdmin(AuditedAdminMixin, admin.ModelAdmin):
    """Operational alerts (superusers: the admin of the other models of this app is global too)."""

    list_display = ["key", "opened_at", "resolved_at", "value", "notified_open", "notified_resolved"]
    list_filter = ["kind"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
