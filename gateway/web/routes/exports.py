"""Exports on the web: a project's exports page (`/projects/{project}/exports`), starting one
(POST: recorded, then written by a job node, `processing.export`), a link that expires (POST
`.../exports/{id}/link`, `gateway.links`), and the download a link leads to
(`/exports/{id}/download`: the link is the credential; each download audited; on S3 a redirect
to a short presigned GET). Who may: the role table's `export` (a data manager, an investigator
of the project)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from html import escape
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from core import Core, SphereError, access
from gateway import jobs, links
from gateway.web.deps import audit, base_url, get_core, member_access
from gateway.web.routes.pages import _page
from storage.objectstore import local_path

router = APIRouter()


@router.get("/projects/{project}/exports")
def page(project: str, request: Request, core: Core = Depends(get_core)) -> HTMLResponse:
    """The project's exports, a form to start one, and a link button for each finished one."""
    p = member_access(project, request, "export").project
    audit(request, "export.list")
    here = f"/projects/{quote(p.name)}/exports"
    rows = []
    for r in core.catalog.exports(p.name):
        button = ""
        if r.state == "done":
            button = (
                f'<form method=post action="{escape(here)}/{escape(r.id)}/link">'
                "<input name=hours type=number value=24 min=1 max=168 size=4> h "
                "<button>Download link</button></form>"
            )
        rows.append(
            f"<tr><td><code>{escape(r.id)}</code></td><td>{escape(r.format)}</td>"
            f"<td>{escape(r.state)}</td><td>{r.n_series}</td><td>{r.nbytes / 1e6:.1f} MB</td>"
            f"<td>{escape(r.actor)}</td><td>{r.created_at:%Y-%m-%d %H:%M}</td>"
            f"<td>{button}</td></tr>"
        )
    table = (
        "<table><tr><th>export</th><th>format</th><th>state</th><th>series</th><th>size</th>"
        "<th>by</th><th>created (UTC)</th><th></th></tr>" + "".join(rows) + "</table>"
        if rows
        else "<p>No exports yet.</p>"
    )
    form = (
        f'<form method=post action="{escape(here)}"><label>Format <select name=format>'
        "<option>dicom</option><option>nifti</option><option>zarr</option></select></label> "
        "<label>Modality <input name=modality size=4 placeholder=any></label> "
        "<label>Study UIDs <input name=studies size=40 placeholder='all (space-separated)'>"
        "</label> <button>Export</button></form>"
    )
    body = f"<h1>{escape(p.name)}: exports</h1><p><a href=/>home</a></p>{form}{table}"
    return _page(f"{p.name} exports", body)


@router.post("/projects/{project}/exports")
def start(
    project: str,
    request: Request,
    format: str = Form("dicom"),
    modality: str = Form(""),
    studies: str = Form(""),
    core: Core = Depends(get_core),
) -> Response:
    """Start an export of the project: recorded, and queued as a job (`sphere serve` runs a
    node, unless --no-jobs) that writes it to the store."""
    audit(request, "export", format=format)
    user = member_access(project, request, "export").user
    from processing import export

    try:
        row = export.start(
            core, project, format, studies=studies.split(), modality=modality.strip(), user=user
        )
        audit(request, export=row.id)
        jobs.submit(core, "export", project, export=row.id, user=user)  # a node writes it
    except access.NotAllowed as e:
        raise HTTPException(403, str(e)) from None
    except SphereError as e:  # an unknown format, nothing to export, a closed project
        raise HTTPException(400, str(e)) from None
    return RedirectResponse(f"/projects/{quote(project)}/exports", status_code=303)


@router.post("/projects/{project}/exports/{export_id}/link")
def make_link(
    project: str,
    export_id: str,
    request: Request,
    hours: float = Form(24.0),
    core: Core = Depends(get_core),
) -> HTMLResponse:
    """A download link of one of the project's exports that stops working after `hours`."""
    audit(request, "export.link", export=export_id)
    user = member_access(project, request, "export").user
    row = core.catalog.export(export_id)
    if row is None or row.project != project:
        raise HTTPException(404, "not found")
    try:
        url, expires = links.link(core, export_id, hours, user=user, base_url=base_url(request))
    except access.NotAllowed as e:
        raise HTTPException(403, str(e)) from None
    except SphereError as e:
        raise HTTPException(400, str(e)) from None
    until = datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = (
        f"<h1>Download link</h1><p>Export <code>{escape(export_id)}</code>, works until "
        f'{until}:</p><p><a href="{escape(url)}">{escape(url)}</a></p>'
        f'<p><a href="/projects/{quote(project)}/exports">back</a></p>'
    )
    return _page("download link", body)


@router.get("/exports/{export_id}/download")
def download(
    export_id: str,
    request: Request,
    expires: str = "",
    sig: str = "",
    core: Core = Depends(get_core),
) -> Response:
    """The zip a signed link leads to: its signature and time checked, the project still
    approved and in date; refused otherwise (403), audited either way. A local zip is streamed;
    one on S3 is a 307 to a presigned GET of a few minutes (`links.presigned`)."""
    audit(request, "export.download", export=export_id)
    record = request.state.audit
    row = core.catalog.export(export_id) if len(export_id) <= 32 else None
    record["actor"] = "link"  # whoever holds it; the maker once the link is found good
    if row is not None:
        record["project"] = row.project
    if row is None or not links.valid(core, export_id, expires, sig):
        audit(request, refused="export.download")
        raise HTTPException(403, "this link is not valid, or its time is over")
    record["actor"] = f"link:{row.actor}"
    project = core.catalog.project(row.project)
    problem = project.approval_problem(date.today()) if project else "no such project"
    if not problem and row.state == "done":
        path = local_path(core.store, row.key)
        if path is not None and path.exists():
            name = f"{row.project}-{row.id}.zip"
            return FileResponse(path, media_type="application/zip", filename=name)
        if path is None and (there := links.presigned(core, row, int(expires))):
            return RedirectResponse(there, status_code=307)
    audit(request, refused="export.download")
    raise HTTPException(403, problem or "this export is no longer kept")
