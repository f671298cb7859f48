"""Reads of tenancy and keys."""

from __future__ import annotations

from dataclasses import dataclass

from django.db.models import Q
from django.utils import timezone

from .models import ApiKey, Membership, Role, Tenant


@dataclass(frozen=True, slots=True)
class KeyAuth:
    """What the data plane needs to know about an authenticated key; cached in process."""

    key_id: int
    key_name: str
    key_prefix: str
    tenant_id: int
    tenant_slug: str
    tenant_timezone: str
    source_id: int
    source_name: str
    source_type: str
    allowed_models: tuple[str, ...]
    allowed_endpoints: tuple[str, ...]
    rpm: int | None
    tpm: int | None
    default_budget_id: str
    cache_enabled: bool
    cache_ttl_s: int
    allowed_regions: tuple[str, ...]
    allow_unpriced_models: bool
    expires_at: object  # aware datetime or None
    revoked: bool

    def may_use_model(self, alias: str) -> bool:
        return not self.allowed_models or alias in self.allowed_models

    def may_use_endpoint(self, endpoint: str) -> bool:
        return not self.allowed_endpoints or endpoint in self.allowed_endpoints


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
        source_name=key.source.name,
        source_type=key.source.type,
        allowed_models=tuple(key.allowed_models or ()),
        allowed_endpoints=tuple(key.allowed_endpoints or ()),
        rpm=key.rpm,
        tpm=key.tpm,
        default_budget_id=key.default_budget_id,
        cache_enabled=tenant.cache_enabled if key.cache_enabled is None else key.cache_enabled,
        cache_ttl_s=tenant.cache_ttl_s,
        allowed_regions=tuple(tenant.allowed_regions or ()),
        allow_unpriced_models=tenant.allow_unpriced_models,
        expires_at=key.expires_at,
        revoked=key.revoked_at is not None,
    )


def tenants_for_user(*, user, roles: tuple[str, ...] | None = None):
    if user.is_superuser:
        return Tenant.objects.all()
    memberships = Membership.objects.filter(user=user)
    if roles:
        memberships = memberships.filter(role__in=roles)
    return Tenant.objects.filter(id__in=memberships.values("tenant_id"))


ADMIN_ROLES = (Role.OWNER, Role.ADMIN)
