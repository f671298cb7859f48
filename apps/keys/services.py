"""Writes of tenancy, keys and credentials. Every control-plane change is audited here."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Q
from django.forms.models import model_to_dict
from django.utils import timezone

from . import crypto
from .models import ROLE_RANK, ApiKey, AuditLog, ManagementToken, ProviderCredential, Role, Source, Tenant

# Fields never copied into the audit log.
_SECRET_FIELDS = {"digest", "previous_digest", "encrypted_secret", "password", "webhook_secret_encrypted"}


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


def cli_actor() -> str:
    """Who runs a management command, for the audit log: `cli:<OS user>` (`cli` if unknown)."""
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def audit_record(*, actor: str, action: str, obj=None, tenant: Tenant | None = None,
                 object_type: str = "", object_id: str = "", before: dict | None = None,
                 after: dict | None = None, via: str = "", tenant_id: int | None = None) -> AuditLog:
    """Append one row to the audit log. `via` says where the change came from (admin, api, cli,
    system; empty: unknown). Callers pass snapshots made by `snapshot`, which drops secrets."""
    if obj is not None:
        object_type = object_type or obj._meta.model_name
        object_id = object_id or str(obj.pk)
        if tenant is None and tenant_id is None:
            tenant_id = _tenant_id_of(obj)
    if tenant is not None:
        tenant_id = tenant.pk
    if not via:
        via = "cli" if actor.split(":")[0] == "cli" else "system" if actor == "system" else ""
    return AuditLog.objects.create(actor=actor, via=via, action=action, tenant_id=tenant_id,
                                   object_type=object_type, object_id=object_id, before=before, after=after)


def _tenant_id_of(obj) -> int | None:
    if isinstance(obj, Tenant):  # a deleted tenant leaves rows that name no tenant
        return obj.pk if obj.pk is not None and Tenant.objects.filter(pk=obj.pk).exists() else None
    return getattr(obj, "tenant_id", None)


@dataclass(frozen=True)
class CreatedKey:
    key: ApiKey
    secret: str  # shown once, never stored


# --- tenant webhook secrets -------------------------------------------------------------------

WEBHOOK_SECRET_PREFIX = "whsec_"


def _webhook_secret_new() -> str:
    import secrets

    return WEBHOOK_SECRET_PREFIX + secrets.token_urlsafe(32)


def tenant_webhook_secret(*, tenant_id: int) -> str:
    """The tenant's webhook signing secret, made (once, whoever asks first) when it has none yet.
    Deliveries sign with it; tenant admins read it to verify them."""
    stored = Tenant.objects.filter(id=tenant_id).values_list("webhook_secret_encrypted", flat=True).first()
    if stored is None:
        raise Tenant.DoesNotExist(f"tenant {tenant_id}")
    if stored:
        return crypto.decrypt(stored)
    Tenant.objects.filter(id=tenant_id, webhook_secret_encrypted="").update(
        webhook_secret_encrypted=crypto.encrypt(_webhook_secret_new()))
    return crypto.decrypt(Tenant.objects.values_list("webhook_secret_encrypted", flat=True).get(id=tenant_id))


@transaction.atomic
def tenant_webhook_secret_rotate(*, tenant: Tenant, actor: str, via: str = "") -> str:
    """Replace the tenant's webhook secret (the old one stops verifying at once). Audited; the
    secret itself never enters the audit log. Returns the new secret."""
    secret = _webhook_secret_new()
    tenant.webhook_secret_encrypted = crypto.encrypt(secret)
    tenant.save(update_fields=["webhook_secret_encrypted"])
    audit_record(actor=actor, action="rotate_webhook_secret", obj=tenant, via=via)
    return secret


def api_key_set_secret(*, key: ApiKey) -> str:
    """Give `key` a fresh secret (digest and display prefix; not saved). Returns the secret, which
    is shown once and never stored."""
    secret = crypto.api_key_generate()
    key.digest = crypto.api_key_digest(secret)
    key.prefix = crypto.api_key_display_prefix(secret)
    return secret


@transaction.atomic
def api_key_create(*, tenant: Tenant, source: Source | None, name: str, actor: str,
                   allowed_models: list[str] | None = None, rpm: int | None = None, tpm: int | None = None,
                   expires_days: int | None = None, default_budget_id: str = "", budget_id_binding: bool = False,
                   allowed_endpoints: list[str] | None = None, cache_enabled: bool | None = None,
                   cache_ttl_s: int | None = None, semantic_cache_enabled: bool | None = None,
                   semantic_cache_embedding_alias: str = "", semantic_cache_threshold: Decimal | None = None,
                   via: str = "") -> CreatedKey:
    """A new key; `source` None makes a tenant-wide key (it may name any declared source)."""
    if source is not None and source.tenant_id != tenant.pk:
        raise ValidationError({"source": f"source {source.name!r} belongs to another tenant"})
    key = ApiKey(
        tenant=tenant,
        source=source,
        name=name,
        allowed_models=allowed_models or [],
        allowed_endpoints=allowed_endpoints or [],
        rpm=rpm,
        tpm=tpm,
        default_budget_id=default_budget_id,
        budget_id_binding=budget_id_binding,
        cache_enabled=cache_enabled,
        cache_ttl_s=cache_ttl_s,
        semantic_cache_enabled=semantic_cache_enabled,
        semantic_cache_embedding_alias=semantic_cache_embedding_alias,
        semantic_cache_threshold=semantic_cache_threshold,
        expires_at=timezone.now() + timedelta(days=expires_days) if expires_days else None,
    )
    secret = api_key_set_secret(key=key)
    key.save()
    audit_record(actor=actor, action="create", obj=key, after=snapshot(key), via=via)
    return CreatedKey(key=key, secret=secret)


# Fields api_key_update may change; the secret only changes through api_key_rotate.
API_KEY_EDITABLE = frozenset({
    "name", "source", "allowed_models", "allowed_endpoints", "rpm", "tpm", "default_budget_id",
    "cache_enabled", "cache_ttl_s", "semantic_cache_enabled", "semantic_cache_embedding_alias",
    "semantic_cache_threshold", "expires_at",
})


@transaction.atomic
def api_key_update(*, key: ApiKey, actor: str, via: str = "", **values) -> ApiKey:
    """Change a key's scopes, limits, expiry or per-key defaults. Audited when something changed."""
    unknown = set(values) - API_KEY_EDITABLE
    if unknown:
        raise ValidationError({name: "cannot be changed here" for name in sorted(unknown)})
    if "source" in values and values["source"].tenant_id != key.tenant_id:
        raise ValidationError({"source": "the source belongs to another tenant"})
    before = snapshot(key)
    changed = [k for k, v in values.items() if getattr(key, k) != v]
    if not changed:
        return key
    for k in changed:
        setattr(key, k, values[k])
    key.save(update_fields=changed)
    audit_record(actor=actor, action="update", obj=key, before=before, after=snapshot(key), via=via)
    return key


