"""Budget periods: calendar boundaries in the tenant's time zone.

`daily` starts at local midnight, `weekly` on Monday at local midnight, `monthly` on the 1st at
local midnight; `total` never resets. Boundaries are computed on local wall-clock dates and then
made aware, so DST changes move the UTC instant, not the local midnight.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

EPOCH = datetime(2000, 1, 1, tzinfo=ZoneInfo("UTC"))


def _midnight(day: date, tz: ZoneInfo) -> datetime:
    return datetime.combine(day, time.min, tzinfo=tz)


_last: dict[tuple[str, str], tuple[datetime, datetime | None]] = {}


def period_bounds(*, period: str, tz: str, at: datetime) -> tuple[datetime, datetime | None]:
    """(start, end) of the period containing `at`; end is when it resets (None for `total`). The
    last answer per (period, time zone) is kept: admission asks for the same period all month."""
    last = _last.get((period, tz))
    if last is not None and last[0] <= at and (last[1] is None or at < last[1]):
        return last
    bounds = _period_bounds(period=period, tz=tz, at=at)
    _last[(period, tz)] = bounds
    return bounds


def _period_bounds(*, period: str, tz: str, at: datetime) -> tuple[datetime, datetime | None]:
    zone = ZoneInfo(tz)
    local = at.astimezone(zone).date()
    if period == "daily":
        start = local
        end = local + timedelta(days=1)
    elif period == "weekly":
        start = local - timedelta(days=local.weekday())
        end = start + timedelta(days=7)
    elif period == "monthly":
        start = local.replace(day=1)
        end = (start + timedelta(days=32)).replace(day=1)
    elif period == "total":
        return EPOCH, None
    else:
        raise ValueError(f"unknown budget period {period!r}")
    return _midnight(start, zone), _midnight(end, zone)


def period_key(*, period: str, tz: str, at: datetime) -> str:
    """A short stable label of the period containing `at`, for counter keys."""
    start, _ = period_bounds(period=period, tz=tz, at=at)
    return "total" if period == "total" else start.date().isoformat()
