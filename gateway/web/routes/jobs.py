"""Jobs over HTTP: `POST /api/projects/{project}/jobs` queues a pull or a pipeline run (a data
manager, or an investigator for a run: the role table's jobs.submit), `GET` lists them with
their progress (jobs.read). The same rules as `sphere jobs submit` (`gateway.jobs.submit`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel

from core import Core, SphereError, access
from gateway import jobs
from gateway.web.deps import audit, get_core, member_access
from storage.catalog import Job

router = APIRouter()


class Submit(BaseModel):
    kind: str = "pull"
    pipeline: str | None = None
    level_rule: str | None = None  # a run's level rule (processing.bone.levels.RULES)


def job_json(j: Job) -> dict[str, Any]:
    """A job as the API answers it: counts and times, nothing from a patient."""
    when = {k: getattr(j, k) for k in ("submitted_at", "started_at", "finished_at")}
    return {
        "id": j.id,
        "kind": j.kind,
        "project": j.project,
        "params": j.params,
        "state": j.state,
        "progress": j.progress or {},
        "node": j.node,
        "submitted_by": j.submitted_by,
        **{k: v.isoformat() + "Z" if v else None for k, v in when.items()},
        "outcome": j.outcome,
    }


@router.post("/api/projects/{project}/jobs", status_code=201)
def submit(
    project: str,
    body: Submit,
    request: Request,
    core: Core = Depends(get_core),
) -> dict[str, Any]:
    audit(request, "jobs.submit", kind=body.kind)
    user = member_access(project, request, "jobs.submit").user
    try:
        job = jobs.submit(
            core, body.kind, project, pipeline=body.pipeline, user=user, level_rule=body.level_rule
        )
    except jobs.JobRefused as e:
        raise HTTPException(409, str(e)) from None
    except access.NotAllowed as e:
        raise HTTPException(403, str(e)) from None
    except SphereError as e:  # a closed project, an unknown kind, pipeline or level rule
        raise HTTPException(400, str(e)) from None
    return job_json(job)


@router.get("/api/projects/{project}/jobs")
def listed(project: str, request: Request, core: Core = Depends(get_core)) -> list[dict[str, Any]]:
    member_access(project, request, "jobs.read")
    return [job_json(j) for j in core.catalog.jobs(project)]
