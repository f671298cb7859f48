"""Routing: from a model alias to an ordered list of deployments to try, and the call loop with
retries and fallbacks.

Order: by priority group (lower first); within a group, a weighted random order. A retryable
error (connect error, timeout, 429, 5xx) is retried on the same deployment with exponential
backoff and jitter, then the next deployment is tried.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from itertools import groupby
from typing import TYPE_CHECKING, TypeVar

from django.conf import settings

from .errors import GatewayError, upstream_error
from .providers.base import ProviderError
from .selectors import AliasRoute, DeploymentRoute

if TYPE_CHECKING:
    from .pipeline import Ctx

T = TypeVar("T")

RETRIES_PER_DEPLOYMENT = getattr(settings, "GATEWAY_RETRIES_PER_DEPLOYMENT", 1)
BACKOFF_BASE_S = 0.05
BACKOFF_MAX_S = 2.0
TOTAL_DEADLINE_S = 60.0


def _weighted_order(group: list[DeploymentRoute]) -> list[DeploymentRoute]:
    pool, out = list(group), []
    while pool:
        pick = random.choices(pool, weights=[max(d.weight, 0) or 1e-9 for d in pool])[0]
        out.append(pick)
        pool.remove(pick)
    return out


def candidates(alias: AliasRoute) -> list[DeploymentRoute]:
    out: list[DeploymentRoute] = []
    for _prio, group in groupby(alias.deployments, key=lambda d: d.priority):
        out.extend(_weighted_order(list(group)))
    return out


def _backoff(attempt: int, retry_after: float | None) -> float:
    if retry_after is not None:
        return min(retry_after, BACKOFF_MAX_S)
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**attempt) * random.uniform(0.5, 1.0)


async def call_with_fallbacks(ctx: Ctx, op: Callable[[DeploymentRoute], Awaitable[T]]) -> T:
    """Run `op` against each candidate deployment until one succeeds; sets ctx.deployment."""
    deadline = time.monotonic() + TOTAL_DEADLINE_S
    last: ProviderError | None = None
    for deployment in ctx.candidates:
        for attempt in range(RETRIES_PER_DEPLOYMENT + 1):
            ctx.deployment = deployment
            try:
                return await op(deployment)
            except ProviderError as exc:
                last = exc
                ctx.attempts += 1
                if not exc.retryable:
                    raise _to_gateway_error(exc)
                if attempt < RETRIES_PER_DEPLOYMENT:
                    pause = _backoff(attempt, exc.retry_after)
                    if time.monotonic() + pause > deadline:
                        break
                    await asyncio.sleep(pause)
        if time.monotonic() > deadline:
            break
    if last is None:
        raise upstream_error(f"No deployment of `{ctx.model}` is available.", status=503, code="no_deployment")
    raise _to_gateway_error(last)


def _to_gateway_error(exc: ProviderError) -> GatewayError:
    if exc.status == 400:
        return GatewayError(400, exc.message, code=exc.code)
    if exc.status == 429:
        headers = {"retry-after": str(int(exc.retry_after or 1))}
        return GatewayError(429, exc.message, type="rate_limit_error", code=exc.code, headers=headers)
    return upstream_error(exc.message, status=exc.status if exc.status in (502, 503, 504) else 502, code=exc.code)