@transaction.atomic
def api_key_revoke(*, key: ApiKey, actor: str, via: str = "") -> ApiKey:
    """Refuse the key (and any rotated-out secret of it) from now on. Every gateway instance sees it
    within GATEWAY_AUTH_CACHE_TTL_S. Revoking a revoked key changes nothing."""
    if key.revoked_at is not None:
        return key
    before = snapshot(key)
    key.revoked_at = timezone.now()
    key.save(update_fields=["revoked_at"])
    audit_record(actor=actor, action="revoke", obj=key, before=before, after=snapshot(key), via=via)
    return key


@transaction.atomic
def api_key_rotate(*, key: ApiKey, actor: str, grace_s: int = 0, via: str = "") -> CreatedKey:
    """Give the key a new secret. The old secret keeps working for `grace_s` seconds (0: refused at
    once); a secret rotated out earlier is forgotten. Returns the new secret, shown once."""
    if grace_s < 0:
        raise ValidationError({"grace_s": "must be zero or more seconds"})
    key = ApiKey.objects.select_for_update().get(pk=key.pk)
    if key.revoked_at is not None:
        raise ValidationError("a revoked key cannot be rotated; create a new key")
    before = snapshot(key)
    if grace_s:
        key.previous_digest = key.digest
        key.previous_digest_expires_at = timezone.now() + timedelta(seconds=grace_s)
    else:
        key.previous_digest, key.previous_digest_expires_at = "", None
    secret = api_key_set_secret(key=key)
    key.save(update_fields=["digest", "prefix", "previous_digest", "previous_digest_expires_at"])
    audit_record(actor=actor, action="rotate", obj=key, before=before,
                 after={**snapshot(key), "grace_s": grace_s}, via=via)
    return CreatedKey(key=key, secret=secret)


