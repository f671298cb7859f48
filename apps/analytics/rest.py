"""Management API for the ledger and analytics: the same data as the dashboard and its CSVs."""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import permissions, serializers, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.pagination import CursorPagination
from rest_framework.response import Response

from apps.core.money import money_str
from apps.keys.models import Tenant
from apps.keys.selectors import EXPORT_ROLES, READ_ROLES, tenant_ids_for_user

from . import recommendations, request_logs, selectors
from .forms import DEFAULT_DAYS, MAX_DAYS, usage_filters_from

FILTER_PARAMS = [
    OpenApiParameter("since", OpenApiTypes.DATE,
                     description=f"First UTC day (default: {DEFAULT_DAYS - 1} days before `until`). At most "
                                 f"{MAX_DAYS} days before `until` and not after it; otherwise 400."),
    OpenApiParameter("until", OpenApiTypes.DATE, description="Last UTC day, inclusive (default: today)"),
    OpenApiParameter("tenant", str, description="Tenant slug (default: all of yours)"),
    OpenApiParameter("source", str, description="The seed's source id"),
    OpenApiParameter("model", str, description="Model alias"),
    OpenApiParameter("tag", str, description="Only requests carrying this metadata.tags value"),
    OpenApiParameter("user", str, description="Only requests of this end user (OpenAI's `user`)"),
]


def _filters(request, roles):
    tenants = list(Tenant.objects.filter(id__in=tenant_ids_for_user(user=request.user, roles=roles)))
    form, filters = usage_filters_from(request.query_params, tenants=tenants)
    if filters is None:
        raise ValidationError(form.errors)
    return filters


class UsageEventPagination(CursorPagination):
    ordering = ("-timestamp", "-id")
    page_size = 100
    max_page_size = 1000
    page_size_query_param = "limit"


class UsageEventSerializer(serializers.Serializer):
    """A ledger row in the seed's usage-event shape plus our own fields."""

    def to_representation(self, instance):
        return selectors.seed_usage_event(instance)


class UsageEventViewSet(viewsets.GenericViewSet):
    """The ledger of the caller's tenants (owners, admins, managers), newest first, cursor-paginated."""

    serializer_class = UsageEventSerializer
    pagination_class = UsageEventPagination
    permission_classes = [permissions.IsAuthenticated]

    def get_queryset(self):
        return selectors.usage_events_values(_filters(self.request, EXPORT_ROLES).ledger())

    @extend_schema(parameters=FILTER_PARAMS, responses=OpenApiTypes.OBJECT)
    def list(self, request):
        page = self.paginate_queryset(self.get_queryset())
        return self.get_paginated_response([selectors.seed_usage_event(r) for r in page])


class AnalyticsViewSet(viewsets.ViewSet):
    """Dashboard figures and aggregates, from the rollups (never the raw ledger)."""

    permission_classes = [permissions.IsAuthenticated]

    @extend_schema(parameters=[*FILTER_PARAMS, OpenApiParameter("granularity", str, enum=["hour", "day"])],
                   responses=OpenApiTypes.OBJECT)
    @action(detail=False, methods=["get"])
    def dashboard(self, request):
        """Totals, budgets, spend over time, breakdowns and provider availability."""
        return Response(selectors.dashboard_data(_filters(request, READ_ROLES)))

    @extend_schema(parameters=FILTER_PARAMS, responses=OpenApiTypes.OBJECT)
    @action(detail=False, methods=["get"])
    def versions(self, request):
        """Each model's versions side by side (the dashboard's "Model versions" page): requests, share
        of traffic, error rate, latency p50/p95, cost and tokens per request."""
        models = selectors.version_comparison(_filters(request, READ_ROLES))
        for v in (v for m in models for v in m["versions"]):  # money as exact decimal strings
            v["cost"], v["cost_per_request"] = money_str(v["cost"]), money_str(v["cost_per_request"])
        return Response({"models": models})

    @extend_schema(parameters=[*FILTER_PARAMS, OpenApiParameter("group", str, enum=list(selectors.AGGREGATE_GROUPS))],
                   responses=OpenApiTypes.OBJECT)
    @action(detail=False, methods=["get"])
    def aggregate(self, request):
        """The aggregated CSV as JSON: per UTC day and model (`group=day_model`) or per source."""
        group = request.query_params.get("group", "day_model")
        if group not in selectors.AGGREGATE_GROUPS:
            raise ValidationError({"group": f"one of {', '.join(selectors.AGGREGATE_GROUPS)}"})
        filters = _filters(request, EXPORT_ROLES)
        return Response({"group": group, "rows": list(selectors.usage_aggregate_rows(filters, group))})


# --- cost optimisation recommendations ---------------------------------------------------------


class RecommendationSerializer(serializers.Serializer):
    kind = serializers.ChoiceField(choices=list(recommendations.KINDS),
                                   help_text="cheaper_model, cache or batch (docs/governance-and-analytics.md)")
    title = serializers.CharField()
    saving_usd = serializers.DecimalField(max_digits=20, decimal_places=10,
                                          help_text="USD over the window: current_cost_usd - alternative_cost_usd")
    current_cost_usd = serializers.DecimalField(max_digits=20, decimal_places=10,
                                                help_text="What the traffic cost (the ledger)")
    alternative_cost_usd = serializers.DecimalField(max_digits=20, decimal_places=10,
                                                    help_text="What it would have cost with the recommendation")
    arithmetic = serializers.CharField(help_text="How the figure was computed, with the numbers")
    assumption = serializers.CharField(help_text="What the figure assumes (lower or upper bound)")
    source_type = serializers.CharField(allow_blank=True)
    source_id = serializers.CharField(allow_blank=True, help_text="The seed's source id (blank: all sources)")
    model = serializers.CharField(help_text="Model alias")
    alternative = serializers.CharField(help_text="The cheaper alias, `response cache` or `batch API`")
    requests = serializers.IntegerField()
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    details = serializers.DictField(help_text="Figures behind the arithmetic, by kind")


