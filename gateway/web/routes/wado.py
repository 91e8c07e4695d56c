"""WADO-RS: instances (multipart application/dicom), metadata (DICOM JSON, gzip, ETag),
frames and bulk data (octet-stream), rendered images and thumbnails (JPEG, PNG).

Every lookup goes through the catalog's index within the caller's project before anything is
read or sent: an unknown UID is 404 before the response starts.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Callable, Iterator

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.routing import Route

from dicom import json_model
from gateway.web import wado
from gateway.web.accept import (
    DICOM_XML,
    negotiate_bulkdata,
    negotiate_dicom,
    negotiate_metadata,
    negotiate_rendered,
    wants_zip,
)
from gateway.web.cache import Located
from gateway.web.deps import Access, audit, catalog_cache, dicomweb_root, project_access
from gateway.web.multipart import MultipartWriter
from gateway.web.render import PixelAttributes, parse_render_params, render_frame
from storage.catalog import IndexedSeries
from storage.zipstream import ZipStream

router = APIRouter()
GZIP_MIN = 1024
MAX_FRAMES = 64  # frame numbers in one request: each is a part held in memory


def _series(
    request: Request, access: Access, study: str, series: str | None = None
) -> list[IndexedSeries]:
    rows = catalog_cache(request).series(access.project.id, study, series)
    if not rows:
        raise HTTPException(404, "not found")
    return rows


def _instance(
    request: Request, access: Access, study: str, series: str, sop: str
) -> tuple[IndexedSeries, Located]:
    found = catalog_cache(request).instance(access.project.id, study, series, sop)
    if found is None:
        raise HTTPException(404, "not found")
    return found


def _readers(request: Request) -> wado.Readers:
    return request.app.state.readers


# -- instances ---------------------------------------------------------------------------------


def _dicom_response(
    request: Request, access: Access, parts: Iterator[tuple[IndexedSeries, str, bytes]]
) -> StreamingResponse:
    """Each instance one part, its Content-Location its WADO-RS URL (PS3.18 8.6.1.2)."""
    chosen = negotiate_dicom(
        request.headers.get("accept"), accept_query=request.query_params.get("accept")
    )
    root = dicomweb_root(request, access.project.name)
    writer = MultipartWriter(
        (
            (chosen.part_content_type, body, {"Content-Location": _instance_url(root, se, sop)})
            for se, sop, body in parts
        ),
        part_type=chosen.media_type,
    )
    return StreamingResponse(iter(writer), media_type=writer.content_type)


def _wants_zip(request: Request) -> bool:
    return wants_zip(request.headers.get("accept"), accept_query=request.query_params.get("accept"))


def _zip_response(
    name: str, parts: Iterator[tuple[IndexedSeries, str, bytes]]
) -> StreamingResponse:
    """The instances as one zip (DICOM Supplement 211), `<study>/<series>/<sop>.dcm`, each as
    the multipart answer would carry it; written as it is sent."""

    def body() -> Iterator[bytes]:
        z = ZipStream()
        for se, sop, data in parts:
            yield from z.add(f"{se.study_uid}/{se.series_uid}/{sop}.dcm", [data])
        yield from z.close()

    disposition = {"Content-Disposition": f'attachment; filename="{name}.zip"'}
    return StreamingResponse(body(), media_type="application/zip", headers=disposition)


def _instance_url(root: str, se: IndexedSeries, sop: str) -> str:
    return f"{root}/studies/{se.study_uid}/series/{se.series_uid}/instances/{sop}"


def _with_series(
    se: IndexedSeries, parts: Iterator[tuple[str, bytes]]
) -> Iterator[tuple[IndexedSeries, str, bytes]]:
    for sop, body in parts:
        yield se, sop, body


@router.get("/studies/{study}")
def retrieve_study(
    study: str,
    request: Request,
    access: Access = Depends(project_access),
):
    rows = _series(request, access, study)
    readers = [_readers(request).get(se) for se in rows]
    as_zip = _wants_zip(request)
    audit(request, "wado.study", study=study, format="zip" if as_zip else None)

    def parts() -> Iterator[tuple[IndexedSeries, str, bytes]]:
        for se, reader in zip(rows, readers, strict=True):
            yield from _with_series(se, wado.instances(reader))

    if as_zip:
        return _zip_response(study, parts())
    return _dicom_response(request, access, parts())


@router.get("/studies/{study}/series/{series}")
def retrieve_series(
    study: str,
    series: str,
    request: Request,
    access: Access = Depends(project_access),
):
    (se,) = _series(request, access, study, series)
    reader = _readers(request).get(se)
    as_zip = _wants_zip(request)
    audit(request, "wado.series", study=study, series=series, format="zip" if as_zip else None)
    if as_zip:
        return _zip_response(series, _with_series(se, wado.instances(reader)))
    return _dicom_response(request, access, _with_series(se, wado.instances(reader)))


@router.get("/studies/{study}/series/{series}/instances/{sop}")
def retrieve_instance(
    study: str,
    series: str,
    sop: str,
    request: Request,
    access: Access = Depends(project_access),
):
    se, inst = _instance(request, access, study, series, sop)
    reader = _readers(request).get(se)
    audit(request, "wado.instance", study=study, series=series, instance=sop)
    return _dicom_response(
        request, access, _with_series(se, wado.instances(reader, [inst.position]))
    )


# -- metadata ----------------------------------------------------------------------------------


def _json(
    request: Request, version: list[str], build: Callable[[], list[str]], root: str
) -> Response:
    """A JSON array of the texts `build` gives (or, for application/dicom+xml, a multipart of
    their XML, one part an instance), with an ETag (304 when the client has it) and gzip when
    accepted (level 1: most of the gain for a fraction of the time)."""
    chosen = negotiate_metadata(
        request.headers.get("accept"), accept_query=request.query_params.get("accept")
    )
    tag = hashlib.sha256("|".join([chosen.media_type, *version]).encode()).hexdigest()[:32]
    etag = f'"{tag}"'
    headers = {"ETag": etag, "Cache-Control": "private, no-cache", "Vary": "Accept-Encoding"}
    sent = request.headers.get("if-none-match", "")
    if etag in {t.strip().removeprefix("W/") for t in sent.split(",")} or sent.strip() == "*":
        return Response(status_code=304, headers=headers)
    media_type = chosen.content_type()
    if chosen.media_type == DICOM_XML:
        models = [json.loads(text) for text in build()]
        writer = wado.xml_multipart((m, _metadata_url(root, m)) for m in models)
        body, media_type = b"".join(writer), writer.content_type
    else:
        body = ("[" + ",".join(build()) + "]").encode()
    if "gzip" in request.headers.get("accept-encoding", "").lower() and len(body) >= GZIP_MIN:
        body = gzip.compress(body, 1)
        headers["Content-Encoding"] = "gzip"
    return Response(body, media_type=media_type, headers=headers)


def _metadata_url(root: str, model: dict) -> str | None:
    uids = [json_model.first(model, t) for t in _UID_TAGS]
    if not all(isinstance(u, str) for u in uids):
        return None
    return f"{root}/studies/{uids[0]}/series/{uids[1]}/instances/{uids[2]}/metadata"


_UID_TAGS = ("0020000D", "0020000E", "00080018")  # study, series, SOP instance


def _version(root: str, rows: list[IndexedSeries], *uids: str) -> list[str]:
    return [root, *uids, *(f"{se.series_uid}@{se.committed_at.isoformat()}" for se in rows)]


def _series_metadata(request: Request, root: str, se: IndexedSeries) -> list[str]:
    reader = _readers(request).get(se)
    return wado.series_metadata(reader, root, se.study_uid, se.series_uid)


@router.get("/studies/{study}/metadata")
def study_metadata(
    study: str,
    request: Request,
    access: Access = Depends(project_access),
):
    rows = _series(request, access, study)
    root = dicomweb_root(request, access.project.name)
    audit(request, "wado.study.metadata", study=study)
    return _json(
        request,
        _version(root, rows, study),
        lambda: [m for se in rows for m in _series_metadata(request, root, se)],
        root,
    )


@router.get("/studies/{study}/series/{series}/metadata")
def series_metadata(
    study: str,
    series: str,
    request: Request,
    access: Access = Depends(project_access),
):
    rows = _series(request, access, study, series)
    root = dicomweb_root(request, access.project.name)
    audit(request, "wado.series.metadata", study=study, series=series)
    return _json(
        request,
        _version(root, rows, study, series),
        lambda: _series_metadata(request, root, rows[0]),
        root,
    )


@router.get("/studies/{study}/series/{series}/instances/{sop}/metadata")
def instance_metadata(
    study: str,
    series: str,
    sop: str,
    request: Request,
    access: Access = Depends(project_access),
):
    se, inst = _instance(request, access, study, series, sop)
    root = dicomweb_root(request, access.project.name)
    audit(request, "wado.instance.metadata", study=study, series=series, instance=sop)

    def build() -> list[str]:
        reader = _readers(request).get(se)
        return [wado.instance_metadata(reader, root, study, series, inst.position)]

    return _json(request, _version(root, [se], study, series, sop), build, root)


# -- frames and bulk data ----------------------------------------------------------------------


def _frame_numbers(text: str) -> list[int]:
    try:
        numbers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise HTTPException(400, "frame numbers must be integers, e.g. 1 or 1,2") from None
    if not numbers or len(numbers) > MAX_FRAMES:
        raise HTTPException(400, f"give 1 to {MAX_FRAMES} frame numbers")
    return numbers


def _bulk_response(request: Request, frames: list[bytes], urls: list[str]) -> Response:
    """Frames or bulk data; in a multipart answer each part's Content-Location is its URL
    (`urls`, one per part: .../frames/N, or the BulkDataURI)."""
    chosen = negotiate_bulkdata(
        request.headers.get("accept"), accept_query=request.query_params.get("accept")
    )
    if not chosen.multipart:
        if len(frames) != 1:
            raise HTTPException(406, "several frames need multipart/related")
        return Response(frames[0], media_type=chosen.part_content_type)
    writer = MultipartWriter(
        (
            (chosen.part_content_type, f, {"Content-Location": url})
            for f, url in zip(frames, urls, strict=True)
        ),
        part_type=chosen.media_type,
    )
    # Frames are few and small: one write answers faster than a stream (one hop, one packet).
    return Response(b"".join(writer), media_type=writer.content_type)


def _pixels(
    request: Request, access: Access, study: str, series: str, sop: str
) -> tuple[IndexedSeries, Located]:
    se, inst = _instance(request, access, study, series, sop)
    if not inst.has_pixels:
        raise HTTPException(404, "this instance has no pixel data")
    return se, inst


# Frames and bulk data are plain Starlette routes put first in the app's list (`pixel_routes`):
# a viewer asks for hundreds a second, and FastAPI's route matching and dependency solving cost
# more than reading a frame. Same access check, same error handlers. From a local folder with
# a SQLite catalog the answer is made on the event loop (a page-cache read, as nginx does it,
# and a local one-row read): the hop to a thread cost more than both. From S3, or with a
# PostgreSQL catalog (a round trip that would stall every other request), it is made in a thread.


async def _pixel_route(request: Request, answer: Callable[[Request], Response]) -> Response:
    if request.app.state.pixels_on_loop:
        return answer(request)
    return await run_in_threadpool(answer, request)


async def retrieve_frames(request: Request) -> Response:
    """GET .../instances/{sop}/frames/{frames}"""
    return await _pixel_route(request, _frames)


async def retrieve_bulkdata(request: Request) -> Response:
    """GET .../instances/{sop}/bulkdata/{tag} (Pixel Data only: nothing else is bulk)"""
    return await _pixel_route(request, _bulkdata)


def _frames(request: Request) -> Response:
    p = request.path_params
    numbers = _frame_numbers(p["frames"])
    access = project_access(p["project"], request)
    se, inst = _pixels(request, access, p["study"], p["series"], p["sop"])
    try:
        zs = wado.frame_slices(_readers(request).get(se), inst.position, numbers)
    except IndexError:
        raise HTTPException(404, "no such frame") from None
    audit(request, "wado.frames", **_uids(p), frames=len(numbers))
    frames = _readers(request).frames(se)
    data = [frames.raw(z) for z in zs]
    base = _instance_url(dicomweb_root(request, access.project.name), se, p["sop"])
    return _bulk_response(request, data, [f"{base}/frames/{n}" for n in numbers])


def _bulkdata(request: Request) -> Response:
    p = request.path_params
    access = project_access(p["project"], request)
    if p["tag"].upper() != wado.PIXEL_DATA:
        raise HTTPException(404, "not found")
    se, inst = _instance(request, access, p["study"], p["series"], p["sop"])
    audit(request, "wado.bulkdata", **_uids(p))
    root = dicomweb_root(request, access.project.name)
    url = [f"{_instance_url(root, se, p['sop'])}/bulkdata/{wado.PIXEL_DATA}"]  # its BulkDataURI
    if inst.has_pixels:  # every frame, end to end: the Pixel Data value
        frames = _readers(request).frames(se)
        zs = _readers(request).get(se).frame_slices(inst.position)
        return _bulk_response(request, [b"".join(frames.raw(z) for z in zs)], url)
    inline = wado.inline_pixels(_readers(request).get(se).header(inst.position))
    if inline is None:
        raise HTTPException(404, "this instance has no pixel data")
    return _bulk_response(request, [inline], url)


def pixel_routes(prefix: str) -> list[Route]:
    """The frames and bulk data routes under `prefix` (the project's DICOMweb root)."""
    instance = prefix + "/studies/{study}/series/{series}/instances/{sop}"
    return [
        Route(instance + "/frames/{frames}", retrieve_frames, methods=["GET"]),
        Route(instance + "/bulkdata/{tag}", retrieve_bulkdata, methods=["GET"]),
    ]


def _uids(path: dict[str, str]) -> dict[str, str]:
    return {"study": path["study"], "series": path["series"], "instance": path["sop"]}


# -- rendered ----------------------------------------------------------------------------------


def _rendered(
    request: Request, se: IndexedSeries, position: int, frame: int, thumbnail: bool
) -> Response:
    """Frame `frame` (from 0) of the image at `position`, rendered."""
    chosen = negotiate_rendered(
        request.headers.get("accept"), accept_query=request.query_params.get("accept")
    )
    options = parse_render_params(request.query_params.multi_items())
    reader = _readers(request).get(se)
    try:
        (z,) = wado.frame_slices(reader, position, [frame + 1])
    except IndexError:
        raise HTTPException(404, "no such frame") from None
    attrs = PixelAttributes.from_dataset_json(reader.header(position), frame)
    body = render_frame(
        _readers(request).frames(se).frame(z),
        attrs,
        media_type=chosen.media_type,
        options=options,
        thumbnail=thumbnail,
    )
    return Response(body, media_type=chosen.media_type)


_INSTANCE = "/studies/{study}/series/{series}/instances/{sop}"


@router.get(_INSTANCE + "/rendered")
@router.get(_INSTANCE + "/thumbnail")
@router.get(_INSTANCE + "/frames/{frame}/rendered")
@router.get(_INSTANCE + "/frames/{frame}/thumbnail")
def instance_image(
    study: str,
    series: str,
    sop: str,
    request: Request,
    access: Access = Depends(project_access),
):
    """An instance's image, rendered or as a thumbnail: the frame asked for, else the first
    (a cine's first frame)."""
    kind = _image_kind(request)
    se, inst = _pixels(request, access, study, series, sop)
    try:
        frame = int(request.path_params.get("frame", "1")) - 1
    except ValueError:
        raise HTTPException(400, "a frame number is an integer") from None
    audit(request, f"wado.{kind}", study=study, series=series, instance=sop)
    return _rendered(request, se, inst.position, frame, kind == "thumbnail")


def _image_kind(request: Request) -> str:
    """ "rendered" or "thumbnail": the routes of both share their functions."""
    return request.url.path.rsplit("/", 1)[1]


def _middle_image(request: Request, se: IndexedSeries) -> Response:
    """A series' (or study's) representative image, as Orthanc and dicomweb-client take it: one
    image, not a multipart of every instance; the middle slice shows more than an end one."""
    reader = _readers(request).get(se)
    n = int(reader.attrs["n_slices"])
    if not n:
        raise HTTPException(404, "this series has no images")
    position, frame = wado.image_at_slice(reader, n // 2)
    return _rendered(request, se, position, frame, _image_kind(request) == "thumbnail")


@router.get("/studies/{study}/series/{series}/rendered")
@router.get("/studies/{study}/series/{series}/thumbnail")
def series_image(
    study: str,
    series: str,
    request: Request,
    access: Access = Depends(project_access),
):
    """A series' middle image, rendered or as a thumbnail."""
    (se,) = _series(request, access, study, series)
    audit(request, f"wado.{_image_kind(request)}", study=study, series=series)
    return _middle_image(request, se)


@router.get("/studies/{study}/rendered")
@router.get("/studies/{study}/thumbnail")
def study_image(
    study: str,
    request: Request,
    access: Access = Depends(project_access),
):
    """A study's representative image (the middle one of its first series with images)."""
    rows = _series(request, access, study)
    audit(request, f"wado.{_image_kind(request)}", study=study)
    readers = _readers(request)  # opened one by one, up to the first with images
    imaged = next((se for se in rows if int(readers.get(se).attrs["n_slices"])), rows[0])
    return _middle_image(request, imaged)
