"""scripts/refresh_deid_table.py rebuilds the packaged table from either source format, offline."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from deid import table

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = Path("/work/shared/reference/ps3.15-table-E.1-1-2025b.json")
spec = importlib.util.spec_from_file_location("refresh", ROOT / "scripts" / "refresh_deid_table.py")
assert spec is not None and spec.loader is not None
refresh = importlib.util.module_from_spec(spec)
spec.loader.exec_module(refresh)

DOCBOOK = """<?xml version="1.0" encoding="utf-8"?>
<book xmlns="http://docbook.org/ns/docbook" xmlns:xl="http://www.w3.org/1999/xlink">
<table xml:id="table_E.1-1"><caption>Application Level Confidentiality Profile</caption>
<thead><tr><th><para>Attribute Name</para></th><th><para>Tag</para></th></tr></thead>
<tbody>
<tr><td><para>Accession Number</para></td><td><para>(0008,0050)</para></td><td><para>N</para></td>
<td><para>Y</para></td><td><para>Z</para></td><td/><td/><td/><td/><td/><td/><td/><td/><td/><td/></tr>
<tr><td><para>Acquisition Date</para></td><td><para>(0008,&#8203;0022)</para></td><td><para>N</para>
</td><td><para>Y</para></td><td><para>X/Z</para></td><td/><td/><td/><td/><td/><td><para>K</para>
</td><td><para>C</para></td><td/><td/><td/></tr>
<tr><td><para>Private Attributes</para></td><td><para>(gggg,eeee) where gggg is odd</para></td>
<td><para>N</para></td><td><para>N</para></td><td><para>X</para></td><td><para>C</para></td><td/>
<td/><td/><td/><td/><td/><td/><td/><td/></tr>
</tbody></table></book>"""


def test_rows_from_the_standards_docbook():
    rows = refresh.rows_from_docbook(DOCBOOK.encode())
    assert rows == [
        {
            "name": "Accession Number",
            "tag": "(0008,0050)",
            "stdCompIOD": "Y",
            "basicProfile": "Z",
            "id": "00080050",
        },
        {
            "name": "Acquisition Date",
            "tag": "(0008,0022)",
            "stdCompIOD": "Y",
            "basicProfile": "X/Z",
            "rtnLongFullDatesOpt": "K",
            "rtnLongModifDatesOpt": "C",
            "id": "00080022",
        },
        {
            "name": "Private Attributes",
            "tag": table.PRIVATE_ROW,
            "stdCompIOD": "N",
            "basicProfile": "X",
            "rtnSafePrivOpt": "C",
            "id": "ggggeeee-where-gggg-is-odd",
        },
    ]
    assert [table.row_from_json(r).basic for r in rows] == ["Z", "X/Z", "X"]


@pytest.mark.skipif(not REFERENCE.exists(), reason="the shared reference copy is not here")
def test_innolitics_json_gives_the_packaged_table(tmp_path):
    out = tmp_path / "table.json"
    assert refresh.main([str(REFERENCE), "--edition", "2025b", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["edition"] == "2025b" and len(doc["rows"]) == 647
    packaged = [(r.tag, r.basic, r.options) for r in table.load()]
    assert [(r.tag, r.basic, r.options) for r in map(table.row_from_json, doc["rows"])] == packaged
