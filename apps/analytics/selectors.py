"""Reads of the ledger."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from time import monotonic

from django.db.models import BigIntegerField, BooleanField, Count, ExpressionWrapper, Func, Max, Q, Sum, Value
from django.utils import timezone

from apps.core import caches
from apps.core.money import MONEY_QUANT, money_str

from . import recommendations as rec
from .models import (
    LATENCY_BUCKETS_MS,
    LATENCY_FIELDS,
    AttemptRollupHourly,
    LedgerArchive,
    UsageDimRollupDaily,
    UsageDimRollupHourly,
    UsageEvent,
    UsageRollupDaily,
    UsageRollupHourly,
)

CSV_COLUMNS = [
    "request_id", "timestamp", "tenant", "source_type", "source_id", "key", "request_type", "model",
    "prompt_tokens", "completion_tokens", "cost", "async", "cached", "batch_id", "budget_id", "status",
    "latency_ms", "model_version", "tags", "end_user",
]
TAGS_SEPARATOR = ";"  # the CSV's `tags` cell: the request's tags joined
# Written as they are in CSVs; every other column is text, neutralised against formulas (csv_safe.py).
CSV_NUMERIC_COLUMNS = ("prompt_tokens", "completion_tokens", "cost", "latency_ms")


def ledger_cost_sums(*, items) -> dict:
    """What the ledger says each (key, tenant_id, scope, scope_value, start, end) spent: the sum of
    `cost` of the tenant's rows in [start, end) (end None: open), narrowed by the scope (`tenant`,
    `source` by source name, `key` by key name, `budget_id`, `tag` (rows carrying it), `user` by
    end user, `*` meaning every row that has one). One query for all. Budget spend
    (apps.billing.budgets) is rebuilt and reconciled from this read."""
    items = list(items)
    if not items:
        return {}
    sums = {}
    for _key, tenant_id, scope, scope_value, start, end in items:
        q = Q(tenant_id=tenant_id, timestamp__gte=start)
        if end is not None:
            q &= Q(timestamp__lt=end)
        if scope == "source":
            q &= Q(source__name=scope_value)
        elif scope == "key":
            q &= Q(api_key__name=scope_value)
        elif scope == "budget_id":
            q &= Q(budget_id=scope_value)
        elif scope == "tag":
            q &= Q(tags__has_tag=scope_value)
        elif scope == "user":
            q &= ~Q(end_user="") if scope_value == "*" else Q(end_user=scope_value)
        sums[f"s{len(sums)}"] = Sum("cost", filter=q)
    row = UsageEvent.objects.filter(tenant_id__in={i[1] for i in items},
                                    timestamp__gte=min(i[4] for i in items)).aggregate(**sums)
    # The ledger's own precision (10 places): SQLite sums decimals as floats (0.85 -> 0.8500000000000001).
    out = {item[0]: (row[f"s{n}"] or Decimal(0)).quantize(MONEY_QUANT) for n, item in enumerate(items)}
    _add_dropped_months(items, out)
    return out


def _add_dropped_months(items: list, out: dict) -> None:
    """Months whose detailed rows retention dropped (archived) still count: their spend is read from
    the hourly rollups, which hold the same sums and are kept forever. Only a period that reaches
    back into a dropped month (a `total` budget) needs it; one small query tells."""
    from apps.keys.models import ApiKey, Source

    from .partitions import month_bounds

    dropped: dict[int, list[date]] = {}
    first = min(i[4] for i in items).astimezone(UTC).date().replace(day=1)
    for tenant_id, month in LedgerArchive.objects.filter(
            tenant_id__in={i[1] for i in items}, dropped_at__isnull=False, month__gte=first).values_list(
            "tenant_id", "month"):
        dropped.setdefault(tenant_id, []).append(month)
    for key, tenant_id, scope, scope_value, start, end in items:
        q = Q()
        for month in dropped.get(tenant_id, ()):
            lo, hi = month_bounds(month)
            lo, hi = max(lo, start), hi if end is None else min(hi, end)
            if lo < hi:
                q |= Q(bucket__gte=lo, bucket__lt=hi)
        if not q:
            continue
        if scope in ("tag", "user"):
            qs = UsageDimRollupHourly.objects.filter(q, tenant_id=tenant_id, dim=scope)
            if scope_value != "*":
                qs = qs.filter(value=scope_value)
            out[key] += qs.aggregate(c=Sum("cost"))["c"] or Decimal(0)
            continue
        qs = UsageRollupHourly.objects.filter(q, tenant_id=tenant_id)
        if scope == "source":
            qs = qs.filter(source_id__in=Source.objects.filter(tenant_id=tenant_id, name=scope_value).values("id"))
        elif scope == "key":
            qs = qs.filter(api_key_id__in=ApiKey.objects.filter(tenant_id=tenant_id, name=scope_value).values("id"))
        elif scope == "budget_id":
            qs = qs.filter(budget_id=scope_value)
        out[key] += qs.aggregate(c=Sum("cost"))["c"] or Decimal(0)


def usage_events(*, tenant_ids, since: datetime | None = None, until: datetime | None = None, **filters):
    qs = UsageEvent.objects.filter(tenant_id__in=tenant_ids, **filters)
    if since is not None:
        qs = qs.filter(timestamp__gte=since)
    if until is not None:
        qs = qs.filter(timestamp__lt=until)
    return qs.order_by("timestamp", "id")


_EXPORT_FIELDS = (
    "request_id", "timestamp", "tenant__slug", "source_type", "source_ref", "api_key__name", "request_type",
    "model", "prompt_tokens", "completion_tokens", "cost", "is_async", "cached", "batch_id", "budget_id",
    "status", "latency_ms", "saved_cost", "price_id", "deployment_id", "estimated", "model_version", "tags", "end_user",
)

EXPORT_FIELDS = _EXPORT_FIELDS  # what seed_usage_event and csv_row read from a ledger row


def usage_export_rows(qs) -> Iterator[dict]:
    """Ledger rows as flat dicts, streamed from the database in chunks (constant memory)."""
    yield from qs.values(*_EXPORT_FIELDS).iterator(chunk_size=2000)


def csv_row(row: dict) -> list:
    return [
        row["request_id"], row["timestamp"].isoformat(), row["tenant__slug"], row["source_type"], row["source_ref"],
        row["api_key__name"] or "", row["request_type"], row["model"], row["prompt_tokens"],
        row["completion_tokens"], f"{row['cost']:f}", str(row["is_async"]).lower(), str(row["cached"]).lower(),
        row["batch_id"], row["budget_id"], row["status"], row["latency_ms"], row["model_version"],
        TAGS_SEPARATOR.join(row["tags"] or ()), row["end_user"],
    ]


def seed_usage_event(row: dict) -> dict:
    """A ledger row in the seed's usage-event shape, with our extra fields beside it."""
    return {
        "usage_event": {
            "timestamp": row["timestamp"].isoformat(),
            "source": {"type": row["source_type"], "id": row["source_ref"]},
            "request_type": row["request_type"],
            "tokens": {"prompt": row["prompt_tokens"], "completion": row["completion_tokens"]},
            "model": row["model"],
            "cost": f"{row['cost']:f}",
            "metadata": {
                "async": row["is_async"],
                "cached": row["cached"],
                "batch_id": row["batch_id"] or None,
                "budget_id": row["budget_id"] or None,
            },
        },
        # Beside the seed's shape (which is produced as written): the request's tags and end user.
        "tags": row["tags"] or [],
        "end_user": row["end_user"] or None,
        "request_id": row["request_id"],
        "tenant": row["tenant__slug"],
        "key": row["api_key__name"],
        "deployment_id": row["deployment_id"],
        "model_version": row["model_version"],
        "status": row["status"],
        "latency_ms": row["latency_ms"],
        "saved_cost": f"{row['saved_cost']:f}",
        "price_version": row["price_id"],
        "estimated": row["estimated"],
    }


