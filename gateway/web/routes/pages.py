"""The small HTML side: sign-in (a token traded for a session cookie), the home page listing
the user's projects and their studies (pseudonymous) with links into the viewer, and grants."""

from __future__ import annotations

from datetime import date
from html import escape
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel

from core import Core, SphereError, access, users
from gateway.web import sessions
from gateway.web.deps import (
    Access,
    audit,
    base_url,
    failed,
    get_core,
    grant_access,
    throttle,
    user_from_request,
)

router = APIRouter()
STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:60rem;padding:0 1rem}"
    "table{border-collapse:collapse;width:100%}td,th{padding:.3rem .6rem;text-align:left;"
    "border-bottom:1px solid #ddd}code{font-size:.85em}"
)


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    html = (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>{body}</body></html>"
    )
    return HTMLResponse(html, status, headers={"Cache-Control": "no-store"})


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/signin")
def signin_form(next: str = "/") -> HTMLResponse:
    return _page(
        "Sign in",
        "<h1>sphere</h1><form method=post action=/signin>"
        f'<input type=hidden name=next value="{escape(_safe_next(next))}">'
        "<label>API token <input name=token type=password autocomplete=off size=50></label> "
        "<button>Sign in</button></form>",
    )


@router.post("/signin")
def signin(
    request: Request,
    token: str = Form(""),
    next: str = Form("/"),
    core: Core = Depends(get_core),
) -> Response:
    audit(request, "signin")
    throttle(request)  # past the limit, the token is not even tried
    user = users.authenticate(core, token.strip())
    if user is None:
        failed(request, "bad token")
        return _page(
            "Sign in", "<p>That token is not valid. <a href=/signin>Try again</a></p>", 401
        )
    request.state.audit["actor"] = user.name
    lifetime_s = core.settings.web.session_hours * 3600
    value = sessions.start(core.catalog, user, lifetime_s)
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(
        sessions.COOKIE,
        value,
        max_age=int(lifetime_s),
        httponly=True,
        samesite="lax",
        secure=base_url(request).startswith("https:"),  # a proxy's word only if trusted
        path="/",
    )
    return response


@router.post("/signout")
def signout(request: Request, core: Core = Depends(get_core)) -> Response:
    """Ends the session here, not only in this browser: its cookie is worth nothing after."""
    audit(request, "signout")
    user = user_from_request(request)
    if user is not None:
        request.state.audit["actor"] = user.name
    cookie = request.cookies.get(sessions.COOKIE)
    if cookie and sessions.well_formed(cookie):
        core.catalog.end_web_session(sessions.digest(cookie))
    response = RedirectResponse("/signin", status_code=303)
    response.delete_cookie(sessions.COOKIE, path="/")
    return response


