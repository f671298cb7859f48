"""Management API for the ledger and analytics: the same data as the dashboard and its CSVs."""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import permissions, serializers, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.pagination import CursorPagination
from rest_framework.response import Response

from apps.keys.models import Tenant
from apps.keys.selectors import EXPORT_ROLES, READ_ROLES, tenant_ids_for_user

from . import selectors
from .forms import DEFAULT_DAYS, MAX_DAYS, usage_filters_from

FILTER_PARAMS = [
    OpenApiParameter("since", OpenApiTypes.DATE,
                     description=f"First UTC day (default: {DEFAULT_DAYS - 1} days before `until`). At most "
                                 f"{MAX_DAYS} days before `until` and not after it; otherwise 400."),
    OpenApiParameter("until", OpenApiTypes.DATE, description="Last UTC day, inclusive (default: today)"),
    OpenApiParameter("tenant", str, description="Tenant slug (default: all of yours)"),
    OpenApiParameter("source", str, description="The seed's source id"),
    OpenApiParameter("model", str, description="Model alias"),
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
