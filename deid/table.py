"""PS3.15 Table E.1-1 as data: one `Row` per attribute, with its basic action and option columns.

The table ships with the package (`deid/data/`); `scripts/refresh_deid_table.py` regenerates it from
the standard. Tags are exact (`(0010,0010)`), masked (`(50XX,XXXX)`, `(60XX,3000)`) or the
private-attribute row `(GGGG,EEEE) WHERE GGGG IS ODD`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

EDITION = "2025b"
TABLE_FILE = f"ps3.15-table-E.1-1-{EDITION}.json"
OPTION_COLUMNS = (
    "rtnSafePrivOpt",
    "rtnUIDsOpt",
    "rtnDevIdOpt",
    "rtnInstIdOpt",
    "rtnPatCharsOpt",
    "rtnLongFullDatesOpt",
    "rtnLongModifDatesOpt",
    "cleanDescOpt",
    "cleanStructContOpt",
    "cleanGraphOpt",
)
ACTION_CODES = frozenset({"D", "Z", "X", "K", "C", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"})
PRIVATE_ROW = "(GGGG,EEEE) WHERE GGGG IS ODD"
_TAG = re.compile(r"^\(([0-9A-FX]{4}),([0-9A-FX]{4})\)$")


@dataclass(frozen=True)
class Row:
    """One attribute of Table E.1-1: its tag pattern and the action of each column."""

    name: str
    tag: str
    basic: str
    options: dict[str, str] = field(default_factory=dict)
    value: int = 0  # the tag with X digits as 0
    mask: int = 0xFFFFFFFF  # bits of `value` that must match (X digits are wildcards)

    @property
    def exact(self) -> bool:
        return self.mask == 0xFFFFFFFF and self.tag != PRIVATE_ROW

    def matches(self, tag: int) -> bool:
        if self.tag == PRIVATE_ROW:
            return bool(tag & 0x10000)
        return tag & self.mask == self.value


def parse_tag(text: str) -> tuple[int, int]:
    """'(60XX,3000)' -> (value, mask): X digits are wildcards. The private row gives (0, 0)."""
    text = text.strip().upper()
    if text == PRIVATE_ROW:
        return 0, 0
    m = _TAG.match(text)
    if not m:
        raise ValueError(f"not a tag pattern: {text!r}")
    digits = m.group(1) + m.group(2)
    value = int(digits.replace("X", "0"), 16)
    mask = int("".join("0" if c == "X" else "F" for c in digits), 16)
    return value, mask


def row_from_json(obj: dict[str, Any]) -> Row:
    """Build a `Row` from one object of the innolitics-format JSON, checking its action codes."""
    basic = obj["basicProfile"].strip()
    if basic not in ACTION_CODES:
        raise ValueError(f"unknown action code {basic!r} for {obj['tag']}")
    options = {k: obj[k].strip() for k in OPTION_COLUMNS if obj.get(k)}
    for k, v in options.items():
        if v not in ACTION_CODES:
            raise ValueError(f"unknown action code {v!r} in {k} for {obj['tag']}")
    value, mask = parse_tag(obj["tag"])
    return Row(obj["name"], obj["tag"].strip().upper(), basic, options, value, mask)


@cache
def load() -> tuple[Row, ...]:
    """The packaged table, parsed once."""
    text = resources.files("deid").joinpath("data", TABLE_FILE).read_text(encoding="utf-8")
    return tuple(row_from_json(r) for r in json.loads(text)["rows"])


def provenance() -> dict[str, str]:
    """Where the packaged table comes from (edition, source, extraction tool)."""
    text = resources.files("deid").joinpath("data", TABLE_FILE).read_text(encoding="utf-8")
    return {k: v for k, v in json.loads(text).items() if k != "rows"}
