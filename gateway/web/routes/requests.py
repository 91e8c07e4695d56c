"""Study requests on the web: an investigator asks for a study set (`POST
/api/projects/{project}/requests`, or the form of `/projects/{project}/requests`: a list or a
cohort CSV) and follows each request; a data manager sees them there and decides with
`sphere requests approve|decline ID` (the values open on the trusted side only).

The values are originals: sealed to the vault's inbox as they arrive (`core.requests`), never
written in clear, never shown back. What an approved request found is told per item by its
position in the list given ("item 3: not found")."""

from __future__ import annotations

from html import escape
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from core import Core, SphereError, access, projects
from core import requests as study_requests
from gateway.web.deps import audit, member_access
from gateway.web.routes.pages import STYLE
from storage.models import StudyRequest

router = APIRouter()
MAX_UPLOAD = 1 << 20  # a cohort CSV of 10,000 rows is well under this
CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)


class Asked(BaseModel):
    """A request's items by kind (any of them; other fields are ignored)."""

    accession: list[str] = []
    patient_id: list[str] = []
    study_uid: list[str] = []


def request_json(core: Core, r: StudyRequest) -> dict[str, Any]:
    """A request as the API answers it: counts, states and times, never a value."""
    out: dict[str, Any] = {
        "id": r.id,
        "requested_by": r.requested_by,
        "requested_at": r.requested_at.isoformat() + "Z",
        "items": r.n_items,
        "kinds": r.kinds.split(","),
        "state": r.state,
        "decided_by": r.decided_by,
        "decided_at": r.decided_at.isoformat() + "Z" if r.decided_at else None,
        "reason": r.reason,
        "job": None,
        "outcome": None,
    }
    if r.job_id:
        job = core.catalog.job(r.job_id)
        if job is not None:
            out["job"] = {"id": job.id, "state": job.state, "outcome": job.outcome}
    found = study_requests.outcome(core, r)
    if found is not None:
        out["outcome"] = {
            **found.counts,
            "per_item": [
                "not looked up yet" if f is None else "not found" if f == 0 else f"found {f}"
                for f in found.found
            ],
        }
    return out


def _submit(core: Core, project: str, request: Request, values: dict[str, list[str]]) -> Any:
    user = member_access(project, request, "request.submit").user
    return _record(core, project, request, values, user)


def _record(
    core: Core, project: str, request: Request, values: dict[str, list[str]], user: Any
) -> StudyRequest:
    try:
        row = study_requests.submit(core, project, values, user=user)
    except access.NotAllowed as e:
        raise HTTPException(403, str(e)) from None
    except SphereError as e:  # no items, too many, requests not open yet
        raise HTTPException(400, str(e)) from None
    audit(request, request_id=row.id, items=row.n_items)
    return row


@router.post("/api/projects/{project}/requests", status_code=201)
def submit(project: str, body: Asked, request: Request) -> dict[str, Any]:
    audit(request, "request.submit")
    core: Core = request.app.state.core
    given = {k: v for k, v in body.model_dump().items() if v}
    return request_json(core, _submit(core, project, request, given))


@router.get("/api/projects/{project}/requests")
def listed(project: str, request: Request) -> list[dict[str, Any]]:
    audit(request, "request.read")
    p = member_access(project, request, "request.read").project
    core: Core = request.app.state.core
    return [request_json(core, r) for r in core.catalog.requests(p.id)]


@router.post("/projects/{project}/requests")
async def submit_form(
    project: str,
    request: Request,
    kind: str = Form("accession"),
    values: str = Form(""),
    cohort: UploadFile | None = File(None),
) -> Response:
    """The page's form: a list (one value a line) of one kind, or a cohort CSV."""
    audit(request, "request.submit")
    core: Core = request.app.state.core
    user = (await run_in_threadpool(member_access, project, request, "request.submit")).user
    given: dict[str, list[str]] = {}
    if cohort is not None and cohort.filename:
        data = await cohort.read(MAX_UPLOAD + 1)
        if len(data) > MAX_UPLOAD:
            raise HTTPException(413, "a cohort file of at most 1 MB")
        try:
            given = projects.parse_cohort_csv(data, "the cohort file")
        except SphereError as e:
            raise HTTPException(400, str(e)) from None
    elif values.strip():
        given = {kind: values.split()}
    await run_in_threadpool(_record, core, project, request, given, user)
    return RedirectResponse(f"/projects/{quote(project)}/requests", status_code=303)


@router.get("/projects/{project}/requests")
def requests_page(project: str, request: Request) -> HTMLResponse:
    audit(request, "request.page")
    member = member_access(project, request, "request.read")
    core: Core = request.app.state.core
    rows = []
    for r in map(lambda r: request_json(core, r), core.catalog.requests(member.project.id)):
        found = r["outcome"]
        if r["state"] == "declined":
            what = f"declined: {r['reason']}"
        elif found:
            missing = [str(i) for i, s in enumerate(found["per_item"], 1) if s == "not found"]
            what = (
                f"found {found['found']}, not found {found['not_found']}"
                + (f" (items {', '.join(missing[:50])})" if missing else "")
                + f", not looked up yet {found['not_looked_up']}; "
                f"{found['studies_stored']} studies stored"
            )
        else:
            what = "waiting for a data manager"
        job = r["job"]
        cells = [r["id"], r["requested_by"], f"{r['items']} {'/'.join(r['kinds'])}", r["state"]]
        cells += [f"{job['id']} {job['state']}" if job else "-", what]
        rows.append("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in cells) + "</tr>")
    form = ""
    if access.allows("request.submit", {member.role}):
        kinds = "".join(f"<option>{k}</option>" for k in projects.COHORT_KINDS)
        form = (
            f'<h2>Ask for a study set</h2><form method=post enctype="multipart/form-data" '
            f'action="/projects/{escape(quote(project))}/requests">'
            f"<p><select name=kind>{kinds}</select> one a line:<br>"
            "<textarea name=values rows=6 cols=60></textarea></p>"
            "<p>or a cohort CSV (columns accession, patient_id, study_uid): "
            "<input type=file name=cohort accept=.csv,text/csv></p><button>Send</button></form>"
            "<p>A data manager approves or declines it; the values are kept sealed, and "
            "shown again to nobody here.</p>"
        )
    elif access.allows("request.decide", core.catalog.user_roles(member.user.id)):
        form = "<p>Decide with <code>sphere requests approve ID</code> or <code>decline</code>.</p>"
    html = (
        f"<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{escape(project)}: requests</title><style>{STYLE}</style></head><body>"
        f'<p><a href="/">&lsaquo; sphere</a></p><h1>{escape(project)}: study requests</h1>'
        "<table><thead><tr><th>id</th><th>by</th><th>items</th><th>state</th><th>pull</th>"
        f"<th>outcome</th></tr></thead><tbody>{''.join(rows)}</tbody></table>{form}"
        "</body></html>"
    )
    headers = {"Cache-Control": "no-store", "Content-Security-Policy": CSP}
    return HTMLResponse(html, headers=headers)
