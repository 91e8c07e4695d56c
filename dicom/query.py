"""The query model of a DICOM search (QIDO-RS, PS3.18 10.6; matching as PS3.4 C.2.2.2), below
both the web layer that parses requests into it and the index that answers them.

A `Query` is a level, its `Match` conditions (each an attribute path, a `MatchKind` and its
`Term`s or range bounds) and a page. `matches` is the reference matcher on a DICOM JSON model
dataset: the index answers what it can in SQL and asks it about the rest. `normalize_temporal`
is the one comparable form of DA/TM/DT values, for range bounds and for stored columns alike.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Level(StrEnum):
    STUDY = "study"
    SERIES = "series"
    INSTANCE = "instance"


class MatchKind(StrEnum):
    UNIVERSAL = "universal"  # empty value (or "*"): no filter, attribute returned
    EMPTY = "empty"  # '""': the attribute is absent or has no value
    SINGLE = "single"  # one exact value
    WILDCARD = "wildcard"  # one value with * or ?
    RANGE = "range"  # DA/TM/DT: a-b, -b, a-
    LIST = "list"  # several values (UIDs or multiple values), any may match


DATE_TIME_VRS = frozenset({"DA", "TM", "DT"})
NUMERIC_VRS = frozenset({"IS", "DS", "US", "SS", "UL", "SL", "FL", "FD", "SV", "UV"})
# VRs for which * and ? are not wildcards (PS3.4 C.2.2.2.4).
NO_WILDCARD_VRS = DATE_TIME_VRS | NUMERIC_VRS | {"UI", "AS", "AT"}


@dataclass(frozen=True)
class Term:
    """One value to match against.

    ``exact`` terms compare by equality with ``value`` (lower-cased on both sides when the
    match is case-insensitive); others by ``likes`` (SQL LIKE patterns, escape ``\\``, any of
    which may match; already lower-cased when case-insensitive; for fuzzy PN they can match a
    superset, so rows should be re-checked with ``regex``).  ``regex`` is authoritative and is
    used with ``fullmatch``.
    """

    value: str
    exact: bool
    likes: tuple[str, ...]
    regex: re.Pattern[str]


@dataclass(frozen=True)
class Match:
    """One attribute condition. ``path`` is a tuple of tags (several for sequence items)."""

    path: tuple[str, ...]
    keyword: str
    vr: str
    kind: MatchKind
    terms: tuple[Term, ...] = ()
    lower: str | None = None  # RANGE: normalised inclusive bounds, None when open
    upper: str | None = None
    case_insensitive: bool = False
    fuzzy: bool = False

    @property
    def tag(self) -> str:
        return self.path[-1]

    @property
    def values(self) -> tuple[str, ...]:
        return tuple(t.value for t in self.terms)

    @property
    def like(self) -> str | None:
        """The LIKE pattern of a single-term WILDCARD match."""
        if len(self.terms) == 1 and self.terms[0].likes:
            return self.terms[0].likes[0]
        return None


@dataclass(frozen=True)
class Query:
    """What to search for: a level, conditions that must all hold, and a page of results."""

    level: Level
    matches: tuple[Match, ...] = ()
    limit: int | None = None
    offset: int = 0


# -- dates and times ------------------------------------------------------------------------


_DA = re.compile(r"\d{8}")
_TM = re.compile(r"(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?")
_DT = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,6}))?([+-]\d{4})?")


def _norm_time(value: str, upper: bool) -> str | None:
    m = _TM.fullmatch(value.replace(":", "").strip())
    if not m:
        return None
    hh, mm, ss, frac = m.groups()
    fill = "59" if upper else "00"
    frac_fill = "9" if upper else "0"
    return f"{hh}{mm or fill}{ss or fill}.{(frac or '').ljust(6, frac_fill)}"


_DT_MAX = ("", "12", "31", "23", "59", "59")
_DT_MIN = ("", "01", "01", "00", "00", "00")


def _norm_datetime(value: str, upper: bool) -> str | None:
    m = _DT.fullmatch(value.strip())
    if not m:
        return None
    groups = m.groups()
    parts = [g or (_DT_MAX[i] if upper else _DT_MIN[i]) for i, g in enumerate(groups[:6])]
    frac = (groups[6] or "").ljust(6, "9" if upper else "0")
    return "".join(parts) + "." + frac


def normalize_temporal(vr: str, value: str, *, upper: bool = False) -> str | None:
    """Comparable form of a DA/TM/DT value (a partial upper bound covers its period)."""
    value = value.strip()
    if vr == "DA":
        return value if _DA.fullmatch(value) else None
    if vr == "TM":
        return _norm_time(value, upper)
    return _norm_datetime(value, upper)


# -- the reference matcher ------------------------------------------------------------------


def _pn_strings(value: Any) -> list[str]:
    if isinstance(value, str):
        groups = value.split("=")
    elif isinstance(value, Mapping):
        groups = [str(value.get(k) or "") for k in ("Alphabetic", "Ideographic", "Phonetic")]
    else:
        return []
    groups = [g.rstrip("^ ") for g in groups]
    whole = "=".join(groups).rstrip("=")
    return [g for g in groups if g] + ([whole] if whole else [])


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _term_matches(match: Match, term: Term, value: Any) -> bool:
    if value is None:
        return False
    if match.vr == "PN":
        return any(term.regex.fullmatch(s) for s in _pn_strings(value))
    if match.vr in NUMERIC_VRS:
        number, wanted = _number(value), float(term.value)
        return number is not None and number == wanted
    if match.vr in ("TM", "DT"):
        return str(value).replace(":", "").strip() == term.value.replace(":", "").strip()
    return term.regex.fullmatch(str(value)) is not None


def _value_matches(match: Match, value: Any) -> bool:
    if match.kind is MatchKind.RANGE:
        if value is None:
            return False
        normal = normalize_temporal(match.vr, str(value))
        if normal is None:
            return False
        if match.lower is not None and normal < match.lower:
            return False
        return match.upper is None or normal <= match.upper
    return any(_term_matches(match, term, value) for term in match.terms)


def _element_values(element: Mapping[str, Any] | None) -> list[Any]:
    if not element:
        return []
    values = element.get("Value")
    return [v for v in values if v is not None and v != ""] if values else []


def _elements(dataset: Mapping[str, Any], path: tuple[str, ...]) -> list[Mapping[str, Any]]:
    """The elements at ``path`` (several when it goes through sequence items)."""
    datasets: list[Mapping[str, Any]] = [dataset]
    for tag in path[:-1]:
        items: list[Mapping[str, Any]] = []
        for ds in datasets:
            items += [i for i in _element_values(ds.get(tag)) if isinstance(i, Mapping)]
        datasets = items
    return [ds[path[-1]] for ds in datasets if path[-1] in ds]


def match_one(match: Match, dataset_json: Mapping[str, Any]) -> bool:
    """Whether one condition holds for a DICOM JSON model dataset."""
    if match.kind is MatchKind.UNIVERSAL:
        return True
    elements = _elements(dataset_json, match.path)
    if match.kind is MatchKind.EMPTY:
        return not any(_element_values(e) for e in elements)
    return any(_value_matches(match, v) for e in elements for v in _element_values(e))


def matches(query: Query, dataset_json: Mapping[str, Any]) -> bool:
    """Whether a DICOM JSON model dataset satisfies every condition of the query."""
    return all(match_one(m, dataset_json) for m in query.matches)
