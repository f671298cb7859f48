"""Reads for the data plane: the routing table, loaded whole and cached in process."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from django.conf import settings

from apps.billing.selectors import PriceInfo, price_versions_by_model
from apps.keys.crypto import decrypt

from .db import db_sync
from .models import Deployment, ModelAlias
from .providers.base import Target


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


@dataclass(frozen=True, slots=True)
class AliasRoute:
    alias: str
    strategy: str
    context_window: int
    max_output_tokens: int
    supports_streaming: bool
    supports_embeddings: bool
    deployments: tuple[DeploymentRoute, ...]
    prices: tuple[PriceInfo, ...] = ()  # newest first


@dataclass(slots=True)
class RoutingTable:
    aliases: dict[str, AliasRoute] = field(default_factory=dict)
    loaded_at: float = 0.0


def routing_table_load() -> RoutingTable:
    prices = price_versions_by_model()
    deployments: dict[int, list[DeploymentRoute]] = {}
    for d in Deployment.objects.filter(is_active=True).select_related("provider", "provider__credential"):
        cred = d.provider.credential
        deployments.setdefault(d.alias_id, []).append(
            DeploymentRoute(
                id=d.id,
                provider_name=d.provider.name,
                target=Target(
                    kind=d.provider.kind,
                    api_base=d.provider.api_base,
                    upstream_model=d.upstream_model,
                    secret=decrypt(cred.encrypted_secret) if cred and cred.encrypted_secret else "",
                    options=d.provider.options or {},
                ),
                weight=d.weight,
                priority=d.priority,
                region=d.region,
                rpm=d.rpm,
                tpm=d.tpm,
            )
        )
    table = RoutingTable(loaded_at=time.monotonic())
    for a in ModelAlias.objects.all():
        table.aliases[a.alias] = AliasRoute(
            alias=a.alias,
            strategy=a.strategy,
            context_window=a.context_window,
            max_output_tokens=a.max_output_tokens,
            supports_streaming=a.supports_streaming,
            supports_embeddings=a.supports_embeddings,
            deployments=tuple(sorted(deployments.get(a.id, ()), key=lambda r: (r.priority, r.id))),
            prices=tuple(prices.get(a.alias, ())),
        )
    return table


_table: RoutingTable | None = None


async def routing_table() -> RoutingTable:
    """The routing table, reloaded from the database at most every GATEWAY_ROUTES_CACHE_TTL_S."""
    global _table
    if _table is None or time.monotonic() - _table.loaded_at > settings.GATEWAY_ROUTES_CACHE_TTL_S:
        _table = await db_sync(routing_table_load)
    return _table


def routing_table_invalidate() -> None:
    global _table
    _table = None
