"""Routing: from a model alias (or `auto`) to the ordered deployments to try, and the call loop
with retries and fallbacks.

Candidates: the alias's active deployments that can serve the request (embeddings need an adapter
that offers them), in the tenant's allowed regions, not in cooldown. Order: by priority group
(lower first); within a group by the alias's strategy: `weighted` (weighted random),
`lowest_latency` (moving average of measured latency, else the last probe's), `cheapest`
(estimated cost of this request at the deployment's price). Deployments whose last probe failed go
to the end of their group.

Calls: a retryable error (connect error, timeout, 429, 5xx) is retried on the same deployment with
exponential backoff and jitter (honouring Retry-After), then the next deployment is tried; attempts
are bounded and the whole loop has a deadline. Each retryable failure counts towards the
deployment's cooldown. A deployment at its own RPM/TPM quota is skipped.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from itertools import groupby
from typing import TYPE_CHECKING, TypeVar

from django.conf import settings
from django.utils import timezone

from apps.billing.selectors import price_in_force

from . import cooldown, observe, versions
from .errors import GatewayError, invalid_request, permission_denied, upstream_error
from .providers import Completion
from .providers.base import ProviderError, offers_embeddings
from .schemas import EMBEDDINGS
from .selectors import AliasRoute, DeploymentRoute, RoutingTable

if TYPE_CHECKING:
    from .pipeline import Ctx

T = TypeVar("T")

AUTO = "auto"
BACKOFF_BASE_S = 0.05
BACKOFF_MAX_S = 2.0
OUTPUT_ESTIMATE_TOKENS = 256  # completion size assumed for cost ranking when the request sets no cap
LATENCY_ALPHA = 0.2

_latency: dict[int, float] = {}  # deployment id -> moving average of seconds to answer (first chunk)


def latency_observe(deployment_id: int, seconds: float) -> None:
    old = _latency.get(deployment_id)
    _latency[deployment_id] = seconds if old is None else old + LATENCY_ALPHA * (seconds - old)


def latency_reset() -> None:
    _latency.clear()


def _latency_of(d: DeploymentRoute) -> float:
    if d.id in _latency:
        return _latency[d.id]
    if d.probe_latency_ms is not None:
        return d.probe_latency_ms / 1000
    return 0.0  # unmeasured: try it, so it gets measured


# --- estimates -------------------------------------------------------------------------------


def prompt_tokens_estimate(ctx: Ctx) -> int:
    return ctx.request.token_estimate


def _asked_output(ctx: Ctx) -> int:
    return int(ctx.send_max_tokens or ctx.request.asked_max_tokens or 0)


def _rates(d: DeploymentRoute, alias: AliasRoute, now) -> tuple[Decimal, Decimal] | None:
    if d.input_usd_per_mtok is not None and d.output_usd_per_mtok is not None:
        return d.input_usd_per_mtok, d.output_usd_per_mtok
    price = price_in_force(list(alias.prices), now)
    if price is None:
        return None
    return price.input_usd_per_mtok, price.output_usd_per_mtok


def _cost(d: DeploymentRoute, alias: AliasRoute, prompt: int, output: int, now) -> Decimal | None:
    rates = _rates(d, alias, now)
    if rates is None:
        return None
    return prompt * rates[0] + output * rates[1]


# --- candidates ------------------------------------------------------------------------------


def _weighted_order(group: list[DeploymentRoute]) -> list[DeploymentRoute]:
    pool, out = list(group), []
    while pool:
        pick = random.choices(pool, weights=[max(d.weight, 0) or 1e-9 for d in pool])[0]
        out.append(pick)
        pool.remove(pick)
    return out


def _order(ctx: Ctx, alias: AliasRoute, deployments: list[DeploymentRoute], strategy: str) -> list[DeploymentRoute]:
    if strategy == "cheapest":
        prompt, output, now = prompt_tokens_estimate(ctx), _asked_output(ctx) or OUTPUT_ESTIMATE_TOKENS, timezone.now()
    out: list[DeploymentRoute] = []
    for _prio, grouped in groupby(sorted(deployments, key=lambda d: d.priority), key=lambda d: d.priority):
        group = _weighted_order(list(grouped))  # random tie-breaks for the sorted strategies too
        if strategy == "lowest_latency":
            group.sort(key=_latency_of)
        elif strategy == "cheapest":
            costs = {d.id: _cost(d, alias, prompt, output, now) for d in group}
            group.sort(key=lambda d: (costs[d.id] is None, costs[d.id] or 0))
        group.sort(key=lambda d: d.healthy is False)
        out.extend(group)
    return out


def _servable(ctx: Ctx, alias: AliasRoute, pool: tuple[DeploymentRoute, ...]) -> list[DeploymentRoute]:
    """Those of the alias's deployments `pool` able to serve this request in the tenant's regions
    (or a 4xx)."""
    from .pipeline import EMBEDDINGS

    deployments = list(pool)
    if ctx.kind == EMBEDDINGS:
        deployments = [d for d in deployments if offers_embeddings(d.target.kind)]
        if not deployments:
            kinds = sorted({d.target.kind for d in pool})
            raise invalid_request(
                f"The model `{alias.alias}` has no deployment that offers embeddings "
                f"({', '.join(kinds)} {'does' if len(kinds) == 1 else 'do'} not).",
                param="model", code="embeddings_not_supported")
    regions = ctx.auth.allowed_regions if ctx.auth else ()
    if regions:
        inside = [d for d in deployments if d.region in regions]
        if not inside and deployments:
            where = sorted({d.region or "unspecified" for d in deployments})
            raise permission_denied(
                f"The model `{alias.alias}` cannot be served in the regions this tenant is restricted to "
                f"({', '.join(regions)}); its deployments are in: {', '.join(where)}.",
                code="region_not_allowed", param="model")
        deployments = inside
    return deployments


async def candidates(ctx: Ctx, alias: AliasRoute, *, strategy: str | None = None,
                     version: str = "") -> list[DeploymentRoute]:
    """The deployments to try for this request, in order (4xx/503 GatewayError when none).

    Pinned to a `version`: that version's deployments only. The bare alias under a rollout: a
    version drawn by its share, its deployments first, then those of the other versions with a
    share (fallbacks); a version at share 0 is never tried. Without a rollout: all deployments."""
    if ctx.stream and not alias.supports_streaming:
        raise invalid_request(f"The model `{alias.alias}` does not support streaming.", param="stream",
                              code="stream_not_supported")
    first = ""
    if version:
        pool = alias.versions[version]
    elif alias.rollout_names:
        pool, first = alias.live, versions.pick(alias.rollout_names, alias.rollout_bounds)
    else:
        pool = alias.deployments
    deployments = _servable(ctx, alias, pool)
    if not deployments:
        raise GatewayError(503, f"The model `{alias.alias}` has no active deployment.", type="api_error",
                           code="no_deployment")
    cooling = await cooldown.cooling([d.id for d in deployments])
    ready = [d for d in deployments if d.id not in cooling]
    if cooling:
        ctx.attempt_log.extend(observe.skipped(d, observe.COOLDOWN, "deployment_cooling_down")
                               for d in deployments if d.id in cooling)
    if not ready:
        wait = max(1, int(min(cooling.values()) + 0.999))
        raise GatewayError(503, f"Every deployment of `{alias.alias}` is cooling down after repeated failures; "
                                f"retry in {wait}s.", type="api_error", code="deployments_cooling_down",
                           headers={"retry-after": str(wait)})
    ordered = _order(ctx, alias, ready, strategy or alias.strategy)
    if first:
        ordered = [d for d in ordered if d.version == first] + [d for d in ordered if d.version != first]
    return ordered


async def auto_alias(ctx: Ctx, table: RoutingTable) -> AliasRoute:
    """`model: "auto"`: the alias of the cheapest healthy deployment whose context window fits the
    prompt and whose capabilities (chat or embeddings, streaming) fit the request."""
    prompt = prompt_tokens_estimate(ctx)
    asked = _asked_output(ctx)
    output = asked or OUTPUT_ESTIMATE_TOKENS
    now = timezone.now()
    options: list[tuple[Decimal, AliasRoute, DeploymentRoute]] = []
    too_small: list[str] = []
    outside: list[str] = []
    for alias in table.aliases.values():
        if not ctx.auth.may_use_model(alias.alias):
            continue
        if (ctx.kind == EMBEDDINGS and not alias.supports_embeddings) or \
                (ctx.kind != EMBEDDINGS and not alias.supports_chat) or (ctx.stream and not alias.supports_streaming):
            continue
        if prompt + asked > alias.context_window:
            too_small.append(alias.alias)
            continue
        try:
            deployments = _servable(ctx, alias, alias.live)
        except GatewayError as exc:
            if exc.code == "region_not_allowed":
                outside.append(alias.alias)
            continue
        for d in deployments:
            cost = _cost(d, alias, prompt, output, now)
            if cost is not None and d.healthy is not False:
                options.append((cost, alias, d))
    cooling = await cooldown.cooling([d.id for _c, _a, d in options])
    options = [o for o in options if o[2].id not in cooling]
    if not options:
        reasons = []
        if too_small:
            reasons.append(f"the prompt (about {prompt} tokens) plus max_tokens exceeds the context window of "
                           f"{', '.join(sorted(too_small))}")
        if outside:
            reasons.append(f"{', '.join(sorted(outside))} cannot be served in the regions this tenant is "
                           f"restricted to ({', '.join(ctx.auth.allowed_regions)})")
        why = "; ".join(reasons) or "no priced, healthy deployment fits this request"
        if outside and not too_small:
            raise permission_denied(f"No model can serve `auto`: {why}.", code="region_not_allowed", param="model")
        raise invalid_request(f"No model can serve `auto`: {why}.", param="model", code="auto_no_model")
    options.sort(key=lambda o: (o[0], o[1].alias, o[2].priority))
    return options[0][1]


# --- calls -----------------------------------------------------------------------------------


def _backoff(attempt: int, retry_after: float | None) -> float:
    if retry_after is not None:
        return min(retry_after, BACKOFF_MAX_S)
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**attempt) * random.uniform(0.5, 1.0)


async def call_with_fallbacks(ctx: Ctx, op: Callable[[DeploymentRoute], Awaitable[T]]) -> T:
    """Run `op` against each candidate deployment until one succeeds; sets ctx.deployment."""
    retries = int(getattr(settings, "GATEWAY_RETRIES_PER_DEPLOYMENT", 1))
    total_s = float(getattr(settings, "GATEWAY_TOTAL_DEADLINE_S", 60.0))
    deadline = time.monotonic() + total_s
    attempts_left = int(getattr(settings, "GATEWAY_MAX_ATTEMPTS", 6))
    tokens = prompt_tokens_estimate(ctx) + _asked_output(ctx) if any(d.tpm for d in ctx.candidates) else 0
    last: ProviderError | None = None
    at_quota = 0
    for deployment in ctx.candidates:
        if attempts_left <= 0 or time.monotonic() >= deadline:
            break
        if not await cooldown.quota_take(deployment.id, rpm=deployment.rpm, tpm=deployment.tpm, tokens=tokens):
            at_quota += 1
            ctx.attempt_log.append(observe.skipped(deployment, observe.RATE_LIMITED, "deployment_at_quota"))
            continue
        for attempt in range(retries + 1):
            remaining = deadline - time.monotonic()
            if attempts_left <= 0 or remaining <= 0:
                break
            attempts_left -= 1
            ctx.deployment = deployment
            started = time.perf_counter()
            try:
                result = await _tried(ctx, deployment, op, remaining)
            except TimeoutError:
                ctx.attempts += 1
                raise upstream_error(f"No deployment of `{ctx.model}` answered within {total_s:g}s.",
                                     status=504, code="upstream_deadline_exceeded")
            except ProviderError as exc:
                last = exc
                ctx.attempts += 1
                if not exc.retryable:
                    raise _to_gateway_error(exc)
                if await cooldown.failure_record(deployment.id):
                    break  # now cooling down: no more tries here
                if attempt >= retries:
                    break
                if exc.retry_after is not None and exc.retry_after > BACKOFF_MAX_S:
                    break  # the upstream asks for a longer pause than a fallback costs
                pause = _backoff(attempt, exc.retry_after)
                if time.monotonic() + pause >= deadline:
                    break
                await asyncio.sleep(pause)
            else:
                latency_observe(deployment.id, time.perf_counter() - started)
                ctx.headers["x-gateway-model-version"] = deployment.version
                if isinstance(result, Completion) and (deployment.tpm and not result.usage.estimated):
                    actual = result.usage.prompt_tokens + result.usage.completion_tokens
                    await cooldown.quota_adjust(deployment.id, tokens=actual - tokens)
                return result
    if last is None:
        if at_quota:
            wait = cooldown.seconds_to_next_minute()
            raise GatewayError(429, f"Every deployment of `{ctx.model}` is at its provider rate limit; "
                                    f"retry in {wait}s.", type="rate_limit_error", code="deployments_at_quota",
                               headers={"retry-after": str(wait)})
        raise upstream_error(f"No deployment of `{ctx.model}` is available.", status=503, code="no_deployment")
    raise _to_gateway_error(last)


async def _tried(ctx: Ctx, deployment: DeploymentRoute, op: Callable[[DeploymentRoute], Awaitable[T]],
                 remaining: float) -> T:
    """One upstream try within `remaining` seconds, recorded on ctx.attempt_log whatever its outcome."""
    started = time.perf_counter()
    try:
        async with asyncio.timeout(remaining):
            result = await op(deployment)
    except BaseException as exc:
        outcome, status, error = observe.outcome_of(exc)
        ctx.attempt_log.append(observe.Attempt(
            deployment_id=deployment.id, provider=deployment.provider_name,
            upstream_model=deployment.target.upstream_model, outcome=outcome, start=started,
            end=time.perf_counter(), status=status, error=error, stream=ctx.stream, kind=deployment.target.kind))
        raise
    ctx.attempt_log.append(observe.Attempt(
        deployment_id=deployment.id, provider=deployment.provider_name, upstream_model=deployment.target.upstream_model,
        outcome=observe.OK, start=started, end=time.perf_counter(), status=200, stream=ctx.stream,
        kind=deployment.target.kind))
    return result


def _to_gateway_error(exc: ProviderError) -> GatewayError:
    if exc.status == 400:
        return GatewayError(400, exc.message, code=exc.code)
    if exc.status == 429:
        headers = {"retry-after": str(int(exc.retry_after or 1))}
        return GatewayError(429, exc.message, type="rate_limit_error", code=exc.code, headers=headers)
    return upstream_error(exc.message, status=exc.status if exc.status in (502, 503, 504) else 502, code=exc.code)
