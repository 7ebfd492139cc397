"""Group and prune schedules read as cron reads them (``iteris_daemon.crontab``). APScheduler
3's ``from_crontab`` numbers the weekdays from Monday = 0: ``0 3 * * 1`` (Mondays) fired
on Tuesdays, and ``7`` (Sunday) was refused; it also fired only where the day of the month
and the weekday both matched. Expected times are read off the calendar (7 December 2026
is a Monday), not computed by croniter."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from iteris_daemon.crontab import CrontabTrigger

MONDAY = datetime(2026, 12, 7, 5, 0, tzinfo=timezone.utc)  # Monday 7 December 2026, 05:00 UTC


def _times(expression: str, count: int, now: datetime = MONDAY) -> list[str]:
    trigger, times, previous = CrontabTrigger(expression), [], None
    for _ in range(count):
        previous = trigger.get_next_fire_time(previous, now)
        times.append(previous.strftime("%a %Y-%m-%d %H:%M"))
    return times


@pytest.mark.parametrize("expression, expected", [
    ("0 3 * * 1", ["Mon 2026-12-14 03:00", "Mon 2026-12-21 03:00"]),  # APScheduler 3: Tuesdays
    ("0 3 * * mon", ["Mon 2026-12-14 03:00", "Mon 2026-12-21 03:00"]),
    ("0 3 * * 0", ["Sun 2026-12-13 03:00", "Sun 2026-12-20 03:00"]),  # APScheduler 3: Mondays
    ("0 3 * * 7", ["Sun 2026-12-13 03:00", "Sun 2026-12-20 03:00"]),  # APScheduler 3: refused
    ("0 3 * * 1-5", ["Tue 2026-12-08 03:00", "Wed 2026-12-09 03:00", "Thu 2026-12-10 03:00",
                     "Fri 2026-12-11 03:00", "Mon 2026-12-14 03:00"]),
    # The day of the month or the weekday: the 1st, and Mondays (APScheduler 3: Mondays the 1st).
    ("0 3 1 * 1", ["Mon 2026-12-14 03:00", "Mon 2026-12-21 03:00", "Mon 2026-12-28 03:00",
                   "Fri 2027-01-01 03:00", "Mon 2027-01-04 03:00"]),
    # A field starting with "*" makes both count, as in cron: Mondays on odd days (QA RV8).
    ("0 0 */2 * 1", ["Mon 2026-12-21 00:00", "Mon 2027-01-11 00:00"]),
    ("0 3 * jan-mar mon-fri", ["Fri 2027-01-01 03:00", "Mon 2027-01-04 03:00"]),
    ("30 4 * * *", ["Tue 2026-12-08 04:30", "Wed 2026-12-09 04:30"]),
    ("0 0 29 2 *", ["Tue 2028-02-29 00:00", "Sun 2032-02-29 00:00"]),
])
def test_times_are_crons(expression, expected):
    assert _times(expression, len(expected)) == expected


def test_now_itself_is_the_first_time_and_each_next_comes_after_the_previous():
    assert _times("*/15 * * * *", 3) == ["Mon 2026-12-07 05:00", "Mon 2026-12-07 05:15", "Mon 2026-12-07 05:30"]
    late = MONDAY.replace(second=1)
    assert _times("*/15 * * * *", 1, now=late) == ["Mon 2026-12-07 05:15"]


@pytest.mark.parametrize("expression, message", [
    ("daily", "cron 'daily': a crontab expression has 5 fields (minute hour day-of-month month day-of-week), got 1"),
    ("0 3 * * * *", "got 6"),
    ("61 * * * *", "cron '61 * * * *': [61 * * * *] is not acceptable, out of range"),
    ("0 3 * * 8", "out of range"),
    ("0 0 30 2 *", "cron '0 0 30 2 *' never fires"),
    # croniter's extensions, which cron does not read ("R": a random minute drawn anew at each look).
    ("R 4 * * *", "cron 'R 4 * * *': minute 'R' is not a list of numbers, ranges and steps"),
    ("0 3 L * *", "day-of-month 'L' is not a list of numbers, ranges and steps"),
    ("0 3 * * 1#2", "day-of-week '1#2' is not a list of numbers or names, ranges and steps"),
    ("0 3 ? * *", "day-of-month '?'"),
    ("H 3 * * *", "minute 'H'"),
])
def test_what_cron_would_not_run_is_refused(expression, message):
    with pytest.raises(ValueError) as error:
        CrontabTrigger(expression)
    assert message in str(error.value)
