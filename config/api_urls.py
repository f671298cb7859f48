"""The management API (DRF) under /api/, its OpenAPI schema and an offline Swagger UI."""

from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import DefaultRouter

from apps.analytics.rest import AnalyticsViewSet, RecommendationViewSet, RequestLogViewSet, UsageEventViewSet
from apps.billing.rest import AlertViewSet, BudgetViewSet, PriceViewSet
from apps.gateway.rest import DeploymentViewSet, ModelAliasViewSet
from apps.keys.rest import (
    ApiKeyViewSet,
    AuditLogViewSet,
    ManagementTokenViewSet,
    MemberViewSet,
    SourceViewSet,
    TenantViewSet,
)

router = DefaultRouter()
router.register("tenants", TenantViewSet, basename="tenant")
router.register("members", MemberViewSet, basename="member")
router.register("sources", SourceViewSet, basename="source")
router.register("keys", ApiKeyViewSet, basename="key")
router.register("budgets", BudgetViewSet, basename="budget")
router.register("models", ModelAliasViewSet, basename="model")
router.register("deployments", DeploymentViewSet, basename="deployment")
router.register("prices", PriceViewSet, basename="price")
router.register("usage-events", UsageEventViewSet, basename="usage-event")
router.register("analytics", AnalyticsViewSet, basename="analytics")
router.register("recommendations", RecommendationViewSet, basename="recommendation")
router.register("request-logs", RequestLogViewSet, basename="request-log")
router.register("audit-log", AuditLogViewSet, basename="audit-log")
router.register("alerts", AlertViewSet, basename="alert")
router.register("tokens", ManagementTokenViewSet, basename="token")

urlpatterns = [
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("", include(router.urls)),
]