@dataclass(frozen=True)
class CacheStats:
    requests: int  # answered requests (status 200) that the cache could have served
    hits: int
    saved_usd: Decimal  # what the hits would have cost at the prices in force

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0


def cache_stats(*, tenant_ids, since: datetime | None = None, until: datetime | None = None,
                **filters) -> CacheStats:
    """Response-cache hit rate and saved dollars over the ledger (e.g. filters: model=..., api_key_id=...)."""
    qs = usage_events(tenant_ids=tenant_ids, since=since, until=until, status=200, **filters).order_by()
    agg = qs.aggregate(requests=Count("id"), hits=Count("id", filter=Q(cached=True)),
                       saved=Sum("saved_cost", filter=Q(cached=True)))
    return CacheStats(requests=agg["requests"], hits=agg["hits"], saved_usd=agg["saved"] or Decimal(0))
# --- dashboards and aggregates (read rollups, never the raw ledger) ---------------------------

HOURLY_MAX_DAYS = 3
BREAKDOWNS = {"model": "model", "source": "source_ref", "key": "api_key_id", "budget_id": "budget_id",
              "provider": "provider"}
# Breakdowns read from the tag and end-user rollups (UsageDimRollup*): the dimension stored there.
DIM_BREAKDOWNS = {"tag": "tag", "end_user": "user"}
DIM_BREAKDOWN_TOP = 20  # end users can be many: the dashboard shows the biggest spenders only
_MEASURES = ("requests", "errors", "cache_hits", "prompt_tokens", "completion_tokens", "cost", "saved_cost",
             "latency_ms_sum")