def api_key_last_used_write(*, seen: dict[int, datetime]) -> int:
    """Write collected last-use times in bulk (one UPDATE per key, never moving a time backwards).
    Returns how many keys changed."""
    changed = 0
    for key_id, at in seen.items():
        changed += ApiKey.objects.filter(Q(last_used_at__isnull=True) | Q(last_used_at__lt=at), pk=key_id) \
            .update(last_used_at=at)
    return changed


def security_event_record(*, action: str, tenant_id: int | None = None, object_type: str = "apikey",
                          object_id: str = "", details: dict | None = None) -> AuditLog:
    """A security event (e.g. a burst of failed authentications) in the audit log."""
    return audit_record(actor="system", via="system", action=action, tenant_id=tenant_id,
                        object_type=object_type, object_id=object_id, after=details)


@transaction.atomic
def provider_credential_set(*, name: str, secret: str, actor: str, via: str = "") -> ProviderCredential:
    cred, created = ProviderCredential.objects.get_or_create(name=name)
    if created or cred.reveal() != secret:
        cred.encrypted_secret = crypto.encrypt(secret) if secret else ""
        cred.save()
        audit_record(actor=actor, action="create" if created else "update", obj=cred,
                     after={"name": name, "secret": "(set)" if secret else "(empty)"}, via=via)
    return cred


def audited_upsert(model, *, actor: str, lookup: dict, values: dict, tenant: Tenant | None = None, via: str = ""):
    """Create or update one row by its natural key, auditing only a real change. Returns (obj, changed)."""
    obj = model.objects.filter(**lookup).first()
    if obj is None:
        obj = model.objects.create(**lookup, **values)
        audit_record(actor=actor, action="create", obj=obj, tenant=tenant, after=snapshot(obj), via=via)
        return obj, True
    before = snapshot(obj)
    changed = [k for k, v in values.items() if getattr(obj, k) != v]
    if not changed:
        return obj, False
    for k in changed:
        setattr(obj, k, values[k])
    obj.save()
    audit_record(actor=actor, action="update", obj=obj, tenant=tenant, before=before, after=snapshot(obj), via=via)
    return obj, True


def tenant_check_adoptable(*, tenant: Tenant, actor: str, adopt: bool = False, via: str = "cli") -> Tenant:
    """An operator's command (gateway_apply, key_create) about to write into `tenant` by slug.

    A tenant renamed since it was created (its slug differs from `created_slug`) is refused: the
    slug the operator names may have been taken by someone else's tenant. With `adopt` the operator
    accepts the tenant under its current slug; that is recorded (audited, action `adopt`) and later
    commands no longer ask."""
    if tenant.created_slug == tenant.slug:
        return tenant
    if not adopt:
        raise ValidationError(
            f"tenant {tenant.slug!r} was created as {tenant.created_slug!r} and renamed since; "
            f"check it is the tenant you mean, then pass --adopt"
        )
    before = snapshot(tenant)
    before["created_slug"] = tenant.created_slug
    tenant.created_slug = tenant.slug
    tenant.save(update_fields=["created_slug"])
    audit_record(actor=actor, action="adopt", obj=tenant, before=before,
                 after={**snapshot(tenant), "created_slug": tenant.created_slug}, via=via)
    return tenant


def tenant_upsert(*, slug: str, name: str, timezone_name: str, actor: str, adopt: bool = False, **extra) -> Tenant:
    """Create or update a tenant by slug (gateway_apply). An existing tenant renamed to this slug
    since its creation is only updated with `adopt` (see `tenant_check_adoptable`)."""
    existing = Tenant.objects.filter(slug=slug).first()
    if existing is not None:
        tenant_check_adoptable(tenant=existing, actor=actor, adopt=adopt)
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


MEMBER_USERNAME_TAKEN = ("This username is taken by an account you do not administer. Choose another "
                         "username for a new user, or ask a superuser to add the existing account.")


def member_add(*, tenant: Tenant, username: str, email: str, role: str, password: str | None, actor: str,
               by=None):
    """Add a member from the admin or the API, on behalf of the user `by` (None: a trusted caller).
    A new user is created (with the password given). An existing user is only attached, and only
    when `selectors.user_may_attach` allows it (superusers: anyone; tenant admins: users of
    tenants they administer); otherwise ValidationError, which names nothing of that user. A tenant
    admin never changes the password or email of a user who may belong to other tenants.
    Returns the Membership."""
    from django.contrib.auth import get_user_model

    from .models import Membership
    from .selectors import user_may_attach

    user = get_user_model().objects.filter(username=username).first()
    if user is not None and by is not None and not user_may_attach(by=by, user=user):
        raise ValidationError({"username": MEMBER_USERNAME_TAKEN})
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


