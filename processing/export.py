"""Exports: a project's study set as one zip in the store, `exports/<project>/<id>.zip`.

    row = export(core, "bone-2026", "nifti", studies=[...], modality="CT")

The zip is written as a stream (`storage.zipstream` into `storage.objectstore.Upload`: a
multipart upload on S3, a file in a local folder), never whole in memory or on local disk. It
holds, by format:
  dicom   dicom/<patient>/<study>/<series>/<sop>.dcm: each instance as WADO-RS serves it
  nifti   nifti/<patient>/<study>/<series>.nii.gz and .json: each image series (`nifti`)
  zarr    zarr/<study>/<series>/...: the series groups as stored
and last `manifest.json`: pseudonymous patients, studies (shifted dates) and series, the
de-identification method codes and the project's profile, each file's size and sha256, and
the pipeline results of those series. Everything in it is pseudonymous, as the store is.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Iterable, Iterator
from typing import Any

from core import Core, SphereError, access, projects
from dicom import json_model
from processing import nifti
from processing.loader import LoadError
from storage.catalog import IndexedSeries, IndexedStudy
from storage.models import Export
from storage.objectstore import Upload, guard, run
from storage.series import SeriesReader, part10_chunks
from storage.zipstream import ZipStream

log = logging.getLogger(__name__)
FORMATS = ("dicom", "nifti", "zarr")
_READ = 8 << 20  # bytes per ranged read of a stored object (a local series is one big shard)


def export_key(project: str, export_id: str) -> str:
    return f"exports/{project}/{export_id}.zip"


def start(
    core: Core,
    project: str,
    fmt: str,
    *,
    studies: Iterable[str] = (),
    modality: str | None = None,
    user: Any = None,
) -> Export:
    """Check (export on the project, the project active, something to export) and record an
    export as running; `write` makes it."""
    if fmt not in FORMATS:
        raise SphereError(f"--format is one of: {', '.join(FORMATS)} (not '{fmt}')")
    core.project(project)  # an unknown project says so first
    who = access.require(core, "export", project, user=user, format=fmt)
    p = projects.require_active(core, project, "export", actor=who.name)
    wanted = sorted({s.strip() for s in studies if s.strip()})
    rows = core.catalog.export_series(p.id, wanted, modality or None)
    missing = set(wanted) - {se.study_uid for se, _ in rows}
    if missing:
        raise SphereError(f"{len(missing)} of the studies given are not stored in '{project}'")
    if not rows:
        raise SphereError(f"nothing to export: no stored series of '{project}' match")
    export_id = secrets.token_hex(8)
    selection = {"studies": wanted, "modality": modality or None}
    row = core.catalog.add_export(
        Export(
            id=export_id,
            project=project,
            actor=who.name,
            format=fmt,
            selection=selection,
            patients=sorted({st.patient_id or "" for _, st in rows}),
            key=export_key(project, export_id),
            n_series=len(rows),
        )
    )
    core.catalog.audit(
        who.name, "export", project, "started", export=export_id, format=fmt, series=len(rows)
    )
    return row


def write(core: Core, row: Export) -> Export:
    """Write the zip of a started export to the store; records and audits how it ended."""
    p = core.project(row.project)
    sel = row.selection or {}
    rows = core.catalog.export_series(p.id, sel.get("studies") or (), sel.get("modality"))
    upload = Upload(core.store, row.key)
    z = ZipStream()
    try:
        for piece in _zip(core, row, rows, z):
            upload.write(piece)
        upload.close()
    except BaseException as e:
        upload.abort()
        why = str(e) if isinstance(e, SphereError) else type(e).__name__
        core.catalog.finish_export(row.id, state="failed", error=why)
        core.catalog.audit(row.actor, "export", row.project, "error", export=row.id, error=why)
        raise
    core.catalog.finish_export(row.id, state="done", nbytes=z.nbytes, n_files=len(z.entries))
    core.catalog.audit(
        row.actor, "export", row.project, export=row.id, nbytes=z.nbytes, n_files=len(z.entries)
    )
    return core.catalog.export(row.id) or row


def export(
    core: Core,
    project: str,
    fmt: str,
    *,
    studies: Iterable[str] = (),
    modality: str | None = None,
    user: Any = None,
) -> Export:
    """Start and write an export (what `sphere export` runs)."""
    return write(core, start(core, project, fmt, studies=studies, modality=modality, user=user))


# -- the zip ---------------------------------------------------------------------------------


def _zip(
    core: Core, row: Export, rows: list[tuple[IndexedSeries, IndexedStudy]], z: ZipStream
) -> Iterator[bytes]:
    series_docs: dict[str, dict[str, Any]] = {}
    for se, st in rows:
        reader = SeriesReader(core.store, se.storage_key)
        patient = st.patient_id or "unknown"
        doc = _series_doc(se, reader)
        series_docs[se.series_uid] = doc
        before = len(z.entries)
        if row.format == "dicom":
            folder = f"dicom/{patient}/{se.study_uid}/{se.series_uid}"
            for sop, chunks in part10_chunks(reader):  # the pixels not copied on the way
                yield from z.add(f"{folder}/{sop}.dcm", chunks)
        elif row.format == "nifti":
            stem = f"nifti/{patient}/{se.study_uid}/{se.series_uid}"
            try:
                nifti.check(reader)
            except LoadError as e:
                doc["skipped"] = str(e)  # an SR, a colour cine: no NIfTI of it
                continue
            yield from z.add(f"{stem}.nii.gz", nifti.nii_gz(reader))
            side = {**nifti.sidecar(reader), **_uids(se, st)}
            yield from z.add(f"{stem}.json", [_json(side)])
        else:
            prefix = se.storage_key.rstrip("/") + "/"
            folder = f"zarr/{se.study_uid}/{se.series_uid}/"
            for key in _keys(core.store, prefix):
                yield from z.add(folder + key[len(prefix) :], _object(core.store, key))
        doc["files"] = [e.name for e in z.entries[before:]]
    manifest = _manifest(core, row, rows, series_docs, z)
    yield from z.add("manifest.json", [_json(manifest)])
    yield from z.close()


def _uids(se: IndexedSeries, st: IndexedStudy) -> dict[str, Any]:
    return {
        "patient": st.patient_id,
        "study_uid": se.study_uid,
        "series_uid": se.series_uid,
        "study_date": st.study_date,
    }


def _series_doc(se: IndexedSeries, reader: SeriesReader) -> dict[str, Any]:
    return {
        "series_uid": se.series_uid,
        "modality": se.modality,
        "series_number": se.series_number,
        "description": se.series_description,
        "series_date": se.series_date,
        "instances": se.n_instances,
        "deidentification_method_codes": _method_codes(reader.header(0) if len(reader) else {}),
    }


def _method_codes(header: dict[str, Any]) -> list[dict[str, str]]:
    """CID 7050 codes of a stored instance's De-identification Method Code Sequence."""
    out = []
    for item in json_model.values(header, "00120064"):
        value = json_model.first(item, "00080100") or ""
        meaning = json_model.first(item, "00080104") or ""
        out.append({"code": value, "scheme": "DCM", "meaning": meaning})
    return out


