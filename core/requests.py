"""Study requests: an investigator asks for a study set within an approved project; a data
manager approves it (its items join the cohort, by the cohort's own path: values to the vault,
digests to the catalog) or declines it with a reason; the investigator follows each request's
state and, once pulled, what was found of each item.

The values are originals. The research side (`sphere serve`) never holds the vault key, so it
seals them to the vault key's inbox (`deid.sealing`): the catalog keeps ciphertext only, until
a decision drops it. Nobody sees them again in clear, but the vault's readers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from core import access, projects
from core.core import Core
from core.errors import ProjectError, SphereError
from deid.sealing import seal_to_inbox
from storage.models import StudyRequest, utcnow

MAX_ITEMS = 10_000  # a request is a study set, not a warehouse


def publish_inbox(core: Core) -> None:
    """Put the inbox's public key in the catalog (the trusted side: it reads the vault key)."""
    public = core.vault.key.inbox_public()
    if core.catalog.inbox_key() != public:
        core.catalog.set_inbox_key(public)


def _context(project: str) -> tuple[str, ...]:
    return ("study-request", project)


def submit(
    core: Core, project: str, values: dict[str, list[str]], *, user: Any = None
) -> StudyRequest:
    """Record a request as `user` (request.submit in an approved, in-date project): {kind:
    [values]}, sealed to the vault's inbox. Counts only in the audit trail."""
    p = core.project(project)
    who = access.require(core, "request.submit", project, user=user)
    projects.require_active(core, project, "request.submit", actor=who.name)
    clean: dict[str, list[str]] = {}
    for kind, vs in values.items():
        if kind not in projects.COHORT_KINDS:
            raise ProjectError(f"a request's kind is one of {', '.join(projects.COHORT_KINDS)}")
        kept = list(dict.fromkeys(v.strip() for v in vs if v and v.strip()))
        if kept:
            clean[kind] = kept
    n = sum(map(len, clean.values()))
    if not n:
        raise ProjectError("a request needs at least one accession number, patient ID or UID")
    if n > MAX_ITEMS:
        raise ProjectError(f"a request holds at most {MAX_ITEMS:,} items ({n:,} given)")
    public = core.catalog.inbox_key()
    if public is None:
        raise SphereError(
            "requests are not open on this server yet: a data manager runs `sphere requests` once"
        )
    sealed = seal_to_inbox(public, json.dumps(clean).encode(), *_context(project))
    row = core.catalog.add_request(
        StudyRequest(
            project_id=p.id, requested_by=who.name, n_items=n, kinds=",".join(clean), sealed=sealed
        )
    )
    core.catalog.audit(who.name, "request.submit", project, request=row.id, items=n)
    return row


def _pending(core: Core, request_id: int) -> tuple[StudyRequest, str]:
    row = core.catalog.request(request_id)
    if row is None:
        raise SphereError(f"no request {request_id}")
    project = project_name(core, row.project_id)
    if row.state != "pending":
        raise SphereError(f"request {request_id} is {row.state} already")
    return row, project


def _reread(core: Core, request_id: int) -> StudyRequest:
    """The request as its decision left it."""
    row = core.catalog.request(request_id)
    if row is None:  # decided just now: only a purge in between removes it
        raise SphereError(f"no request {request_id}")
    return row


def approve(core: Core, request_id: int) -> tuple[StudyRequest, str]:
    """The operator approves: the values, opened from the inbox, join the project's cohort
    (`projects.add_cohort`); the request keeps their digests. The caller starts the pull."""
    access.require(core, "request.decide", request=request_id)  # a global role's: first
    row, project = _pending(core, request_id)
    who = access.require(core, "request.decide", project, request=request_id)
    projects.require_active(core, project, "request.decide", actor=who.name)
    opened = json.loads(core.vault.key.open_inbox(row.sealed or "", *_context(project)))
    keys = core.keys(project)
    items = []
    for kind, vs in opened.items():
        projects.add_cohort(core, project, kind, vs, actor=who.name)
        items += [[kind, keys.cohort_digest(kind, v)] for v in vs]
    if not core.catalog.decide_request(
        request_id, state="approved", decided_by=who.name, decided_at=utcnow(), sealed=None,
        items=items,
    ):  # fmt: skip
        raise SphereError(f"request {request_id} was decided meanwhile")
    core.catalog.audit(who.name, "request.approve", project, request=request_id, items=len(items))
    return _reread(core, request_id), project


def decline(core: Core, request_id: int, reason: str) -> StudyRequest:
    """The operator declines with a reason (told to the investigator); the values are dropped."""
    if not reason.strip():
        raise SphereError("say why: --reason TEXT (the investigator reads it)")
    access.require(core, "request.decide", request=request_id)
    _, project = _pending(core, request_id)
    who = access.require(core, "request.decide", project, request=request_id)
    if not core.catalog.decide_request(
        request_id, state="declined", decided_by=who.name, decided_at=utcnow(), sealed=None,
        reason=reason.strip(),
    ):  # fmt: skip
        raise SphereError(f"request {request_id} was decided meanwhile")
    core.catalog.audit(who.name, "request.decline", project, request=request_id)
    return _reread(core, request_id)


def project_name(core: Core, project_id: int) -> str:
    return next(p.name for p in core.catalog.projects() if p.id == project_id)


@dataclass(frozen=True)
class Outcome:
    """What became of an approved request's items: per item (in the order given), studies
    found at the last pull (None: not looked up yet) and how many of them are stored whole."""

    found: list[int | None]
    pulled: list[int]

    @property
    def counts(self) -> dict[str, int]:
        return {
            "found": sum(1 for f in self.found if f),
            "not_found": sum(1 for f in self.found if f == 0),
            "not_looked_up": sum(1 for f in self.found if f is None),
            "studies_stored": sum(self.pulled),
        }


def outcome(core: Core, row: StudyRequest) -> Outcome | None:
    """Per item of an approved request: found, not found, not looked up yet (by digest)."""
    if row.state != "approved" or not row.items:
        return None
    cohort = {(i.kind, i.digest): i for i in core.catalog.cohort(row.project_id)}
    whole = _whole_studies(core, row.project_id)
    found: list[int | None] = []
    pulled: list[int] = []
    for kind, digest in row.items:
        item = cohort.get((kind, digest))
        found.append(item.studies_found if item else None)
        pulled.append(sum(1 for s in (item.studies or []) if s in whole) if item else 0)
    return Outcome(found, pulled)


def _whole_studies(core: Core, project_id: int) -> set[str]:
    by_study: dict[str, bool] = {}
    for r in core.catalog.series(project_id):
        if r.status != "removed":
            by_study[r.study_uid] = by_study.get(r.study_uid, True) and r.status == "complete"
    return {s for s, ok in by_study.items() if ok}