@dataclass(frozen=True)
class UsageFilters:
    """What the dashboard, its CSVs and the analytics API filter by. Dates are UTC calendar days,
    `until` inclusive; empty strings mean no filter. `tag` and `end_user` (one of them at a time)
    switch the rollups read to the tag or end-user rollups, which hold the same figures for the
    requests carrying that tag or end user."""

    tenant_ids: tuple[int, ...]
    since: date
    until: date
    source: str = ""
    model: str = ""
    granularity: str = ""  # "hour" | "day" | "" (hour for ranges up to HOURLY_MAX_DAYS days)
    tag: str = ""
    end_user: str = ""

    @property
    def start(self) -> datetime:
        return datetime.combine(self.since, time.min, tzinfo=UTC)

    @property
    def end(self) -> datetime:
        return datetime.combine(self.until + timedelta(days=1), time.min, tzinfo=UTC)

    @property
    def resolved_granularity(self) -> str:
        if self.granularity in ("hour", "day"):
            return self.granularity
        return "hour" if (self.until - self.since).days < HOURLY_MAX_DAYS else "day"

    @property
    def by_dim(self) -> tuple[str, str] | None:
        """("tag", name) or ("user", end user) when one of those filters is set."""
        if self.tag:
            return "tag", self.tag
        if self.end_user:
            return "user", self.end_user
        return None

    def ledger(self):
        """The raw ledger under these filters (for row-level exports only)."""
        extra = {}
        if self.source:
            extra["source_ref"] = self.source
        if self.model:
            extra["model"] = self.model
        if self.tag:
            extra["tags__has_tag"] = self.tag
        if self.end_user:
            extra["end_user"] = self.end_user
        return usage_events(tenant_ids=self.tenant_ids, since=self.start, until=self.end, **extra)

    def _narrowed(self, qs):
        """A rollup queryset under the source and model filters, unordered."""
        if self.source:
            qs = qs.filter(source_ref=self.source)
        if self.model:
            qs = qs.filter(model=self.model)
        return qs.order_by()

    def rollups(self, granularity: str = "day"):
        """Rollups under these filters. The range is whole UTC days, so sums over daily rows equal
        sums over hourly ones: only the hourly time series needs the (24x larger) hourly table."""
        dim = self.by_dim
        if dim is not None:
            return self.dim_rollups(dim[0], granularity).filter(value=dim[1])
        model = UsageRollupHourly if granularity == "hour" else UsageRollupDaily
        qs = model.objects.filter(tenant_id__in=self.tenant_ids, bucket__gte=self.start, bucket__lt=self.end)
        return self._narrowed(qs)

    def dim_rollups(self, dim: str, granularity: str = "day"):
        """The tag (`dim` "tag") or end-user ("user") rollups under the date, source and model filters."""
        model = UsageDimRollupHourly if granularity == "hour" else UsageDimRollupDaily
        qs = model.objects.filter(tenant_id__in=self.tenant_ids, dim=dim, bucket__gte=self.start,
                                  bucket__lt=self.end)
        return self._narrowed(qs)

    def attempt_rollups(self):
        """Upstream attempt rollups under these filters (not narrowed by tag or end user: attempts
        are rolled up without them)."""
        qs = AttemptRollupHourly.objects.filter(tenant_id__in=self.tenant_ids, bucket__gte=self.start,
                                                bucket__lt=self.end)
        return self._narrowed(qs)


def _sums(with_latency: bool = False) -> dict:
    out = {m: Sum(m) for m in _MEASURES}
    if with_latency:
        out.update({f: Sum(f) for f in LATENCY_FIELDS})
    return out


def latency_percentile(hist: list[int], q: float) -> int | None:
    """The q-quantile (0..1) of a latency histogram in LATENCY_BUCKETS_MS, interpolated linearly
    within its bucket; None without data. The open last bucket reports its lower bound."""
    total = sum(hist)
    if not total:
        return None
    rank, cum, lower = q * total, 0, 0
    for i, count in enumerate(hist):
        if count and cum + count >= rank:
            if i >= len(LATENCY_BUCKETS_MS):
                return LATENCY_BUCKETS_MS[-1]
            upper = LATENCY_BUCKETS_MS[i]
            return round(lower + (upper - lower) * (rank - cum) / count)
        cum += count
        lower = LATENCY_BUCKETS_MS[i] if i < len(LATENCY_BUCKETS_MS) else lower
    return LATENCY_BUCKETS_MS[-1]


def _ratio(num, den) -> float | None:
    return round(num / den, 4) if den else None


