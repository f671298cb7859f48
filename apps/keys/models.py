"""Tenancy and credentials: tenants, members and roles, sources, API keys, provider credentials,
and the append-only audit log."""

import zoneinfo

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from . import crypto

UNIT_INTERVAL = [MinValueValidator(0), MaxValueValidator(1)]  # a similarity threshold


def validate_timezone(value: str) -> None:
    if value not in zoneinfo.available_timezones():
        raise ValidationError(f"unknown time zone {value!r}")


class Tenant(models.Model):
    slug = models.SlugField(unique=True)
    # The slug the tenant was created with (or last adopted under by an operator). Only superusers
    # rename tenants; gateway_apply and key_create refuse a tenant whose slug differs from this
    # unless told to adopt it, so a renamed tenant never silently receives an operator's config.
    created_slug = models.SlugField(editable=False, default="")
    name = models.CharField(max_length=200)
    timezone = models.CharField(max_length=64, default="UTC", validators=[validate_timezone])
    # Data residency: when non-empty, requests are only routed to deployments in these regions.
    allowed_regions = models.JSONField(default=list, blank=True)
    allow_unpriced_models = models.BooleanField(default=False)
    # Off: a request's metadata.budget_id must name a declared budget (scope budget_id), so a typo
    # cannot escape its budget (400 unknown_budget_id). On: any id is booked as sent.
    allow_freeform_budget_ids = models.BooleanField(default=False)
    cache_enabled = models.BooleanField(default=True)
    cache_ttl_s = models.PositiveIntegerField("cache TTL (seconds)", default=3600)
    # Semantic cache (apps/gateway/semantic.py): off unless the tenant opts in; prompts are embedded
    # with this embedding alias (a billed request of the tenant) and a stored answer whose prompt is
    # at least this similar (cosine) is served.
    semantic_cache_enabled = models.BooleanField("semantic cache", default=False)
    semantic_cache_embedding_alias = models.CharField(
        "semantic cache embedding model", max_length=200, blank=True,
        help_text="The embedding model alias prompts are embedded with (billed to the tenant).")
    semantic_cache_threshold = models.DecimalField(
        "semantic cache threshold", max_digits=5, decimal_places=4, null=True, blank=True, validators=UNIT_INTERVAL,
        help_text="Minimum cosine similarity of a hit (0-1). Empty: GATEWAY_SEMANTIC_CACHE_THRESHOLD.")
    # Signs this tenant's webhooks (budget alerts, callback_url), Fernet-encrypted. Made on first
    # use; tenant admins read and rotate it (services.tenant_webhook_secret*).
    webhook_secret_encrypted = models.TextField(blank=True, default="", editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug

    def save(self, *args, **kwargs):
        if not self.created_slug:
            self.created_slug = self.slug
            if kwargs.get("update_fields") is not None:
                kwargs["update_fields"] = {*kwargs["update_fields"], "created_slug"}
        super().save(*args, **kwargs)


class Role(models.TextChoices):
    OWNER = "owner"
    ADMIN = "admin"
    MANAGER = "manager"
    VIEWER = "viewer"


class Membership(models.Model):
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.VIEWER)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "tenant"], name="uniq_membership")]

    def __str__(self) -> str:
        return f"{self.user} @ {self.tenant} ({self.role})"


class SourceType(models.TextChoices):
    APPLICATION = "application"
    SERVICE = "service"


