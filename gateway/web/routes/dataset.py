"""A project's image series as a training set over HTTP (`processing.remote` reads it): the
list of complete series, and each series' stored values with the attributes that make them a
MONAI `MetaTensor`, read from the store a block of slices at a time (never the whole volume in
the server's memory). Reading is study.read, as WADO-RS (the same pixels, fewer bytes and no
DICOM parsing on either side); each series read is a row of the audit trail."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import StreamingResponse

from core import Core
from gateway.web.deps import audit, member_access
from processing.loader import LOAD_ATTRS, LoadError, check_volume
from storage.catalog import SeriesRecord
from storage.series import SeriesReader

router = APIRouter()
BLOCK_BYTES = 16 << 20  # slices read from the store and sent at a time


def _listed(r: SeriesRecord, modality: str | None) -> bool:
    return bool(r.storage_key) and (modality is None or r.modality == modality)


@router.get("/api/projects/{project}/series")
def series_list(
    project: str, request: Request, modality: str | None = "CT"
) -> list[dict[str, Any]]:
    """The project's complete series (of `modality`; `?modality=` for all), as
    `SeriesDataset` lists them."""
    audit(request, "dataset.list", modality=modality)
    p = member_access(project, request, "study.read").project
    core: Core = request.app.state.core
    rows = core.catalog.series(p.id, status="complete")
    return [
        {
            "storage_key": r.storage_key,
            "series_uid": r.series_uid,
            "study_uid": r.study_uid,
            "modality": r.modality,
        }
        for r in rows
        if _listed(r, modality or None)
    ]


def _reader(project: str, series: str, request: Request, action: str) -> SeriesReader:
    audit(request, action, series=series)
    p = member_access(project, request, "study.read").project
    core: Core = request.app.state.core
    row = core.catalog.one_series(p.id, series)
    if row is None or row.status != "complete" or not row.storage_key:
        raise HTTPException(404, "no such series in this project")
    reader = SeriesReader(core.store, row.storage_key)
    try:
        check_volume(reader.attrs)
    except LoadError as e:
        raise HTTPException(422, str(e)) from None
    return reader


@router.get("/api/projects/{project}/series/{series}")
def series_attrs(project: str, series: str, request: Request) -> dict[str, Any]:
    """What makes the stored values a `MetaTensor`: geometry, rescale, modality, key."""
    reader = _reader(project, series, request, "dataset.attrs")
    return {"storage_key": reader.key, **{k: reader.attrs.get(k) for k in LOAD_ATTRS}}


@router.get("/api/projects/{project}/series/{series}/volume")
def series_volume(project: str, series: str, request: Request) -> StreamingResponse:
    """The stored values (z, y, x) as raw little-endian bytes of the attributes' dtype."""
    reader = _reader(project, series, request, "dataset.volume")
    volume = reader.volume
    if volume is None:  # check_volume said it has one; a series replaced meanwhile
        raise HTTPException(404, "no such series in this project")
    dtype = np.dtype(volume.dtype).newbyteorder("<")
    frame = int(np.prod(volume.shape[1:])) * dtype.itemsize
    step = max(1, BLOCK_BYTES // max(frame, 1))

    def blocks() -> Iterator[bytes]:
        for z in range(0, volume.shape[0], step):
            yield np.ascontiguousarray(volume[z : z + step], dtype=dtype).tobytes()

    audit(request, nbytes=frame * volume.shape[0])
    headers = {"Content-Length": str(frame * volume.shape[0]), "Cache-Control": "no-store"}
    return StreamingResponse(blocks(), media_type="application/octet-stream", headers=headers)