def usage_totals(filters: UsageFilters) -> dict:
    agg = filters.rollups().aggregate(**_sums(True))
    hist = [agg[f] or 0 for f in LATENCY_FIELDS]
    requests = agg["requests"] or 0
    return {
        "requests": requests,
        "errors": agg["errors"] or 0,
        "prompt_tokens": agg["prompt_tokens"] or 0,
        "completion_tokens": agg["completion_tokens"] or 0,
        "tokens": (agg["prompt_tokens"] or 0) + (agg["completion_tokens"] or 0),
        "cost": agg["cost"] or Decimal(0),
        "saved_cost": agg["saved_cost"] or Decimal(0),
        "cache_hits": agg["cache_hits"] or 0,
        "cache_hit_rate": _ratio(agg["cache_hits"] or 0, requests),
        "error_rate": _ratio(agg["errors"] or 0, requests),
        "latency_p50_ms": latency_percentile(hist, 0.50),
        "latency_p95_ms": latency_percentile(hist, 0.95),
    }


def usage_series(filters: UsageFilters) -> list[dict]:
    """Spend, requests and tokens per bucket (hour or UTC day), oldest first, gaps left out."""
    rows = (filters.rollups(filters.resolved_granularity).values("bucket")
            .annotate(cost=Sum("cost"), requests=Sum("requests"), prompt_tokens=Sum("prompt_tokens"),
                      completion_tokens=Sum("completion_tokens"), errors=Sum("errors"))
            .order_by("bucket"))
    return list(rows)


def usage_breakdown(filters: UsageFilters, by: str) -> list[dict]:
    """Spend and requests per model, source, key, budget_id or provider, biggest spend first; per
    tag or end user (`by` "tag", "end_user": the top DIM_BREAKDOWN_TOP, from their rollups, under
    the date, source and model filters; empty while a tag or end-user filter is set)."""
    if by in DIM_BREAKDOWNS:
        if filters.by_dim is not None:
            return []
        rows = list(filters.dim_rollups(DIM_BREAKDOWNS[by]).values("value")
                    .annotate(cost=Sum("cost"), requests=Sum("requests"), errors=Sum("errors"),
                              tokens=Sum("prompt_tokens") + Sum("completion_tokens"), saved_cost=Sum("saved_cost"))
                    .order_by("-cost", "-requests", "value")[:DIM_BREAKDOWN_TOP])
        for r in rows:
            r["label"] = r.pop("value")
            r["error_rate"] = _ratio(r["errors"], r["requests"])
        return rows
    field = BREAKDOWNS[by]
    rows = list(filters.rollups().values(field)
                .annotate(cost=Sum("cost"), requests=Sum("requests"), errors=Sum("errors"),
                          tokens=Sum("prompt_tokens") + Sum("completion_tokens"), saved_cost=Sum("saved_cost"))
                .order_by("-cost", field))
    names = {}
    if by == "key":
        from apps.keys.models import ApiKey

        names = dict(ApiKey.objects.filter(id__in=[r[field] for r in rows]).values_list("id", "name"))
    for r in rows:
        value = r.pop(field)
        r["label"] = names.get(value, "(none)") if by == "key" else (value or "(none)")
        r["error_rate"] = _ratio(r["errors"], r["requests"])
    return rows


# Attempts that reached (or tried to reach) the provider; `cooldown` (skipped without a call) is
# reported beside them and does not count against availability.
_CALLED = ("ok", "error", "timeout", "rate_limited")


def _availability_rows(qs) -> list[dict]:
    """Per provider from attempt rollups: attempts by outcome, availability (ok / attempts that
    called it) and mean attempt latency."""
    rows = (qs.values("provider")
            .annotate(**{o: Sum("attempts", filter=Q(outcome=o)) for o in (*_CALLED, "cooldown")},
                      latency_ms_sum=Sum("latency_ms_sum", filter=Q(outcome__in=_CALLED)))
            .order_by("provider"))
    out = []
    for r in rows:
        counts = {o: r[o] or 0 for o in (*_CALLED, "cooldown")}
        called = sum(counts[o] for o in _CALLED)
        out.append({"provider": r["provider"], "attempts": called, **counts,
                    "failed": called - counts["ok"], "availability": _ratio(counts["ok"], called),
                    "latency_avg_ms": round((r["latency_ms_sum"] or 0) / called) if called else None})
    return out


_probe_sources: list = []


def provider_probes_register(fn) -> None:
    """Another app reports active probes per provider (gateway: its deployments' health checks):
    `fn(since, until)` -> {provider: {"probes": n, "probes_ok": n}}."""
    if fn not in _probe_sources:
        _probe_sources.append(fn)


def provider_availability(filters: UsageFilters) -> list[dict]:
    """Per provider: upstream attempts by outcome and availability, from the attempt rollups (every
    try, failed ones a fallback hid included; not the ledger's final outcome), and the share of its
    deployments' active probes that succeeded over the range (`probe_availability`; probes are not
    per tenant, so only the providers of the tenants' own attempts are listed)."""
    rows = {r["provider"]: r for r in _availability_rows(filters.attempt_rollups())}
    probes: dict[str, dict] = {}
    for source in _probe_sources:
        for provider, p in source(filters.start, filters.end).items():
            acc = probes.setdefault(provider, {"probes": 0, "probes_ok": 0})
            acc["probes"] += p["probes"]
            acc["probes_ok"] += p["probes_ok"]
    for provider, row in rows.items():  # probes are global: shown only beside this tenant's own traffic
        p = probes.get(provider, {"probes": 0, "probes_ok": 0})
        row.update(probes=p["probes"], probe_availability=_ratio(p["probes_ok"], p["probes"]))
    return [rows[k] for k in sorted(rows)]


