"""Management API (DRF) for tenancy: tenants, members, sources, keys, audit log; and the tenant
scoping and role rules every management viewset uses.

Rules: every queryset is limited to the caller's tenants (superusers: all). Any member may read
(GET); owners and admins may write. Writes are audited with the caller as actor."""

from __future__ import annotations

from django.core.exceptions import ValidationError as DjangoValidationError
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, permissions, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import PermissionDenied, ValidationError
from rest_framework.response import Response

from . import services
from .audit import AuditedViewSetMixin
from .models import ApiKey, AuditLog, ManagementToken, Membership, Role, Source, Tenant
from .selectors import ADMIN_ROLES, READ_ROLES, tenant_ids_for_user, user_may

# --- scoping, permissions, audit ------------------------------------------------------------

class TenantRolePermission(permissions.BasePermission):
    """Reads need any role in the object's tenant; writes need owner or admin there."""

    def has_permission(self, request, view):
        if not (request.user and request.user.is_authenticated):
            return False
        if request.method == "POST" and getattr(view, "action", None) == "create":
            return request.user.is_superuser or bool(tenant_ids_for_user(user=request.user, roles=ADMIN_ROLES))
        return True

    def has_object_permission(self, request, view, obj):
        tenant_id = view.tenant_id_of(obj)
        roles = READ_ROLES if request.method in permissions.SAFE_METHODS else ADMIN_ROLES
        return user_may(user=request.user, tenant_id=tenant_id, roles=roles)


class SuperuserWritePermission(permissions.BasePermission):
    """Global configuration (models, deployments, prices): anyone signed in reads, superusers write."""

    def has_permission(self, request, view):
        if not (request.user and request.user.is_authenticated):
            return False
        return request.method in permissions.SAFE_METHODS or request.user.is_superuser


def actor_of(request) -> str:
    from .audit import _actor

    return _actor(request)


class TenantScopedViewSetMixin(AuditedViewSetMixin):
    """Limits the queryset to the caller's tenants; creates, updates and deletes are audited
    (AuditedViewSetMixin)."""

    tenant_path = "tenant"  # ORM path from the model to its Tenant
    read_roles: tuple[str, ...] | None = READ_ROLES
    permission_classes = [TenantRolePermission]

    def tenant_ids(self, roles=None):
        return tenant_ids_for_user(user=self.request.user, roles=roles or self.read_roles)

    def get_queryset(self):
        qs = super().get_queryset()
        if self.request.user.is_superuser:
            return qs
        return qs.filter(**{f"{self.tenant_path}__in": self.tenant_ids()})

    def tenant_id_of(self, obj) -> int | None:
        target = obj
        for part in self.tenant_path.split("__"):
            target = getattr(target, part, None)
        return target.pk if target is not None else None


class AdminTenantField(serializers.SlugRelatedField):
    """A tenant, by slug, among those the caller administers."""

    def __init__(self, **kwargs):
        super().__init__(slug_field="slug", **kwargs)

    def get_queryset(self):
        request = self.context["request"]
        return Tenant.objects.filter(id__in=tenant_ids_for_user(user=request.user, roles=ADMIN_ROLES))


class AdminSourceField(serializers.PrimaryKeyRelatedField):
    def get_queryset(self):
        request = self.context["request"]
        return Source.objects.filter(tenant_id__in=tenant_ids_for_user(user=request.user, roles=ADMIN_ROLES))


# --- tenants --------------------------------------------------------------------------------

class TenantSerializer(serializers.ModelSerializer):
    """A tenant. Its slug names it in commands, configs and URLs: only superusers set or change it."""

    class Meta:
        model = Tenant
        fields = ["id", "slug", "created_slug", "name", "timezone", "allowed_regions", "allow_unpriced_models",
                  "cache_enabled", "cache_ttl_s", "semantic_cache_enabled", "semantic_cache_embedding_alias",
                  "semantic_cache_threshold", "created_at"]
        read_only_fields = ["created_slug", "created_at"]

    def get_fields(self):
        fields = super().get_fields()
        request = self.context.get("request")
        if request is not None and not request.user.is_superuser:
            fields["slug"].read_only = True
        return fields


class WebhookSecretSerializer(serializers.Serializer):
    tenant = serializers.CharField()
    webhook_secret = serializers.CharField(help_text="Signs X-LLM-Signature of alert webhooks and callbacks.")


