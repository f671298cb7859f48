"""Writes of the data plane's configuration, above all `config_apply` (gateway_apply)."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import timedelta

from asgiref.sync import async_to_sync
from django.db import transaction
from django.utils import timezone

from apps.analytics.models import RequestLogPolicy
from apps.billing.services import budget_upsert, price_set
from apps.billing.services import prices_sync as billing_prices_sync
from apps.keys.services import (
    audit_record,
    audited_upsert,
    member_upsert,
    provider_credential_set,
    source_upsert,
    tenant_upsert,
)

from .config_schema import ConfigError, GatewayConfig
from .models import Deployment, DeploymentHealth, ModelAlias, Provider, RateLimit
from .providers import ProviderError, adapter_for
from .selectors import DeploymentRoute, routing_table_invalidate, routing_table_load
from .versions import RolloutError, shares_split


def _split_scope(scope: str) -> tuple[str, str]:
    kind, _, value = scope.partition(":")
    return kind, value


def _secret_from_env(cfg: GatewayConfig) -> tuple[dict[str, str], list[str]]:
    secrets, errors = {}, []
    for i, p in enumerate(cfg.providers):
        if p.api_key_env:
            value = os.environ.get(p.api_key_env)
            if value is None and not Provider.objects.filter(name=p.name, credential__isnull=False).exists():
                errors.append(f"providers[{i}].api_key_env: environment variable {p.api_key_env} is not set")
            elif value is not None:
                secrets[p.name] = value
    for i, t in enumerate(cfg.tenants):
        for j, m in enumerate(t.members):
            if m.password_env and os.environ.get(m.password_env) is None:
                errors.append(f"tenants[{i}].members[{j}].password_env: environment variable "
                              f"{m.password_env} is not set")
    return secrets, errors


def alias_pins(*, alias: ModelAlias) -> list[str]:
    """The upstream model versions an alias is pinned to: `provider:upstream_model` of each active
    deployment."""
    return sorted(f"{p}:{m}" for p, m in Deployment.objects.filter(alias=alias, is_active=True)
                  .values_list("provider__name", "upstream_model"))


def alias_pin_audit(*, alias: ModelAlias, before: list[str], actor: str) -> None:
    """Record a change of the alias's pinned upstream versions in the audit trail (action `repin`)."""
    after = alias_pins(alias=alias)
    if after != before:
        audit_record(actor=actor, action="repin", obj=alias, before={"pins": before}, after={"pins": after})


# --- versions and rollouts (apps/gateway/versions.py) ----------------------------------------


def alias_versions(*, alias: ModelAlias) -> list[str]:
    """The versions an alias serves: those of its active deployments."""
    return sorted({d.version_name for d in Deployment.objects.filter(alias=alias, is_active=True)
                   .only("version", "upstream_model")})


def _alias_locked(alias: str) -> ModelAlias:
    try:
        return ModelAlias.objects.select_for_update().get(alias=alias)
    except ModelAlias.DoesNotExist:
        raise RolloutError(f"unknown model alias {alias!r}") from None


@transaction.atomic
def model_rollout(*, alias: str, version: str, share: int, actor: str) -> dict[str, int]:
    """Give `version` `share` percent of the bare alias's traffic; the other versions divide the
    rest in proportion to their shares (equally when they have none). Audited (`rollout`). The first
    step of a version's rollout remembers the shares before it, which `model_rollback` restores
    (from no rollout: all traffic to the other versions). Returns the new shares; a step that
    changes nothing records nothing."""
    row = _alias_locked(alias)
    versions = alias_versions(alias=row)
    before = dict(row.version_shares or {})
    shares = shares_split(versions, version, share, current=before)
    if shares == before and row.rollout_version == version:
        return shares
    if row.rollout_version != version:
        row.rollout_baseline = {v: n for v, n in before.items() if v in versions} or \
            shares_split(versions, version, 0)
        row.rollout_version = version
    row.version_shares = shares
    row.save(update_fields=["version_shares", "rollout_version", "rollout_baseline"])
    audit_record(actor=actor, action="rollout", obj=row, before={"shares": before},
                 after={"shares": shares, "version": version, "baseline": row.rollout_baseline})
    transaction.on_commit(routing_table_invalidate)
    return shares


@transaction.atomic
def model_rollback(*, alias: str, actor: str) -> dict[str, int]:
    """End the alias's rollout: the shares before it began come back, the rolled-out version gets
    what it had then (nothing, for a new version). Audited (`rollback`). Returns the shares."""
    row = _alias_locked(alias)
    if row.rollout_baseline is None:
        raise RolloutError(f"{alias!r} has no rollout to roll back")
    before, version = dict(row.version_shares or {}), row.rollout_version
    row.version_shares, row.rollout_version, row.rollout_baseline = row.rollout_baseline, "", None
    row.save(update_fields=["version_shares", "rollout_version", "rollout_baseline"])
    audit_record(actor=actor, action="rollback", obj=row, before={"shares": before, "version": version},
                 after={"shares": row.version_shares})
    transaction.on_commit(routing_table_invalidate)
    return row.version_shares


