"""Reads of prices and budgets."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from .models import Price


@dataclass(frozen=True, slots=True)
class PriceInfo:
    id: int
    model: str
    input_usd_per_mtok: Decimal
    output_usd_per_mtok: Decimal
    cached_input_usd_per_mtok: Decimal | None
    cache_write_usd_per_mtok: Decimal | None
    batch_discount: Decimal
    effective_from: datetime


def price_versions_by_model() -> dict[str, list[PriceInfo]]:
    """Every price version, newest first, by model alias."""
    out: dict[str, list[PriceInfo]] = {}
    for p in Price.objects.order_by("model", "-effective_from"):
        out.setdefault(p.model, []).append(
            PriceInfo(
                id=p.id,
                model=p.model,
                input_usd_per_mtok=p.input_usd_per_mtok,
                output_usd_per_mtok=p.output_usd_per_mtok,
                cached_input_usd_per_mtok=p.cached_input_usd_per_mtok,
                cache_write_usd_per_mtok=p.cache_write_usd_per_mtok,
                batch_discount=p.batch_discount,
                effective_from=p.effective_from,
            )
        )
    return out


def price_in_force(versions: list[PriceInfo] | None, at: datetime) -> PriceInfo | None:
    for v in versions or ():
        if v.effective_from <= at:
            return v
    return None


def price_for_model(*, model: str, at: datetime) -> PriceInfo | None:
    return price_in_force(price_versions_by_model().get(model), at)