class TenantRecommendationsSerializer(serializers.Serializer):
    tenant = serializers.CharField(help_text="Tenant slug")
    since = serializers.DateTimeField()
    until = serializers.DateTimeField()
    window_days = serializers.IntegerField()
    recommendations = RecommendationSerializer(many=True, help_text="Biggest saving first")


class RecommendationViewSet(viewsets.ViewSet):
    """Cost optimisation recommendations per tenant over the last 30 days, from the ledger."""

    permission_classes = [permissions.IsAuthenticated]

    @extend_schema(operation_id="recommendations_list", responses=TenantRecommendationsSerializer(many=True),
                   parameters=[OpenApiParameter("tenant", str, description="Tenant slug (default: all of yours)")])
    def list(self, request):
        """One entry per tenant of yours (or the one named): cheaper models of the same capabilities
        for short prompts, repeated prompts the response cache would have answered, and traffic a
        batch API would bill at a discount; each with its dollar saving over the last 30 days and
        the arithmetic behind it."""
        tenants = Tenant.objects.filter(id__in=tenant_ids_for_user(user=request.user, roles=READ_ROLES))
        if slug := request.query_params.get("tenant"):
            tenants = tenants.filter(slug=slug)
        reports = [selectors.recommendations_for_tenant(tenant=t) for t in tenants.order_by("slug")]
        return Response(TenantRecommendationsSerializer(reports, many=True).data)


# --- request logs -----------------------------------------------------------------------------

REQUEST_LOG_PARAMS = [
    OpenApiParameter("since", OpenApiTypes.DATETIME, description="From this time (ISO 8601; a date means its start)"),
    OpenApiParameter("until", OpenApiTypes.DATETIME, description="Before this time (ISO 8601)"),
    OpenApiParameter("tenant", str, description="Tenant slug (default: all of yours)"),
    OpenApiParameter("model", str, description="Model alias"),
    OpenApiParameter("source", str, description="The seed's source id"),
    OpenApiParameter("key", str, description="API key name"),
    OpenApiParameter("status", int, description="HTTP status the client got"),
    OpenApiParameter("budget_id", str, description="metadata.budget_id"),
    OpenApiParameter("tag", str, description="One of the request's metadata.tags"),
    OpenApiParameter("user", str, description="The request's end user (OpenAI's `user`)"),
    OpenApiParameter("q", str, description="Free text, searched in the request and response bodies"),
]


class RequestLogSerializer(serializers.Serializer):
    def to_representation(self, instance):
        return request_logs.request_log_dict(instance, bodies=self.context.get("bodies", True))


class RequestLogPagination(CursorPagination):
    ordering = ("-timestamp", "-id")
    page_size = 50
    max_page_size = 500
    page_size_query_param = "limit"


def _when(params, name: str):
    from django.utils.dateparse import parse_date, parse_datetime

    value = params.get(name)
    if not value:
        return None
    try:
        at = parse_datetime(value)
        if at is None and (day := parse_date(value)) is not None:
            from datetime import datetime, time

            at = datetime.combine(day, time.min)
    except ValueError:
        at = None
    if at is None:
        raise ValidationError({name: "an ISO 8601 date or time"})
    from django.utils import timezone

    return at if timezone.is_aware(at) else timezone.make_aware(at, timezone.get_current_timezone())


class RequestLogViewSet(viewsets.GenericViewSet):
    """What a request sent and got back, its upstream attempts and timings (tenants that turned
    request logs on; owners, admins, managers), newest first. Retrieve by the x-request-id."""

    serializer_class = RequestLogSerializer
    pagination_class = RequestLogPagination
    permission_classes = [permissions.IsAuthenticated]
    lookup_field = "request_id"
    lookup_value_regex = "[^/]+"

    def _tenant_ids(self):
        ids = tenant_ids_for_user(user=self.request.user, roles=EXPORT_ROLES)
        slug = self.request.query_params.get("tenant")
        if slug:
            ids = list(Tenant.objects.filter(id__in=ids, slug=slug).values_list("id", flat=True))
        return ids

    def get_queryset(self):
        p = self.request.query_params
        status = p.get("status")
        if status and not status.isdigit():
            raise ValidationError({"status": "an HTTP status code"})
        return request_logs.request_logs_query(
            tenant_ids=self._tenant_ids(), since=_when(p, "since"), until=_when(p, "until"), model=p.get("model", ""),
            source=p.get("source", ""), key=p.get("key", ""), status=int(status) if status else None,
            budget_id=p.get("budget_id", ""), tag=p.get("tag", ""), end_user=p.get("user", ""), q=p.get("q", ""))

    @extend_schema(operation_id="request_logs_list", parameters=REQUEST_LOG_PARAMS, responses=OpenApiTypes.OBJECT)
    def list(self, request):
        page = self.paginate_queryset(self.get_queryset())
        return self.get_paginated_response([request_logs.request_log_dict(r, bodies=False) for r in page])

    @extend_schema(operation_id="request_logs_retrieve", responses=OpenApiTypes.OBJECT)
    def retrieve(self, request, request_id=None):
        row = request_logs.request_log_get(tenant_ids=self._tenant_ids(), request_id=request_id)
        if row is None:
            raise NotFound("No request log with this id.")
        return Response(request_logs.request_log_dict(row, bodies=True))