class TenantViewSet(TenantScopedViewSetMixin, viewsets.ModelViewSet):
    """Tenants: members read theirs; owners and admins update theirs; superusers create and delete."""

    queryset = Tenant.objects.all()
    serializer_class = TenantSerializer
    tenant_path = "id"
    lookup_field = "slug"

    def get_queryset(self):
        qs = Tenant.objects.all()
        return qs if self.request.user.is_superuser else qs.filter(id__in=self.tenant_ids())

    def tenant_id_of(self, obj):
        return obj.pk

    def create(self, request, *args, **kwargs):
        if not request.user.is_superuser:
            raise PermissionDenied("Only superusers create tenants.")
        return super().create(request, *args, **kwargs)

    def update(self, request, *args, **kwargs):
        # Refused before any validation, whatever the new value: a uniqueness check would tell a
        # tenant admin which other tenants exist.
        data = request.data if isinstance(request.data, dict) else {}
        if not request.user.is_superuser and "slug" in data:
            tenant = self.get_object()
            if data.get("slug") != tenant.slug:
                raise ValidationError({"slug": ["Only superusers change a tenant's slug."]})
        return super().update(request, *args, **kwargs)

    def destroy(self, request, *args, **kwargs):
        if not request.user.is_superuser:
            raise PermissionDenied("Only superusers delete tenants.")
        return super().destroy(request, *args, **kwargs)

    def _admin_tenant(self, request) -> Tenant:
        tenant = self.get_object()
        if not user_may(user=request.user, tenant_id=tenant.pk, roles=ADMIN_ROLES):
            raise PermissionDenied("Only owners and admins of the tenant see its webhook secret.")
        return tenant

    @extend_schema(request=None, responses=WebhookSecretSerializer)
    @action(detail=True, methods=["get"], url_path="webhook-secret")
    def webhook_secret(self, request, slug=None):
        """The secret that signs this tenant's webhooks (owners and admins)."""
        tenant = self._admin_tenant(request)
        return Response({"tenant": tenant.slug, "webhook_secret": services.tenant_webhook_secret(tenant_id=tenant.pk)})

    @extend_schema(request=None, responses=WebhookSecretSerializer)
    @action(detail=True, methods=["post"], url_path="webhook-secret/rotate")
    def webhook_secret_rotate(self, request, slug=None):
        """A new webhook secret; the old one stops verifying at once (owners and admins)."""
        tenant = self._admin_tenant(request)
        secret = services.tenant_webhook_secret_rotate(tenant=tenant, actor=actor_of(request), via="api")
        return Response({"tenant": tenant.slug, "webhook_secret": secret})


# --- members --------------------------------------------------------------------------------

class MemberSerializer(serializers.ModelSerializer):
    tenant = AdminTenantField()
    username = serializers.CharField(source="user.username", max_length=150)
    email = serializers.EmailField(source="user.email", required=False, allow_blank=True)
    password = serializers.CharField(write_only=True, required=False, allow_blank=True, min_length=8,
                                     style={"input_type": "password"})

    class Meta:
        model = Membership
        fields = ["id", "tenant", "username", "email", "role", "password"]

    def validate(self, attrs):
        request = self.context["request"]
        tenant = attrs.get("tenant") or (self.instance.tenant if self.instance else None)
        touches_owner = attrs.get("role") == Role.OWNER or (self.instance and self.instance.role == Role.OWNER)
        if touches_owner and not user_may(user=request.user, tenant_id=tenant.id, roles=(Role.OWNER,)):
            raise PermissionDenied("Only owners grant or change the owner role.")
        return attrs

    def create(self, validated):
        user = validated.get("user", {})
        request = self.context["request"]
        try:
            return services.member_add(tenant=validated["tenant"], username=user["username"],
                                       email=user.get("email", ""), role=validated.get("role", Role.VIEWER),
                                       password=validated.get("password") or None,
                                       actor=request.user.get_username(), by=request.user)
        except DjangoValidationError as exc:
            raise serializers.ValidationError(exc.message_dict) from exc

    def update(self, instance, validated):
        if "role" in validated:
            instance.role = validated["role"]
            instance.save(update_fields=["role"])
        return instance


