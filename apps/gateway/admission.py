"""Admission: every rate limit and every budget hold that applies to a request, checked and taken
in one atomic step (one Redis round trip in production), and settled after the call.

Rate limits: RPM and TPM on the key (ApiKey.rpm/tpm and `key:<name>` limits), its source, its
tenant, each of the request's tags (`tag:<name>`) and its end user (OpenAI's `user`: `user:<id>`,
else the per-end-user `user:*`, which gives every end user a window of their own). TPM is
charged the prompt estimate at admission and corrected to the actual tokens at settle. Priority
(`metadata.priority`, 0-9, 9 most important, 5 when absent): requests below 5 may use only
GATEWAY_LOW_PRIORITY_SHARE of each limit, leaving the rest as headroom for the others.

Budgets (apps.billing.budgets owns them; this module says which apply and how much to hold): the
hold is an upper bound of the request's cost (prompt tokens <= prompt UTF-8 bytes,
completion tokens <= max_tokens or the model's output limit, priced at the dearer of the input and
cache-write rates). Actual cost <= hold, so a hard budget is never passed, whatever the
concurrency. Counters are integer micro-dollars, rounded up; they are rebuilt from the ledger when
missing.

When the shared state cannot be reached, GATEWAY_RATE_LIMIT_ON_STATE_ERROR and
GATEWAY_BUDGET_ON_STATE_ERROR ("open" or "closed") decide; the response says which happened in
`x-gateway-admission`.
"""

from __future__ import annotations

import hashlib
import logging
import math
from decimal import Decimal
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from django.conf import settings

from apps.billing.budgets import Hold, Refusal, StateUnavailable, hold_take, hold_unbacked
from apps.billing.selectors import budgets_applying
from apps.billing.services import cost_upper_bound
from apps.core.money import usd
from apps.core.state import LimitCell, tenant_key

from .errors import GatewayError

if TYPE_CHECKING:
    from .pipeline import Ctx

log = logging.getLogger(__name__)

NORMAL_PRIORITY = 5


def _duration(ms: int) -> str:
    """OpenAI's reset format: 20ms, 1s, 6m0s."""
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.3g}s"
    return f"{int(seconds // 60)}m{int(seconds % 60)}s"


def _digest(end_user: str) -> str:
    """An end user's id in a counter's key: bounded length, any characters."""
    return hashlib.sha256(end_user.encode()).hexdigest()[:32]


def _limit_cells(ctx: Ctx, policy) -> list[tuple[LimitCell, str]]:
    """(cell, human name) for every RPM/TPM that applies: the key's, its source's (the source the
    request books on), its tenant's."""
    auth = ctx.auth
    priority = ctx.metadata.priority
    share = settings.GATEWAY_LOW_PRIORITY_SHARE if priority is not None and priority < NORMAL_PRIORITY else 1.0
    prefix = tenant_key(auth.tenant_id, "rl")  # one hash tag per tenant: one Cluster slot per admission
    found: list[tuple[str, str, int | None, int | None]] = []
    if auth.rpm or auth.tpm:
        found.append((f"{prefix}:k{auth.key_id}", f"key '{auth.key_name}'", auth.rpm, auth.tpm))
    tags, end_user = ctx.request.tags, ctx.request.end_user
    own_user_limit = bool(end_user) and any(rl.scope == "user" and rl.scope_value == end_user
                                            for rl in policy.rate_limits)
    for rl in policy.rate_limits:
        if rl.scope == "tenant":
            found.append((f"{prefix}:tenant", f"tenant '{auth.tenant_slug}'", rl.rpm, rl.tpm))
        elif rl.scope == "source" and rl.scope_value == ctx.source_name:
            found.append((f"{prefix}:source:{rl.scope_value}", f"source '{rl.scope_value}'", rl.rpm, rl.tpm))
        elif rl.scope == "key" and rl.scope_value == auth.key_name:
            found.append((f"{prefix}:key:{rl.scope_value}", f"key '{rl.scope_value}'", rl.rpm, rl.tpm))
        elif rl.scope == "tag" and rl.scope_value in tags:
            found.append((f"{prefix}:tag:{rl.scope_value}", f"tag '{rl.scope_value}'", rl.rpm, rl.tpm))
        elif rl.scope == "user" and end_user and (rl.scope_value == end_user
                                                  or (rl.scope_value == "*" and not own_user_limit)):
            found.append((f"{prefix}:user:{_digest(end_user)}", f"end user '{end_user}'", rl.rpm, rl.tpm))
    cells = []
    estimate = ctx.request.token_estimate
    for key, name, rpm, tpm in found:
        if rpm:
            cells.append((LimitCell(key=f"{key}:rpm", limit=rpm, cost=1, share=share, kind="requests"), name))
        if tpm:
            cells.append((LimitCell(key=f"{key}:tpm", limit=tpm, cost=estimate, share=share, kind="tokens"), name))
    return cells