# --- single sign-on (apps/keys/sso.py reads the claims, this writes what they say) ---------------

SSO_ACTOR = "sso"  # changes made because the identity provider's claims said so


@dataclass(frozen=True)
class SsoLogin:
    user: object
    provisioned: bool  # the user was created (or linked) at this login
    unknown_tenants: tuple[str, ...]  # slugs in the claims that name no tenant (ignored)


def _sso_username(*, hint: str, issuer: str, subject: str) -> str:
    import hashlib

    from django.contrib.auth import get_user_model

    base = (hint or subject)[:140]
    if not get_user_model().objects.filter(username=base).exists():
        return base
    return f"{base}-{hashlib.sha256(f'{issuer}|{subject}'.encode()).hexdigest()[:8]}"


@transaction.atomic
def sso_user_login(*, issuer: str, subject: str, email: str, email_verified: bool, username_hint: str,
                   tenant_roles: dict[str, str], superuser: bool | None) -> SsoLogin:
    """The user of the identity (issuer, subject) after a verified OpenID Connect login, with the
    memberships the claims give: `tenant_roles` ({tenant slug: role}) becomes the user's set of
    memberships (added, role changed, removed when a tenant is no longer listed); slugs naming no
    tenant are ignored and returned. `superuser` None leaves is_superuser alone.

    A new identity is linked to the one existing user with that email when the provider says the
    email is verified; otherwise a user is provisioned (no usable password). Everything is audited:
    provisioning, each membership change and the login itself (one row per tenant of the user,
    so each tenant's admins see it). An inactive user is neither synchronised nor logged in."""
    from django.contrib.auth import get_user_model

    from .models import Membership, SsoIdentity

    User = get_user_model()
    now = timezone.now()
    provisioned = False
    identity = (SsoIdentity.objects.select_for_update().select_related("user")
                .filter(issuer=issuer, subject=subject).first())
    if identity is None:
        matches = list(User.objects.filter(email__iexact=email)[:2]) if email and email_verified else []
        if len(matches) == 1:
            user = matches[0]
            action = "sso_link"
        else:
            user = User.objects.create_user(
                _sso_username(hint=username_hint, issuer=issuer, subject=subject), email=email or "")
            user.set_unusable_password()
            user.save(update_fields=["password"])
            action = "sso_provision"
        identity = SsoIdentity.objects.create(user=user, issuer=issuer, subject=subject)
        provisioned = True
        audit_record(actor=SSO_ACTOR, via="sso", action=action, object_type="user", object_id=str(user.pk),
                     after={"username": user.get_username(), "email": user.email, "issuer": issuer,
                            "subject": subject})
    user = identity.user
    if not user.is_active:
        security_event_record(action="sso_login_refused", object_type="user", object_id=str(user.pk),
                              details={"username": user.get_username(), "reason": "user is inactive"})
        return SsoLogin(user=user, provisioned=provisioned, unknown_tenants=())

    tenants = {t.slug: t for t in Tenant.objects.filter(slug__in=list(tenant_roles))}
    unknown = tuple(sorted(set(tenant_roles) - set(tenants)))
    current = {m.tenant_id: m for m in Membership.objects.select_for_update().filter(user=user)}
    wanted = {tenants[slug].pk: (tenants[slug], role) for slug, role in tenant_roles.items() if slug in tenants}
    for tenant_id, membership in current.items():
        if tenant_id not in wanted:
            before = snapshot(membership)
            membership.delete()
            audit_record(actor=SSO_ACTOR, via="sso", action="delete", object_type="membership",
                         object_id=str(before["id"]), tenant_id=tenant_id, before=before)
    for tenant, role in wanted.values():
        audited_upsert(Membership, actor=SSO_ACTOR, via="sso", lookup={"user": user, "tenant": tenant},
                       values={"role": role}, tenant=tenant)

    before = {"email": user.email, "is_staff": user.is_staff, "is_superuser": user.is_superuser}
    if email and user.email != email:
        user.email = email
    if superuser is not None:
        user.is_superuser = superuser
    user.is_staff = bool(wanted) or user.is_superuser
    after = {"email": user.email, "is_staff": user.is_staff, "is_superuser": user.is_superuser}
    if after != before:
        user.save(update_fields=list(after))
        audit_record(actor=SSO_ACTOR, via="sso", action="update", object_type="user", object_id=str(user.pk),
                     before=before, after=after)
    identity.last_login_at = now
    identity.save(update_fields=["last_login_at"])

    login = {"username": user.get_username(), "issuer": issuer, "subject": subject,
             "tenants": {slug: role for slug, role in sorted(tenant_roles.items()) if slug in tenants}}
    if unknown:
        login["unknown_tenants"] = list(unknown)
    for tenant_id in sorted(wanted) or [None]:
        audit_record(actor=user.get_username(), via="sso", action="sso_login", object_type="user",
                     object_id=str(user.pk), tenant_id=tenant_id, after=login)
    return SsoLogin(user=user, provisioned=provisioned, unknown_tenants=unknown)


