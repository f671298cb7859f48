"""Writes of tenancy, keys and credentials. Every control-plane change is audited here."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import transaction
from django.forms.models import model_to_dict
from django.utils import timezone

from . import crypto
from .models import ApiKey, AuditLog, ProviderCredential, Source, Tenant

# Fields never copied into the audit log.
_SECRET_FIELDS = {"digest", "previous_digest", "encrypted_secret", "password"}


def snapshot(obj) -> dict:
    """A JSON-safe picture of a model instance for the audit log, secrets left out."""
    data = model_to_dict(obj)
    out = {}
    for k, v in data.items():
        if k in _SECRET_FIELDS:
            continue
        if isinstance(v, datetime):
            v = v.isoformat()
        elif hasattr(v, "pk"):
            v = v.pk
        elif isinstance(v, list):
            v = [getattr(i, "pk", i) for i in v]
        elif not isinstance(v, str | int | float | bool | dict | type(None)):
            v = str(v)
        out[k] = v
    return out


def audit_record(*, actor: str, action: str, obj=None, tenant: Tenant | None = None,
                 object_type: str = "", object_id: str = "", before: dict | None = None,
                 after: dict | None = None) -> AuditLog:
    if obj is not None:
        object_type = object_type or obj._meta.model_name
        object_id = object_id or str(obj.pk)
        if tenant is None:
            tenant = getattr(obj, "tenant", None) if not isinstance(obj, Tenant) else obj
    return AuditLog.objects.create(actor=actor, action=action, tenant=tenant, object_type=object_type,
                                   object_id=object_id, before=before, after=after)


@dataclass(frozen=True)
class CreatedKey:
    key: ApiKey
    secret: str  # shown once, never stored


@transaction.atomic
def api_key_create(*, tenant: Tenant, source: Source, name: str, actor: str, allowed_models: list[str] | None = None,
                   rpm: int | None = None, tpm: int | None = None, expires_days: int | None = None,
                   default_budget_id: str = "") -> CreatedKey:
    secret = crypto.api_key_generate()
    key = ApiKey.objects.create(
        tenant=tenant,
        source=source,
        name=name,
        digest=crypto.api_key_digest(secret),
        prefix=crypto.api_key_display_prefix(secret),
        allowed_models=allowed_models or [],
        rpm=rpm,
        tpm=tpm,
        default_budget_id=default_budget_id,
        expires_at=timezone.now() + timedelta(days=expires_days) if expires_days else None,
    )
    audit_record(actor=actor, action="create", obj=key, after=snapshot(key))
    return CreatedKey(key=key, secret=secret)


@transaction.atomic
def api_key_revoke(*, key: ApiKey, actor: str) -> ApiKey:
    before = snapshot(key)
    key.revoked_at = timezone.now()
    key.save(update_fields=["revoked_at"])
    audit_record(actor=actor, action="revoke", obj=key, before=before, after=snapshot(key))
    return key


@transaction.atomic
def provider_credential_set(*, name: str, secret: str, actor: str) -> ProviderCredential:
    cred, created = ProviderCredential.objects.get_or_create(name=name)
    if created or cred.reveal() != secret:
        cred.encrypted_secret = crypto.encrypt(secret) if secret else ""
        cred.save()
        audit_record(actor=actor, action="create" if created else "update", obj=cred,
                     after={"name": name, "secret": "(set)" if secret else "(empty)"})
    return cred


def audited_upsert(model, *, actor: str, lookup: dict, values: dict, tenant: Tenant | None = None):
    """Create or update one row by its natural key, auditing only a real change. Returns (obj, changed)."""
    obj = model.objects.filter(**lookup).first()
    if obj is None:
        obj = model.objects.create(**lookup, **values)
        audit_record(actor=actor, action="create", obj=obj, tenant=tenant, after=snapshot(obj))
        return obj, True
    before = snapshot(obj)
    changed = [k for k, v in values.items() if getattr(obj, k) != v]
    if not changed:
        return obj, False
    for k in changed:
        setattr(obj, k, values[k])
    obj.save()
    audit_record(actor=actor, action="update", obj=obj, tenant=tenant, before=before, after=snapshot(obj))
    return obj, True


def tenant_upsert(*, slug: str, name: str, timezone_name: str, actor: str, **extra) -> Tenant:
    tenant, _ = audited_upsert(Tenant, actor=actor, lookup={"slug": slug},
                               values={"name": name, "timezone": timezone_name, **extra})
    return tenant


def source_upsert(*, tenant: Tenant, name: str, type: str, actor: str) -> Source:  # noqa: A002
    source, _ = audited_upsert(Source, actor=actor, lookup={"tenant": tenant, "name": name}, values={"type": type})
    return source


def member_upsert(*, tenant: Tenant, username: str, email: str, role: str, password: str | None, actor: str):
    from django.contrib.auth import get_user_model

    from .models import Membership

    User = get_user_model()
    user = User.objects.filter(username=username).first()
    if user is None:
        user = User.objects.create_user(username=username, email=email, password=password)
        if not password:
            user.set_unusable_password()
        user.is_staff = role in ("owner", "admin", "manager", "viewer")
        user.save()
        audit_record(actor=actor, action="create", tenant=tenant, object_type="user", object_id=str(user.pk),
                     after={"username": username, "email": email})
    else:
        dirty = False
        if email and user.email != email:
            user.email, dirty = email, True
        if password and not user.check_password(password):
            user.set_password(password)
            dirty = True
        if not user.is_staff:
            user.is_staff, dirty = True, True
        if dirty:
            user.save()
            audit_record(actor=actor, action="update", tenant=tenant, object_type="user", object_id=str(user.pk),
                         after={"username": username, "email": user.email})
    audited_upsert(Membership, actor=actor, lookup={"user": user, "tenant": tenant}, values={"role": role},
                   tenant=tenant)
    return user


def member_add(*, tenant: Tenant, username: str, email: str, role: str, password: str | None, actor: str):
    """Add a member from the admin or the API. A new user is created (with the password given);
    an existing user is only attached: a tenant admin never changes the password or email of a
    user who may belong to other tenants. Returns the Membership."""
    from django.contrib.auth import get_user_model

    from .models import Membership

    user = get_user_model().objects.filter(username=username).first()
    if user is None:
        user = member_upsert(tenant=tenant, username=username, email=email, role=role, password=password,
                             actor=actor)
        return Membership.objects.select_related("user", "tenant").get(user=user, tenant=tenant)
    membership, _ = audited_upsert(Membership, actor=actor, lookup={"user": user, "tenant": tenant},
                                   values={"role": role}, tenant=tenant)
    if not user.is_staff:
        user.is_staff = True
        user.save(update_fields=["is_staff"])
    return membership
