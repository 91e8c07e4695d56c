"""When a source may be pulled from: windows such as "mon-fri 20:00-07:00", "sat-sun" or
"22:00-06:00" (every day), in local time. A range that crosses midnight belongs to the day it
starts on: "fri 20:00-07:00" is open until Saturday 07:00. No window: always open."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, time, timedelta

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_SPEC = re.compile(
    r"^\s*(?:(?P<d1>[a-z]{3})(?:-(?P<d2>[a-z]{3}))?)?\s*"
    r"(?:(?P<t1>\d{1,2}:\d{2})-(?P<t2>\d{1,2}:\d{2}))?\s*$"
)


@dataclass(frozen=True)
class Window:
    days: frozenset[int]  # weekdays it starts on (Monday 0)
    start: time
    end: time  # == start: the whole day

    def open_at(self, now: datetime) -> bool:
        t = now.time()
        if self.start == self.end:
            return now.weekday() in self.days
        if self.start < self.end:
            return now.weekday() in self.days and self.start <= t < self.end
        # across midnight: the evening of a day it starts on, or the morning after one
        if t >= self.start:
            return now.weekday() in self.days
        return t < self.end and (now.weekday() - 1) % 7 in self.days


def parse(spec: str) -> Window:
    """One window; `ValueError` saying what is wrong."""
    m = _SPEC.match(spec.lower())
    if not m or not (m["d1"] or m["t1"]):
        raise ValueError(f"window {spec!r}: expected e.g. 'mon-fri 20:00-07:00' or 'sat-sun'")
    days = frozenset(range(7))
    if m["d1"]:
        if m["d1"] not in DAYS or (m["d2"] and m["d2"] not in DAYS):
            raise ValueError(f"window {spec!r}: days are {', '.join(DAYS)}")
        a = DAYS.index(m["d1"])
        b = DAYS.index(m["d2"]) if m["d2"] else a
        days = frozenset((a + i) % 7 for i in range((b - a) % 7 + 1))
    start = end = time(0, 0)
    if m["t1"]:
        try:
            start, end = (
                time.fromisoformat(f"{int(x[:-3]):02d}{x[-3:]}") for x in (m["t1"], m["t2"])
            )
        except ValueError:
            raise ValueError(f"window {spec!r}: times are HH:MM, 00:00 to 23:59") from None
    return Window(days, start, end)


def is_open(specs: list[str], now: datetime) -> bool:
    """Whether any of the windows is open at `now` (no windows: always)."""
    return not specs or any(parse(s).open_at(now) for s in specs)


def next_open(specs: list[str], now: datetime) -> datetime:
    """The first minute at or after `now` when a window is open (within a week)."""
    t = now.replace(second=0, microsecond=0)
    for _ in range(8 * 24 * 60):
        if is_open(specs, t):
            return max(t, now)
        t += timedelta(minutes=1)
    return now + timedelta(days=7)
