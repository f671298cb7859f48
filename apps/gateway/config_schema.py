"""The declarative config file of `gateway_apply`: its schema, and errors that name the path of
the bad field (`tenants[0].budgets[1].period: must be one of daily, weekly, monthly, total`)."""

from __future__ import annotations

import re
import zoneinfo
from datetime import datetime
from decimal import Decimal
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .providers import base as _providers


class ConfigError(Exception):
    """A bad config file. `errors` are lines of `path: problem`."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


ProviderKindName = Literal["openai", "azure_openai", "anthropic", "gemini", "openai_compatible", "mock", "bedrock",
                           "vertex"]


# Provider options each kind understands (see docs/providers.md), with their types.
PROVIDER_OPTIONS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "openai": {"organization": str, "project": str},
    "azure_openai": {"api_version": str},
    "anthropic": {"anthropic_version": str, "beta": (str, list), "default_max_tokens": int},
    "gemini": {"api_version": str},
    "openai_compatible": {},
    "mock": {},
    "bedrock": {"region": str, "profile": str},
    "vertex": {"project": str, "location": str, "publisher": str},
}
# Kinds whose api_base has a public default; the others must name theirs.
# bedrock and vertex: from the region (location)
DEFAULT_API_BASES = {"openai", "anthropic", "gemini", "mock", "bedrock", "vertex"}


class ProviderSpec(_Strict):
    name: str = Field(min_length=1, max_length=100)
    kind: ProviderKindName
    api_base: str = ""
    api_key_env: str | None = None
    options: dict = Field(default_factory=dict)

    @model_validator(mode="after")
    def _needs_base(self):
        if self.kind not in DEFAULT_API_BASES and not self.api_base:
            raise ValueError(f"api_base: is required for kind {self.kind}")
        if self.api_base and not re.match(r"^https?://[^/\s]+", self.api_base):
            raise ValueError("api_base: must be an http:// or https:// URL")
        known = PROVIDER_OPTIONS[self.kind]
        for key, value in self.options.items():
            if key not in known:
                allowed = ", ".join(sorted(known)) or "none"
                raise ValueError(f"options.{key}: is not an option of kind {self.kind} (options: {allowed})")
            if not isinstance(value, known[key]) or isinstance(value, bool):
                raise ValueError(f"options.{key}: has the wrong type")
        return self


class DeploymentSpec(_Strict):
    provider: str
    model: str = Field(min_length=1)
    version: str = Field(default="", max_length=100)  # the version's label; empty: the model is the version
    weight: int = Field(default=1, ge=0)
    priority: int = 0
    region: str = ""
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    input_usd_per_mtok: Decimal | None = Field(default=None, ge=0)
    output_usd_per_mtok: Decimal | None = Field(default=None, ge=0)
    # Batches API lines routed here go to the provider's own batch API (openai and anthropic kinds).
    provider_batch: bool = False

    @field_validator("input_usd_per_mtok", "output_usd_per_mtok", mode="before")
    @classmethod
    def _no_float_drift(cls, v):
        return Decimal(str(v)) if isinstance(v, float) else v

    @model_validator(mode="after")
    def _cost_pair(self):
        if (self.input_usd_per_mtok is None) != (self.output_usd_per_mtok is None):
            raise ValueError("input_usd_per_mtok and output_usd_per_mtok go together")
        return self


class RolloutSpec(_Strict):
    """`rollout: {version: "2024-08-06", share: 10}`: the version gets `share` percent of the bare
    alias's traffic, the other versions the rest (as `manage.py model_rollout`)."""

    version: str = Field(min_length=1)
    share: int = Field(ge=0, le=100)


class ModelSpec(_Strict):
    alias: str = Field(min_length=1, max_length=200)
    input_usd_per_mtok: Decimal | None = Field(default=None, ge=0)
    output_usd_per_mtok: Decimal | None = Field(default=None, ge=0)
    cached_input_usd_per_mtok: Decimal | None = Field(default=None, ge=0)
    cache_write_usd_per_mtok: Decimal | None = Field(default=None, ge=0)
    batch_discount: Decimal | None = Field(default=None, ge=0, le=1)
    price_effective_from: datetime | None = None
    strategy: Literal["weighted", "lowest_latency", "cheapest"] = "weighted"
    context_window: int = Field(default=128_000, ge=1)
    max_output_tokens: int = Field(default=16_384, ge=1)
    supports_streaming: bool = True
    supports_embeddings: bool | None = None  # None: inferred (apps/gateway/capabilities.py)
    supports_chat: bool | None = None
    # The least similarity of a semantic cache hit on this model, whatever else asks for less.
    semantic_cache_threshold: Decimal | None = Field(default=None, ge=0, le=1)
    deployments: list[DeploymentSpec] = Field(default_factory=list)
    rollout: RolloutSpec | None = None  # left out: the shares stay as they are

    @field_validator("input_usd_per_mtok", "output_usd_per_mtok", "cached_input_usd_per_mtok",
                     "cache_write_usd_per_mtok", "batch_discount", "semantic_cache_threshold", mode="before")
    @classmethod
    def _no_float_drift(cls, v):
        return Decimal(str(v)) if isinstance(v, float) else v

    @model_validator(mode="after")
    def _price_pair(self):
        if (self.input_usd_per_mtok is None) != (self.output_usd_per_mtok is None):
            raise ValueError("input_usd_per_mtok and output_usd_per_mtok go together")
        return self