@transaction.atomic
def config_apply(*, cfg: GatewayConfig, actor: str = "cli", adopt: bool = False) -> None:
    """Make the database match the config. Idempotent: applying the same file twice changes
    nothing the second time. All or nothing: an error changes nothing. A tenant renamed to one of
    the config's slugs since its creation is refused (django ValidationError) unless `adopt`."""
    secrets, errors = _secret_from_env(cfg)
    if errors:
        raise ConfigError(errors)

    providers: dict[str, Provider] = {}
    for p in cfg.providers:
        cred = provider_credential_set(name=f"provider:{p.name}", secret=secrets[p.name], actor=actor) \
            if p.name in secrets else None
        values = {"kind": p.kind, "api_base": p.api_base, "options": p.options}
        if cred is not None:
            values["credential"] = cred
        providers[p.name], _ = audited_upsert(Provider, actor=actor, lookup={"name": p.name}, values=values)

    for m in cfg.models:
        alias, _ = audited_upsert(
            ModelAlias, actor=actor, lookup={"alias": m.alias},
            values={"strategy": m.strategy, "context_window": m.context_window,
                    "max_output_tokens": m.max_output_tokens, "supports_streaming": m.supports_streaming,
                    "supports_embeddings": m.supports_embeddings, "supports_chat": m.supports_chat,
                    "semantic_cache_threshold": m.semantic_cache_threshold},
        )
        pins_before = alias_pins(alias=alias)
        keep = []
        for d in m.deployments:
            provider = providers.get(d.provider) or Provider.objects.get(name=d.provider)
            dep, _ = audited_upsert(
                Deployment, actor=actor,
                lookup={"alias": alias, "provider": provider, "upstream_model": d.model},
                values={"version": d.version, "weight": d.weight, "priority": d.priority, "region": d.region,
                        "rpm": d.rpm,
                        "tpm": d.tpm, "input_usd_per_mtok": d.input_usd_per_mtok,
                        "output_usd_per_mtok": d.output_usd_per_mtok, "provider_batch": d.provider_batch,
                        "is_active": True},
            )
            keep.append(dep.id)
        for gone in Deployment.objects.filter(alias=alias, is_active=True).exclude(id__in=keep):
            gone.is_active = False
            gone.save(update_fields=["is_active"])
            audit_record(actor=actor, action="deactivate", obj=gone)
        alias_pin_audit(alias=alias, before=pins_before, actor=actor)
        if m.rollout is not None:
            try:
                model_rollout(alias=m.alias, version=m.rollout.version, share=m.rollout.share, actor=actor)
            except RolloutError as exc:
                raise ConfigError([f"models[{cfg.models.index(m)}].rollout: {exc}"]) from None
        if m.input_usd_per_mtok is not None:
            price_set(model=m.alias, input_usd_per_mtok=m.input_usd_per_mtok,
                      output_usd_per_mtok=m.output_usd_per_mtok,
                      cached_input_usd_per_mtok=m.cached_input_usd_per_mtok,
                      cache_write_usd_per_mtok=m.cache_write_usd_per_mtok,
                      batch_discount=m.batch_discount or 0, effective_from=m.price_effective_from, actor=actor)

    for t in cfg.tenants:
        extra = {"allowed_regions": t.allowed_regions, "allow_unpriced_models": t.allow_unpriced_models,
                 "allow_freeform_budget_ids": t.allow_freeform_budget_ids}
        if t.cache is not None:
            extra.update(cache_enabled=t.cache.enabled, cache_ttl_s=t.cache.ttl_s)
            sem = t.cache.semantic
            if sem is not None:
                extra.update(semantic_cache_enabled=sem.enabled, semantic_cache_embedding_alias=sem.embedding_alias,
                             semantic_cache_threshold=sem.threshold)
        tenant = tenant_upsert(slug=t.slug, name=t.name, timezone_name=t.timezone, actor=actor, adopt=adopt,
                               **extra)
        if t.request_log is not None:
            audited_upsert(RequestLogPolicy, actor=actor, tenant=tenant, lookup={"tenant": tenant},
                           values={"enabled": t.request_log.enabled, "bodies": t.request_log.bodies,
                                   "retention_days": t.request_log.retention_days,
                                   "redact_patterns": t.request_log.redact})
        for s in t.sources:
            source_upsert(tenant=tenant, name=s.name, type=s.type, actor=actor)
        for mem in t.members:
            member_upsert(tenant=tenant, username=mem.username, email=mem.email, role=mem.role,
                          password=os.environ.get(mem.password_env) if mem.password_env else None, actor=actor)
        for rl in t.rate_limits:
            scope, value = _split_scope(rl.scope)
            audited_upsert(RateLimit, actor=actor, tenant=tenant,
                           lookup={"tenant": tenant, "scope": scope, "scope_value": value},
                           values={"rpm": rl.rpm, "tpm": rl.tpm})
        for b in t.budgets:
            scope, value = _split_scope(b.scope)
            budget_upsert(tenant=tenant, name=b.name, actor=actor, scope=scope, scope_value=value,
                          limit_usd=b.limit_usd, period=b.period, enforcement=b.enforcement,
                          alert_thresholds=[str(x) for x in b.alert_thresholds],
                          shrink_max_tokens=b.shrink_max_tokens, alert_emails=b.alert_emails,
                          alert_webhook_url=b.alert_webhook_url)
    transaction.on_commit(routing_table_invalidate)


