"""Management API for budgets and alerts (tenant-scoped) and prices (global, versioned)."""

from __future__ import annotations

from django.utils import timezone
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.response import Response

from apps.keys.rest import AdminTenantField, SuperuserWritePermission, TenantScopedViewSetMixin, actor_of

from .models import Alert, Budget, Price
from .selectors import price_for_model
from .services import price_set


class BudgetSerializer(serializers.ModelSerializer):
    tenant = AdminTenantField()

    class Meta:
        model = Budget
        fields = ["id", "tenant", "name", "scope", "scope_value", "limit_usd", "period", "enforcement",
                  "alert_thresholds", "shrink_max_tokens", "alert_emails", "alert_webhook_url", "created_at"]

    def validate(self, attrs):
        if self.instance is not None and "tenant" in attrs and attrs["tenant"] != self.instance.tenant:
            raise serializers.ValidationError({"tenant": "A budget cannot move to another tenant."})
        scope = attrs.get("scope", getattr(self.instance, "scope", "tenant"))
        value = attrs.get("scope_value", getattr(self.instance, "scope_value", ""))
        if scope != "tenant" and not value:
            raise serializers.ValidationError({"scope_value": f"A {scope} budget names its {scope}."})
        return attrs


class BudgetViewSet(TenantScopedViewSetMixin, viewsets.ModelViewSet):
    queryset = Budget.objects.select_related("tenant")
    serializer_class = BudgetSerializer


class PriceSerializer(serializers.ModelSerializer):
    class Meta:
        model = Price
        fields = ["id", "model", "input_usd_per_mtok", "output_usd_per_mtok", "cached_input_usd_per_mtok",
                  "cache_write_usd_per_mtok", "batch_discount", "effective_from", "source", "created_at"]
        read_only_fields = ["source", "created_at"]
        extra_kwargs = {"effective_from": {"required": False}}
        validators = []


class PriceViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin,
                   viewsets.GenericViewSet):
    """Price versions. Prices are never edited in place: a POST adds a version (if it differs
    from the one in force). Anyone signed in reads; superusers add."""

    queryset = Price.objects.all()
    serializer_class = PriceSerializer
    permission_classes = [SuperuserWritePermission]

    @extend_schema(responses={
        201: OpenApiResponse(PriceSerializer, description="A new version, different from the one in force"),
        200: OpenApiResponse(PriceSerializer, description="Unchanged: the version already in force"),
    })
    def create(self, request, *args, **kwargs):
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        d = serializer.validated_data
        price = price_set(
            model=d["model"], input_usd_per_mtok=d["input_usd_per_mtok"], output_usd_per_mtok=d["output_usd_per_mtok"],
            cached_input_usd_per_mtok=d.get("cached_input_usd_per_mtok"),
            cache_write_usd_per_mtok=d.get("cache_write_usd_per_mtok"), batch_discount=d.get("batch_discount", 0),
            effective_from=d.get("effective_from"), source="admin", actor=actor_of(request),
        )
        if price is None:  # unchanged: answer with the version in force, as documented
            info = price_for_model(model=d["model"], at=d.get("effective_from") or timezone.now())
            return Response(PriceSerializer(Price.objects.get(pk=info.id)).data, status=status.HTTP_200_OK)
        return Response(PriceSerializer(price).data, status=status.HTTP_201_CREATED)


class AlertSerializer(serializers.ModelSerializer):
    tenant = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    budget = serializers.SlugRelatedField(slug_field="name", read_only=True, allow_null=True,
                                          help_text="null once the budget is deleted")

    class Meta:
        model = Alert
        fields = ["id", "tenant", "budget", "kind", "threshold", "period_start", "model", "spent_usd", "limit_usd",
                  "forecast_usd", "message", "email_status", "webhook_status", "created_at"]


class AlertViewSet(TenantScopedViewSetMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin,
                   viewsets.GenericViewSet):
    """Budget alerts (thresholds, forecasts, unpriced models) of the caller's tenants, newest first.
    Read-only: alerts are fired by the gateway, never written through the API."""

    queryset = Alert.objects.select_related("tenant", "budget")
    serializer_class = AlertSerializer
