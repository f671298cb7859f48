"""Writes and computations of money. Decimal throughout; never float."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

from .selectors import PriceInfo

MTOK = Decimal(1_000_000)
QUANT = Decimal("0.0000000001")


def cost_compute(*, price: PriceInfo, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
                 cache_write_tokens: int = 0, batch: bool = False) -> Decimal:
    """USD cost of one request. Cached reads and cache writes are billed at their own rates where
    the price has them (else as plain input); reasoning tokens are part of completion tokens."""
    cached_rate = price.cached_input_usd_per_mtok if price.cached_input_usd_per_mtok is not None \
        else price.input_usd_per_mtok
    write_rate = price.cache_write_usd_per_mtok if price.cache_write_usd_per_mtok is not None \
        else price.input_usd_per_mtok
    plain_input = max(0, prompt_tokens - cached_tokens - cache_write_tokens)
    total = (
        plain_input * price.input_usd_per_mtok
        + cached_tokens * cached_rate
        + cache_write_tokens * write_rate
        + completion_tokens * price.output_usd_per_mtok
    ) / MTOK
    if batch and price.batch_discount:
        total *= Decimal(1) - price.batch_discount
    return total.quantize(QUANT, rounding=ROUND_HALF_UP)


def cost_upper_bound(*, price: PriceInfo, prompt_tokens_max: int, completion_tokens_max: int) -> Decimal:
    """The most a request can cost: what admission holds against budgets."""
    input_rate = max(price.input_usd_per_mtok, price.cache_write_usd_per_mtok or Decimal(0))
    total = (prompt_tokens_max * input_rate + completion_tokens_max * price.output_usd_per_mtok) / MTOK
    return total.quantize(QUANT, rounding=ROUND_HALF_UP)


def price_set(*, model: str, input_usd_per_mtok: Decimal, output_usd_per_mtok: Decimal, actor: str,
              cached_input_usd_per_mtok: Decimal | None = None, cache_write_usd_per_mtok: Decimal | None = None,
              batch_discount: Decimal = Decimal(0), effective_from=None, source: str = "config"):
    """Add a price version when it differs from the one in force. Prices are never edited in place."""
    from django.utils import timezone

    from apps.keys.services import audit_record, snapshot

    from .models import Price
    from .selectors import price_for_model

    when = effective_from or timezone.now()
    current = price_for_model(model=model, at=when)
    wanted = (input_usd_per_mtok, output_usd_per_mtok, cached_input_usd_per_mtok, cache_write_usd_per_mtok,
              batch_discount)
    if current is not None and (current.input_usd_per_mtok, current.output_usd_per_mtok,
                                current.cached_input_usd_per_mtok, current.cache_write_usd_per_mtok,
                                current.batch_discount) == wanted:
        return None
    price = Price.objects.create(
        model=model, input_usd_per_mtok=input_usd_per_mtok, output_usd_per_mtok=output_usd_per_mtok,
        cached_input_usd_per_mtok=cached_input_usd_per_mtok, cache_write_usd_per_mtok=cache_write_usd_per_mtok,
        batch_discount=batch_discount, effective_from=when, source=source,
    )
    audit_record(actor=actor, action="create", obj=price, after=snapshot(price))
    return price


def budget_upsert(*, tenant, name: str, actor: str, **values):
    from apps.keys.services import audited_upsert

    from .models import Budget

    budget, _ = audited_upsert(Budget, actor=actor, lookup={"tenant": tenant, "name": name}, values=values,
                               tenant=tenant)
    return budget