@router.get("/")
def home(request: Request, core: Core = Depends(get_core)) -> Response:
    user = user_from_request(request)
    if user is None:
        return RedirectResponse("/signin", status_code=303)
    request.state.audit["actor"] = user.name
    audit(request, "home")
    today = date.today()
    parts = [
        f"<h1>sphere</h1><p>Signed in as <b>{escape(user.name)}</b>. "
        "<form method=post action=/signout style=display:inline><button>Sign out</button>"
        "</form></p>"
    ]
    memberships = [
        (p, role)
        for p, role in core.catalog.user_projects(user.id)
        if access.allows("project.read", {role})
    ]
    if not memberships:
        parts.append("<p>You are not a member of any project yet.</p>")
    for project, role in memberships:
        jobs = f"/projects/{quote(project.name)}/jobs"
        results = f"/projects/{quote(project.name)}/results"
        exports = ""
        if access.allows("export", {role}):  # routes.exports: start one, links that expire
            exports = f' <a href="/projects/{quote(project.name)}/exports">exports</a>'
        parts.append(
            f"<h2>{escape(project.name)} <small>({escape(role)}) "
            f'<a href="{escape(jobs)}">jobs</a> <a href="{escape(results)}">results</a>'
            f"{exports}</small></h2>"
        )
        if project.title:
            parts.append(f"<p>{escape(project.title)}</p>")
        problem = project.approval_problem(today)
        if problem:
            state = project.state(today)
            parts.append(f"<p>Not available ({escape(state)}): {escape(problem)}.</p>")
            continue
        page = _page_number(request, project.name)
        studies, total = core.catalog.indexed_studies(
            project.id, STUDIES_A_PAGE, (page - 1) * STUDIES_A_PAGE
        )
        if not total:
            parts.append("<p>No studies stored yet.</p>")
            continue
        parts.append(_pager(project.name, page, total))
        rows = []
        for st in studies:
            link = "/viewer/?" + urlencode(
                {"StudyInstanceUIDs": st.study_uid, "project": project.name}
            )
            rows.append(
                f'<tr><td><a href="{escape(link)}"><code>{escape(st.study_uid)}</code></a></td>'
                f"<td>{escape(st.patient_id or '')}</td><td>{escape(st.study_date or '')}</td>"
                f"<td>{escape(st.study_description or '')}</td><td>{escape(st.modalities)}</td>"
                f"<td>{st.n_series}</td><td>{st.n_instances}</td></tr>"
            )
        parts.append(
            "<table><tr><th>study (pseudonymous)</th><th>patient</th><th>date (shifted)</th>"
            "<th>description</th><th>modalities</th><th>series</th><th>instances</th></tr>"
            + "".join(rows)
            + "</table>"
        )
    return _page("sphere", "".join(parts))


STUDIES_A_PAGE = 50  # a 10,000-study project is a page at a time, not 2 MB of table


def _page_number(request: Request, project: str) -> int:
    """The page asked for this project (`/?project=p&page=n`); 1 for the others."""
    if request.query_params.get("project") != project:
        return 1
    try:  # bounded: an offset past 2**63 is an error in SQL, not an empty page
        return min(max(1, int(request.query_params.get("page", "1"))), 10**9)
    except ValueError:
        return 1


def _pager(project: str, page: int, total: int) -> str:
    """ "Studies 51-100 of 10,000", with links to the pages before and after."""
    first = (page - 1) * STUDIES_A_PAGE + 1
    last = min(page * STUDIES_A_PAGE, total)

    def link(n: int, text: str) -> str:
        href = "/?" + urlencode({"project": project, "page": n}) + f"#{project}"
        return f' <a href="{escape(href)}">{text}</a>'

    if first > total:
        out = f'<p id="{escape(project)}">No studies on this page ({total:,} in all).'
    else:
        out = f'<p id="{escape(project)}">Studies {first:,}-{last:,} of {total:,}.'
    if page > 1:
        out += link(page - 1, "&lsaquo; previous")
    if last < total:
        out += link(page + 1, "next &rsaquo;")
    return out + "</p>"


class Grant(BaseModel):
    user: str
    role: str = "viewer"


@router.post("/projects/{project}/members", status_code=204)
def grant(
    body: Grant,
    request: Request,
    member: Access = Depends(grant_access),
    core: Core = Depends(get_core),
) -> Response:
    """A role in this project, by the role table (`core.users.grant`): an investigator grants
    the viewer role only, and changes no investigator's role. A name that is no user is
    answered as a grant made (204), so names cannot be probed; the refusal is audited."""
    audit(request, "grant", role=body.role)
    try:
        users.grant(core, member.project.name, body.user, body.role, by_user=member.user)
    except users.NotAllowed as e:
        raise HTTPException(403, str(e)) from None
    except SphereError as e:  # an unknown role, a closed project
        raise HTTPException(400, str(e)) from None
    return Response(status_code=204)


def _safe_next(target: str) -> str:
    """Only a path on this site: never `//host` or a scheme (an open redirect)."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return quote(target, safe="/?&=%:._-~+,")