class SourceSpec(_Strict):
    name: str = Field(min_length=1, max_length=100)
    type: Literal["application", "service"] = "application"


class MemberSpec(_Strict):
    username: str = Field(min_length=1, max_length=150)
    email: str = ""
    role: Literal["owner", "admin", "manager", "viewer"] = "viewer"
    password_env: str | None = None


Scope = str
_SCOPE_RE = re.compile(r"^(tenant|source:.+|key:.+|budget_id:.+|tag:.+|user:.+)$")


class RateLimitSpec(_Strict):
    scope: Scope = "tenant"
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)

    @field_validator("scope")
    @classmethod
    def _scope(cls, v: str) -> str:
        if not re.match(r"^(tenant|source:.+|key:.+|tag:.+|user:.+)$", v):
            raise ValueError("must be tenant, source:<name>, key:<name>, tag:<name>, user:<id> or user:*")
        return v


class BudgetSpec(_Strict):
    name: str = Field(min_length=1, max_length=100)
    scope: Scope = "tenant"
    limit_usd: Decimal = Field(gt=0)
    period: Literal["daily", "weekly", "monthly", "total"] = "monthly"
    enforcement: Literal["hard", "soft"] = "hard"
    alert_thresholds: list[Decimal] = Field(default_factory=list)
    shrink_max_tokens: bool = False
    alert_emails: list[str] = Field(default_factory=list)
    alert_webhook_url: str = ""

    @field_validator("alert_webhook_url")
    @classmethod
    def _public_webhook(cls, v: str) -> str:
        if v:
            from apps.keys.outbound import DestinationRefused, url_check

            try:
                url_check(v, resolve=True)
            except DestinationRefused as exc:
                raise ValueError(f"webhook URL not allowed: {exc}") from None
        return v

    @field_validator("limit_usd", mode="before")
    @classmethod
    def _no_float_drift(cls, v):
        return Decimal(str(v)) if isinstance(v, float) else v

    @field_validator("alert_thresholds", mode="before")
    @classmethod
    def _thresholds(cls, v):
        return [Decimal(str(x)) if isinstance(x, float) else x for x in v or []]

    @field_validator("scope")
    @classmethod
    def _scope(cls, v: str) -> str:
        if not _SCOPE_RE.match(v):
            raise ValueError("must be tenant, source:<name>, key:<name>, budget_id:<id>, tag:<name>, user:<id> "
                             "or user:*")
        return v


class SemanticCacheSpec(_Strict):
    """`semantic: {enabled: true, embedding_alias: text-embedding-3-small, threshold: 0.95}` (the
    semantic cache, apps/gateway/semantic.py). Threshold empty: GATEWAY_SEMANTIC_CACHE_THRESHOLD."""

    enabled: bool = True
    embedding_alias: str = Field(default="", max_length=200)
    threshold: Decimal | None = Field(default=None, ge=0, le=1)

    @field_validator("threshold", mode="before")
    @classmethod
    def _no_float_drift(cls, v):
        return Decimal(str(v)) if isinstance(v, float) else v

    @model_validator(mode="after")
    def _alias_when_enabled(self):
        if self.enabled and not self.embedding_alias:
            raise ValueError("embedding_alias is required when the semantic cache is enabled")
        return self


class CacheSpec(_Strict):
    enabled: bool = True
    ttl_s: int = Field(default=3600, ge=1)
    semantic: SemanticCacheSpec | None = None


class RequestLogSpec(_Strict):
    """`request_log: {bodies: true, retention_days: 30}`: log this tenant's requests (attempts and
    timings; the bodies too with `bodies: true`, redacted and size-capped). `enabled: false` turns
    an earlier policy off; `redact` adds regular expressions to redact from bodies."""

    enabled: bool = True
    bodies: bool = False
    retention_days: int = Field(default=30, ge=1, le=3650)
    redact: list[str] = Field(default_factory=list)

    @field_validator("redact")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for i, pattern in enumerate(v):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"[{i}] is not a valid regular expression: {exc}") from None
        return v


