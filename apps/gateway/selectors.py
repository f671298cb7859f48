"""Reads for the data plane: the routing table, loaded whole and cached in process."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db.models import Count, OuterRef, Q, Subquery
from django.utils import timezone

from apps.analytics.recommendations import AliasInfo, Catalog
from apps.analytics.request_logs import RequestLogSettings, request_log_settings
from apps.billing.selectors import PriceInfo, budget_refs_for_tenant, price_versions_by_model
from apps.core import caches
from apps.core.db import db_sync
from apps.keys.crypto import decrypt
from apps.keys.models import Source

from .capabilities import alias_capabilities
from .models import Deployment, DeploymentHealth, ModelAlias, Provider
from .providers.base import Target
from .versions import cumulative


@dataclass(frozen=True, slots=True)
class DeploymentRoute:
    id: int
    provider_name: str
    target: Target
    weight: int
    priority: int
    region: str
    rpm: int | None
    tpm: int | None
    input_usd_per_mtok: Decimal | None = None  # what the deployment costs; the alias's price if None
    output_usd_per_mtok: Decimal | None = None
    healthy: bool | None = None  # the last probe's verdict; None before the first probe
    probe_latency_ms: int | None = None
    version: str = ""  # the version it serves (apps/gateway/versions.py): its label, else its upstream model
    provider_batch: bool = False  # Batches API lines may go to the provider's own batch API


@dataclass(frozen=True, slots=True)
class AliasRoute:
    alias: str
    strategy: str
    context_window: int
    max_output_tokens: int
    supports_streaming: bool
    supports_embeddings: bool
    deployments: tuple[DeploymentRoute, ...]
    supports_chat: bool = True
    prices: tuple[PriceInfo, ...] = ()  # newest first
    # Versions (apps/gateway/versions.py): each version's deployments (routing order), and the
    # rollout: the versions with a share of the bare alias's traffic and their running totals
    # (empty: no rollout, every deployment serves the bare alias).
    versions: dict[str, tuple[DeploymentRoute, ...]] = field(default_factory=dict)
    rollout_names: tuple[str, ...] = ()
    rollout_bounds: tuple[int, ...] = ()
    live: tuple[DeploymentRoute, ...] = ()  # those serving the bare alias: of versions with a share, else all
    semantic_cache_threshold: Decimal | None = None  # the floor of a semantic hit on this alias


@dataclass(slots=True)
class RoutingTable:
    aliases: dict[str, AliasRoute] = field(default_factory=dict)
    loaded_at: float = 0.0


def _route_of(d: Deployment, *, healthy: bool | None = None, latency_ms: int | None = None) -> DeploymentRoute:
    cred = d.provider.credential
    return DeploymentRoute(
        id=d.id,
        provider_name=d.provider.name,
        target=Target(
            kind=d.provider.kind,
            api_base=d.provider.api_base,
            upstream_model=d.upstream_model,
            secret=decrypt(cred.encrypted_secret) if cred and cred.encrypted_secret else "",
            options=d.provider.options or {},
            region=d.region or "",
        ),
        weight=d.weight,
        priority=d.priority,
        region=d.region,
        rpm=d.rpm,
        tpm=d.tpm,
        input_usd_per_mtok=d.input_usd_per_mtok,
        output_usd_per_mtok=d.output_usd_per_mtok,
        healthy=healthy,
        probe_latency_ms=latency_ms,
        provider_batch=d.provider_batch,
        version=d.version_name,
    )


def deployment_route(*, deployment_id: int) -> DeploymentRoute | None:
    """One deployment as the router sees it, active or not (a provider batch sent to it is polled
    and collected there even after the deployment was switched off)."""
    d = Deployment.objects.select_related("provider", "provider__credential").filter(id=deployment_id).first()
    return _route_of(d) if d is not None else None


def routing_table_load() -> RoutingTable:
    prices = price_versions_by_model()
    deployments: dict[int, list[DeploymentRoute]] = {}
    latest = DeploymentHealth.objects.filter(deployment=OuterRef("pk")).order_by("-checked_at")
    rows = (Deployment.objects.filter(is_active=True).select_related("provider", "provider__credential")
            .annotate(last_ok=Subquery(latest.values("ok")[:1]),
                      last_latency_ms=Subquery(latest.values("latency_ms")[:1])))
    for d in rows:
        deployments.setdefault(d.alias_id, []).append(_route_of(d, healthy=d.last_ok, latency_ms=d.last_latency_ms))
    table = RoutingTable(loaded_at=time.monotonic())
    for a in ModelAlias.objects.all():
        routes = tuple(sorted(deployments.get(a.id, ()), key=lambda r: (r.priority, r.id)))
        embeddings, chat = alias_capabilities(
            alias=a.alias, models=[(r.target.upstream_model, r.target.kind) for r in routes],
            supports_embeddings=a.supports_embeddings, supports_chat=a.supports_chat)
        by_version: dict[str, tuple[DeploymentRoute, ...]] = {}
        for r in routes:
            by_version[r.version] = (*by_version.get(r.version, ()), r)
        names, bounds = cumulative(a.version_shares or {}, by_version)
        table.aliases[a.alias] = AliasRoute(
            alias=a.alias,
            strategy=a.strategy,
            context_window=a.context_window,
            max_output_tokens=a.max_output_tokens,
            supports_streaming=a.supports_streaming,
            supports_embeddings=embeddings,
            supports_chat=chat,
            deployments=routes,
            prices=tuple(prices.get(a.alias, ())),
            versions=by_version,
            rollout_names=names,
            rollout_bounds=bounds,
            live=tuple(r for r in routes if r.version in names) if names else routes,
            semantic_cache_threshold=a.semantic_cache_threshold,
        )
    return table


def _routes_ttl_s() -> float:
    return settings.GATEWAY_ROUTES_CACHE_TTL_S


_table = caches.Loaded(lambda _key: db_sync(routing_table_load), _routes_ttl_s, max_entries=1)


async def routing_table() -> RoutingTable:
    """The routing table, kept in process for GATEWAY_ROUTES_CACHE_TTL_S (reloaded ahead, in the
    background: apps.core.caches.Loaded)."""
    return await _table.get()


def routing_table_invalidate() -> None:
    _table.forget()
    _policies.forget()


@dataclass(frozen=True, slots=True)
class RateLimitRef:
    scope: str  # tenant | source | key | tag | user
    scope_value: str
    rpm: int | None
    tpm: int | None


@dataclass(slots=True)
class TenantPolicy:
    rate_limits: tuple[RateLimitRef, ...]
    budgets: tuple  # of apps.billing.selectors.BudgetRef
    loaded_at: float
    sources: dict = field(default_factory=dict)  # declared source name -> (id, type)
    budget_ids: frozenset = frozenset()  # the metadata.budget_id values its budgets declare
    request_log: RequestLogSettings | None = None  # None: this tenant logs no requests


def tenant_policy_load(tenant_id: int) -> TenantPolicy:
    from .models import RateLimit

    limits = tuple(RateLimitRef(scope=r.scope, scope_value=r.scope_value, rpm=r.rpm, tpm=r.tpm)
                   for r in RateLimit.objects.filter(tenant_id=tenant_id))
    budgets = tuple(budget_refs_for_tenant(tenant_id=tenant_id))
    sources = {name: (sid, kind) for sid, name, kind in
               Source.objects.filter(tenant_id=tenant_id).values_list("id", "name", "type")}
    return TenantPolicy(rate_limits=limits, budgets=budgets, loaded_at=time.monotonic(), sources=sources,
                        budget_ids=frozenset(b.budget_id for b in budgets if b.budget_id),
                        request_log=request_log_settings(tenant_id=tenant_id))


_policies = caches.Loaded(lambda tenant_id: db_sync(tenant_policy_load, tenant_id=tenant_id), _routes_ttl_s)


async def tenant_policy(tenant_id: int) -> TenantPolicy:
    """A tenant's rate limits and budgets, kept in process as the routing table is."""
    return await _policies.get(tenant_id)