class MemberViewSet(TenantScopedViewSetMixin, viewsets.ModelViewSet):
    """Members of the caller's tenants. Create adds a new user with a role (default `viewer`), or
    attaches an existing user: superusers attach anyone, owners and admins only users who already
    belong to a tenant they administer (anyone else: 400 that names nothing of that user). Update
    changes the role only; delete removes the membership, not the user."""

    queryset = Membership.objects.select_related("user", "tenant").order_by("tenant__slug", "user__username")
    serializer_class = MemberSerializer

    def perform_create(self, serializer):
        serializer.save()  # member_add audits

    def perform_destroy(self, instance):
        if instance.role == Role.OWNER and not user_may(user=self.request.user, tenant_id=instance.tenant_id,
                                                        roles=(Role.OWNER,)):
            raise PermissionDenied("Only owners remove an owner.")
        super().perform_destroy(instance)

    def perform_update(self, serializer):
        if serializer.validated_data.get("tenant") not in (None, serializer.instance.tenant):
            raise PermissionDenied("A membership cannot move to another tenant.")
        for field in ("user",):
            serializer.validated_data.pop(field, None)
        super().perform_update(serializer)


# --- sources --------------------------------------------------------------------------------

class SourceSerializer(serializers.ModelSerializer):
    tenant = AdminTenantField()

    class Meta:
        model = Source
        fields = ["id", "tenant", "name", "type", "created_at"]


class SourceViewSet(TenantScopedViewSetMixin, viewsets.ModelViewSet):
    queryset = Source.objects.select_related("tenant")
    serializer_class = SourceSerializer


# --- keys -----------------------------------------------------------------------------------

class ApiKeySerializer(serializers.ModelSerializer):
    tenant = AdminTenantField()
    source = AdminSourceField()
    expires_days = serializers.IntegerField(write_only=True, required=False, min_value=1)

    class Meta:
        model = ApiKey
        fields = ["id", "tenant", "source", "name", "prefix", "allowed_models", "allowed_endpoints", "rpm", "tpm",
                  "default_budget_id", "cache_enabled", "semantic_cache_enabled", "semantic_cache_embedding_alias",
                  "semantic_cache_threshold", "expires_at", "expires_days", "revoked_at", "last_used_at",
                  "created_at"]
        read_only_fields = ["prefix", "expires_at", "revoked_at", "last_used_at", "created_at"]

    def validate(self, attrs):
        tenant = attrs.get("tenant") or getattr(self.instance, "tenant", None)
        source = attrs.get("source") or getattr(self.instance, "source", None)
        if self.instance is not None and "tenant" in attrs and attrs["tenant"] != self.instance.tenant:
            raise serializers.ValidationError({"tenant": "A key cannot move to another tenant."})
        if source is not None and tenant is not None and source.tenant_id != tenant.id:
            raise serializers.ValidationError({"source": "The source belongs to another tenant."})
        return attrs


class ApiKeyCreatedSerializer(ApiKeySerializer):
    secret = serializers.CharField(read_only=True, help_text="The key itself: shown once, never again.")

    class Meta(ApiKeySerializer.Meta):
        fields = [*ApiKeySerializer.Meta.fields, "secret"]


class ApiKeyViewSet(TenantScopedViewSetMixin, viewsets.ModelViewSet):
    """API keys. The secret is in the response to the create call only; it is never stored."""

    queryset = ApiKey.objects.select_related("tenant", "source")
    serializer_class = ApiKeySerializer

    @extend_schema(responses={201: ApiKeyCreatedSerializer})
    def create(self, request, *args, **kwargs):
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        d = serializer.validated_data
        created = services.api_key_create(
            tenant=d["tenant"], source=d["source"], name=d["name"], actor=actor_of(request),
            allowed_models=d.get("allowed_models"), rpm=d.get("rpm"), tpm=d.get("tpm"),
            expires_days=d.get("expires_days"), default_budget_id=d.get("default_budget_id", ""),
            allowed_endpoints=d.get("allowed_endpoints"), cache_enabled=d.get("cache_enabled"),
            semantic_cache_enabled=d.get("semantic_cache_enabled"),
            semantic_cache_embedding_alias=d.get("semantic_cache_embedding_alias", ""),
            semantic_cache_threshold=d.get("semantic_cache_threshold"), via="api",
        )
        out = ApiKeyCreatedSerializer(created.key, context=self.get_serializer_context()).data
        out["secret"] = created.secret
        return Response(out, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses=ApiKeySerializer)
    @action(detail=True, methods=["post"])
    def revoke(self, request, pk=None):
        key = self.get_object()
        services.api_key_revoke(key=key, actor=actor_of(request), via="api")
        return Response(self.get_serializer(key).data)


