"""Admission: every rate limit and every budget hold that applies to a request, checked and taken
in one atomic step (one Redis round trip in production), and settled after the call.

Rate limits: RPM and TPM on the key (ApiKey.rpm/tpm and `key:<name>` limits), its source and its
tenant. TPM is charged the prompt estimate at admission and corrected to the actual tokens at
settle. Priority (`metadata.priority`, 0-9, 9 most important, 5 when absent): requests below 5 may
use only GATEWAY_LOW_PRIORITY_SHARE of each limit, leaving the rest as headroom for the others.

Budgets: the hold is an upper bound of the request's cost (prompt tokens <= prompt UTF-8 bytes,
completion tokens <= max_tokens or the model's output limit, priced at the dearer of the input and
cache-write rates). Actual cost <= hold, so a hard budget is never passed, whatever the
concurrency. Counters are integer micro-dollars, rounded up; they are rebuilt from the ledger when
missing.

When the shared state cannot be reached, GATEWAY_RATE_LIMIT_ON_STATE_ERROR and
GATEWAY_BUDGET_ON_STATE_ERROR ("open" or "closed") decide; the response says which happened in
`x-gateway-admission`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from decimal import ROUND_CEILING, Decimal
from typing import TYPE_CHECKING

from django.conf import settings

from apps.billing.periods import period_bounds, period_key
from apps.billing.selectors import BudgetRef, budget_spent_from_ledger
from apps.billing.services import cost_upper_bound
from apps.core.db import db_sync

from .errors import GatewayError
from .selectors import tenant_policy
from .state import BudgetCell, LimitCell, StateUnavailable, state
from .tokens import estimate_messages, estimate_text, prompt_bytes

if TYPE_CHECKING:
    from .pipeline import Ctx

log = logging.getLogger(__name__)

NORMAL_PRIORITY = 5
KEY_GRACE = timedelta(days=7)


@dataclass(slots=True)
class BudgetHold:
    ref: BudgetRef
    cell: BudgetCell
    period_start: datetime
    period_end: datetime | None


@dataclass(slots=True)
class Admission:
    """What admission took for one request; enough to settle or release it later (also from
    another process: see `as_dict` / `from_dict`)."""

    limits: list[tuple[LimitCell, str]] = field(default_factory=list)  # (cell, "requests" | "tokens")
    budgets: list[BudgetHold] = field(default_factory=list)
    token_estimate: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    settled: bool = False
    max_tokens: int | None = None  # the completion bound the hold was taken for (a worker sends it too)

    @property
    def hold_usd(self) -> Decimal:
        return sum((Decimal(b.cell.hold_micros) / 1_000_000 for b in self.budgets), Decimal(0))

    def to_dict(self) -> dict:
        """JSON-safe, so a worker process can settle or release what a web process admitted."""
        return {
            "limits": [{"key": c.key, "limit": c.limit, "cost": c.cost, "share": c.share, "kind": kind}
                       for c, kind in self.limits],
            "budgets": [{
                "ref": {**{f.name: getattr(h.ref, f.name) for f in fields(BudgetRef)},
                        "limit_usd": str(h.ref.limit_usd)},
                "cell": {f.name: getattr(h.cell, f.name) for f in fields(BudgetCell)},
                "period_start": h.period_start.isoformat(),
                "period_end": h.period_end.isoformat() if h.period_end else None,
            } for h in self.budgets],
            "token_estimate": self.token_estimate,
            "headers": self.headers,
            "settled": self.settled,
            "max_tokens": self.max_tokens,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Admission:
        return cls(
            limits=[(LimitCell(key=d["key"], limit=d["limit"], cost=d["cost"], share=d["share"]), d["kind"])
                    for d in data.get("limits", ())],
            budgets=[BudgetHold(
                ref=BudgetRef(**{**d["ref"], "limit_usd": Decimal(d["ref"]["limit_usd"])}),
                cell=BudgetCell(**d["cell"]),
                period_start=datetime.fromisoformat(d["period_start"]),
                period_end=datetime.fromisoformat(d["period_end"]) if d["period_end"] else None,
            ) for d in data.get("budgets", ())],
            token_estimate=data.get("token_estimate", 0),
            headers=data.get("headers", {}),
            settled=data.get("settled", False),
            max_tokens=data.get("max_tokens"),
        )


def micros(usd: Decimal) -> int:
    return int((usd * 1_000_000).to_integral_value(rounding=ROUND_CEILING))


def _duration(ms: int) -> str:
    """OpenAI's reset format: 20ms, 1s, 6m0s."""
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.3g}s"
    return f"{int(seconds // 60)}m{int(seconds % 60)}s"


