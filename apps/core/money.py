"""Money: Decimal USD with 10 places in the database, integer micro-dollars in counters."""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal

MONEY = {"max_digits": 20, "decimal_places": 10}
MONEY_QUANT = Decimal("0.0000000001")


def money_str(value: Decimal | None) -> str | None:
    """Exact USD as a decimal string, the same on every database: at most 10 places, no trailing
    zeros (Decimal("8.5000000000") -> "8.5")."""
    if value is None:
        return None
    return format(value.quantize(Decimal("0.0000000001")).normalize(), "f")


def micros(usd: Decimal) -> int:
    """USD -> whole micro-dollars, rounded up (a hold or a spend is never under-counted)."""
    return int((usd * 1_000_000).to_integral_value(rounding=ROUND_CEILING))


def usd(micros_: int) -> Decimal:
    return Decimal(micros_) / 1_000_000
