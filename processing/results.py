"""The results table of a project: one row per (series, pipeline), flattened for export.

Values become columns of their own (`l1_hu`, `class`, ...), so a CSV opens as a table; Parquet
keeps their types. Only pseudonymous values appear: the patient pseudonym, the shifted study
date (as the de-identified headers hold it), pseudonymous UIDs.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path
from typing import Any

from core.core import Core
from core.errors import SphereError

FIXED = (
    "patient",
    "study_date",
    "study_uid",
    "series_uid",
    "pipeline",
    "version",
    "status",
    "reason",
)
TRAILING = (
    "device",
    "seconds",
    "input_checksum",
    "model_checksum",
    "sr_series_uid",
    "seg_series_uid",
    "report_key",
    "updated_at",
)


def result_rows(core: Core, project: str, pipeline: str | None = None) -> list[dict[str, Any]]:
    """The project's results as flat dicts (fixed columns, then values, then provenance)."""
    p = core.project(project)
    patients = {s.series_uid: s.patient_pseudonym for s in core.catalog.series(p.id)}
    dates = core.catalog.study_dates(p.id)
    rows = []
    for r in core.catalog.results(p.id, pipeline):
        prov = r.provenance or {}
        row: dict[str, Any] = {
            "patient": patients.get(r.series_uid, ""),
            "study_date": _iso(dates.get(r.study_uid)),
            "study_uid": r.study_uid,
            "series_uid": r.series_uid,
            "pipeline": r.pipeline,
            "version": r.version,
            "status": r.status,
            "reason": r.reason or "",
        }
        for k, v in (r.values or {}).items():
            row.setdefault(k, v)
        row.update(
            device=prov.get("device"),
            seconds=prov.get("seconds"),
            input_checksum=prov.get("input_checksum"),
            model_checksum=prov.get("model_checksum"),
            sr_series_uid=r.sr_series_uid,
            seg_series_uid=r.seg_series_uid,
            report_key=r.report_key,
            updated_at=r.updated_at.isoformat(timespec="seconds") if r.updated_at else None,
        )
        rows.append(row)
    return rows


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """Fixed columns, value columns in order of first appearance, then provenance."""
    seen: dict[str, None] = {c: None for c in FIXED}
    for row in rows:
        for k in row:
            if k not in TRAILING:
                seen.setdefault(k, None)
    return [*seen, *TRAILING]


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    cols = columns(rows)
    with Path(path).open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, restval="")
        w.writeheader()
        for row in rows:
            w.writerow({k: "" if v is None else v for k, v in row.items()})


def parquet_available() -> bool:
    return importlib.util.find_spec("pyarrow") is not None


def write_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    """Parquet export (pyarrow); SphereError saying how to get it when pyarrow is missing."""
    if not parquet_available():
        raise SphereError("Parquet export needs pyarrow: pip install 'sphere[parquet]'")
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = columns(rows)
    data = {c: [_cell(row.get(c)) for row in rows] for c in cols}
    try:
        table = pa.table(data)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # a column of mixed types: as text
        table = pa.table({c: [None if v is None else str(v) for v in vs] for c, vs in data.items()})
    pq.write_table(table, path)


def _iso(da: str | None) -> str:
    """A DICOM date (YYYYMMDD) as YYYY-MM-DD; "" when there is none."""
    if not da or len(da) != 8 or not da.isdigit():
        return da or ""
    return f"{da[:4]}-{da[4:6]}-{da[6:]}"


def _cell(v: Any) -> Any:
    return v if v is None or isinstance(v, str | int | float | bool) else str(v)