# --- audit log ------------------------------------------------------------------------------

class AuditLogSerializer(serializers.ModelSerializer):
    tenant = serializers.SlugRelatedField(slug_field="slug", read_only=True, allow_null=True,
                                          help_text="null for global changes and deleted tenants")

    class Meta:
        model = AuditLog
        fields = ["id", "at", "actor", "tenant", "action", "object_type", "object_id", "before", "after"]


class AuditLogViewSet(TenantScopedViewSetMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin,
                      viewsets.GenericViewSet):
    """The audit log of the caller's tenants (superusers: everything, including global changes).
    Owners and admins only: it names members and every change."""

    queryset = AuditLog.objects.select_related("tenant")
    serializer_class = AuditLogSerializer
    read_roles = ADMIN_ROLES

    def tenant_id_of(self, obj):
        return obj.tenant_id



# --- management API tokens ------------------------------------------------------------------

class ManagementTokenSerializer(serializers.ModelSerializer):
    tenant = AdminTenantField()
    user = serializers.CharField(source="user.username", read_only=True)
    expires_days = serializers.IntegerField(write_only=True, required=False, default=90, min_value=1,
                                            max_value=services.MANAGEMENT_TOKEN_MAX_DAYS)

    class Meta:
        model = ManagementToken
        fields = ["id", "tenant", "name", "kind", "role", "user", "prefix", "created_by", "created_at", "expires_at",
                  "expires_days", "revoked_at", "last_used_at"]
        read_only_fields = ["prefix", "created_by", "created_at", "expires_at", "revoked_at", "last_used_at"]


class ManagementTokenCreatedSerializer(ManagementTokenSerializer):
    secret = serializers.CharField(read_only=True, help_text="The token itself: shown once, never again.")

    class Meta(ManagementTokenSerializer.Meta):
        fields = [*ManagementTokenSerializer.Meta.fields, "secret"]


class ManagementTokenViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin,
                             viewsets.GenericViewSet):
    """Tokens for this API (`Authorization: Bearer <token>`), for scripts and CI. Owners and admins
    create and revoke their tenants' tokens (personal: acting as themselves, at most their own role;
    `kind: service`: a service identity with the token's role) and see them all; anyone else sees
    their own. The secret is in the response to the create call only. A token cannot create tokens."""

    serializer_class = ManagementTokenSerializer
    permission_classes = [permissions.IsAuthenticated]

    def get_queryset(self):
        qs = ManagementToken.objects.select_related("tenant", "user")
        user = self.request.user
        if user.is_superuser:
            return qs
        from django.db.models import Q

        return qs.filter(Q(tenant_id__in=tenant_ids_for_user(user=user, roles=ADMIN_ROLES))
                         | Q(user_id=user.pk, tenant_id__in=tenant_ids_for_user(user=user)))

    def _refuse_token_callers(self, request):
        if getattr(request.user, "management_token", None) is not None:
            raise PermissionDenied("A management token cannot create or revoke tokens: sign in as a person.")

    @extend_schema(responses={201: ManagementTokenCreatedSerializer})
    def create(self, request, *args, **kwargs):
        self._refuse_token_callers(request)
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        d = serializer.validated_data
        service = d.get("kind") == ManagementToken.Kind.SERVICE
        try:
            created = services.management_token_create(
                tenant=d["tenant"], name=d["name"], role=d.get("role", Role.VIEWER), actor=actor_of(request),
                expires_days=d["expires_days"], user=None if service else request.user, service=service,
                by=request.user, via="api")
        except DjangoValidationError as exc:
            raise ValidationError(exc.message_dict) from exc
        out = ManagementTokenCreatedSerializer(created.token, context=self.get_serializer_context()).data
        out["secret"] = created.secret
        return Response(out, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses=ManagementTokenSerializer)
    @action(detail=True, methods=["post"])
    def revoke(self, request, pk=None):
        """Refuse the token from its next request on (owners and admins of its tenant, or its own user)."""
        self._refuse_token_callers(request)
        token = self.get_object()
        if not (token.user_id == request.user.pk
                or user_may(user=request.user, tenant_id=token.tenant_id, roles=ADMIN_ROLES)):
            raise PermissionDenied("Only the tenant's owners and admins revoke this token.")
        services.management_token_revoke(token=token, actor=actor_of(request), via="api")
        return Response(self.get_serializer(token).data)
