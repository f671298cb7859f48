"""Budget alerts. (Thresholds, forecasts and delivery come with the money work; admission already
calls this after every settle.)"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal


async def budget_spend_observed(*, budget_id: int, tenant_id: int, period_start: datetime,
                                period_end: datetime | None, limit_usd: Decimal, spent_before: Decimal,
                                spent_after: Decimal) -> None:
    """Called on the hot path after a settle: must stay cheap (arithmetic; enqueue only on a crossing)."""
    return None