# --- management API tokens (/api/) ----------------------------------------------------------------

MANAGEMENT_TOKEN_MAX_DAYS = 365


@dataclass(frozen=True)
class CreatedToken:
    token: ManagementToken
    secret: str


@transaction.atomic
def management_token_create(*, tenant: Tenant, name: str, role: str, actor: str, expires_days: int = 90,
                            user=None, service: bool = False, by=None, via: str = "") -> CreatedToken:
    """A token for the management API, shown once (only its digest is stored). Personal (`user`):
    its role may not exceed the user's in the tenant. Service (`service=True`): a service user is
    made for it (unusable password, no membership). `by` (a person; None from the command line)
    must administer the tenant and may not hand out more than their own role."""
    from django.contrib.auth import get_user_model

    from .selectors import tenant_roles_for_user

    if role not in Role.values:
        raise ValidationError({"role": f"must be one of {', '.join(Role.values)}"})
    if not 1 <= expires_days <= MANAGEMENT_TOKEN_MAX_DAYS:
        raise ValidationError({"expires_days": f"must be between 1 and {MANAGEMENT_TOKEN_MAX_DAYS}"})
    if by is not None and not by.is_superuser:
        mine = tenant_roles_for_user(user=by).get(tenant.pk)
        if mine not in (Role.OWNER, Role.ADMIN):
            raise ValidationError({"tenant": "only the tenant's owners and admins create tokens"})
        if ROLE_RANK[role] > ROLE_RANK[mine]:
            raise ValidationError({"role": f"cannot exceed your own role ({mine})"})
    if service == (user is not None):
        raise ValidationError({"user": "give a user (personal token) or ask for a service token, not both"})
    if ManagementToken.objects.filter(tenant=tenant, name=name).exists():
        raise ValidationError({"name": f"tenant {tenant.slug} has a token named {name!r} already"})
    if service:
        username = f"svc-{tenant.slug}-{name}"[:150]
        user = get_user_model()(username=username, is_active=True)
        user.set_unusable_password()
        if get_user_model().objects.filter(username=username).exists():
            raise ValidationError({"name": f"a user named {username!r} exists already"})
        user.save()
    elif not user.is_superuser and ROLE_RANK[role] > ROLE_RANK.get(
            tenant_roles_for_user(user=user).get(tenant.pk), -1):
        raise ValidationError({"role": f"{user.get_username()} does not hold {role} (or more) in {tenant.slug}"})
    secret = crypto.management_token_generate()
    token = ManagementToken.objects.create(
        tenant=tenant, user=user, kind=ManagementToken.Kind.SERVICE if service else ManagementToken.Kind.PERSONAL,
        name=name, role=role, digest=crypto.api_key_digest(secret), prefix=crypto.api_key_display_prefix(secret),
        created_by=actor, expires_at=timezone.now() + timedelta(days=expires_days))
    audit_record(actor=actor, action="create", obj=token, after=snapshot(token), via=via)
    return CreatedToken(token=token, secret=secret)


def management_token_revoke(*, token: ManagementToken, actor: str, via: str = "") -> ManagementToken:
    """Refuse the token from its next request on. Revoking a revoked token changes nothing."""
    if token.revoked_at is not None:
        return token
    before = snapshot(token)
    token.revoked_at = timezone.now()
    token.save(update_fields=["revoked_at"])
    audit_record(actor=actor, action="revoke", obj=token, before=before, after=snapshot(token), via=via)
    return token
