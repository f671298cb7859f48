"""Reads of tenancy and keys."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from django.db.models import Q
from django.utils import timezone

from .models import ApiKey, AuditLog, Membership, Role, Tenant


@dataclass(frozen=True, slots=True)
class KeyAuth:
    """What the data plane needs to know about an authenticated key; cached in process."""

    key_id: int
    key_name: str
    key_prefix: str
    tenant_id: int
    tenant_slug: str
    tenant_timezone: str
    source_id: int | None  # None: a tenant-wide key
    source_name: str
    source_type: str
    allowed_models: tuple[str, ...]
    allowed_endpoints: tuple[str, ...]
    rpm: int | None
    tpm: int | None
    default_budget_id: str
    budget_id_binding: bool
    allow_freeform_budget_ids: bool
    cache_enabled: bool
    cache_ttl_s: int
    semantic_cache_enabled: bool
    semantic_cache_embedding_alias: str
    semantic_cache_threshold: Decimal | None
    allowed_regions: tuple[str, ...]
    allow_unpriced_models: bool
    expires_at: object  # aware datetime or None
    revoked: bool

    def may_use_model(self, alias: str) -> bool:
        return not self.allowed_models or alias in self.allowed_models

    def may_use_endpoint(self, endpoint: str) -> bool:
        """Entries are paths (`/v1/embeddings`) or prefixes ending in `*` (`/v1/*`, `/v1/chat/*`)."""
        if not self.allowed_endpoints:
            return True
        for allowed in self.allowed_endpoints:
            if allowed == endpoint or (allowed.endswith("*") and endpoint.startswith(allowed[:-1])):
                return True
        return False


def api_key_auth_by_digest(*, digest: str) -> KeyAuth | None:
    """The key whose current digest, or rotated-out digest still in its grace period, matches."""
    now = timezone.now()
    key = (
        ApiKey.objects.select_related("tenant", "source")
        .filter(Q(digest=digest) | Q(previous_digest=digest, previous_digest_expires_at__gt=now))
        .first()
    )
    if key is None:
        return None
    return _key_auth(key)


def api_key_auth_by_id(*, key_id: int) -> KeyAuth | None:
    """The key by id, for workers running work that was authenticated at enqueue (async, batch).
    Revocation and expiry are reported on the result, as for a digest lookup."""
    key = ApiKey.objects.select_related("tenant", "source").filter(id=key_id).first()
    return _key_auth(key) if key is not None else None


def _key_auth(key: ApiKey) -> KeyAuth:
    tenant = key.tenant
    return KeyAuth(
        key_id=key.id,
        key_name=key.name,
        key_prefix=key.prefix,
        tenant_id=tenant.id,
        tenant_slug=tenant.slug,
        tenant_timezone=tenant.timezone,
        source_id=key.source_id,
        source_name=key.source.name if key.source_id else "",
        source_type=key.source.type if key.source_id else "",
        allowed_models=tuple(key.allowed_models or ()),
        allowed_endpoints=tuple(key.allowed_endpoints or ()),
        rpm=key.rpm,
        tpm=key.tpm,
        default_budget_id=key.default_budget_id,
        budget_id_binding=key.budget_id_binding,
        allow_freeform_budget_ids=tenant.allow_freeform_budget_ids,
        cache_enabled=tenant.cache_enabled if key.cache_enabled is None else key.cache_enabled,
        cache_ttl_s=key.cache_ttl_s or tenant.cache_ttl_s,
        semantic_cache_enabled=(tenant.semantic_cache_enabled if key.semantic_cache_enabled is None
                                else key.semantic_cache_enabled),
        semantic_cache_embedding_alias=key.semantic_cache_embedding_alias or tenant.semantic_cache_embedding_alias,
        semantic_cache_threshold=(key.semantic_cache_threshold if key.semantic_cache_threshold is not None
                                  else tenant.semantic_cache_threshold),
        allowed_regions=tuple(tenant.allowed_regions or ()),
        allow_unpriced_models=tenant.allow_unpriced_models,
        expires_at=key.expires_at,
        revoked=key.revoked_at is not None,
    )


def tenants_for_user(*, user, roles: tuple[str, ...] | None = None):
    if user.is_superuser:
        return Tenant.objects.all()
    return Tenant.objects.filter(id__in=tenant_ids_for_user(user=user, roles=roles))


ADMIN_ROLES = (Role.OWNER, Role.ADMIN)


def audit_log_for_user(*, user):
    """The audit rows `user` may read: all for a superuser, else those of the tenants where the
    user is an owner or admin (newest first)."""
    qs = AuditLog.objects.select_related("tenant")
    if user.is_superuser:
        return qs
    return qs.filter(tenant__in=tenants_for_user(user=user, roles=ADMIN_ROLES))


def user_is_tenant_admin(*, user) -> bool:
    return user.is_superuser or bool(tenant_ids_for_user(user=user, roles=ADMIN_ROLES))
READ_ROLES = (Role.OWNER, Role.ADMIN, Role.MANAGER, Role.VIEWER)
# Who may export the ledger (CSV and the usage-events API): viewers read dashboards and config only.
EXPORT_ROLES = (Role.OWNER, Role.ADMIN, Role.MANAGER)


def tenant_roles_for_user(*, user) -> dict[int, str]:
    """{tenant_id: role} of the user's memberships, cached on the user object for the request."""
    if not getattr(user, "is_authenticated", False):
        return {}
    cached = getattr(user, "_tenant_roles_cache", None)
    if cached is None:
        cached = dict(Membership.objects.filter(user_id=user.pk).values_list("tenant_id", "role"))
        user._tenant_roles_cache = cached
    return cached


def tenant_ids_for_user(*, user, roles: tuple[str, ...] | None = None) -> list[int]:
    """Ids of the tenants the user may act on with one of `roles` (any role when None).
    Superusers get every tenant."""
    if not getattr(user, "is_authenticated", False) or not user.is_active:
        return []
    if user.is_superuser:
        return list(Tenant.objects.values_list("id", flat=True))
    return [t for t, r in tenant_roles_for_user(user=user).items() if roles is None or r in roles]


def user_may(*, user, tenant_id: int | None, roles: tuple[str, ...]) -> bool:
    """Whether the user holds one of `roles` in the tenant (superusers always may)."""
    if not getattr(user, "is_authenticated", False) or not user.is_active:
        return False
    if user.is_superuser:
        return True
    return tenant_id is not None and tenant_roles_for_user(user=user).get(tenant_id) in roles


def user_may_attach(*, by, user) -> bool:
    """Whether `by` may make the existing `user` a member of one of their tenants: superusers
    always; a tenant owner or admin only a user who already belongs to a tenant they administer
    (whose name, email and roles they can read already). Anyone else must be invited by a
    superuser: attaching by username would let an admin pull in, and read, another tenant's user."""
    if by.is_superuser:
        return True
    return Membership.objects.filter(user=user, tenant_id__in=tenant_ids_for_user(user=by, roles=ADMIN_ROLES)) \
        .exists()
