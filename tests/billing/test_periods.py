"""Budget period boundaries with a frozen clock, in non-UTC time zones, across DST changes and
months of 28, 29, 30 and 31 days. Expected instants are written in UTC."""

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import time_machine
from django.utils import timezone

from apps.billing.periods import EPOCH, period_bounds, period_key

BERLIN, NEW_YORK = "Europe/Berlin", "America/New_York"


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def bounds_now(period: str, tz: str) -> tuple[datetime, datetime | None]:
    return period_bounds(period=period, tz=tz, at=timezone.now())


CASES = [
    # (now in UTC, period, zone, expected start UTC, expected end UTC)
    pytest.param(utc(2026, 3, 29, 12, 0), "daily", BERLIN, utc(2026, 3, 28, 23), utc(2026, 3, 29, 22),
                 id="daily-berlin-spring-forward-day-is-23h"),
    pytest.param(utc(2026, 10, 25, 12, 0), "daily", BERLIN, utc(2026, 10, 24, 22), utc(2026, 10, 25, 23),
                 id="daily-berlin-fall-back-day-is-25h"),
    pytest.param(utc(2026, 3, 8, 12, 0), "daily", NEW_YORK, utc(2026, 3, 8, 5), utc(2026, 3, 9, 4),
                 id="daily-new-york-spring-forward"),
    pytest.param(utc(2026, 11, 1, 12, 0), "daily", NEW_YORK, utc(2026, 11, 1, 4), utc(2026, 11, 2, 5),
                 id="daily-new-york-fall-back"),
    pytest.param(utc(2026, 7, 15, 23, 30), "daily", BERLIN, utc(2026, 7, 15, 22), utc(2026, 7, 16, 22),
                 id="daily-berlin-already-tomorrow-locally"),
    pytest.param(utc(2026, 7, 16, 2, 0), "daily", NEW_YORK, utc(2026, 7, 15, 4), utc(2026, 7, 16, 4),
                 id="daily-new-york-still-yesterday-locally"),
    # 2026-03-29 is a Sunday: the week began Monday 23 March (CET) and ends Monday 30 March (CEST).
    pytest.param(utc(2026, 3, 29, 12, 0), "weekly", BERLIN, utc(2026, 3, 22, 23), utc(2026, 3, 29, 22),
                 id="weekly-berlin-across-dst"),
    pytest.param(utc(2026, 11, 2, 3, 0), "weekly", NEW_YORK, utc(2026, 10, 26, 4), utc(2026, 11, 2, 5),
                 id="weekly-new-york-sunday-night-across-dst"),
    pytest.param(utc(2026, 2, 14, 12, 0), "monthly", BERLIN, utc(2026, 1, 31, 23), utc(2026, 2, 28, 23),
                 id="monthly-28-days"),
    pytest.param(utc(2028, 2, 29, 12, 0), "monthly", BERLIN, utc(2028, 1, 31, 23), utc(2028, 2, 29, 23),
                 id="monthly-29-days-leap-year"),
    pytest.param(utc(2026, 4, 30, 21, 0), "monthly", BERLIN, utc(2026, 3, 31, 22), utc(2026, 4, 30, 22),
                 id="monthly-30-days"),
    pytest.param(utc(2026, 1, 31, 22, 59), "monthly", BERLIN, utc(2025, 12, 31, 23), utc(2026, 1, 31, 23),
                 id="monthly-31-days-last-minute"),
    pytest.param(utc(2026, 1, 31, 23, 30), "monthly", BERLIN, utc(2026, 1, 31, 23), utc(2026, 2, 28, 23),
                 id="monthly-berlin-already-february"),
    pytest.param(utc(2026, 2, 1, 3, 0), "monthly", NEW_YORK, utc(2026, 1, 1, 5), utc(2026, 2, 1, 5),
                 id="monthly-new-york-still-january"),
    pytest.param(utc(2026, 3, 20, 12, 0), "monthly", NEW_YORK, utc(2026, 3, 1, 5), utc(2026, 4, 1, 4),
                 id="monthly-new-york-month-with-dst-change"),
    pytest.param(utc(2026, 12, 31, 23, 30), "monthly", BERLIN, utc(2026, 12, 31, 23), utc(2027, 1, 31, 23),
                 id="monthly-berlin-new-year"),
]