ROLLUP_STAMP = "analytics.rollup"


def rollups_updated_at() -> datetime | None:
    """Ledger rows up to this time are in the rollups (None: never computed)."""
    from apps.core.stamps import stamp_read

    return stamp_read(ROLLUP_STAMP)


def latency_by(filters: UsageFilters, by: str) -> list[dict]:
    """p50/p95 latency (ms) and requests per model or provider, from the rollups' histograms;
    slowest p95 first."""
    field = BREAKDOWNS[by]
    rows = (filters.rollups().values(field)
            .annotate(requests=Sum("requests"), latency_ms_sum=Sum("latency_ms_sum"),
                      **{f: Sum(f) for f in LATENCY_FIELDS})
            .order_by(field))
    out = []
    for r in rows:
        hist = [r[f] or 0 for f in LATENCY_FIELDS]
        if not sum(hist):
            continue
        out.append({"label": r[field] or "(none)", "requests": r["requests"] or 0,
                    "p50_ms": latency_percentile(hist, 0.50), "p95_ms": latency_percentile(hist, 0.95),
                    "mean_ms": round((r["latency_ms_sum"] or 0) / r["requests"]) if r["requests"] else None})
    out.sort(key=lambda r: (-(r["p95_ms"] or 0), r["label"]))
    return out


def version_comparison(filters: UsageFilters) -> list[dict]:
    """The versions of each model side by side, from the daily rollups: requests and their share of
    the model's, error rate, latency p50/p95, cost and tokens per request. One dict per model,
    `{"model", "requests", "versions": [...]}`, models by name, versions by name ("(none)": requests
    that reached no deployment)."""
    rows = (filters.rollups().values("model", "model_version")
            .annotate(requests=Sum("requests"), errors=Sum("errors"), cost=Sum("cost"),
                      prompt_tokens=Sum("prompt_tokens"), completion_tokens=Sum("completion_tokens"),
                      **{f: Sum(f) for f in LATENCY_FIELDS})
            .order_by("model", "model_version"))
    models: dict[str, dict] = {}
    for r in rows:
        requests = r["requests"] or 0
        hist = [r[f] or 0 for f in LATENCY_FIELDS]
        tokens = (r["prompt_tokens"] or 0) + (r["completion_tokens"] or 0)
        cost = r["cost"] or Decimal(0)
        entry = models.setdefault(r["model"], {"model": r["model"], "requests": 0, "versions": []})
        entry["requests"] += requests
        entry["versions"].append({
            "version": r["model_version"] or "(none)", "requests": requests, "errors": r["errors"] or 0,
            "error_rate": _ratio(r["errors"] or 0, requests),
            "latency_p50_ms": latency_percentile(hist, 0.50), "latency_p95_ms": latency_percentile(hist, 0.95),
            "cost": cost, "cost_per_request": (cost / requests).quantize(MONEY_QUANT) if requests else None,
            "tokens": tokens, "tokens_per_request": round(tokens / requests, 1) if requests else None,
        })
    for entry in models.values():
        for v in entry["versions"]:
            v["traffic_share"] = _ratio(v["requests"], entry["requests"])
            v["traffic_pct"] = _pct(v["traffic_share"])
            v["error_pct"] = _pct(v["error_rate"])
    return [models[k] for k in sorted(models) if k]


def _pct(ratio: float | None) -> str | None:
    return None if ratio is None else f"{ratio * 100:.1f}"


def dashboard_data(filters: UsageFilters) -> dict:
    """Everything the dashboard shows; the analytics API returns the same dict."""
    return {
        "filters": {"since": filters.since.isoformat(), "until": filters.until.isoformat(),
                    "source": filters.source, "model": filters.model, "tag": filters.tag,
                    "user": filters.end_user, "granularity": filters.resolved_granularity},
        "totals": usage_totals(filters),
        "series": usage_series(filters),
        "breakdowns": {by: usage_breakdown(filters, by)
                       for by in ("model", "source", "key", "budget_id", "tag", "end_user")},
        "providers": provider_availability(filters),
        "latency": {by: latency_by(filters, by) for by in ("model", "provider")},
    }


