"""A project's pipeline results where researchers look (`/projects/{project}/results`): the table
`sphere results` gives (pseudonymous patient, shifted study date, value, class, reason, flags),
each series' PNG report, and the table as CSV or Parquet. Reading is results.read; taking the
table away is export, as on the command line."""

from __future__ import annotations

import tempfile
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, Response

from core import Core, SphereError
from gateway.web.deps import audit, member_access
from gateway.web.routes.pages import STYLE
from processing.outputs import get_bytes
from processing.results import result_rows, write_csv, write_parquet

router = APIRouter()
CSP = (
    "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
HEADER = (
    "patient", "study date", "series", "pipeline", "status", "value", "class", "reason", "flags"
)  # fmt: skip


def _value(row: dict[str, Any]) -> str:
    v = row.get("l1_hu", row.get("body_mean_hu"))
    return f"{v:.1f} HU" if isinstance(v, int | float) else "-"


@router.get("/projects/{project}/results")
def results_page(project: str, request: Request) -> HTMLResponse:
    audit(request, "results.page")
    member_access(project, request, "results.read")
    core: Core = request.app.state.core
    rows = result_rows(core, project)
    audit(request, rows=len(rows))
    base = f"/projects/{quote(project)}/results"
    cells, reports = [], []
    for r in rows:
        link = "/viewer/?" + urlencode({"StudyInstanceUIDs": r["study_uid"], "project": project})
        row = [r["study_date"] or "-", r["series_uid"][-12:], r["pipeline"], r["status"]]
        row += [_value(r), r.get("class") or "", r["reason"] or "", r.get("flags") or ""]
        first = f'<td><a href="{escape(link)}">{escape(r["patient"] or "-")}</a></td>'
        cells.append(f"<tr>{first}{''.join(f'<td>{escape(str(c))}</td>' for c in row)}</tr>")
        if r["report_key"]:
            src = f"{base}/{quote(r['series_uid'])}/{quote(r['pipeline'])}.png"
            caption = f"{r['patient']} {r['study_date']} {r['pipeline']}: {_value(r)}"
            reports.append(
                f'<figure><img src="{escape(src)}" alt="report" style="max-width:100%">'
                f"<figcaption>{escape(caption)}</figcaption></figure>"
            )
    table = (
        "<table><thead><tr>"
        + "".join(f"<th>{h}</th>" for h in HEADER)
        + "</tr></thead><tbody>"
        + "".join(cells)
        + "</tbody></table>"
        if rows
        else "<p>No results yet (<code>sphere run bone-density</code>).</p>"
    )
    html = (
        f"<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{escape(project)}: results</title><style>{STYLE}</style></head><body>"
        f'<p><a href="/">&lsaquo; sphere</a></p><h1>{escape(project)}: results</h1>'
        f'<p>{len(rows)} results. Download: <a href="/api{escape(base)}.csv">CSV</a> · '
        f'<a href="/api{escape(base)}.parquet">Parquet</a>. Patients by pseudonym, study '
        f"dates shifted as stored.</p>{table}<h2>Reports</h2>{''.join(reports) or '<p>none</p>'}"
        "</body></html>"
    )
    headers = {"Cache-Control": "no-store", "Content-Security-Policy": CSP}
    return HTMLResponse(html, headers=headers)


@router.get("/projects/{project}/results/{series}/{pipeline}.png")
def report(project: str, series: str, pipeline: str, request: Request) -> Response:
    """A series' PNG report, by the key its result row holds (never a path from the URL)."""
    audit(request, "results.report", series=series, pipeline=pipeline)
    access = member_access(project, request, "results.read")
    core: Core = request.app.state.core
    key = next(
        (
            r.report_key
            for r in core.catalog.results(access.project.id, pipeline)
            if r.series_uid == series and r.report_key
        ),
        None,
    )
    data = get_bytes(core.store, key) if key else None
    if data is None:
        raise HTTPException(404, "no report for this series")
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, no-store"})


@router.get("/api/projects/{project}/results.{fmt}")
def table(project: str, fmt: str, request: Request) -> Response:
    """The results table as `sphere results --csv/--parquet` writes it."""
    audit(request, "results.export", format=fmt)
    member_access(project, request, "export")
    if fmt not in ("csv", "parquet"):
        raise HTTPException(404, "results come as .csv or .parquet")
    core: Core = request.app.state.core
    rows = result_rows(core, project)
    with tempfile.TemporaryDirectory() as tmp:  # small: one row per series
        path = Path(tmp) / f"results.{fmt}"
        try:
            (write_csv if fmt == "csv" else write_parquet)(rows, path)
        except SphereError as e:  # pyarrow missing
            raise HTTPException(501, str(e)) from None
        data = path.read_bytes()
    media = "text/csv" if fmt == "csv" else "application/vnd.apache.parquet"
    name = f"{project}-results.{fmt}"
    return Response(
        data,
        media_type=media,
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )
