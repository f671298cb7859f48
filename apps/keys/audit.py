"""Audit hooks for the two interactive control planes: the Django admin and the DRF management API.

Both record, for every create, update and delete, who (the username), where from (`via`), the
tenant, the object and its before/after snapshots (secrets left out by `services.snapshot`).

Admin:  class SourceAdmin(AuditedAdminMixin, admin.ModelAdmin): ...
API:    class SourceViewSet(AuditedViewSetMixin, viewsets.ModelViewSet): ...

Put the mixin first so its hooks wrap the base class's. A viewset or admin that changes objects
through a service which audits already (e.g. `api_key_revoke`) should not also use the mixin for
that change.
"""

from __future__ import annotations

from django.db import models, transaction

from apps.core.forms import MoneyInput

from .services import audit_record, snapshot


def _actor(request) -> str:
    """The username; with a management API token, which token too (`ann [token llmt_AbCd]`)."""
    user = getattr(request, "user", None)
    name = (user.get_username() if user is not None and user.is_authenticated else "") or "anonymous"
    token = getattr(user, "management_token", None)
    return f"{name} [token {token.prefix}]"[:150] if token is not None else name


def _before(obj) -> dict | None:
    if obj.pk is None:
        return None
    current = type(obj)._default_manager.filter(pk=obj.pk).first()
    return snapshot(current) if current is not None else None


def _tenant_id(obj) -> int | None:
    from .models import Tenant

    if isinstance(obj, Tenant):
        return obj.pk
    return getattr(obj, "tenant_id", None)


def audit_delete(*, request, obj, via: str, delete=None) -> None:
    """Delete `obj` (with `delete(obj)`, default `obj.delete()`) and record it; the row keeps the
    object's id and last snapshot."""
    from .models import Tenant

    before, pk, object_type = snapshot(obj), obj.pk, obj._meta.model_name
    tenant_id = None if isinstance(obj, Tenant) else _tenant_id(obj)
    if delete is None:
        obj.delete()
    else:
        delete(obj)
    audit_record(actor=_actor(request), via=via, action="delete", object_type=object_type, object_id=str(pk),
                 tenant_id=tenant_id, before=before)


class AuditedAdminMixin:
    """ModelAdmin mixin: every add, change and delete made in the admin leaves an audit row.
    (Money fields are edited without the database's trailing zeros.)"""

    formfield_overrides = {models.DecimalField: {"widget": MoneyInput}}

    def audit_after(self, request, obj, form) -> dict:
        """The `after` picture of a saved object; override to add non-field facts (never secrets)."""
        return snapshot(obj)

    def save_model(self, request, obj, form, change):
        request._audit_before = _before(obj) if change else None
        super().save_model(request, obj, form, change)

    def save_related(self, request, form, formsets, change):
        super().save_related(request, form, formsets, change)
        if getattr(request, "_audit_recorded", False):  # a service already audited this change
            return
        obj = form.instance
        after = self.audit_after(request, obj, form)
        before = getattr(request, "_audit_before", None)
        if change and before == after:
            return
        audit_record(actor=_actor(request), via="admin", action="update" if change else "create", obj=obj,
                     before=before, after=after)

    def delete_model(self, request, obj):
        with transaction.atomic():
            audit_delete(request=request, obj=obj, via="admin", delete=lambda o: super(AuditedAdminMixin, self)
                         .delete_model(request, o))

    def delete_queryset(self, request, queryset):
        with transaction.atomic():
            for obj in queryset:
                audit_delete(request=request, obj=obj, via="admin")


class AuditedViewSetMixin:
    """DRF (Generic/Model)ViewSet mixin: perform_create/update/destroy leave an audit row, in the
    same transaction as the change."""

    audit_via = "api"

    def perform_create(self, serializer):
        with transaction.atomic():
            super().perform_create(serializer)
            obj = serializer.instance
            audit_record(actor=_actor(self.request), via=self.audit_via, action="create", obj=obj,
                         after=snapshot(obj))

    def perform_update(self, serializer):
        with transaction.atomic():
            before = _before(serializer.instance)
            super().perform_update(serializer)
            obj = serializer.instance
            after = snapshot(obj)
            if before != after:
                audit_record(actor=_actor(self.request), via=self.audit_via, action="update", obj=obj,
                             before=before, after=after)

    def perform_destroy(self, instance):
        with transaction.atomic():
            audit_delete(request=self.request, obj=instance, via=self.audit_via,
                         delete=super().perform_destroy)