def _manifest(
    core: Core,
    row: Export,
    rows: list[tuple[IndexedSeries, IndexedStudy]],
    series_docs: dict[str, dict[str, Any]],
    z: ZipStream,
) -> dict[str, Any]:
    project = core.project(row.project)
    codes = core.profile(row.project).method_codes()
    patients: dict[str, dict[str, Any]] = {}
    for se, st in rows:
        pat = patients.setdefault(st.patient_id or "unknown", {"studies": {}})
        study = pat["studies"].setdefault(
            st.study_uid,
            {
                "study_uid": st.study_uid,
                "study_date": st.study_date,  # shifted by the project's key
                "description": st.study_description,
                "series": [],
            },
        )
        study["series"].append(series_docs[se.series_uid])
    wanted = set(series_docs)
    results = [
        {
            "pipeline": r.pipeline,
            "version": r.version,
            "study_uid": r.study_uid,
            "series_uid": r.series_uid,
            "status": r.status,
            "reason": r.reason,
            "values": r.values,
            "sr_series_uid": r.sr_series_uid,
            "seg_series_uid": r.seg_series_uid,
        }
        for r in core.catalog.results(project.id)
        if r.series_uid in wanted
    ]
    return {
        "export": row.id,
        "project": row.project,
        "format": row.format,
        "created_by": row.actor,
        "created_at": row.created_at.isoformat() + "Z" if row.created_at else None,
        "selection": row.selection,
        "deidentification": {
            "method_codes": [{"code": c, "scheme": "DCM", "meaning": m} for c, m in codes],
            "profile": project.deid_profile or {},
            "dates": "shifted per patient by the project's key",
        },
        "patients": [
            {"patient": pid, "studies": list(p["studies"].values())} for pid, p in patients.items()
        ],
        "results": results,
        "files": [{"name": e.name, "size": e.size, "sha256": e.sha256} for e in z.entries],
    }


def _json(value: Any) -> bytes:
    return json.dumps(value, indent=1, ensure_ascii=False, default=str).encode()


# -- reading stored objects ----------------------------------------------------------------------


def _keys(store: Any, prefix: str) -> list[str]:
    async def listed() -> list[str]:
        return sorted([k async for k in store.list_prefix(prefix) if k.startswith(prefix)])

    with guard("list"):
        return run(listed())


def _object(store: Any, key: str) -> Iterator[bytes]:
    """An object's bytes in ranged reads of `_READ` (one in memory at a time)."""
    from zarr.abc.store import RangeByteRequest
    from zarr.core.buffer import default_buffer_prototype

    with guard("read"):
        size = run(store.getsize(key))
    proto = default_buffer_prototype()
    for start in range(0, size, _READ):
        with guard("read"):
            buf = run(store.get(key, proto, RangeByteRequest(start, min(start + _READ, size))))
        yield buf.to_bytes()
