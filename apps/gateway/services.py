"""Writes of the data plane's configuration, above all `config_apply` (gateway_apply)."""

from __future__ import annotations

import os

from django.db import transaction

from apps.billing.services import budget_upsert, price_set
from apps.keys.services import (
    audit_record,
    audited_upsert,
    member_upsert,
    provider_credential_set,
    source_upsert,
    tenant_upsert,
)

from .config_schema import ConfigError, GatewayConfig
from .models import Deployment, ModelAlias, Provider, RateLimit
from .selectors import routing_table_invalidate


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


@transaction.atomic
def config_apply(*, cfg: GatewayConfig, actor: str = "cli") -> None:
    """Make the database match the config. Idempotent: applying the same file twice changes
    nothing the second time. All or nothing: an error changes nothing."""
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
                    "supports_embeddings": m.supports_embeddings},
        )
        keep = []
        for d in m.deployments:
            provider = providers.get(d.provider) or Provider.objects.get(name=d.provider)
            dep, _ = audited_upsert(
                Deployment, actor=actor,
                lookup={"alias": alias, "provider": provider, "upstream_model": d.model},
                values={"weight": d.weight, "priority": d.priority, "region": d.region, "rpm": d.rpm,
                        "tpm": d.tpm, "is_active": True},
            )
            keep.append(dep.id)
        for gone in Deployment.objects.filter(alias=alias, is_active=True).exclude(id__in=keep):
            gone.is_active = False
            gone.save(update_fields=["is_active"])
            audit_record(actor=actor, action="deactivate", obj=gone)
        if m.input_usd_per_mtok is not None:
            price_set(model=m.alias, input_usd_per_mtok=m.input_usd_per_mtok,
                      output_usd_per_mtok=m.output_usd_per_mtok,
                      cached_input_usd_per_mtok=m.cached_input_usd_per_mtok,
                      cache_write_usd_per_mtok=m.cache_write_usd_per_mtok,
                      batch_discount=m.batch_discount or 0, effective_from=m.price_effective_from, actor=actor)

    for t in cfg.tenants:
        extra = {"allowed_regions": t.allowed_regions, "allow_unpriced_models": t.allow_unpriced_models}
        if t.cache is not None:
            extra.update(cache_enabled=t.cache.enabled, cache_ttl_s=t.cache.ttl_s)
        tenant = tenant_upsert(slug=t.slug, name=t.name, timezone_name=t.timezone, actor=actor, **extra)
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