def completion_bound(ctx: Ctx) -> int:
    """The most completion tokens the request can produce: max_tokens, else the model's limit."""
    asked = ctx.request.asked_max_tokens
    if asked:
        return int(asked)
    return ctx.alias.max_output_tokens if ctx.alias else 16_384


def hold_usd(ctx: Ctx) -> Decimal:
    """The upper bound of the request's cost (what admission holds): see the module docstring."""
    if ctx.price is None:
        return Decimal(0)
    completion = 0 if ctx.kind == "embeddings" else ctx.completion_bound
    return cost_upper_bound(price=ctx.price, prompt_tokens_max=ctx.request.prompt_bound,
                            completion_tokens_max=completion)


def _fail_policy(limits, budgets) -> dict[str, str]:
    """Shared state unreachable: apply the configured policy per kind of limit."""
    if any(b.hard for b in budgets) and settings.GATEWAY_BUDGET_ON_STATE_ERROR == "closed":
        raise GatewayError(503, "Budgets cannot be checked right now (shared state unreachable); try again shortly.",
                           type="api_error", code="admission_unavailable",
                           headers={"x-gateway-admission": "fail-closed", "retry-after": "1"})
    if limits and settings.GATEWAY_RATE_LIMIT_ON_STATE_ERROR == "closed":
        raise GatewayError(503, "Rate limits cannot be checked right now (shared state unreachable); try again "
                           "shortly.", type="api_error", code="admission_unavailable",
                           headers={"x-gateway-admission": "fail-closed", "retry-after": "1"})
    log.warning("admission state unreachable: admitting without limits (fail-open)")
    return {"x-gateway-admission": "fail-open"}