def usage_filter_choices(*, tenant_ids, since: date, until: date) -> dict[str, list[str]]:
    base = UsageFilters(tenant_ids=tuple(tenant_ids), since=since, until=until).rollups("day")
    # Blank values (a batch line that was not JSON has no model) are no choice: an empty option would
    # match the empty filter and show up selected instead of "all".
    return {
        "models": sorted(set(base.values_list("model", flat=True).distinct()) - {""}),
        "sources": sorted(set(base.values_list("source_ref", flat=True).distinct()) - {""}),
    }


AGGREGATE_GROUPS = {
    "day_model": ("day", "tenant", "model"),
    "source": ("tenant", "source_type", "source_id"),
    "tag": ("tenant", "tag"),
    "end_user": ("tenant", "end_user"),
}
AGGREGATE_MEASURES = ("requests", "errors", "cache_hits", "prompt_tokens", "completion_tokens", "cost",
                      "saved_cost")


def usage_aggregate_rows(filters: UsageFilters, group: str) -> Iterator[dict]:
    """Daily rollups grouped per (UTC day, model), per source, per tag or per end user over the
    range: the aggregated CSV and its JSON twin. Per tag, a request with two tags counts in both."""
    qs = filters.rollups("day")
    if group in DIM_BREAKDOWNS:
        dim = DIM_BREAKDOWNS[group]
        qs = filters.dim_rollups(dim)
        if filters.by_dim is not None:
            qs = qs.filter(value=filters.by_dim[1]) if filters.by_dim[0] == dim else qs.none()
        qs = qs.values("tenant__slug", "value").order_by("tenant__slug", "value")
    elif group == "day_model":
        qs = qs.values("bucket", "tenant__slug", "model").order_by("bucket", "tenant__slug", "model")
    else:
        qs = qs.values("tenant__slug", "source_type", "source_ref").order_by("tenant__slug", "source_type",
                                                                             "source_ref")
    for r in qs.annotate(**{m: Sum(m) for m in AGGREGATE_MEASURES}).iterator(chunk_size=2000):
        out = {"tenant": r.pop("tenant__slug")}
        if "bucket" in r:
            out = {"day": r.pop("bucket").date().isoformat(), **out}
        if "source_ref" in r:
            r["source_id"] = r.pop("source_ref")
        if "value" in r:
            r[group] = r.pop("value")
        out.update(r)
        # Money as exact decimal strings without trailing zeros, the same on every database.
        for money in ("cost", "saved_cost"):
            out[money] = money_str(out[money] or Decimal(0))
        yield {k: out[k] for k in (*AGGREGATE_GROUPS[group], *AGGREGATE_MEASURES)}


def redis_checks() -> dict[str, str]:
    """Ping Redis and the Celery broker when they are Redis; a filesystem broker must be writable."""
    import os

    from django.conf import settings

    checks: dict[str, str] = {}
    targets = {}
    if settings.REDIS_URL:
        targets["redis"] = settings.REDIS_URL
    broker = settings.CELERY_BROKER_URL
    if broker.startswith(("redis://", "rediss://")):
        targets["broker"] = broker
    elif broker.startswith("sentinel://"):  # settings turned redis+sentinel:// into kombu's form
        targets["broker"] = getattr(settings, "CELERY_BROKER_SENTINEL_URL", "")
    elif broker.startswith("filesystem://"):
        folder = getattr(settings, "CELERY_BROKER_TRANSPORT_OPTIONS", {}).get("data_folder_in", "")
        checks["broker"] = "ok" if folder and os.access(folder, os.W_OK) else "error: broker folder not writable"
    if targets:
        import redis

        from apps.core.redis import sync_client_for

        for name, url in targets.items():
            if not url:
                continue
            try:
                sync_client_for(url).ping()  # redis:// or redis+sentinel:// (the current master)
                checks[name] = "ok"
            except redis.RedisError as exc:
                checks[name] = f"error: {type(exc).__name__}"
    return checks


def provider_availability_recent(*, hours: int = 1) -> list[dict]:
    """Per provider over the last `hours` (attempt rollups, every tenant): informational."""
    now = timezone.now()
    return _availability_rows(AttemptRollupHourly.objects.filter(bucket__gte=now - timedelta(hours=hours)).order_by())


def usage_events_values(qs):
    """The ledger as export dicts (what `seed_usage_event` and `csv_row` take), unevaluated."""
    return qs.values(*_EXPORT_FIELDS)