def _limit_cells(ctx: Ctx, policy, token_estimate: int) -> list[tuple[LimitCell, str, str]]:
    """(cell, kind, human name) for every RPM/TPM that applies."""
    auth = ctx.auth
    priority = ctx.metadata.priority
    share = settings.GATEWAY_LOW_PRIORITY_SHARE if priority is not None and priority < NORMAL_PRIORITY else 1.0
    prefix = f"llms:rl:t{auth.tenant_id}"
    found: list[tuple[str, str, int | None, int | None]] = []
    if auth.rpm or auth.tpm:
        found.append((f"llms:rl:k{auth.key_id}", f"key '{auth.key_name}'", auth.rpm, auth.tpm))
    for rl in policy.rate_limits:
        if rl.scope == "tenant":
            found.append((f"{prefix}:tenant", f"tenant '{auth.tenant_slug}'", rl.rpm, rl.tpm))
        elif rl.scope == "source" and rl.scope_value == auth.source_name:
            found.append((f"{prefix}:source:{rl.scope_value}", f"source '{rl.scope_value}'", rl.rpm, rl.tpm))
        elif rl.scope == "key" and rl.scope_value == auth.key_name:
            found.append((f"{prefix}:key:{rl.scope_value}", f"key '{rl.scope_value}'", rl.rpm, rl.tpm))
    cells = []
    for key, name, rpm, tpm in found:
        if rpm:
            cells.append((LimitCell(key=f"{key}:rpm", limit=rpm, cost=1, share=share), "requests", name))
        if tpm:
            cells.append((LimitCell(key=f"{key}:tpm", limit=tpm, cost=token_estimate, share=share), "tokens", name))
    return cells


def _budget_holds(ctx: Ctx, policy) -> list[BudgetHold]:
    auth = ctx.auth
    refs = [b for b in policy.budgets
            if b.applies(source_name=auth.source_name, key_name=auth.key_name, budget_id=ctx.budget_id)]
    if not refs:
        return []
    hold = micros(_hold_usd(ctx))
    out = []
    for ref in refs:
        start, end = period_bounds(period=ref.period, tz=auth.tenant_timezone, at=ctx.timestamp)
        ttl = int((end - ctx.timestamp + KEY_GRACE).total_seconds()) if end else 0
        label = period_key(period=ref.period, tz=auth.tenant_timezone, at=ctx.timestamp)
        cell = BudgetCell(key=f"llms:bud:{ref.id}:{label}", limit_micros=micros(ref.limit_usd), hold_micros=hold,
                          hard=ref.hard, ttl_s=ttl)
        out.append(BudgetHold(ref=ref, cell=cell, period_start=start, period_end=end))
    return out


def _completion_bound(ctx: Ctx) -> int:
    asked = ctx.body.get("max_completion_tokens") or ctx.body.get("max_tokens")
    if asked:
        return int(asked)
    return ctx.alias.max_output_tokens if ctx.alias else 16_384


def _hold_usd(ctx: Ctx) -> Decimal:
    if ctx.price is None:
        return Decimal(0)
    if ctx.kind == "embeddings":
        inputs = ctx.body["input"] if isinstance(ctx.body["input"], list) else [ctx.body["input"]]
        prompt_max = sum(len(str(i).encode()) for i in inputs) + 8
        return cost_upper_bound(price=ctx.price, prompt_tokens_max=prompt_max, completion_tokens_max=0)
    return cost_upper_bound(price=ctx.price, prompt_tokens_max=_prompt_max(ctx),
                            completion_tokens_max=_completion_bound(ctx))