def _rate_headers(cells: list[tuple[LimitCell, str]], pairs: list[tuple[int, int]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for kind in ("requests", "tokens"):
        tightest = None
        for (cell, _), (remaining, reset_ms) in zip(cells, pairs, strict=True):
            if cell.kind == kind and (tightest is None or remaining < tightest[1]):
                tightest = (cell.limit, remaining, reset_ms)
        if tightest:
            headers[f"x-ratelimit-limit-{kind}"] = str(tightest[0])
            headers[f"x-ratelimit-remaining-{kind}"] = str(max(tightest[1], 0))
            headers[f"x-ratelimit-reset-{kind}"] = _duration(tightest[2])
    return headers


def _usd(amount: Decimal) -> str:
    """Dollars with cents, and every further digit a limit has ($100.00, $0.0001), never rounded."""
    return f"{amount:.2f}" if amount == amount.quantize(Decimal("0.01")) else f"{amount.normalize():f}"


def _budget_error(ctx: Ctx, refusal: Refusal, amount: Decimal) -> GatewayError:
    period = refusal.period
    ref = period.ref
    remaining = usd(max(refusal.remaining_micros, 0))
    where = "" if ref.scope == "tenant" else f" for {ref.scope} '{ref.subject or ref.scope_value}'"
    if period.period_end is None:
        when = "it does not reset (period: total)"
    else:
        when = f"it resets at {period.period_end.astimezone(ZoneInfo(ref.timezone)).isoformat()}"
    return GatewayError(
        402,
        f"Budget '{ref.name}'{where} is exhausted: ${remaining:.6f} of ${_usd(ref.limit_usd)} ({ref.period}) remains, "
        f"and this request may cost up to ${amount:.6f}; {when}.",
        type="insufficient_quota",
        code="budget_exceeded",
        headers={"x-gateway-budget": ref.name},
    )


def _rate_error(cell: LimitCell, name: str, retry_after_ms: int) -> GatewayError:
    kind = cell.kind
    retry_s = max(1, math.ceil(retry_after_ms / 1000))
    headers = {"retry-after": str(retry_s), f"x-ratelimit-limit-{kind}": str(cell.limit),
               f"x-ratelimit-remaining-{kind}": "0", f"x-ratelimit-reset-{kind}": _duration(retry_after_ms)}
    return GatewayError(429, f"Rate limit reached: {kind} per minute for {name} (limit {cell.limit}"
                        f"{'' if cell.share == 1 else f', {int(cell.limit * cell.share)} at low priority'}). "
                        f"Try again in {retry_s}s.", type=kind, code="rate_limit_exceeded", headers=headers)


def _shrunk_bound(ctx: Ctx, remaining_micros: int) -> int | None:
    """The completion bound that makes the hold fit what remains of a budget; None if none does."""
    price = ctx.price
    if price is None or ctx.kind != "chat" or price.output_usd_per_mtok <= 0:
        return None
    prompt_cost = cost_upper_bound(price=price, prompt_tokens_max=ctx.request.prompt_bound, completion_tokens_max=0)
    room = usd(remaining_micros) - prompt_cost
    tokens = math.floor(room * 1_000_000 / price.output_usd_per_mtok) if room > 0 else 0
    return min(tokens, ctx.completion_bound) if tokens >= 1 else None


def _hold_ttl_s(ctx: Ctx) -> int:
    """A request queued for a worker (`async: true`, not a batch line, which runs as it is admitted)
    keeps its hold until the worker settles or releases it; the sync TTL would let it expire first.
    A batch line sent to a provider's batch API keeps it until the provider's results arrive."""
    if ctx.batch_api_deployment is not None:
        return max(settings.GATEWAY_PROVIDER_BATCH_HOLD_TTL_S, settings.GATEWAY_HOLD_TTL_S)
    if ctx.is_async and not ctx.batch_id:
        return max(settings.GATEWAY_ASYNC_HOLD_TTL_S, settings.GATEWAY_HOLD_TTL_S)
    return settings.GATEWAY_HOLD_TTL_S


async def admit(ctx: Ctx, policy) -> Hold:
    """Take every rate-limit slot and budget hold that applies (one round trip), or raise a
    402/429/503 GatewayError. Sets ctx.completion_bound (the max_tokens the upstream is sent when a
    hard budget needs one) and the rate-limit headers. Idempotent by request id."""
    auth = ctx.auth
    limit_cells = _limit_cells(ctx, policy)
    for cell, name in limit_cells:
        if cell.cost > cell.limit * cell.share:
            raise GatewayError(429, f"This request needs about {cell.cost} {cell.kind}, more than the {cell.kind} "
                               f"per minute limit of {name} allows ({int(cell.limit * cell.share)}).",
                               type=cell.kind, code="rate_limit_exceeded")
    budgets = budgets_applying(policy.budgets, source_name=ctx.source_name, key_name=auth.key_name,
                               budget_id=ctx.budget_id, tags=ctx.request.tags, end_user=ctx.request.end_user)
    ctx.completion_bound = completion_bound(ctx)
    if budgets and ctx.price is not None and ctx.kind == "chat" and any(b.hard for b in budgets):
        ctx.send_max_tokens = ctx.completion_bound  # the hold assumes it: make the upstream honour it
    ttl = _hold_ttl_s(ctx)
    cells = [c for c, _ in limit_cells]
    shrunk = False
    while True:
        amount = hold_usd(ctx)
        try:
            outcome = await hold_take(request_id=ctx.request_id, budgets=budgets, amount_usd=amount,
                                      at=ctx.timestamp, ttl_s=ttl, limits=cells,
                                      token_estimate=ctx.request.token_estimate)
        except StateUnavailable:
            ctx.headers.update(_fail_policy(cells, budgets))
            return hold_unbacked(request_id=ctx.request_id, ttl_s=ttl)
        if isinstance(outcome, Hold):
            ctx.headers.update(_rate_headers(limit_cells, outcome.limit_outcome))
            return outcome
        if outcome.reason == "rate":
            cell, name = limit_cells[outcome.index]
            raise _rate_error(cell, name, outcome.retry_after_ms)
        bound = None if shrunk or not outcome.period.ref.shrink_max_tokens else \
            _shrunk_bound(ctx, outcome.remaining_micros)
        if bound is None:
            raise _budget_error(ctx, outcome, amount)
        shrunk = True
        ctx.completion_bound = ctx.send_max_tokens = bound
        ctx.headers["x-gateway-max-tokens-lowered"] = str(bound)
