"""FastAPI dependencies: the core, the signed-in user, a user's access to a project.

Access is decided here and nowhere else: no credential is 401; a project the user is not a
member of (or that does not exist) is 404 on every route, so nothing tells whether it exists;
a project that is not approved, revoked or expired is 403 for its members. `current_user` is
the one place a credential is checked (a bearer token, else the sign-in cookie): an OIDC
check would replace that function alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date
from typing import Any

from fastapi import HTTPException, Request

from core import Core, access
from gateway.web import sessions
from gateway.web.cache import CatalogCache
from gateway.web.edge import trusted_proxy
from storage.catalog import Project, User


@dataclass(frozen=True)
class Access:
    """A member's access to an approved, in-date project."""

    project: Project
    user: User
    role: str  # "" for a user acting by a global role (a data manager granting)


async def get_core(request: Request) -> Core:
    return request.app.state.core  # async: no thread hop for what does no I/O


def audit(request: Request, action: str | None = None, **detail: Any) -> None:
    """Add to this request's audit record (pseudonymous UIDs, counts; never query values)."""
    record = getattr(request.state, "audit", None)
    if record is None:
        return
    if action:
        record["action"] = action
    record["detail"].update({k: v for k, v in detail.items() if v is not None})


def catalog_cache(request: Request) -> CatalogCache:
    return request.app.state.cache


def client_address(request: Request) -> str:
    """The client's address (through a trusted proxy, the one it names: `gateway.web.edge`)."""
    return request.client.host if request.client else "-"


def user_from_request(request: Request) -> User | None:
    """The user a request's bearer token or session cookie names, or None. Refreshes the
    catalog cache: this runs first in every request that needs a user. A bad token counts
    against the client's address; past the limit its tokens are not tried (429)."""
    cache = catalog_cache(request)
    cache.refresh()
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if header:
        if scheme.lower() != "bearer":
            return None
        throttle(request)
        user = cache.user_by_token(token.strip())
        if user is None:
            failed(request, "bad token")
        return user
    cookie = request.cookies.get(sessions.COOKIE)
    if not cookie or not sessions.well_formed(cookie):
        return None
    found = cache.session(sessions.digest(cookie))
    if found is None:
        return None
    user = cache.user_by_id(found.user_id)
    if (
        user is None
        or not user.active
        or sessions.fingerprint(user.token_hash) != found.token_fingerprint
    ):
        return None
    return user


def throttle(request: Request) -> None:
    """429 when this client's address has failed too often lately (`gateway.web.throttle`)."""
    wait = request.app.state.failures.retry_after(client_address(request))
    if wait:
        audit(request, refused="too many failures")
        raise HTTPException(
            429,
            "too many failed sign-ins from this address; try again later",
            {"Retry-After": str(wait)},
        )


def failed(request: Request, why: str) -> None:
    """Count a failed sign-in or bad token against the client's address, and audit it."""
    address = client_address(request)
    request.app.state.failures.failed(address)
    audit(request, failure=why, client=address)


def current_user(request: Request) -> User:
    """The signed-in user, else 401: the one place a credential is checked."""
    user = user_from_request(request)
    if user is None:
        raise HTTPException(
            401, "sign in: a bearer token or a session", {"WWW-Authenticate": "Bearer"}
        )
    record = getattr(request.state, "audit", None)
    if record is not None:
        record["actor"] = user.name
    return user


def project_access(project: str, request: Request) -> Access:
    """The caller's access to `project` to read its studies (QIDO-RS, WADO-RS): `study.read`.
    Calls `current_user` itself: one thread hop, not two, for each request."""
    return member_access(project, request, "study.read")


def grant_access(project: str, request: Request) -> Access:
    """The caller's access to `project` to give roles in it: `project.grant`."""
    return member_access(project, request, "project.grant")


def member_access(project: str, request: Request, action: str) -> Access:
    """A user's access to `project` for `action`, by `core.access`'s table (global roles and
    the role in the project). Neither a member nor holding a global role that allows it (or no
    such project): 404; a member whose role the table refuses, or a project not approved,
    revoked, expired: 403. A refusal is audited with its action (the audit middleware writes
    the row, outcome refused)."""
    user = current_user(request)
    cache = catalog_cache(request)
    record = getattr(request.state, "audit", None)
    held = set(cache.global_roles(user.id))
    found = cache.membership(project, user.id)
    if found is None and access.allows(action, held):  # a data manager granting, say
        p = cache.project(project)
        found = (p, "") if p is not None else None
    if found is None:  # no such project, or not a member: the same answer
        if record is not None and cache.project_exists(project):
            record["project"] = project  # a name typed that is no project is not kept
        _refused(record, action)
        raise HTTPException(404, "not found")
    p, role = found
    if record is not None:
        record["project"] = p.name
    if not access.allows(action, held | {role}):
        _refused(record, action)
        raise HTTPException(403, f"your role in this project may not {action}")
    problem = p.approval_problem(date.today())
    if problem:  # told to members only: revoked, expired, not yet approved
        _refused(record, action)
        raise HTTPException(403, problem)
    return Access(p, user, role)


def _refused(record: dict[str, Any] | None, action: str) -> None:
    if record is not None:
        record["action"] = action
        record["detail"]["refused"] = action


_HOST = re.compile(r"[A-Za-z0-9.\-]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?")
_PREFIX = re.compile(r"(/[A-Za-z0-9._~\-]+)*")


def base_url(request: Request) -> str:
    """This server's origin as the client sees it, honouring `Forwarded` (RFC 7239) or
    `X-Forwarded-Proto/Host/Prefix` from a trusted proxy in front (`trusted_proxies`: from
    anyone else they are ignored); odd values are ignored."""
    proto, host = request.url.scheme, request.headers.get("host", request.url.netloc)
    prefix = ""
    if trusted_proxy(request):
        proto, host, prefix = _forwarded(request, proto, host)
    proto = proto.lower() if proto.lower() in ("http", "https") else request.url.scheme
    if not _HOST.fullmatch(host):
        host = request.url.netloc
    prefix = prefix.rstrip("/")
    if not _PREFIX.fullmatch(prefix):
        prefix = ""
    return f"{proto}://{host}{prefix}"


def _forwarded(request: Request, proto: str, host: str) -> tuple[str, str, str]:
    """(proto, host, prefix) as a proxy's `Forwarded` or `X-Forwarded-*` headers give them."""
    forwarded = request.headers.get("forwarded")
    if not forwarded:
        proto = _first(request.headers.get("x-forwarded-proto")) or proto
        host = _first(request.headers.get("x-forwarded-host")) or host
        return proto, host, _first(request.headers.get("x-forwarded-prefix")) or ""
    for pair in forwarded.split(",")[0].split(";"):
        name, _, value = pair.strip().partition("=")
        value = value.strip().strip('"')
        if name.lower() == "proto":
            proto = value
        elif name.lower() == "host":
            host = value
    return proto, host, ""


def dicomweb_root(request: Request, project: str) -> str:
    return f"{base_url(request)}/projects/{project}/dicom-web"


def _first(value: str | None) -> str | None:
    return value.split(",")[0].strip() if value else None