def usage_by_batch(*, tenant_ids, batch_id: str | None = None, since: datetime | None = None,
                   until: datetime | None = None) -> list[dict]:
    """The ledger grouped by the seed's batch_id (requests without one are left out): per batch the
    number of requests, of failed ones, tokens, cost, and the first and last timestamp. Newest first."""
    from django.db.models import Count, Max, Min, Q, Sum

    # `> ""` rather than `<> ""` (the same rows): a range the batch_id index answers, so the page reads
    # the rows that carry a batch id, not every row of the tenants in the range (docs/ledger-at-scale.md)
    qs = usage_events(tenant_ids=tenant_ids, since=since, until=until).filter(batch_id__gt="")
    if batch_id is not None:
        qs = qs.filter(batch_id=batch_id)
    rows = (
        qs.order_by()
        .values("tenant_id", "batch_id")
        .annotate(
            requests=Count("id"),
            failed=Count("id", filter=Q(status__gte=400)),
            prompt_tokens=Sum("prompt_tokens"),
            completion_tokens=Sum("completion_tokens"),
            cost=Sum("cost"),
            first_at=Min("timestamp"),
            last_at=Max("timestamp"),
        )
        .order_by("-last_at")
    )
    return list(rows)


def usage_event_summary(*, request_id: str) -> dict | None:
    """The ledger row of a request (status, tokens, cost), or None: a worker that finds one knows
    the request already ran and was billed."""
    return UsageEvent.objects.filter(request_id=request_id).values(
        "status", "prompt_tokens", "completion_tokens", "cost").first()


def ledger_archived_months(*, tenant_ids) -> list[dict]:
    """Archived months of these tenants, newest first: what the dashboard lists (apps/analytics/archive.py).
    `dropped`: the detailed rows left the database (the month's charts still come from rollups;
    `manage.py ledger_restore --month YYYY-MM` brings the rows back)."""
    return [{"tenant": a.tenant.slug, "month": a.month, "rows": a.rows, "cost": a.cost, "location": a.location,
             "archived_at": a.archived_at, "dropped": a.dropped_at is not None}
            for a in LedgerArchive.objects.filter(tenant_id__in=tenant_ids).select_related("tenant")]
def attempt_stats(*, since: datetime, until: datetime) -> dict[str, dict]:
    """Per provider, the upstream attempts of every tenant in [since, until) straight from the
    ledger rows (for short windows: operational alerts): calls (cooldown skips excluded), failed
    ones, and the sum of their latencies in ms."""
    from django.db import connection

    out: dict[str, dict] = {}
    if connection.vendor == "postgresql":
        table = connection.ops.quote_name(UsageEvent._meta.db_table)
        sql = (
            "SELECT a->>'provider', count(*), count(*) FILTER (WHERE a->>'outcome' <> 'ok'), "  # noqa: S608
            "COALESCE(sum((a->>'latency_ms')::numeric), 0) "
            f"FROM {table} e CROSS JOIN LATERAL jsonb_array_elements(e.attempts) a "
            "WHERE e.timestamp >= %s AND e.timestamp < %s AND e.attempts <> '[]'::jsonb "
            "AND a->>'outcome' <> 'cooldown' GROUP BY 1"
        )
        with connection.cursor() as cur:
            cur.execute(sql, [since, until])
            for provider, calls, failed, latency in cur.fetchall():
                out[provider or ""] = {"calls": calls, "failed": failed, "latency_ms_sum": float(latency)}
        return out
    rows = UsageEvent.objects.filter(timestamp__gte=since, timestamp__lt=until).exclude(attempts=[])
    for attempts in rows.values_list("attempts", flat=True).iterator(chunk_size=2000):
        for a in attempts or ():
            if a.get("outcome") == "cooldown":
                continue
            acc = out.setdefault(a.get("provider") or "", {"calls": 0, "failed": 0, "latency_ms_sum": 0.0})
            acc["calls"] += 1
            acc["failed"] += a.get("outcome") != "ok"
            acc["latency_ms_sum"] += a.get("latency_ms") or 0
    return out


# --- cost optimisation recommendations (apps/analytics/recommendations.py) ----------------------


class _EpochWindow(Func):
    """The fixed window of `ttl_s` seconds a timestamp falls in: UTC epoch seconds // ttl_s."""

    output_field = BigIntegerField()

    def __init__(self, expression, ttl_s: int):
        super().__init__(expression, Value(int(ttl_s)))

    def as_sql(self, compiler, connection, **extra):  # PostgreSQL
        return self.as_sql_template(compiler, connection,
                                    "FLOOR(EXTRACT(EPOCH FROM %(ts)s) / %(ttl)s)::bigint")

    def as_sqlite(self, compiler, connection, **extra):
        return self.as_sql_template(compiler, connection, "(CAST(strftime('%%%%s', %(ts)s) AS INTEGER) / %(ttl)s)")

    def as_sql_template(self, compiler, connection, template):
        ts_sql, ts_params = compiler.compile(self.source_expressions[0])
        ttl_sql, ttl_params = compiler.compile(self.source_expressions[1])
        return template % {"ts": ts_sql, "ttl": ttl_sql}, [*ts_params, *ttl_params]


def _exact(rows, *names: str) -> list[dict]:
    """Sums of money to 10 places (SQLite adds decimals as floats: 0.190000000000001)."""
    rows = list(rows)
    for r in rows:
        for name in names:
            r[name] = (r[name] or Decimal(0)).quantize(MONEY_QUANT)
    return rows