class Source(models.Model):
    """An application or service of the tenant that calls the gateway (the seed's source)."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="sources")
    name = models.CharField(max_length=100)
    type = models.CharField(max_length=16, choices=SourceType.choices, default=SourceType.APPLICATION)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["tenant", "name"]
        constraints = [models.UniqueConstraint(fields=["tenant", "name"], name="uniq_source_name")]

    def __str__(self) -> str:
        return f"{self.tenant.slug}/{self.name}"


class ApiKey(models.Model):
    """An API key. Only the HMAC-SHA256 digest of the secret is stored; the secret is shown once."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="api_keys")
    # The source the key books on; empty: a tenant-wide key, which may name any declared source of
    # its tenant in metadata.source_id (a bound key may name only its own).
    source = models.ForeignKey(Source, null=True, blank=True, on_delete=models.PROTECT, related_name="api_keys")
    name = models.CharField(max_length=100)
    digest = models.CharField(max_length=64, unique=True)
    prefix = models.CharField(max_length=16)
    allowed_models = models.JSONField(default=list, blank=True, help_text="Empty: every model.")
    allowed_endpoints = models.JSONField(default=list, blank=True, help_text="Empty: every endpoint.")
    rpm = models.PositiveIntegerField("requests per minute", null=True, blank=True, help_text="Empty: no limit.")
    tpm = models.PositiveIntegerField("tokens per minute", null=True, blank=True, help_text="Empty: no limit.")
    default_budget_id = models.CharField(max_length=100, blank=True)
    budget_id_binding = models.BooleanField(
        default=False, help_text="The key books on its default budget id only: a request naming another is refused.")
    cache_enabled = models.BooleanField(null=True, blank=True, help_text="Tenant default: the tenant's setting.")
    cache_ttl_s = models.PositiveIntegerField("cache TTL (seconds)", null=True, blank=True,
                                              help_text="Empty: the tenant's TTL.")
    semantic_cache_enabled = models.BooleanField("semantic cache", null=True, blank=True,
                                                 help_text="Tenant default: the tenant's setting.")
    semantic_cache_embedding_alias = models.CharField("semantic cache embedding model", max_length=200, blank=True,
                                                      help_text="Empty: the tenant's.")
    semantic_cache_threshold = models.DecimalField("semantic cache threshold", max_digits=5, decimal_places=4,
                                                   null=True, blank=True, validators=UNIT_INTERVAL,
                                                   help_text="Empty: the tenant's.")
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    # Rotation: the previous digest keeps working until previous_digest_expires_at.
    previous_digest = models.CharField(max_length=64, blank=True, db_index=True)
    previous_digest_expires_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["tenant", "name"]
        constraints = [models.UniqueConstraint(fields=["tenant", "name"], name="uniq_key_name")]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}...)"


class ProviderCredential(models.Model):
    """A provider secret, encrypted at rest with Fernet. Never logged, never shown after saving."""

    name = models.CharField(max_length=100, unique=True)
    encrypted_secret = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return self.name

    def reveal(self) -> str:
        return crypto.decrypt(self.encrypted_secret) if self.encrypted_secret else ""


class AuditLog(models.Model):
    """Append-only record of control-plane changes and security events."""

    at = models.DateTimeField(auto_now_add=True, db_index=True)
    actor = models.CharField(max_length=150, help_text="username, 'cli' or 'system'")
    via = models.CharField(max_length=16, blank=True, help_text="admin, api, cli or system")
    tenant = models.ForeignKey(Tenant, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    action = models.CharField(max_length=64)
    object_type = models.CharField(max_length=64)
    object_id = models.CharField(max_length=64, blank=True)
    before = models.JSONField(null=True, blank=True)
    after = models.JSONField(null=True, blank=True)

    class Meta:
        ordering = ["-at", "-id"]

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M} {self.actor} {self.action} {self.object_type}:{self.object_id}"


class SsoIdentity(models.Model):
    """The account of a user at an OpenID Connect provider: (issuer, subject) is the stable id a
    provider gives a person, so a changed email or name still finds the same user."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="sso_identities")
    issuer = models.CharField(max_length=255)
    subject = models.CharField(max_length=255)
    created_at = models.DateTimeField(auto_now_add=True)
    last_login_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["issuer", "subject"], name="uniq_sso_identity")]
        verbose_name_plural = "SSO identities"

    def __str__(self) -> str:
        return f"{self.subject} @ {self.issuer}"


ROLE_RANK = {Role.VIEWER: 0, Role.MANAGER: 1, Role.ADMIN: 2, Role.OWNER: 3}


class ManagementToken(models.Model):
    """A bearer token for the management API (/api/), for scripts and CI: scoped to one tenant and a
    role, expiring, revocable. Only the HMAC-SHA256 digest of the secret is stored; it is shown once.

    A personal token acts as its user, never above the user's own role in the tenant (checked at
    every request). A service token acts as a service user made for it (no password, no membership):
    its role is the token's."""

    class Kind(models.TextChoices):
        PERSONAL = "personal"
        SERVICE = "service"

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="management_tokens")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="management_tokens",
                             help_text="Personal: the person; service: the service user made for the token.")
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.PERSONAL)
    name = models.CharField(max_length=100)
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.VIEWER,
                            help_text="The most the token may do in its tenant (a personal token: never more "
                                      "than its user's own role).")
    digest = models.CharField(max_length=64, unique=True)
    prefix = models.CharField(max_length=16)
    created_by = models.CharField(max_length=150, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["tenant", "name"]
        constraints = [models.UniqueConstraint(fields=["tenant", "name"], name="uniq_management_token_name")]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}...)"