class TenantSpec(_Strict):
    slug: str = Field(pattern=r"^[-a-zA-Z0-9_]+$", max_length=50)
    name: str = Field(min_length=1, max_length=200)
    timezone: str = "UTC"
    allowed_regions: list[str] = Field(default_factory=list)
    allow_unpriced_models: bool = False
    # metadata.budget_id values need not be declared as budgets (default: an undeclared one is a 400)
    allow_freeform_budget_ids: bool = False
    cache: CacheSpec | None = None
    request_log: RequestLogSpec | None = None  # left out: unchanged (off for a new tenant)
    sources: list[SourceSpec] = Field(default_factory=list)
    members: list[MemberSpec] = Field(default_factory=list)
    rate_limits: list[RateLimitSpec] = Field(default_factory=list)
    budgets: list[BudgetSpec] = Field(default_factory=list)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        if v not in zoneinfo.available_timezones():
            raise ValueError(f"unknown time zone {v!r}")
        return v


class GatewayConfig(_Strict):
    providers: list[ProviderSpec] = Field(default_factory=list)
    models: list[ModelSpec] = Field(default_factory=list)
    tenants: list[TenantSpec] = Field(default_factory=list)


# A model validator's message `field.sub: problem` names a field below the validated object.
_SUBPATH_RE = re.compile(r"^([A-Za-z_][\w.]*): (.+)$", re.S)


def _line(err: dict) -> str:
    path, message = _path(err["loc"]), _message(err)
    sub = _SUBPATH_RE.match(message) if err["type"] == "value_error" else None
    if sub:
        path, message = (f"{path}.{sub[1]}" if path else sub[1]), sub[2]
    return f"{path}: {message}"


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _message(err: dict) -> str:
    if err["type"] == "literal_error":
        options = re.findall(r"'([^']*)'", err["ctx"]["expected"])
        return "must be one of " + ", ".join(options)
    if err["type"] == "missing":
        return "is required"
    if err["type"] == "extra_forbidden":
        return "is not a recognised field"
    return err["msg"].removeprefix("Value error, ")


def _cross_check(cfg: GatewayConfig) -> list[str]:
    errors = []
    seen = set()
    kinds = {p.name: p.kind for p in cfg.providers}
    for i, p in enumerate(cfg.providers):
        if p.name in seen:
            errors.append(f"providers[{i}].name: duplicate provider {p.name!r}")
        seen.add(p.name)
    aliases = set()
    for i, m in enumerate(cfg.models):
        if m.alias in aliases:
            errors.append(f"models[{i}].alias: duplicate alias {m.alias!r}")
        aliases.add(m.alias)
        pairs = set()
        for j, d in enumerate(m.deployments):
            if d.provider not in seen:
                errors.append(f"models[{i}].deployments[{j}].provider: unknown provider {d.provider!r}")
            elif d.provider_batch and not _providers.offers_batch(kinds[d.provider]):
                errors.append(f"models[{i}].deployments[{j}].provider_batch: {kinds[d.provider]} providers have no "
                              "batch API the gateway speaks (openai and anthropic do)")
            if (d.provider, d.model) in pairs:  # a deployment is stored by (alias, provider, model)
                errors.append(f"models[{i}].deployments[{j}]: duplicate deployment {d.provider}:{d.model} "
                              "(one per provider and model within an alias)")
            pairs.add((d.provider, d.model))
        if m.rollout is not None:
            names = {d.version or d.model for d in m.deployments}
            if m.rollout.version not in names:
                errors.append(f"models[{i}].rollout.version: {m.rollout.version!r} is not a version of "
                              f"{m.alias!r} (versions: {', '.join(sorted(names)) or 'none'})")
            elif len(names) == 1 and m.rollout.share != 100:
                errors.append(f"models[{i}].rollout.share: {m.rollout.version!r} is the only version: "
                              "its share is 100")
    for i, t in enumerate(cfg.tenants):
        sources = {s.name for s in t.sources}
        for j, rl in enumerate(t.rate_limits):
            if rl.scope.startswith("source:") and rl.scope[7:] not in sources:
                errors.append(f"tenants[{i}].rate_limits[{j}].scope: unknown source {rl.scope[7:]!r}")
        for j, b in enumerate(t.budgets):
            if b.scope.startswith("source:") and b.scope[7:] not in sources:
                errors.append(f"tenants[{i}].budgets[{j}].scope: unknown source {b.scope[7:]!r}")
    return errors


def config_parse(text: str) -> GatewayConfig:
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"(file): not valid YAML: {exc}"])
    if not isinstance(raw, dict):
        raise ConfigError(["(file): the top level must be a mapping"])
    try:
        cfg = GatewayConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError([_line(e) for e in exc.errors(include_url=False)])
    errors = _cross_check(cfg)
    if errors:
        raise ConfigError(errors)
    return cfg