@dataclass(frozen=True, slots=True)
class DeploymentStatus:
    deployment_id: int
    label: str
    region: str
    ok: bool | None  # the last probe; None when never probed
    latency_ms: int | None
    checked_at: datetime | None
    availability: float | None  # share of successful probes over the window
    probes: int


def deployment_health(*, window: timedelta = timedelta(hours=24)) -> list[DeploymentStatus]:
    """Availability and latency of every active deployment from the probes (readyz, analytics)."""
    since = timezone.now() - window
    latest = DeploymentHealth.objects.filter(deployment=OuterRef("pk")).order_by("-checked_at")
    rows = (
        Deployment.objects.filter(is_active=True).select_related("alias", "provider")
        .annotate(
            last_ok=Subquery(latest.values("ok")[:1]),
            last_latency_ms=Subquery(latest.values("latency_ms")[:1]),
            last_checked_at=Subquery(latest.values("checked_at")[:1]),
            probes=Count("health_checks", filter=Q(health_checks__checked_at__gte=since)),
            probes_ok=Count("health_checks", filter=Q(health_checks__checked_at__gte=since, health_checks__ok=True)),
        )
        .order_by("alias__alias", "priority", "id")
    )
    return [
        DeploymentStatus(
            deployment_id=d.id, label=str(d), region=d.region, ok=d.last_ok, latency_ms=d.last_latency_ms,
            checked_at=d.last_checked_at, availability=(d.probes_ok / d.probes) if d.probes else None,
            probes=d.probes,
        )
        for d in rows
    ]


