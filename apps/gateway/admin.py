"""Django admin for providers, model aliases and deployments. Every change is audited; a
provider's credential is shown by name only, never decrypted."""

from django import forms
from django.contrib import admin, messages
from django.db import models

from apps.core.forms import MoneyInput
from apps.keys.audit import AuditedAdminMixin
from apps.keys.services import audit_record, snapshot

from .capabilities import alias_capabilities
from .models import Deployment, DeploymentHealth, ModelAlias, OpsIncident, Provider
from .selectors import routing_table_invalidate
from .services import alias_pin_audit, alias_pins, alias_versions, model_rollback, model_rollout
from .versions import RolloutError, shares_split


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
    fields = ["provider", "upstream_model", "version", "priority", "weight", "region", "rpm", "tpm",
              "input_usd_per_mtok", "output_usd_per_mtok", "provider_batch", "is_active"]


@admin.register(Provider)
class ProviderAdmin(AuditedAdmin):
    list_display = ["name", "kind", "api_base", "credential_name"]
    list_select_related = ["credential"]
    list_filter = ["kind"]
    search_fields = ["name"]

    @admin.display(description="credential")
    def credential_name(self, obj):
        return obj.credential.name if obj.credential else "-"


class ModelAliasForm(forms.ModelForm):
    """The alias's fields, plus a rollout step: a version and its share of the bare alias's traffic
    (model_rollout, audited). The shares themselves change only through that service."""

    rollout_to = forms.ChoiceField(label="Roll out version", required=False,
                                   help_text="Give this version a share of the alias's traffic (a canary: 5, "
                                             "then 50, then 100); the other versions divide the rest.")
    rollout_share = forms.IntegerField(label="Share (%)", required=False, min_value=0, max_value=100)

    class Meta:
        model = ModelAlias
        fields = ["alias", "strategy", "context_window", "max_output_tokens", "supports_streaming",
                  "supports_embeddings", "supports_chat"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        names = alias_versions(alias=self.instance) if self.instance.pk else []
        self.fields["rollout_to"].choices = [("", "-"), *((n, n) for n in names)]

    def clean(self):
        data = super().clean()
        if bool(data.get("rollout_to")) != (data.get("rollout_share") is not None):
            raise forms.ValidationError("A rollout needs both a version and a share.")
        if data.get("rollout_to"):
            try:
                shares_split(alias_versions(alias=self.instance), data["rollout_to"], data["rollout_share"])
            except RolloutError as exc:
                raise forms.ValidationError(str(exc)) from None
        return data


@admin.register(ModelAlias)
class ModelAliasAdmin(AuditedAdmin):
    form = ModelAliasForm
    list_display = ["alias", "strategy", "context_window", "chat", "supports_streaming", "embeddings", "rollout"]
    list_filter = ["strategy"]
    search_fields = ["alias"]
    inlines = [DeploymentInline]
    readonly_fields = ["rollout"]
    actions = ["rollback"]

    @admin.display(description="Rollout (share of traffic per version)")
    def rollout(self, obj) -> str:
        if not obj.version_shares:
            return "none: every deployment serves the alias"
        shares = ", ".join(f"{v} {n}%" for v, n in sorted(obj.version_shares.items()))
        return f"{shares}" + (f" (rolling out {obj.rollout_version})" if obj.rollout_version else "")

    @admin.action(description="Roll back the rollout of the selected aliases")
    def rollback(self, request, queryset):
        for alias in queryset:
            try:
                model_rollback(alias=alias.alias, actor=f"admin:{request.user.username}")
            except RolloutError as exc:
                self.message_user(request, str(exc), level=messages.WARNING)
            else:
                self.message_user(request, f"{alias.alias}: rolled back.")

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
        actor = f"admin:{request.user.username}"
        alias_pin_audit(alias=form.instance, before=before, actor=actor)
        if form.cleaned_data.get("rollout_to"):
            try:
                model_rollout(alias=form.instance.alias, version=form.cleaned_data["rollout_to"],
                              share=form.cleaned_data["rollout_share"], actor=actor)
            except RolloutError as exc:  # the inlines changed the versions since the form was checked
                self.message_user(request, f"Rollout not done: {exc}", level=messages.ERROR)
        routing_table_invalidate()


@admin.register(Deployment)
class DeploymentAdmin(AuditedAdmin):
    list_display = ["alias", "provider", "upstream_model", "version", "priority", "weight", "region", "rpm", "tpm",
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
