"""Prices from the installed `genai-prices` package (offline: its bundled snapshot, no network).

We only read flat per-million-token prices: input, output, cache read, cache write and the batch
discount. Long-context tiers are read at their base tier; time-of-day prices (off-peak) are
ignored in favour of the standard price, so a sync gives the same answer at any hour.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

# Our provider kinds -> genai-prices provider ids. None: let genai-prices guess from the model name.
PROVIDER_IDS: dict[str, str | None] = {
    "openai": "openai",
    "azure_openai": "azure",
    "anthropic": "anthropic",
    "gemini": "google",
    "openai_compatible": None,
    "mock": None,
}


@dataclass(frozen=True, slots=True)
class GenaiPrice:
    ref: str  # "provider/model" in genai-prices
    input_usd_per_mtok: Decimal
    output_usd_per_mtok: Decimal
    cached_input_usd_per_mtok: Decimal | None
    cache_write_usd_per_mtok: Decimal | None
    batch_discount: Decimal


def _flat(value) -> Decimal | None:
    from genai_prices.types import TieredPrices

    if value is None:
        return None
    if isinstance(value, TieredPrices):
        return value.base
    return Decimal(value)


def _standard_prices(model, at: datetime):
    from genai_prices.types import ModelPrice, StartDateConstraint

    if isinstance(model.prices, ModelPrice):
        return model.prices
    chosen = model.prices[0].prices
    for conditional in model.prices:  # later ones take precedence; skip time-of-day variants
        c = conditional.constraint
        if c is None or (isinstance(c, StartDateConstraint) and c.active(at)):
            chosen = conditional.prices
    return chosen


def _batch_discount(model, standard, at: datetime) -> Decimal:
    """1 - batch/standard, when the batch variant scales input and output by the same factor."""
    from genai_prices.types import StartDateConstraint

    for variant in model.price_variants or ():
        if variant.when != {"processing": "batch"}:
            continue
        c = variant.constraint
        if c is not None and not (isinstance(c, StartDateConstraint) and c.active(at)):
            continue
        ratios = set()
        for key in ("input_mtok", "output_mtok"):
            base, batch = _flat(getattr(standard, key, None)), _flat(getattr(variant.prices, key, None))
            if base and batch is not None:
                ratios.add(batch / base)
        if len(ratios) == 1:
            ratio = ratios.pop()
            if Decimal(0) <= ratio < Decimal(1):
                return (Decimal(1) - ratio).quantize(Decimal("0.0001"))
    return Decimal(0)


def genai_price_lookup(*, refs: list[tuple[str, str | None]], at: datetime) -> GenaiPrice | None:
    """The first of (model name, our provider kind or None) that genai-prices knows with a token price."""
    from genai_prices import data_snapshot

    snapshot = data_snapshot.get_snapshot()
    for name, kind in refs:
        if not name:
            continue
        provider_ids = [PROVIDER_IDS.get(kind)] if kind else [None]
        if provider_ids[0] is None and kind in ("openai_compatible", "mock", None):
            provider_ids.append("openai")  # e.g. embeddings models only found under their provider
        for provider_id in provider_ids:
            try:
                provider, model = snapshot.find_provider_model(name, None, provider_id, None)
            except LookupError:
                continue
            standard = _standard_prices(model, at)
            input_rate = _flat(getattr(standard, "input_mtok", None))
            if input_rate is None:
                continue
            return GenaiPrice(
                ref=f"{provider.id}/{model.id}",
                input_usd_per_mtok=input_rate,
                output_usd_per_mtok=_flat(getattr(standard, "output_mtok", None)) or Decimal(0),
                cached_input_usd_per_mtok=_flat(getattr(standard, "cache_read_mtok", None)),
                cache_write_usd_per_mtok=_flat(getattr(standard, "cache_write_mtok", None)),
                batch_discount=_batch_discount(model, standard, at),
            )
    return None


def genai_model_is_embedding(*, name: str, kind: str | None) -> bool | None:
    """What genai-prices' model data says of `name`: True when it prices input tokens only (an
    embedding model), False when it prices output tokens too, None when it does not know the model."""
    from django.utils import timezone
    from genai_prices import data_snapshot

    if not name:
        return None
    snapshot = data_snapshot.get_snapshot()
    provider_ids = [PROVIDER_IDS.get(kind)] if kind else [None]
    if provider_ids[0] is None and kind in ("openai_compatible", "mock", None):
        provider_ids.append("openai")
    for provider_id in provider_ids:
        try:
            _provider, model = snapshot.find_provider_model(name, None, provider_id, None)
        except LookupError:
            continue
        standard = _standard_prices(model, timezone.now())
        if _flat(getattr(standard, "input_mtok", None)) is None:
            continue
        return _flat(getattr(standard, "output_mtok", None)) is None
    return None