# --- availability probes ----------------------------------------------------------------------

PROBE_RETENTION = timedelta(days=7)


async def _probe(route: DeploymentRoute, *, embeddings: bool, timeout_s: float) -> tuple[bool, int | None, str]:
    """One minimal call (a one-token chat, or a one-word embedding): up or not, and how fast."""
    adapter = adapter_for(route.target.kind)
    model = route.target.upstream_model
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            if embeddings:
                await adapter.embed(route.target, {"model": model, "input": "ping"})
            else:
                await adapter.complete(route.target, {"model": model, "max_tokens": 1,
                                                      "messages": [{"role": "user", "content": "ping"}]})
    except ProviderError as exc:
        return False, None, exc.message[:500]
    except TimeoutError:
        return False, None, f"no answer within {timeout_s:g}s"
    return True, int((time.perf_counter() - started) * 1000), ""


def deployments_probe(*, timeout_s: float = 20.0) -> list[DeploymentHealth]:
    """Probe every active deployment concurrently and record the outcomes; forget old probes."""
    table = routing_table_load()
    routes = [(d, not a.supports_chat) for a in table.aliases.values() for d in a.deployments]

    async def run_all():
        return await asyncio.gather(*(_probe(d, embeddings=e, timeout_s=timeout_s) for d, e in routes))

    results = async_to_sync(run_all)() if routes else []
    now = timezone.now()
    rows = DeploymentHealth.objects.bulk_create([
        DeploymentHealth(deployment_id=d.id, checked_at=now, ok=ok, latency_ms=ms, error=error)
        for (d, _e), (ok, ms, error) in zip(routes, results, strict=True)
    ])
    DeploymentHealth.objects.filter(checked_at__lt=now - PROBE_RETENTION).delete()
    transaction.on_commit(routing_table_invalidate)
    return rows


def prices_sync(*, actor: str = "cli", at=None) -> dict[str, str]:
    """Seed and refresh every alias's price from genai-prices: the references looked up are its
    deployments' upstream models in routing order (with their provider kind), then the alias."""
    refs: dict[str, list[tuple[str, str | None]]] = {}
    for alias in routing_table_load().aliases.values():
        found = [(d.target.upstream_model, d.target.kind) for d in alias.deployments if d.target.kind != "mock"]
        first_kind = alias.deployments[0].target.kind if alias.deployments else None
        refs[alias.alias] = [*found, (alias.alias, first_kind if first_kind != "mock" else None)]
    return billing_prices_sync(aliases=refs, actor=actor, at=at)


# --- stored Responses API answers (apps/gateway/dialects/openai_responses.py) -----------------


def stored_response_create(*, response_id: str, tenant_id: int, api_key_id: int | None, conversation: list,
                           response: dict) -> None:
    """Keep a `store: true` answer for GATEWAY_RESPONSES_STORE_TTL_S."""
    from django.conf import settings

    from .models import StoredResponse

    StoredResponse.objects.update_or_create(
        id=response_id, defaults={"tenant_id": tenant_id, "api_key_id": api_key_id, "conversation": conversation,
                                  "response": response,
                                  "expires_at": timezone.now() + timedelta(
                                      seconds=settings.GATEWAY_RESPONSES_STORE_TTL_S)})


def stored_response_delete(*, tenant_id: int, response_id: str) -> bool:
    from .models import StoredResponse

    deleted, _ = StoredResponse.objects.filter(tenant_id=tenant_id, id=response_id).delete()
    return deleted > 0


def stored_responses_purge(*, now=None) -> int:
    """Delete stored answers past their expiry. Returns how many."""
    from .models import StoredResponse

    deleted, _ = StoredResponse.objects.filter(expires_at__lte=now or timezone.now()).delete()
    return deleted
