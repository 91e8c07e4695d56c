"""The QIDO-RS index: studies, series and instances of a project as catalog rows, and searches.

Written when a series is committed (`write_series`, from its stored headers), so a search never
opens Zarr. Each level keeps its own attributes as DICOM JSON (`dataset`): a series those all
its instances share, a study the patient and study attributes, an instance the rest; merged
they give an instance's whole header. A search takes a `dicom.query.Query`: matches whose
attribute has a column become SQL; the others, and person names (component groups, trailing
`^`), are checked by the reference matcher (`dicom.query.matches`) on the merged JSON, and
such a search pages in Python, in the same order. Times are stored as
`dicom.query.normalize_temporal` gives them, the form range bounds take.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, delete, func, insert, or_, select
from sqlalchemy.orm import Session, aliased

from dicom import query as dq
from dicom.json_model import first
from dicom.query import Level, Match, MatchKind, Query
from storage.models import IndexedInstance, IndexedSeries, IndexedStudy, get_or_add

# Patient and study attributes: kept on the study row, not repeated below it.
STUDY_TAGS = frozenset(
    {
        "00080020",  # StudyDate
        "00080030",  # StudyTime
        "00080050",  # AccessionNumber
        "00080090",  # ReferringPhysicianName
        "00081030",  # StudyDescription
        "00081032",  # ProcedureCodeSequence
        "00081080",  # AdmittingDiagnosesDescription
        "0020000D",  # StudyInstanceUID
        "00200010",  # StudyID
        "00321060",  # RequestedProcedureDescription
    }
)
_INSTANCE_ALWAYS = frozenset({"00080018", "00200013"})  # SOP Instance UID, Instance Number
MODALITIES_IN_STUDY = "00080061"
ONLINE = {"vr": "CS", "Value": ["ONLINE"]}
_PIXEL_TAGS = frozenset({"7FE00008", "7FE00009", "7FE00010"})
# Computed from the index, never taken from a stored header (which could say otherwise):
# ModalitiesInStudy, the three counts of related series and instances, InstanceAvailability.
_COMPUTED_TAGS = frozenset({"00080061", "00201206", "00201208", "00201209", "00080056"})
_NOT_KEPT = _PIXEL_TAGS | _COMPUTED_TAGS


@dataclass(frozen=True)
class Column:
    attr: str
    vr: str


STUDY_COLUMNS = {
    "0020000D": Column("study_uid", "UI"),
    "00100020": Column("patient_id", "LO"),
    "00100010": Column("patient_name", "PN"),
    "00100030": Column("patient_birth_date", "DA"),
    "00100040": Column("patient_sex", "CS"),
    "00080020": Column("study_date", "DA"),
    "00080030": Column("study_time", "TM"),
    "00080050": Column("accession", "SH"),
    "00200010": Column("study_id", "SH"),
    "00081030": Column("study_description", "LO"),
    "00080090": Column("referring_physician", "PN"),
}
SERIES_COLUMNS = {
    "0020000E": Column("series_uid", "UI"),
    "00080060": Column("modality", "CS"),
    "00200011": Column("series_number", "IS"),
    "0008103E": Column("series_description", "LO"),
    "00080021": Column("series_date", "DA"),
}
INSTANCE_COLUMNS = {
    "00080018": Column("sop_uid", "UI"),
    "00080016": Column("sop_class_uid", "UI"),
    "00200013": Column("instance_number", "IS"),
    "00280010": Column("rows", "US"),
    "00280011": Column("columns", "US"),
    "00280100": Column("bits_allocated", "US"),
    "00280008": Column("number_of_frames", "IS"),
}
_INT_VRS = frozenset({"IS", "US"})


@dataclass
class Hit:
    """One search result: the merged DICOM JSON (with the computed attributes) and its UIDs."""

    dataset: dict[str, Any]
    study_uid: str
    series_uid: str | None = None
    sop_uid: str | None = None


# -- writing ---------------------------------------------------------------------------------


def write_series(
    s: Session,
    project_id: int,
    storage_key: str,
    headers: Sequence[dict[str, Any]],
    n_slices: int,
) -> None:
    """Index one committed series from its stored headers, replacing what was there, then
    recompute its study's row. Idempotent: a re-commit never doubles a row."""
    if not headers:
        return
    # Pixel data kept inline (a derived SEG) is served by WADO-RS, not indexed; computed
    # attributes are the index's own.
    headers = [{t: e for t, e in h.items() if t not in _NOT_KEPT} for h in headers]
    study_uid = first(headers[0], "0020000D")
    series_uid = first(headers[0], "0020000E")
    common = _common(headers)
    series_ds = {t: e for t, e in common.items() if not _is_study_tag(t)}
    study_ds = {t: e for t, e in common.items() if _is_study_tag(t)}
    for tag in _INSTANCE_ALWAYS:
        series_ds.pop(tag, None)
    merged = {**common}
    s.execute(
        delete(IndexedInstance).where(
            IndexedInstance.project_id == project_id, IndexedInstance.series_uid == series_uid
        )
    )
    s.execute(
        delete(IndexedSeries).where(
            IndexedSeries.project_id == project_id, IndexedSeries.series_uid == series_uid
        )
    )
    s.add(
        IndexedSeries(
            project_id=project_id,
            study_uid=study_uid,
            series_uid=series_uid,
            storage_key=storage_key,
            n_instances=len(headers),
            dataset=_dumps(series_ds),
            study_dataset=_dumps(study_ds),
            **_columns(merged, SERIES_COLUMNS, skip=frozenset({"series_uid"})),
        )
    )
    rows = []
    for i, h in enumerate(headers):
        own = {t: e for t, e in h.items() if t not in common}  # what varies, kept per instance
        own.update({t: h[t] for t in _INSTANCE_ALWAYS if t in h})
        rows.append(
            {
                "project_id": project_id,
                "study_uid": study_uid,
                "series_uid": series_uid,
                "position": i,
                "has_pixels": i < n_slices,
                "dataset": _dumps(own),
                **_columns(h, INSTANCE_COLUMNS),
            }
        )
    s.execute(insert(IndexedInstance), rows)
    s.flush()
    _write_study(s, project_id, study_uid)


