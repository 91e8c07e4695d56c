"""Date shifting for Retain Longitudinal Temporal Information with Modified Dates.

Whole days only, so intervals between a patient's exams, times of day and UTC offsets are kept.
"""

from __future__ import annotations

import re
from datetime import date, timedelta
from functools import lru_cache

# DT: YYYY[MM[DD]] then [HH[MM[SS[.F{1,6}]]]] and an optional UTC offset.
_DT = re.compile(
    r"(\d{4}(?:\d{2}(?:\d{2})?)?)"
    r"((?:\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?)?(?:[+-]\d{4})?)"
)


@lru_cache(maxsize=1 << 14)
def shift_da(value: str, days: int) -> str:
    """Shift one DA value ('YYYYMMDD', or the old 'YYYY.MM.DD') by whole days."""
    v = value.strip()
    if len(v) == 10 and v[4] == "." and v[7] == ".":
        v = v.replace(".", "")
    if len(v) != 8 or not v.isdigit():
        raise ValueError("not a DA value")
    d = date(int(v[:4]), int(v[4:6]), int(v[6:8])) + timedelta(days=days)
    return f"{d.year:04d}{d.month:02d}{d.day:02d}"


@lru_cache(maxsize=1 << 14)
def shift_dt(value: str, days: int) -> str:
    """Shift one DT value's date by whole days; time, fraction and UTC offset are kept."""
    m = _DT.fullmatch(value.strip())
    if not m:
        raise ValueError("not a DT value")
    head, rest = m.group(1), m.group(2)
    if len(head) == 8:
        return shift_da(head, days) + rest
    # A year or a month only: shift its first day and keep the precision.
    full = head + "0101"[len(head) - 4 :]
    return shift_da(full, days)[: len(head)] + rest
