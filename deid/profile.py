"""A project's de-identification profile: PS3.15 options, safe private attributes, burned-in policy.

`Profile()` is the default for new projects: the Basic Profile with Retain Longitudinal Temporal
Information Modified Dates (a keyed per-patient shift), Retain Patient Characteristics and Clean
Descriptors. `to_json()` / `Profile.from_json()` store it in the catalog.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from deid import table


class Option(StrEnum):
    """PS3.15 options, valued by their CID 7050 code meaning."""

    CLEAN_PIXEL_DATA = "Clean Pixel Data Option"
    CLEAN_RECOGNIZABLE_VISUAL_FEATURES = "Clean Recognizable Visual Features Option"
    CLEAN_GRAPHICS = "Clean Graphics Option"
    CLEAN_STRUCTURED_CONTENT = "Clean Structured Content Option"
    CLEAN_DESCRIPTORS = "Clean Descriptors Option"
    RETAIN_LONG_FULL_DATES = "Retain Longitudinal Temporal Information Full Dates Option"
    RETAIN_LONG_MODIFIED_DATES = "Retain Longitudinal Temporal Information Modified Dates Option"
    RETAIN_PATIENT_CHARACTERISTICS = "Retain Patient Characteristics Option"
    RETAIN_DEVICE_IDENTITY = "Retain Device Identity Option"
    RETAIN_UIDS = "Retain UIDs Option"
    RETAIN_SAFE_PRIVATE = "Retain Safe Private Option"
    RETAIN_INSTITUTION_IDENTITY = "Retain Institution Identity Option"

    @property
    def code(self) -> str:
        """The CID 7050 code value."""
        return CODES[self]


BASIC_CODE = ("113100", "Basic Application Confidentiality Profile")
CODES: dict[Option, str] = {
    Option.CLEAN_PIXEL_DATA: "113101",
    Option.CLEAN_RECOGNIZABLE_VISUAL_FEATURES: "113102",
    Option.CLEAN_GRAPHICS: "113103",
    Option.CLEAN_STRUCTURED_CONTENT: "113104",
    Option.CLEAN_DESCRIPTORS: "113105",
    Option.RETAIN_LONG_FULL_DATES: "113106",
    Option.RETAIN_LONG_MODIFIED_DATES: "113107",
    Option.RETAIN_PATIENT_CHARACTERISTICS: "113108",
    Option.RETAIN_DEVICE_IDENTITY: "113109",
    Option.RETAIN_UIDS: "113110",
    Option.RETAIN_SAFE_PRIVATE: "113111",
    Option.RETAIN_INSTITUTION_IDENTITY: "113112",
}
# The Table E.1-1 column of each option that has one.
COLUMNS: dict[Option, str] = {
    Option.RETAIN_SAFE_PRIVATE: "rtnSafePrivOpt",
    Option.RETAIN_UIDS: "rtnUIDsOpt",
    Option.RETAIN_DEVICE_IDENTITY: "rtnDevIdOpt",
    Option.RETAIN_INSTITUTION_IDENTITY: "rtnInstIdOpt",
    Option.RETAIN_PATIENT_CHARACTERISTICS: "rtnPatCharsOpt",
    Option.RETAIN_LONG_FULL_DATES: "rtnLongFullDatesOpt",
    Option.RETAIN_LONG_MODIFIED_DATES: "rtnLongModifDatesOpt",
    Option.CLEAN_DESCRIPTORS: "cleanDescOpt",
    Option.CLEAN_STRUCTURED_CONTENT: "cleanStructContOpt",
    Option.CLEAN_GRAPHICS: "cleanGraphOpt",
}
DEFAULT_OPTIONS = frozenset(
    {
        Option.RETAIN_LONG_MODIFIED_DATES,
        Option.RETAIN_PATIENT_CHARACTERISTICS,
        Option.CLEAN_DESCRIPTORS,
    }
)
BURNED_IN_POLICIES = ("quarantine", "blank")
_PRIVATE_KEY = re.compile(r"^\(?([0-9A-Fa-f]{4}),?(?:xx|XX)([0-9A-Fa-f]{2})\)?$")


@dataclass(frozen=True)
class Region:
    """A rectangle (pixels) to blank in images of the given size (None: any size)."""

    x: int
    y: int
    width: int
    height: int
    rows: int | None = None
    columns: int | None = None

    def fits(self, rows: int, columns: int) -> bool:
        return (self.rows in (None, rows)) and (self.columns in (None, columns))


def private_key(creator: str, key: int | str) -> tuple[str, int]:
    """('ACME 1.0', '(0019,xx10)') or ('ACME 1.0', 0x00190010) -> ('ACME 1.0', 0x00190010).

    A safe private attribute is named by its creator and its tag with the block byte cleared.
    """
    if isinstance(key, str):
        m = _PRIVATE_KEY.match(key.strip())
        if not m:
            raise ValueError(f"not a private attribute key: {key!r} (use '(gggg,xxee)')")
        key = int(m.group(1), 16) << 16 | int(m.group(2), 16)
    group = key >> 16
    if not group & 1:
        raise ValueError(f"not a private group: {group:04X}")
    return creator.strip(), (group << 16) | (key & 0xFF)


@dataclass(frozen=True)
class Profile:
    """What a project keeps: options (CID 7050), safe private attributes, burned-in policy."""

    options: frozenset[Option] = DEFAULT_OPTIONS
    safe_private: frozenset[tuple[str, int]] = frozenset()
    burned_in: str = "quarantine"  # or "blank": blank `regions`, quarantine what they don't fit
    regions: tuple[Region, ...] = ()
    _actions: dict[int, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        opts = frozenset(Option(o) for o in self.options)
        object.__setattr__(self, "options", opts)
        if {Option.RETAIN_LONG_FULL_DATES, Option.RETAIN_LONG_MODIFIED_DATES} <= opts:
            raise ValueError("choose either full or modified dates, not both")
        if Option.CLEAN_RECOGNIZABLE_VISUAL_FEATURES in opts:
            raise ValueError("Clean Recognizable Visual Features is not implemented")
        if Option.CLEAN_PIXEL_DATA in opts:
            raise ValueError("pixel data is cleaned by burned_in='blank' with regions")
        if self.burned_in not in BURNED_IN_POLICIES:
            raise ValueError(f"burned_in must be one of {BURNED_IN_POLICIES}")
        if self.burned_in == "blank" and not self.regions:
            raise ValueError("burned_in='blank' needs at least one region")
        safe = frozenset(private_key(c, k) for c, k in self.safe_private)
        object.__setattr__(self, "safe_private", safe)
        object.__setattr__(self, "regions", tuple(self.regions))
        self._actions.update(_compile(opts))

    def action(self, row: table.Row) -> str:
        """The row's action under this profile's options (may be a conditional code)."""
        return row_action(row, self.options)

    @property
    def actions(self) -> dict[int, str]:
        """Exact tag -> action, for the engine (masked rows and private tags are separate)."""
        return self._actions

    def method_codes(self) -> list[tuple[str, str]]:
        """(CID 7050 code, meaning) of the profile and its options, as instances record them
        in De-identification Method Code Sequence."""
        return [BASIC_CODE] + sorted((CODES[o], o.value) for o in self.options if o in CODES)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict, as stored in the catalog."""
        return {
            "options": sorted(o.value for o in self.options),
            "safe_private": sorted(
                [c, f"({k >> 16:04X},xx{k & 0xFF:02X})"] for c, k in self.safe_private
            ),
            "burned_in": self.burned_in,
            "regions": [r.__dict__ for r in self.regions],
            "table": table.EDITION,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | str) -> Profile:
        """The inverse of `to_json`; missing keys take their defaults. Options may be given by
        code meaning, enum name or CID 7050 code value."""
        if isinstance(data, str):
            data = json.loads(data) if data.strip() else {}
        kw: dict[str, Any] = {}
        if "options" in data:
            kw["options"] = frozenset(_option(o) for o in data["options"])
        if "safe_private" in data:
            kw["safe_private"] = frozenset(private_key(c, k) for c, k in data["safe_private"])
        if "burned_in" in data:
            kw["burned_in"] = data["burned_in"]
        if "regions" in data:
            kw["regions"] = tuple(Region(**r) for r in data["regions"])
        return cls(**kw)


def _option(value: str) -> Option:
    value = str(value).strip()
    for o in Option:
        if value in (o.value, o.name, o.code) or value.lower() == o.value.lower():
            return o
    raise ValueError(f"unknown de-identification option: {value!r}")


def row_action(row: table.Row, options: frozenset[Option]) -> str:
    """Basic action, replaced by the chosen options' column; between options, C wins over K
    (cleaning is the more conservative of the two)."""
    codes = {row.options[COLUMNS[o]] for o in options if o in COLUMNS and COLUMNS[o] in row.options}
    if "C" in codes:
        return "C"
    if "K" in codes:
        return "K"
    return row.basic


def _compile(options: frozenset[Option]) -> dict[int, str]:
    return {r.value: row_action(r, options) for r in table.load() if r.exact}
