#!/usr/bin/env python3
"""Regenerate deid/data/ps3.15-table-E.1-1-<edition>.json from the DICOM standard.

    python scripts/refresh_deid_table.py SOURCE --edition 2025b [--out deid/data/...]

SOURCE (a path or an http(s) URL) is either the innolitics dicom-standard
`confidentiality_profile_attributes.json` or the standard's DocBook `part15.xml`
(https://dicom.nema.org/medical/dicom/<edition>/source/docbook/part15/part15.xml). The result keeps
one object per row (name, tag, stdCompIOD, basicProfile and each option column that is set) and
a provenance header. Run it by hand when a new edition is out; nothing runs it at import or test.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from deid.table import OPTION_COLUMNS

# Columns of Table E.1-1, in the standard's order (as the innolitics extractor names them).
COLUMNS = ["name", "tag", "retired", "stdCompIOD", "basicProfile", *OPTION_COLUMNS]
TABLE_ID = "table_E.1-1"
XML_ID = "{http://www.w3.org/XML/1998/namespace}id"


def read_source(source: str) -> bytes:
    if re.match(r"^https?://", source):
        with urllib.request.urlopen(source, timeout=120) as r:  # noqa: S310 - the user's URL
            return r.read()
    return Path(source).read_bytes()


def slug(tag: str) -> str:
    """The innolitics row id: '(0008,0050)' -> '00080050'."""
    return re.sub(r"\s+", "-", re.sub(r"[(),]", "", tag.strip().lower()))


def _clean(text: str) -> str:
    return " ".join(text.replace("\u200b", "").split())


def rows_from_innolitics(data: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Rows from the innolitics JSON (already one object per row)."""
    out = []
    for obj in data:
        row = {k: _clean(str(obj[k])) for k in COLUMNS if obj.get(k) and k != "retired"}
        row["tag"] = row["tag"].upper()
        row["id"] = slug(row["tag"])
        out.append(row)
    return out


def rows_from_docbook(xml: bytes) -> list[dict[str, str]]:
    """Rows from the standard's DocBook part15.xml, Table E.1-1."""
    root = ET.fromstring(xml)
    table = next((t for t in root.iter() if t.get(XML_ID) == TABLE_ID), None)
    if table is None:
        raise SystemExit(f"no {TABLE_ID} in this DocBook file")
    out = []
    for tr in table.iter():
        if not tr.tag.endswith("}tr") or not any(c.tag.endswith("}td") for c in tr):
            continue
        cells = [_clean("".join(td.itertext())) for td in tr if td.tag.endswith("}td")]
        if len(cells) != len(COLUMNS):
            raise SystemExit(f"a row of {TABLE_ID} has {len(cells)} cells, not {len(COLUMNS)}")
        row = {k: v for k, v in zip(COLUMNS, cells, strict=True) if v and k != "retired"}
        row["tag"] = row["tag"].upper()
        row["id"] = slug(row["tag"])
        out.append(row)
    return out


def convert(data: bytes, edition: str, source: str) -> dict[str, Any]:
    """The packaged document: provenance header and rows, sorted as the standard sorts them."""
    text = data.lstrip()
    if text.startswith(b"<"):
        rows, tool = rows_from_docbook(data), "scripts/refresh_deid_table.py (DocBook part15.xml)"
    else:
        rows = rows_from_innolitics(json.loads(data))
        tool = (
            "innolitics dicom-standard (dicom_standard/extract_conf_profile_attributes.py), "
            "wrapped by scripts/refresh_deid_table.py"
        )
    if len(rows) < 500:
        raise SystemExit(f"only {len(rows)} rows: is this Table E.1-1?")
    return {
        "table": "DICOM PS3.15 Table E.1-1 Application Level Confidentiality Profile Attributes",
        "edition": edition,
        "source": source,
        "extraction": tool,
        "columns": "basicProfile plus one key per option where the option changes the action: "
        + ", ".join(COLUMNS[5:]),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("source", help="path or URL of the innolitics JSON or part15.xml")
    ap.add_argument("--edition", required=True, help="the standard's edition, e.g. 2025b")
    ap.add_argument("--out", type=Path, help="output file (default: deid/data/...-EDITION.json)")
    ap.add_argument("--provenance", help="where SOURCE itself came from (default: SOURCE)")
    args = ap.parse_args(argv)
    doc = convert(read_source(args.source), args.edition, args.provenance or args.source)
    out = args.out or Path(__file__).resolve().parent.parent / "deid" / "data" / (
        f"ps3.15-table-E.1-1-{args.edition}.json"
    )
    out.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{len(doc['rows'])} rows written to {out}")
    if args.edition != "2025b":
        print("now set deid.table.EDITION to the new edition and run the tests", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
