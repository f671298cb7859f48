"""Management API for model aliases and deployments (global configuration; superusers write).
Credentials are never exposed: a deployment names its provider only."""

from __future__ import annotations

from rest_framework import serializers, viewsets

from apps.keys.audit import AuditedViewSetMixin
from apps.keys.rest import SuperuserWritePermission

from .models import Deployment, ModelAlias, Provider


class DeploymentSerializer(serializers.ModelSerializer):
    alias = serializers.SlugRelatedField(slug_field="alias", queryset=ModelAlias.objects.all())
    provider = serializers.SlugRelatedField(slug_field="name", queryset=Provider.objects.all())

    class Meta:
        model = Deployment
        fields = ["id", "alias", "provider", "upstream_model", "weight", "priority", "region", "rpm", "tpm",
                  "is_active"]


class ModelAliasSerializer(serializers.ModelSerializer):
    deployments = DeploymentSerializer(many=True, read_only=True)

    class Meta:
        model = ModelAlias
        fields = ["id", "alias", "strategy", "context_window", "max_output_tokens", "supports_streaming",
                  "supports_embeddings", "deployments", "created_at"]


class _AuditedGlobalViewSet(AuditedViewSetMixin, viewsets.ModelViewSet):
    permission_classes = [SuperuserWritePermission]


class ModelAliasViewSet(_AuditedGlobalViewSet):
    """Model aliases with their deployments. What a key may call is its `allowed_models`."""

    queryset = ModelAlias.objects.prefetch_related("deployments__provider", "deployments__alias")
    serializer_class = ModelAliasSerializer


class DeploymentViewSet(_AuditedGlobalViewSet):
    queryset = Deployment.objects.select_related("alias", "provider")
    serializer_class = DeploymentSerializer
