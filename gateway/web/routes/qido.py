"""QIDO-RS: searches of a project's studies, series and instances, from the catalog's index."""

from __future__ import annotations

import dataclasses
import json
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from core import Core
from dicom.json_model import first
from gateway.web import qido, wado
from gateway.web.accept import DICOM_XML, negotiate_metadata
from gateway.web.deps import Access, audit, dicomweb_root, get_core, project_access

router = APIRouter()
RETRIEVE_URL = "00081190"
# PS3.18's words for results cut at the server's maximum (a 299 Warning)
TRUNCATED = (
    "The number of results exceeded the maximum supported by the server. "
    "Additional results can be requested."
)


def search(
    request: Request,
    access: Access,
    core: Core,
    level: qido.Level,
    study: str | None = None,
    series: str | None = None,
) -> Response:
    chosen = negotiate_metadata(
        request.headers.get("accept"), accept_query=request.query_params.get("accept")
    )
    most = core.settings.web.max_results
    query = qido.parse_qido(
        request.query_params.multi_items(),
        level,
        study_uid=study,
        series_uid=series,
        max_limit=most,
    )
    page = dataclasses.replace(query, limit=most + 1) if query.capped else query  # more?
    hits = core.catalog.search(
        access.project.id,
        page,
        max_rows=core.settings.web.search_max_rows,
        deadline=time.monotonic() + core.settings.web.search_timeout_s,
    )
    if query.capped and len(hits) > most:
        hits = hits[:most]
        query = dataclasses.replace(query, warnings=(*query.warnings, TRUNCATED))
    root = dicomweb_root(request, access.project.name)
    results = []
    for hit in hits:
        url = f"{root}/studies/{hit.study_uid}"
        if level is not qido.Level.STUDY:
            url += f"/series/{hit.series_uid}"
        if level is qido.Level.INSTANCE:
            url += f"/instances/{hit.sop_uid}"
        hit.dataset[RETRIEVE_URL] = {"vr": "UR", "Value": [url]}
        results.append(qido.select(query, hit.dataset, fill_missing=True))
    # A UID from the path is recorded only when it named something here: a user may type anything.
    known = bool(results)
    audit(
        request,
        f"qido.{level}",
        study=study if known else None,
        series=series if known else None,
        results=len(results),
    )
    headers = {"Warning": ", ".join(qido.warning_headers(query))} if query.warnings else {}
    if chosen.media_type == DICOM_XML:  # one part a result, named by its RetrieveURL
        urls = [first(r, RETRIEVE_URL) for r in results]
        writer = wado.xml_multipart(zip(results, urls, strict=True))
        return Response(b"".join(writer), media_type=writer.content_type, headers=headers)
    return Response(
        json.dumps(results, separators=(",", ":")),
        media_type=chosen.content_type(),
        headers=headers,
    )


@router.get("/studies")
def studies(
    request: Request, access: Access = Depends(project_access), core: Core = Depends(get_core)
):
    return search(request, access, core, qido.Level.STUDY)


@router.get("/series")
def all_series(
    request: Request, access: Access = Depends(project_access), core: Core = Depends(get_core)
):
    return search(request, access, core, qido.Level.SERIES)


@router.get("/instances")
def all_instances(
    request: Request, access: Access = Depends(project_access), core: Core = Depends(get_core)
):
    return search(request, access, core, qido.Level.INSTANCE)


@router.get("/studies/{study}/series")
def study_series(
    study: str,
    request: Request,
    access: Access = Depends(project_access),
    core: Core = Depends(get_core),
):
    return search(request, access, core, qido.Level.SERIES, study)


@router.get("/studies/{study}/instances")
def study_instances(
    study: str,
    request: Request,
    access: Access = Depends(project_access),
    core: Core = Depends(get_core),
):
    return search(request, access, core, qido.Level.INSTANCE, study)


@router.get("/studies/{study}/series/{series}/instances")
def series_instances(
    study: str,
    series: str,
    request: Request,
    access: Access = Depends(project_access),
    core: Core = Depends(get_core),
):
    return search(request, access, core, qido.Level.INSTANCE, study, series)