def _write_study(s: Session, project_id: int, study_uid: str) -> None:
    """Recompute a study's row from all its series: each attribute its first non-empty
    value, series taken by number then UID, so a reindex in any order gives the same row
    and an SR without a StudyDescription does not blank the study's."""
    series = sorted(
        s.scalars(
            select(IndexedSeries).where(
                IndexedSeries.project_id == project_id, IndexedSeries.study_uid == study_uid
            )
        ),
        key=lambda x: (x.series_number is None, x.series_number or 0, x.series_uid),
    )
    row = get_or_add(s, IndexedStudy, project_id=project_id, study_uid=study_uid)
    sources = [json.loads(x.study_dataset) for x in series if x.study_dataset is not None]
    if len(sources) < len(series) and row.dataset:
        sources.append(json.loads(row.dataset))  # series indexed before study_dataset existed
    study_ds = _merge_first(sources)
    for k, v in _columns(study_ds, STUDY_COLUMNS, skip=frozenset({"study_uid"})).items():
        setattr(row, k, v)
    row.dataset = _dumps(study_ds)
    row.n_series = len(series)
    row.n_instances = sum(x.n_instances for x in series)
    row.modalities = "\\".join(sorted({x.modality for x in series if x.modality}))


def delete_series(s: Session, project_id: int, series_uid: str) -> None:
    """Forget a series (and its study when it was the last one)."""
    row = s.scalar(
        select(IndexedSeries).where(
            IndexedSeries.project_id == project_id, IndexedSeries.series_uid == series_uid
        )
    )
    if row is None:
        return
    s.execute(
        delete(IndexedInstance).where(
            IndexedInstance.project_id == project_id, IndexedInstance.series_uid == series_uid
        )
    )
    s.delete(row)
    s.flush()
    left = s.scalar(
        select(func.count()).where(
            IndexedSeries.project_id == project_id, IndexedSeries.study_uid == row.study_uid
        )
    )
    if not left:
        s.execute(
            delete(IndexedStudy).where(
                IndexedStudy.project_id == project_id, IndexedStudy.study_uid == row.study_uid
            )
        )
    else:
        _write_study(s, project_id, row.study_uid)  # its counts, and attributes it gave


# -- searching -------------------------------------------------------------------------------


class SearchTooBroad(Exception):
    """A search that examined more rows, or took longer, than it may (`search`'s budget)."""