def _prompt_max(ctx: Ctx) -> int:
    """Upper bound of a chat request's prompt tokens, definitions the provider counts included."""
    extra = [ctx.body[k] for k in ("tools", "functions", "response_format") if ctx.body.get(k)]
    return prompt_bytes(ctx.body["messages"], extra)


def _token_estimate(ctx: Ctx) -> int:
    if ctx.kind == "embeddings":
        inputs = ctx.body["input"] if isinstance(ctx.body["input"], list) else [ctx.body["input"]]
        return sum(estimate_text(str(i)) for i in inputs)
    return estimate_messages(ctx.body["messages"])


async def _rebuild(hold: BudgetHold) -> None:
    spent = await db_sync(budget_spent_from_ledger, budget=hold.ref, start=hold.period_start, end=hold.period_end)
    await state().set_spent(key=hold.cell.key, micros=micros(spent), ttl_s=hold.cell.ttl_s)


def _fail_policy(limits, budgets) -> dict[str, str]:
    """Shared state unreachable: apply the configured policy per kind of limit."""
    hard_budgets = [b for b in budgets if b.cell.hard]
    if hard_budgets and settings.GATEWAY_BUDGET_ON_STATE_ERROR == "closed":
        raise GatewayError(503, "Budgets cannot be checked right now (shared state unreachable); try again shortly.",
                           type="api_error", code="admission_unavailable",
                           headers={"x-gateway-admission": "fail-closed", "retry-after": "1"})
    if limits and settings.GATEWAY_RATE_LIMIT_ON_STATE_ERROR == "closed":
        raise GatewayError(503, "Rate limits cannot be checked right now (shared state unreachable); try again "
                           "shortly.", type="api_error", code="admission_unavailable",
                           headers={"x-gateway-admission": "fail-closed", "retry-after": "1"})
    log.warning("admission state unreachable: admitting without limits (fail-open)")
    return {"x-gateway-admission": "fail-open"}


