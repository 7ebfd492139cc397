"""Crontab expressions read as cron reads them, for APScheduler 3.

APScheduler 3's ``CronTrigger.from_crontab`` numbers the weekdays from Monday = 0 (fixed only
in its 4.x API): ``0 3 * * 1``, Mondays to cron, fired on Tuesdays, ``* * * * 0`` on
Mondays, and ``7`` (Sunday) was refused; and it fires only where the day of the month *and*
the weekday match, where cron fires where either does (``0 3 1 * 1``: the 1st and every
Monday). :class:`CrontabTrigger` asks croniter, which numbers the weekdays as cron does, for
each next time. croniter also reads extensions cron does not (``R`` for a random value, drawn
anew at each look; ``L``, ``#``, ``?``, ``H``): those are refused, as is every expression
whose fields are not cron's lists of numbers, names, ranges and steps.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

from apscheduler.triggers.base import BaseTrigger
from croniter import CroniterBadDateError, croniter

FIELDS = "minute hour day-of-month month day-of-week"
_VALUE = r"(?:\*|\d+{names})(?:-(?:\d+{names}))?(?:/\d+)?"
_NUMBERS = re.compile(rf"{_VALUE.format(names='')}(?:,{_VALUE.format(names='')})*")
_NAMED = re.compile(rf"{_VALUE.format(names='|[a-z]{3}')}(?:,{_VALUE.format(names='|[a-z]{3}')})*", re.IGNORECASE)


class CrontabTrigger(BaseTrigger):
    """Fires at the times of a five-field crontab expression, in UTC."""

    __slots__ = ("expression", "_day_or")

    def __init__(self, expression: str):
        """Refuse (ValueError) an expression cron would not read, or one that never fires
        (30 February, say)."""
        fields = expression.split()
        if len(fields) != 5:
            raise ValueError(f"cron {expression!r}: a crontab expression has 5 fields ({FIELDS}), got {len(fields)}")
        for field, name, syntax in zip(fields, FIELDS.split(), (_NUMBERS, _NUMBERS, _NUMBERS, _NAMED, _NAMED)):
            if not syntax.fullmatch(field):
                raise ValueError(f"cron {expression!r}: {name} {field!r} is not a list of numbers"
                                 f"{' or names' if syntax is _NAMED else ''}, ranges and steps")
        try:
            croniter(expression)
        except ValueError as exc:  # croniter's errors say which value is out of range
            raise ValueError(f"cron {expression!r}: {exc}") from None
        self.expression = expression
        # cron's rule: the day of the month or the weekday, unless either field starts with "*"
        # (then both must match, as "*/2" in the day of the month means every other day).
        self._day_or = not (fields[2].startswith("*") or fields[4].startswith("*"))
        if self.get_next_fire_time(None, datetime.now(timezone.utc)) is None:
            raise ValueError(f"cron {expression!r} never fires")

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime | None:
        """The first time after the previous fire time, or from ``now`` on (``now`` itself
        included, as APScheduler's own triggers do) for a job just added."""
        start = previous_fire_time or now - timedelta(microseconds=1)
        try:
            return croniter(self.expression, start.astimezone(timezone.utc), day_or=self._day_or).get_next(datetime)
        except CroniterBadDateError:  # no time in croniter's search range
            return None

    def __str__(self) -> str:
        return f"cron[{self.expression}]"

    def __repr__(self) -> str:
        return f"<CrontabTrigger ({self.expression!r}, timezone='UTC')>"