def search(
    s: Session,
    project_id: int,
    query: Query,
    max_rows: int | None = None,
    deadline: float | None = None,
) -> list[Hit]:
    """The page of `query` (studies, series or instances of a project), in a stable order.
    Rows checked in Python (by the reference matcher) stop at `max_rows` or at `deadline` (a
    `time.monotonic()` value): SearchTooBroad, rather than a search that holds a worker for
    as long as the index is large."""
    level, limit, offset = query.level, query.limit, query.offset
    st, se, inst = IndexedStudy, IndexedSeries, IndexedInstance
    q: Select[*tuple[Any, ...]]
    tables: list[tuple[Any, dict[str, Column]]]
    order: list[Any]
    if level is Level.STUDY:
        q = select(st).where(st.project_id == project_id)
        tables = [(st, STUDY_COLUMNS)]
        order = [st.study_date, st.study_uid]
    elif level is Level.SERIES:
        q = (
            select(se, st)
            .join(st, (st.project_id == se.project_id) & (st.study_uid == se.study_uid))
            .where(se.project_id == project_id)
        )
        tables = [(se, SERIES_COLUMNS), (st, STUDY_COLUMNS)]
        order = [st.study_date, se.study_uid, se.series_number, se.series_uid]
    else:
        q = (
            select(inst, se, st)
            .join(se, (se.project_id == inst.project_id) & (se.series_uid == inst.series_uid))
            .join(st, (st.project_id == se.project_id) & (st.study_uid == se.study_uid))
            .where(inst.project_id == project_id)
        )
        tables = [(inst, INSTANCE_COLUMNS), (se, SERIES_COLUMNS), (st, STUDY_COLUMNS)]
        order = [inst.study_uid, inst.series_uid, inst.position]
    exact = True
    for m in query.matches:
        clause, is_exact = _clause(m, tables)
        if clause is not None:
            q = q.where(clause)
        exact = exact and is_exact
    q = q.order_by(*order)
    python_paging = not exact
    if not python_paging:
        q = q.offset(offset or None).limit(limit)
    hits = []
    parsed: dict[tuple[str, int], dict[str, Any]] = {}  # a study's, a series' JSON, read once
    for examined, row in enumerate(s.execute(q), 1):
        if python_paging and (
            (max_rows is not None and examined > max_rows)
            or (deadline is not None and examined % 64 == 0 and time.monotonic() > deadline)
        ):
            raise SearchTooBroad(f"{examined - 1} rows examined")
        hit = _hit(level, row, parsed)
        if python_paging and not dq.matches(query, hit.dataset):
            continue
        hits.append(hit)
        if python_paging and limit is not None and len(hits) >= offset + limit:
            break  # the page is full: the rest need not be read
    if python_paging:
        hits = hits[offset:]
        hits = hits[:limit] if limit is not None else hits
    return hits


def _hit(level: Level, row: Any, parsed: dict[tuple[str, int], dict[str, Any]]) -> Hit:
    if level is Level.STUDY:
        (st,) = row
        return Hit(_study_json(st), st.study_uid)
    study = parsed.get(("study", row[-1].id))
    if study is None:
        study = parsed[("study", row[-1].id)] = _study_json(row[-1])
    if level is Level.SERIES:
        se, st = row
        return Hit({**study, **_series_json(se)}, st.study_uid, se.series_uid)
    inst, se, st = row
    series = parsed.get(("series", se.id))
    if series is None:
        series = parsed[("series", se.id)] = _series_json(se)
    ds = {**study, **series, **json.loads(inst.dataset)}
    ds["00080056"] = ONLINE
    return Hit(ds, st.study_uid, se.series_uid, inst.sop_uid)


def _study_json(st: IndexedStudy) -> dict[str, Any]:
    ds = json.loads(st.dataset)
    ds["0020000D"] = {"vr": "UI", "Value": [st.study_uid]}
    ds["00080056"] = ONLINE
    ds["00201206"] = {"vr": "IS", "Value": [st.n_series]}
    ds["00201208"] = {"vr": "IS", "Value": [st.n_instances]}
    if st.modalities:
        ds["00080061"] = {"vr": "CS", "Value": st.modalities.split("\\")}
    return ds


def _series_json(se: IndexedSeries) -> dict[str, Any]:
    ds = json.loads(se.dataset)
    ds["0020000E"] = {"vr": "UI", "Value": [se.series_uid]}
    ds["00201209"] = {"vr": "IS", "Value": [se.n_instances]}
    ds["00080056"] = ONLINE
    return ds


