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


def usd_display(value: Decimal | int | str | None) -> str:
    """USD for people, with the precision that matters: cents from $1 up ("$1,234.50"), and below
    a dollar the first two significant digits too ("$0.0042", "$0.50"), never "$0.00" for a
    non-zero amount (at most 8 places). None -> "–"."""
    if value is None or value == "":
        return "–"
    amount = Decimal(str(value))
    sign, amount = ("-" if amount < 0 else ""), abs(amount)
    places = 2
    if 0 < amount < 1:
        exponent = amount.adjusted()  # 0.0042 -> -3
        places = min(max(2, -exponent + 1), 8)
    quantized = amount.quantize(Decimal(1).scaleb(-places))
    if amount and not quantized:
        return f"{sign}<$0.00000001"
    if places > 2:
        text = format(quantized.normalize(), "f")
        whole, _, frac = text.partition(".")
        text = f"{whole}.{frac.ljust(2, '0')}"
    else:
        text = f"{quantized:,.2f}"
    return f"{sign}${text}"