def _recommendation_rows(*, tenant_id: int, since: datetime, until: datetime):
    """The tenant's successful requests of [since, until) the cache did not answer (the
    (tenant, timestamp) index)."""
    return UsageEvent.objects.filter(tenant_id=tenant_id, timestamp__gte=since, timestamp__lt=until,
                                     status__lt=300, cached=False).order_by()


def recommendation_usage(*, tenant_id: int, since: datetime, until: datetime) -> list[dict]:
    """Per (source, model, provider, stream, in a batch or not): requests, prompt and completion
    tokens, cost. One aggregate query on the ledger for two kinds (cheaper model, batch): the rollups
    count cache hits' tokens at $0, which would make a model look cheaper, and have no stream flag."""
    return _exact(_recommendation_rows(tenant_id=tenant_id, since=since, until=until)
                  .annotate(in_batch=ExpressionWrapper(~Q(batch_id=""), output_field=BooleanField()))
                  .values("source_type", "source_ref", "model", "provider", "stream", "in_batch")
                  .annotate(requests=Count("id"), prompt_tokens=Sum("prompt_tokens"),
                            completion_tokens=Sum("completion_tokens"), cost=Sum("cost"))
                  .order_by("source_type", "source_ref", "model", "provider", "stream", "in_batch"), "cost")


def _summed(rows, keys: tuple[str, ...]) -> list[dict]:
    """`rows` added up per `keys` (requests, tokens, cost)."""
    out: dict[tuple, dict] = {}
    for r in rows:
        acc = out.setdefault(tuple(r[k] for k in keys), {**{k: r[k] for k in keys}, "requests": 0,
                                                            "prompt_tokens": 0, "completion_tokens": 0,
                                                            "cost": Decimal(0)})
        for m in ("requests", "prompt_tokens", "completion_tokens", "cost"):
            acc[m] += r[m] or 0
    return list(out.values())


def recommendation_repeated_prompts(*, tenant_id: int, since: datetime, until: datetime, ttl_s: int) -> list[dict]:
    """Per (model, prompt hash, TTL window) sent more than once: requests, their cost and the most
    expensive one's. One aggregate query."""
    return _exact(_recommendation_rows(tenant_id=tenant_id, since=since, until=until).exclude(prompt_hash="")
                  .annotate(window=_EpochWindow("timestamp", max(1, ttl_s)))
                  .values("model", "prompt_hash", "window")
                  .annotate(requests=Count("id"), spent=Sum("cost"), max_cost=Max("cost"))
                  .filter(requests__gt=1)
                  .order_by("model", "prompt_hash", "window"), "spent", "max_cost")


# Recommendations cover 30 days: a page computed a few minutes ago is as good, and the queries read
# a month of ledger rows. Per process, by tenant id.
RECOMMENDATIONS_FRESH_S = 300
_recommendations_cache: dict[int, tuple[float, dict]] = {}


@caches.on_reset
def recommendations_cache_reset() -> None:
    _recommendations_cache.clear()


def recommendations_for_tenant(*, tenant, at: datetime | None = None) -> dict:
    """The tenant's recommendations over the last WINDOW_DAYS days up to `at` (default now; then a
    result up to RECOMMENDATIONS_FRESH_S old may be answered), biggest saving first, with the window
    (the savings of different kinds may overlap: a request moved to a cheaper model and batched
    saves less than both figures added). Two aggregate queries on the ledger."""
    if at is None:
        cached = _recommendations_cache.get(tenant.id)
        if cached is not None and monotonic() - cached[0] < RECOMMENDATIONS_FRESH_S:
            return cached[1]
    until = at or timezone.now()
    since = until - timedelta(days=rec.WINDOW_DAYS)
    catalog, quote = rec.alias_catalog(), rec.price_quoter(at=until)
    usage = recommendation_usage(tenant_id=tenant.id, since=since, until=until)
    sync = [r for r in usage if not r["stream"] and not r["in_batch"]]
    items = [
        *rec.recommend_cheaper_model(_summed(usage, ("source_type", "source_ref", "model")),
                                     catalog=catalog, quote=quote),
        *rec.recommend_cache(recommendation_repeated_prompts(tenant_id=tenant.id, since=since, until=until,
                                                             ttl_s=tenant.cache_ttl_s),
                             ttl_s=tenant.cache_ttl_s, cache_enabled=tenant.cache_enabled),
        *rec.recommend_batch(_summed(sync, ("source_type", "source_ref", "model", "provider")),
                             catalog=catalog, quote=quote),
    ]
    report = {"tenant": tenant.slug, "since": since, "until": until, "window_days": rec.WINDOW_DAYS,
              "recommendations": rec.ranked(items)}
    if at is None:
        _recommendations_cache[tenant.id] = (monotonic(), report)
    return report