def provider_probes(since: datetime, until: datetime) -> dict[str, dict]:
    """Per provider: the deployments' active probes in [since, until) and how many succeeded
    (provider availability on the dashboard shows them beside the attempts)."""
    rows = (DeploymentHealth.objects.filter(checked_at__gte=since, checked_at__lt=until)
            .values("deployment__provider__name")
            .annotate(probes=Count("id"), probes_ok=Count("id", filter=Q(ok=True))))
    return {r["deployment__provider__name"]: {"probes": r["probes"], "probes_ok": r["probes_ok"]} for r in rows}


def deployments_readiness() -> dict:
    """The deployments part of /readyz: how many are up, down or never probed."""
    health = deployment_health()
    return {"deployments": {"total": len(health), "up": sum(h.ok is True for h in health),
                            "down": sum(h.ok is False for h in health),
                            "unprobed": sum(h.ok is None for h in health)}}


def model_aliases() -> list[str]:
    return list(ModelAlias.objects.order_by("alias").values_list("alias", flat=True))


def alias_catalog() -> Catalog:
    """What each alias can do and who serves it (its active deployments), and every provider's
    kind: what the cost recommendations call "the same capabilities" (apps/analytics/recommendations.py)."""
    aliases = {}
    for a in ModelAlias.objects.prefetch_related("deployments__provider"):
        active = [d for d in a.deployments.all() if d.is_active]
        models = [(d.upstream_model, d.provider.kind) for d in active]
        embeddings, chat = alias_capabilities(alias=a.alias, models=models, supports_embeddings=a.supports_embeddings,
                                              supports_chat=a.supports_chat)
        aliases[a.alias] = AliasInfo(alias=a.alias, chat=chat, embeddings=embeddings, streaming=a.supports_streaming,
                                     context_window=a.context_window, max_output_tokens=a.max_output_tokens,
                                     provider_kinds=frozenset(d.provider.kind for d in active))
    return Catalog(aliases=aliases, provider_kinds=dict(Provider.objects.values_list("name", "kind")))


def queued_holds() -> list[dict]:
    """The budget holds stored with async requests no worker has finished and with batch lines
    waiting on a provider's batch API (billing puts them back when the budget counters are rebuilt)."""
    from .models import AsyncRequest, BatchLine, JobStatus

    rows = list(AsyncRequest.objects.filter(status__in=(JobStatus.QUEUED, JobStatus.RUNNING),
                                            admission__isnull=False).values_list("admission", flat=True))
    # Batch lines waiting on a provider's batch API hold their budget until the results arrive.
    rows += BatchLine.objects.filter(status=JobStatus.SUBMITTED, plan__isnull=False).values_list("plan", flat=True)
    return [plan["hold"] for plan in rows if isinstance(plan, dict) and plan.get("hold")]


def stored_response_get(*, tenant_id: int, response_id: str):
    """A stored Responses API answer of this tenant that has not expired, or None."""
    from .models import StoredResponse

    return StoredResponse.objects.filter(tenant_id=tenant_id, id=response_id,
                                         expires_at__gt=timezone.now()).first()
