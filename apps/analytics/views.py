"""Dashboards, CSV exports, health and readiness. Views parse, call one selector and render."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from itertools import islice

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.core.handlers.asgi import ASGIRequest
from django.db import connection
from django.http import Http404, HttpResponseBadRequest, JsonResponse, StreamingHttpResponse
from django.shortcuts import render

from apps.core import workers
from apps.keys.models import Tenant
from apps.keys.selectors import EXPORT_ROLES, tenant_ids_for_user

from . import selectors
from .csv_safe import SafeCsvWriter
from .forms import usage_filters_from


def home(request):
    """`/` (the admin's "View site"): signed-in people go to the dashboard, others to the login."""
    from django.shortcuts import redirect

    if request.user.is_authenticated:
        return redirect("analytics:dashboard")
    return redirect(f"{settings.LOGIN_URL}?next=/dashboard/")


def healthz(request):
    return JsonResponse({"status": "ok"})


def monitoring_client(request) -> bool:
    """May this client read monitoring details (/metrics, /readyz's checks)? With METRICS_TOKEN set,
    one that sends it as a bearer token; without, a client on loopback."""
    import hmac

    from django.conf import settings

    token = settings.METRICS_TOKEN
    if token:
        sent = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(sent.encode(), token.encode())
    return request.META.get("REMOTE_ADDR") in ("127.0.0.1", "::1")


def readyz(request):
    """Ready when the database, Redis (if configured) and the Celery broker answer. Provider
    availability is reported from the recent ledger but never fails readiness. The checks, providers
    and counts go only to monitoring clients (as /metrics); others get the status alone."""
    checks: dict[str, str] = {}
    try:
        with connection.cursor() as cur:
            cur.execute("SELECT 1")
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - reported, not swallowed
        checks["database"] = f"error: {type(exc).__name__}"
    checks.update(selectors.redis_checks())
    ok = all(v == "ok" for v in checks.values())
    status = 200 if ok else 503
    body = {"status": "ok" if ok else "unavailable", "checks": checks}
    if not monitoring_client(request):
        return JsonResponse({"status": body["status"]}, status=status)
    if checks["database"] == "ok":  # upstream availability is reported, not a readiness condition
        for part in _readyz_parts:
            body.update(part())
        body["providers"] = selectors.provider_availability_recent()
    # Reported, not a readiness condition (this web instance serves whether or not workers run):
    # queues with work waiting and no worker consuming them.
    body["workers"] = workers.queue_report()
    return JsonResponse(body, status=status)


_readyz_parts: list = []


def readyz_part_register(fn) -> None:
    """Another app adds to the /readyz body (gateway: its deployments' probe results)."""
    if fn not in _readyz_parts:
        _readyz_parts.append(fn)


def _readable_tenants(user, roles=None):
    return list(Tenant.objects.filter(id__in=tenant_ids_for_user(user=user, roles=roles)).only("id", "slug", "name"))


@login_required
def dashboard(request):
    tenants = _readable_tenants(request.user)
    form, filters = usage_filters_from(request.GET, tenants=tenants)
    context = {"form": form, "tenants": tenants, "may_export": bool(tenant_ids_for_user(user=request.user,
                                                                                        roles=EXPORT_ROLES))}
    if filters is not None:
        context["data"] = selectors.dashboard_data(filters)
        context["tenant_ids"] = filters.tenant_ids
        context["choices"] = selectors.usage_filter_choices(tenant_ids=filters.tenant_ids, since=filters.since,
                                                            until=filters.until)
        context["query"] = request.GET.urlencode()
        context["archived"] = selectors.ledger_archived_months(tenant_ids=filters.tenant_ids)
        context["dim_top"] = selectors.DIM_BREAKDOWN_TOP
    context["queues"] = workers.queue_report()
    context["rollup"] = _rollup_freshness()
    return render(request, "analytics/dashboard.html", context, status=200 if filters is not None else 400)


REQUESTS_PAGE_SIZE = 100


def _moment(value: str | None):
    """A filter's date and time (a datetime-local input's value), in the current time zone."""
    from django.utils import timezone
    from django.utils.dateparse import parse_datetime

    if not value:
        return None
    at = parse_datetime(value)
    if at is None:
        raise ValueError(value)
    return at if timezone.is_aware(at) else timezone.make_aware(at)


@login_required
def requests_page(request):
    """The "Requests" page: the request logs of the user's tenants (owners, admins, managers),
    searchable, newest first (the first REQUESTS_PAGE_SIZE; narrow the filters for older ones)."""
    from .request_logs import request_logs_query

    tenant_ids = tenant_ids_for_user(user=request.user, roles=EXPORT_ROLES)
    p = request.GET
    status = p.get("status", "")
    try:
        rows = list(request_logs_query(tenant_ids=tenant_ids, since=_moment(p.get("since")),
                                       until=_moment(p.get("until")), model=p.get("model", ""),
                                       source=p.get("source", ""), key=p.get("key", ""),
                                       status=int(status) if status.isdigit() else None,
                                       budget_id=p.get("budget_id", ""), tag=p.get("tag", ""),
                                       end_user=p.get("user", ""), q=p.get("q", ""))[:REQUESTS_PAGE_SIZE])
    except ValueError:
        return HttpResponseBadRequest("since/until: an ISO 8601 date and time")
    return render(request, "analytics/requests.html", {"rows": rows, "params": p, "any_tenant": bool(tenant_ids)})


@login_required
def request_page(request, request_id: str):
    """One request log: bodies, attempts and timings."""
    from .request_logs import request_log_dict, request_log_get

    row = request_log_get(tenant_ids=tenant_ids_for_user(user=request.user, roles=EXPORT_ROLES),
                          request_id=request_id)
    if row is None:
        raise Http404("No request log with this id.")
    return render(request, "analytics/request.html", {"log": request_log_dict(row, bodies=True)})


def _rollup_freshness() -> dict:
    """The "last updated" stamp: charts and totals read rollups the beat recomputes every
    ANALYTICS_ROLLUP_EVERY_S, so requests newer than the stamp show after the next run."""
    return {"updated_at": selectors.rollups_updated_at(), "every_s": int(settings.ANALYTICS_ROLLUP_EVERY_S)}


@login_required
def batches(request):
    """Spend and lines per batch_id (the seed's `options.batch_id` and OpenAI batches), newest first."""
    tenants = _readable_tenants(request.user)
    form, filters = usage_filters_from(request.GET, tenants=tenants)
    context = {"form": form, "tenants": tenants}
    if filters is not None:
        slugs = {t.id: t.slug for t in tenants}
        rows = selectors.usage_by_batch(tenant_ids=filters.tenant_ids, since=filters.start, until=filters.end)
        for r in rows:
            r["tenant"] = slugs.get(r["tenant_id"], "")
            r["tokens"] = (r["prompt_tokens"] or 0) + (r["completion_tokens"] or 0)
        context.update(rows=rows[:500], truncated=len(rows) > 500)
    return render(request, "analytics/batches.html", context, status=200 if filters is not None else 400)


@login_required
def recommendations_page(request):
    """Cost optimisation recommendations of the user's tenants (or the one chosen), last 30 days:
    each saving with its arithmetic and assumption."""
    tenants = list(Tenant.objects.filter(id__in=tenant_ids_for_user(user=request.user)).order_by("slug"))
    slug = request.GET.get("tenant", "")
    chosen = [t for t in tenants if not slug or t.slug == slug]
    reports = [selectors.recommendations_for_tenant(tenant=t) for t in chosen]
    return render(request, "analytics/recommendations.html", {"tenants": tenants, "reports": reports,
                                                              "chosen": slug})


@login_required
def versions(request):
    """Model versions side by side (requests, error rate, latency, cost and tokens per request),
    from the rollups of the user's tenants: a rollout's canary beside the version it replaces."""
    tenants = _readable_tenants(request.user)
    form, filters = usage_filters_from(request.GET, tenants=tenants)
    context = {"form": form, "tenants": tenants}
    if filters is not None:
        context["models"] = selectors.version_comparison(filters)
        context["choices"] = selectors.usage_filter_choices(tenant_ids=filters.tenant_ids, since=filters.since,
                                                            until=filters.until)
    context["rollup"] = _rollup_freshness()
    return render(request, "analytics/versions.html", context, status=200 if filters is not None else 400)


class _Echo:
    def write(self, value):
        return value


def _csv_lines(header: list[str], rows: Iterable[list], numeric_columns) -> Iterator[str]:
    writer = SafeCsvWriter(_Echo(), columns=header, numeric_columns=numeric_columns)
    yield writer.writerow(header)
    for row in rows:
        yield writer.writerow(row)


async def _in_batches(lines: Iterator[str], size: int = 1000) -> AsyncIterator[str]:
    """Drive a sync iterator (a DB cursor) from async code, `size` lines per thread hop: under ASGI
    a sync iterator would be read whole into memory first."""
    try:
        while chunk := await sync_to_async(lambda: list(islice(lines, size)))():
            yield "".join(chunk)
    finally:
        await sync_to_async(lines.close)()


def _stream_csv(request, filename: str, lines: Iterator[str]) -> StreamingHttpResponse:
    content = _in_batches(lines) if isinstance(request, ASGIRequest) else lines
    response = StreamingHttpResponse(content, content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    response["Cache-Control"] = "no-store"
    return response


def _export_filters(request):
    tenants = _readable_tenants(request.user, roles=EXPORT_ROLES)
    if not tenants:
        raise Http404("No tenant to export.")
    form, filters = usage_filters_from(request.GET, tenants=tenants)
    return form, filters


@login_required
def usage_csv(request):
    """The ledger of the user's tenants, filtered like the dashboard, streamed in constant memory."""
    form, filters = _export_filters(request)
    if filters is None:
        return HttpResponseBadRequest(form.errors.as_text())
    lines = _csv_lines(selectors.CSV_COLUMNS, map(selectors.csv_row, selectors.usage_export_rows(filters.ledger())),
                       selectors.CSV_NUMERIC_COLUMNS)
    return _stream_csv(request, f"usage-{filters.since}-{filters.until}.csv", lines)


@login_required
def usage_summary_csv(request):
    """Aggregates from the daily rollups: `group=day_model` (default) or `group=source`."""
    group = request.GET.get("group", "day_model")
    if group not in selectors.AGGREGATE_GROUPS:
        return HttpResponseBadRequest(f"group must be one of {', '.join(selectors.AGGREGATE_GROUPS)}")
    form, filters = _export_filters(request)
    if filters is None:
        return HttpResponseBadRequest(form.errors.as_text())
    columns = [*selectors.AGGREGATE_GROUPS[group], *selectors.AGGREGATE_MEASURES]
    rows = ([r[c] for c in columns] for r in selectors.usage_aggregate_rows(filters, group))
    lines = _csv_lines(columns, rows, selectors.AGGREGATE_MEASURES)
    return _stream_csv(request, f"usage-{group}-{filters.since}-{filters.until}.csv", lines)


def static_file(request, path: str):
    """/static/ served by the app from the staticfiles finders (SERVE_STATIC), so the embedded mode
    works offline under uvicorn without collectstatic or a web server in front."""
    from django.contrib.staticfiles.views import serve
    from django.http import HttpResponse

    served = serve(request, path, insecure=True)
    if not served.streaming:  # 304 Not Modified
        return served
    # Static files are small: one body instead of a sync file iterator (which ASGI would read
    # whole anyway, with a warning).
    response = HttpResponse(b"".join(served.streaming_content), content_type=served["Content-Type"])
    for header in ("Last-Modified", "Content-Encoding"):
        if header in served:
            response[header] = served[header]
    served.close()
    response["Cache-Control"] = "public, max-age=3600"
    return response



def metrics(request):
    """Prometheus exposition. It names every tenant and budget, and /v1 clients reach this port: with
    METRICS_TOKEN set a scrape must send it as a bearer token; without, only loopback may scrape."""
    from django.conf import settings
    from django.http import HttpResponse

    from .metrics import metrics_text

    if not monitoring_client(request):
        if settings.METRICS_TOKEN:
            return HttpResponse("A bearer token (METRICS_TOKEN) is required.\n", status=401,
                                content_type="text/plain", headers={"WWW-Authenticate": "Bearer"})
        return HttpResponse("Set METRICS_TOKEN to scrape from another host.\n", status=403,
                            content_type="text/plain")

    body, content_type = metrics_text()
    return HttpResponse(body, content_type=content_type)