def _clause(m: Match, tables: list[tuple[Any, dict[str, Column]]]) -> tuple[Any, bool]:
    """(SQL condition or None, whether it decides the match alone)."""
    kind = m.kind
    if kind is MatchKind.UNIVERSAL:
        return None, True
    if m.path == (MODALITIES_IN_STUDY,):
        return _modalities_clause(m)
    col = None
    if len(m.path) == 1:
        for table, columns in tables:
            if m.path[0] in columns:
                c = columns[m.path[0]]
                col, vr = getattr(table, c.attr), c.vr
                break
    if col is None:
        return None, False
    numeric = vr in _INT_VRS
    if kind is MatchKind.EMPTY:
        return (col.is_(None) if numeric else or_(col.is_(None), col == "")), True
    if kind is MatchKind.RANGE:
        if vr not in ("DA", "TM"):
            return None, False
        conds = []
        if m.lower is not None:
            conds.append(col >= m.lower)  # DA: YYYYMMDD, TM: HHMMSS.ffffff, as stored
        if m.upper is not None:
            conds.append(col <= m.upper)
        return (conds[0] if len(conds) == 1 else conds[0] & conds[1]), True
    if vr == "TM":
        return None, False  # exact TM compares raw text; left to the recheck
    exact = vr != "PN"
    terms = []
    for t in m.terms:
        if numeric:
            try:
                number = float(t.value)
            except ValueError:
                return None, False
            terms.append(col == number)
        elif m.case_insensitive:
            lowered = func.lower(col)
            if t.exact:
                terms.append(lowered == t.value.lower().rstrip("^ "))
            else:
                terms.append(or_(*(lowered.like(p, escape="\\") for p in t.likes)))
        elif t.exact:
            terms.append(col == t.value)
        else:
            terms.append(or_(*(col.like(p, escape="\\") for p in t.likes)))
    return (terms[0] if len(terms) == 1 else or_(*terms)), exact


def _modalities_clause(m: Match) -> tuple[Any, bool]:
    """ModalitiesInStudy: the study has a series of one of the modalities (equality, so as
    case-sensitive as the reference matcher on every database). Wildcards and empty matches are
    left to it."""
    if m.kind not in (MatchKind.SINGLE, MatchKind.LIST) or not all(t.exact for t in m.terms):
        return None, False
    se, st = aliased(IndexedSeries), IndexedStudy
    has = select(se.id).where(
        se.project_id == st.project_id,
        se.study_uid == st.study_uid,
        se.modality.in_([t.value for t in m.terms]),
    )
    return has.exists(), True


# -- helpers ---------------------------------------------------------------------------------


def _is_study_tag(tag: str) -> bool:
    return tag.startswith("0010") or tag in STUDY_TAGS


def _common(headers: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The elements equal in every header."""
    first = headers[0]
    keep = set(first)
    for h in headers[1:]:
        keep = {t for t in keep if h.get(t) == first[t]}
    return {t: first[t] for t in sorted(keep)}


def _merge_first(sources: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Each tag's first element with a value across `sources` (an empty one only when
    none has a value), as Orthanc keeps a study's first non-empty attributes."""
    out: dict[str, Any] = {}
    for ds in sources:
        for tag, element in ds.items():
            if tag not in out or (not _has_value(out[tag]) and _has_value(element)):
                out[tag] = element
    return dict(sorted(out.items()))


def _has_value(element: dict[str, Any]) -> bool:
    return bool(element.get("Value") or element.get("InlineBinary") or element.get("BulkDataURI"))


def _columns(
    ds: dict[str, Any], columns: dict[str, Column], skip: frozenset[str] = frozenset()
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tag, c in columns.items():
        if c.attr in skip:
            continue
        value = first(ds, tag)
        if c.vr == "PN" and isinstance(value, dict):
            value = value.get("Alphabetic")
        if c.vr in _INT_VRS:
            try:
                value = int(float(value)) if value not in (None, "") else None
            except (TypeError, ValueError):
                value = None
        elif c.vr == "TM" and value:
            value = dq.normalize_temporal("TM", str(value))
        elif value is not None:
            value = str(value)
        out[c.attr] = value
    return out


def _dumps(ds: dict[str, Any]) -> str:
    return json.dumps(ds, separators=(",", ":"))
