"""Admission: rate limits and budget holds, checked and taken in one atomic step, and settled
after the call. (Pass-through until the rate-limit and budget work lands: it admits everything
and holds nothing, but the pipeline already calls it at the right places.)"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .pipeline import Ctx


@dataclass(slots=True)
class Admission:
    hold_usd: Decimal = Decimal(0)
    tokens_reserved: int = 0
    headers: dict[str, str] = field(default_factory=dict)


async def admit(ctx: Ctx) -> Admission:
    """Take every rate-limit slot and budget hold that applies, or raise a 402/429 GatewayError."""
    return Admission()


async def settle(ctx: Ctx) -> None:
    """Replace the hold with the actual cost and tokens (ctx.cost, ctx.usage)."""


async def release(ctx: Ctx) -> None:
    """Give back the whole hold: the request failed before costing anything."""