def _rate_headers(cells: list[tuple[LimitCell, str, str]], pairs: list[tuple[int, int]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for kind in ("requests", "tokens"):
        tightest = None
        for (cell, k, _), (remaining, reset_ms) in zip(cells, pairs, strict=True):
            if k == kind and (tightest is None or remaining < tightest[1]):
                tightest = (cell.limit, remaining, reset_ms)
        if tightest:
            headers[f"x-ratelimit-limit-{kind}"] = str(tightest[0])
            headers[f"x-ratelimit-remaining-{kind}"] = str(max(tightest[1], 0))
            headers[f"x-ratelimit-reset-{kind}"] = _duration(tightest[2])
    return headers


def _budget_error(ctx: Ctx, hold: BudgetHold, remaining_micros: int) -> GatewayError:
    ref = hold.ref
    remaining = Decimal(max(remaining_micros, 0)) / 1_000_000
    where = "" if ref.scope == "tenant" else f" for {ref.scope} '{ref.scope_value}'"
    if hold.period_end is None:
        when = "it does not reset (period: total)"
    else:
        from zoneinfo import ZoneInfo

        when = f"it resets at {hold.period_end.astimezone(ZoneInfo(ctx.auth.tenant_timezone)).isoformat()}"
    return GatewayError(
        402,
        f"Budget '{ref.name}'{where} is exhausted: ${remaining:.6f} of ${_usd(ref.limit_usd)} ({ref.period}) remains, "
        f"and this request may cost up to ${Decimal(hold.cell.hold_micros) / 1_000_000:.6f}; {when}.",
        type="insufficient_quota",
        code="budget_exceeded",
        headers={"x-gateway-budget": ref.name},
    )


def _usd(amount: Decimal) -> str:
    """Dollars with cents, and every further digit a limit has ($100.00, $0.0001), never rounded."""
    return f"{amount:.2f}" if amount == amount.quantize(Decimal("0.01")) else f"{amount.normalize():f}"


def _shrink(ctx: Ctx, hold: BudgetHold, remaining_micros: int) -> bool:
    """Lower max_tokens so the hold fits what remains of the budget. False if nothing fits."""
    price = ctx.price
    if price is None or ctx.kind != "chat" or price.output_usd_per_mtok <= 0:
        return False
    prompt_cost = cost_upper_bound(price=price, prompt_tokens_max=_prompt_max(ctx), completion_tokens_max=0)
    room = Decimal(remaining_micros) / 1_000_000 - prompt_cost
    tokens = math.floor(room * 1_000_000 / price.output_usd_per_mtok) if room > 0 else 0
    if tokens < 1:
        return False
    ctx.body.pop("max_completion_tokens", None)
    ctx.body["max_tokens"] = min(tokens, _completion_bound(ctx))
    ctx.headers["x-gateway-max-tokens-lowered"] = str(ctx.body["max_tokens"])
    return True


def _hold_ttl_s(ctx: Ctx) -> int:
    """A request queued for a worker (`async: true`, not a batch line, which runs as it is admitted)
    keeps its hold until the worker settles or releases it; the sync TTL would let it expire first."""
    if ctx.is_async and not ctx.batch_id:
        return max(settings.GATEWAY_ASYNC_HOLD_TTL_S, settings.GATEWAY_HOLD_TTL_S)
    return settings.GATEWAY_HOLD_TTL_S


async def admit(ctx: Ctx) -> Admission:
    """Take every rate-limit slot and budget hold that applies, or raise a 402/429 GatewayError."""
    policy = await tenant_policy(ctx.auth.tenant_id)
    estimate = _token_estimate(ctx)
    limit_cells = _limit_cells(ctx, policy, estimate)
    for cell, kind, name in limit_cells:
        if cell.cost > cell.limit * cell.share:
            raise GatewayError(429, f"This request needs about {cell.cost} {kind}, more than the {kind} per minute "
                               f"limit of {name} allows ({int(cell.limit * cell.share)}).",
                               type=kind, code="rate_limit_exceeded")
    holds = _budget_holds(ctx, policy)
    if holds and ctx.price is not None and not (ctx.body.get("max_tokens") or ctx.body.get("max_completion_tokens")) \
            and ctx.kind == "chat" and any(h.ref.hard for h in holds):
        # The hold assumes the model's output limit: make the upstream honour it too.
        ctx.body["max_tokens"] = _completion_bound(ctx)
    admission = Admission(limits=[(c, k) for c, k, _ in limit_cells], budgets=holds, token_estimate=estimate)
    if not limit_cells and not holds:
        return admission
    backend = state()
    shrunk = False
    for _attempt in range(4):
        try:
            outcome = await backend.admit(request_id=ctx.request_id, limits=[c for c, _, _ in limit_cells],
                                          budgets=[h.cell for h in holds],
                                          hold_ttl_s=_hold_ttl_s(ctx))
        except StateUnavailable:
            admission.headers = _fail_policy(limit_cells, holds)
            admission.limits, admission.budgets = [], []
            return admission
        if outcome.ok:
            admission.headers = _rate_headers(limit_cells, outcome.limits)
            if holds and ctx.kind == "chat":
                admission.max_tokens = ctx.body.get("max_tokens")
            return admission
        if outcome.reason == "rebuild":
            try:
                await _rebuild(holds[outcome.index])
            except StateUnavailable:
                admission.headers = _fail_policy(limit_cells, holds)
                admission.limits, admission.budgets = [], []
                return admission
            continue
        if outcome.reason == "rate":
            cell, kind, name = limit_cells[outcome.index]
            retry_s = max(1, math.ceil(outcome.retry_after_ms / 1000))
            headers = {"retry-after": str(retry_s), f"x-ratelimit-limit-{kind}": str(cell.limit),
                       f"x-ratelimit-remaining-{kind}": "0",
                       f"x-ratelimit-reset-{kind}": _duration(outcome.retry_after_ms)}
            raise GatewayError(429, f"Rate limit reached: {kind} per minute for {name} (limit {cell.limit}"
                               f"{'' if cell.share == 1 else f', {int(cell.limit * cell.share)} at low priority'}). "
                               f"Try again in {retry_s}s.", type=kind, code="rate_limit_exceeded", headers=headers)
        hold = holds[outcome.index]
        if hold.ref.shrink_max_tokens and not shrunk and _shrink(ctx, hold, outcome.remaining_micros):
            shrunk = True
            new = micros(_hold_usd(ctx))
            for h in holds:
                h.cell.hold_micros = new
            continue
        raise _budget_error(ctx, hold, outcome.remaining_micros)
    raise GatewayError(503, "Admission could not complete; try again.", type="api_error", code="admission_retry")


def admitted_max_tokens_apply(ctx: Ctx) -> None:
    """A worker re-reads the stored request: give the upstream the max_tokens admission capped or
    lowered it to, since the hold only covers that bound."""
    bound = ctx.admission.max_tokens if ctx.admission is not None else None
    if bound and ctx.kind == "chat" and (ctx.body.get("max_completion_tokens") or ctx.body.get("max_tokens")) != bound:
        ctx.body.pop("max_completion_tokens", None)
        ctx.body["max_tokens"] = bound


async def _close(ctx: Ctx, *, actual_tokens: int, actual_usd: Decimal) -> None:
    adm = ctx.admission
    if adm is None or adm.settled or (not adm.limits and not adm.budgets):
        return
    adm.settled = True
    limit_deltas = [(cell, actual_tokens - adm.token_estimate) for cell, kind in adm.limits if kind == "tokens"]
    budget_actuals = [(h.cell, micros(actual_usd)) for h in adm.budgets]
    try:
        results = await state().settle(request_id=ctx.request_id, limits=limit_deltas, budgets=budget_actuals)
    except StateUnavailable:
        log.warning("settle could not reach the shared state; counters will be rebuilt from the ledger")
        return
    if actual_usd <= 0:
        return
    from apps.billing import alerts

    for hold, (before, after) in zip(adm.budgets, results, strict=True):
        if before < 0:
            continue
        await alerts.budget_spend_observed(
            budget_id=hold.ref.id, tenant_id=hold.ref.tenant_id, period_start=hold.period_start,
            period_end=hold.period_end, limit_usd=hold.ref.limit_usd,
            spent_before=Decimal(before) / 1_000_000, spent_after=Decimal(after) / 1_000_000,
        )


async def settle(ctx: Ctx) -> None:
    """Replace the hold with the actual cost and tokens (ctx.cost, ctx.usage)."""
    usage = ctx.usage
    tokens = (usage.prompt_tokens + usage.completion_tokens) if usage else 0
    await _close(ctx, actual_tokens=tokens, actual_usd=ctx.cost)


async def release(ctx: Ctx) -> None:
    """Give back the whole hold (and the token estimate): the request failed before costing anything."""
    await _close(ctx, actual_tokens=0, actual_usd=Decimal(0))


async def budget_usage(*, budgets, at: datetime) -> dict[int, tuple[Decimal, Decimal]]:
    """budget.id -> (spent_usd, held_usd) for the period containing `at`, from the fast counters;
    those missing are rebuilt from the ledger in one query. `budgets` are Budget rows with `tenant`
    loaded."""
    from apps.billing.selectors import budgets_spent_from_ledger

    budgets = list(budgets)
    periods = {}
    for b in budgets:
        tz = b.tenant.timezone
        start, end = period_bounds(period=b.period, tz=tz, at=at)
        periods[b.id] = (start, end, f"llms:bud:{b.id}:{period_key(period=b.period, tz=tz, at=at)}")
    backend = state()
    try:
        found = await backend.usage(keys=[periods[b.id][2] for b in budgets])
    except StateUnavailable:
        found = [(None, 0)] * len(budgets)
    missing = [(b, periods[b.id][0], periods[b.id][1]) for b, (spent, _) in zip(budgets, found, strict=True)
               if spent is None]
    ledger = await db_sync(budgets_spent_from_ledger, items=missing) if missing else {}
    out: dict[int, tuple[Decimal, Decimal]] = {}
    for b, (spent, held) in zip(budgets, found, strict=True):
        if spent is None:
            spent = micros(ledger[b.id])
            start, end, key = periods[b.id]
            ttl = int((end - at + KEY_GRACE).total_seconds()) if end else 0
            try:
                await backend.set_spent(key=key, micros=spent, ttl_s=ttl)
            except StateUnavailable:
                pass
        out[b.id] = (Decimal(spent) / 1_000_000, Decimal(held) / 1_000_000)
    return out