@pytest.mark.parametrize(("now", "period", "tz", "start", "end"), CASES)
def test_period_bounds_with_frozen_clock(now, period, tz, start, end):
    with time_machine.travel(now, tick=False):
        got_start, got_end = bounds_now(period, tz)

    assert (got_start, got_end) == (start, end)
    assert got_start <= now < got_end


@pytest.mark.parametrize(("days", "month"), [(28, utc(2026, 2, 10)), (29, utc(2028, 2, 10)), (30, utc(2026, 6, 10)),
                                             (31, utc(2026, 8, 10))])
def test_month_lengths_in_local_days(days, month):
    with time_machine.travel(month, tick=False):
        start, end = bounds_now("monthly", BERLIN)

    assert (end - start) == timedelta(days=days)  # no DST change in these months
    local = start.astimezone(ZoneInfo(BERLIN))
    assert (local.day, local.hour, local.minute) == (1, 0, 0)


@pytest.mark.parametrize("tz", [BERLIN, NEW_YORK])
def test_the_local_midnight_belongs_to_the_new_period(tz):
    with time_machine.travel(utc(2026, 5, 20, 12), tick=False):
        _, end = bounds_now("daily", tz)

    assert period_bounds(period="daily", tz=tz, at=end)[0] == end
    assert period_bounds(period="daily", tz=tz, at=end - timedelta(microseconds=1))[1] == end


def test_consecutive_months_tile_the_year_without_gaps():
    at = utc(2026, 1, 15)
    for _ in range(24):
        start, end = period_bounds(period="monthly", tz=NEW_YORK, at=at)
        nxt, _ = period_bounds(period="monthly", tz=NEW_YORK, at=end)
        assert nxt == end
        assert start < end
        at = end


def test_total_never_resets():
    with time_machine.travel(utc(2030, 6, 1), tick=False):
        assert bounds_now("total", BERLIN) == (EPOCH, None)
    assert period_key(period="total", tz=BERLIN, at=utc(2030, 6, 1)) == "total"


def test_period_key_is_the_local_start_date():
    with time_machine.travel(utc(2026, 1, 31, 23, 30), tick=False):
        now = timezone.now()
        assert period_key(period="monthly", tz=BERLIN, at=now) == "2026-02-01"
        assert period_key(period="monthly", tz=NEW_YORK, at=now) == "2026-01-01"
        assert period_key(period="weekly", tz=BERLIN, at=now) == "2026-01-26"
        assert period_key(period="daily", tz=NEW_YORK, at=now) == "2026-01-31"


def test_unknown_period_is_an_error():
    with pytest.raises(ValueError, match="unknown budget period"):
        period_bounds(period="hourly", tz=BERLIN, at=utc(2026, 1, 1))


def test_the_kept_last_answer_never_answers_for_another_period():
    march = datetime(2026, 3, 15, 12, tzinfo=UTC)
    january = datetime(2026, 1, 31, 23, 59, tzinfo=UTC)

    assert period_bounds(period="monthly", tz="UTC", at=march)[0] == datetime(2026, 3, 1, tzinfo=UTC)
    assert period_bounds(period="monthly", tz="UTC", at=january) == (datetime(2026, 1, 1, tzinfo=UTC),
                                                                     datetime(2026, 2, 1, tzinfo=UTC))
    assert period_bounds(period="monthly", tz="UTC", at=march)[1] == datetime(2026, 4, 1, tzinfo=UTC)
    # another time zone is another answer: 23:59 UTC on Jan 31 is February in Paris
    assert period_bounds(period="monthly", tz="Europe/Paris", at=january)[0] == datetime(2026, 1, 31, 23, tzinfo=UTC)
