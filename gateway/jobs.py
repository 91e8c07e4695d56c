"""Jobs: pulls and pipeline runs queued in the catalog and run by nodes (`sphere worker`,
`sphere serve`).

A job is a row (`storage.models.Job`) and the function the CLI runs: `gateway.pull.pull` for a
pull, `processing.runner.run_pipeline` for a run. A node leases one job at a time and renews the
lease with each heartbeat, writing the job's progress; a node that dies loses the lease when it
runs out and any node takes the job up again. A pull taken up again resumes: complete series are
skipped, instances spooled on this node are kept (the lease is per job, the resume per series).
A cancel is seen at the next heartbeat: series not yet started are left, what was stored stays.
One pull per project at a time, cluster-wide: refused at submit while one is queued or running,
and held by the project's pull lock (`gateway.pull.lock`) while it runs.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from functools import cached_property
from typing import Any

from core import Core, SphereError, Unavailable, access, metrics, projects
from core.settings import Settings
from gateway.pull import PullBusy, Puller, pull
from gateway.pull.guard import OutsideWindow, check_windows
from gateway.pull.stops import PullStopped
from storage.catalog import Job, utcnow

log = logging.getLogger(__name__)

KINDS = ("pull", "run", "export")
PIPELINES = ("bone-density",)


class JobRefused(SphereError):
    """A job that may not be queued (a pull of the project is queued or running already)."""


def node_name(settings: Settings) -> str:
    """This node, in listings: its Storage SCP's AE title, host and process."""
    return f"{settings.ae_title}@{socket.gethostname()}:{os.getpid()}"


def submit(
    core: Core,
    kind: str,
    project: str,
    *,
    pipeline: str | None = None,
    export: str | None = None,
    user: Any = None,
    level_rule: str | None = None,
) -> Job:
    """Queue a job as `user` (default: the CLI's operator): jobs.submit on the project, the
    project approved and in date. A second pull of a project is refused, naming the first.
    An export job writes an export `processing.export.start` recorded (`export`: its id)."""
    if kind not in KINDS:
        raise SphereError(f"a job is one of: {', '.join(KINDS)} (not '{kind}')")
    core.project(project)  # an unknown project says so first
    who = access.require(core, "jobs.submit", project, user=user, kind=kind)
    projects.require_active(core, project, "jobs.submit", actor=who.name)
    params: dict[str, Any] = {}
    if level_rule is not None and kind != "run":
        raise SphereError("--level-rule is for a run job (bone-density)")
    if kind == "run":
        if pipeline not in PIPELINES:
            raise SphereError(f"--pipeline is one of: {', '.join(PIPELINES)}")
        params["pipeline"] = pipeline
        if level_rule is not None:
            from processing.bone.levels import RULES

            if level_rule not in RULES:
                raise SphereError(f"--level-rule is one of: {', '.join(RULES)}")
            params["level_rule"] = level_rule
    if kind == "export":
        found = core.catalog.export(export or "")
        if found is None or found.project != project:
            raise SphereError("an export job writes a started export: `sphere export` starts one")
        params["export"] = found.id
    if kind == "pull":
        held = core.catalog.pull_lock(core.project(project).id)
        if held is not None:
            from gateway.pull.lock import gone, holder_text

            if not gone(held, socket.gethostname()):
                refuse(core, who.name, project, f"is being pulled on {holder_text(held)}")
    job, busy = core.catalog.submit_job(kind, project, params, who.name)
    if busy is not None:
        where = f" on {busy.node}" if busy.node and busy.state == "running" else ""
        refuse(core, who.name, project, f"has pull job {busy.id} {busy.state}{where}")
    core.catalog.audit(who.name, "jobs.submit", project, job=job.id, kind=kind, **params)
    return job


def refuse(core: Core, actor: str, project: str, why: str) -> None:
    core.catalog.audit(actor, "jobs.submit", project, "refused", reason=why)
    raise JobRefused(f"project {project} {why}: one pull per project at a time")


def cancel(core: Core, job_id: int, *, user: Any = None) -> str:
    """Cancel a job (jobs.cancel on its project); returns what happens, in words."""
    job = core.catalog.job(job_id)
    if job is None:
        raise SphereError(f"no job {job_id} (see `sphere jobs`)")
    who = access.require(core, "jobs.cancel", job.project, user=user, job=job_id)
    was = core.catalog.cancel_job(job_id, who.name)
    core.catalog.audit(who.name, "jobs.cancel", job.project, job=job_id, state=was)
    if was in ("queued", "waiting"):
        return f"job {job_id} cancelled"
    if was == "running":
        return f"job {job_id} stops at its next heartbeat (what it stored stays)"
    return f"job {job_id} had already ended ({was})"


@dataclass
class Running:
    """A job this node holds: its heartbeat's view."""

    job: Job
    token: str
    progress: Callable[[], dict[str, Any]] = dict
    stop: threading.Event = field(default_factory=threading.Event)  # cancel, lost, or node stops
    why: str = ""  # cancelled|lost|stopping|window
    on_stop: Callable[[], None] = lambda: None


class Node:
    """Leases and runs jobs, one at a time, until `stop` is set. Opens a trusted-side `Core`
    per job (a pull needs the vault); a run's workers are the research side."""

    def __init__(
        self, settings: Settings, *, name: str | None = None, parent: int | None = None
    ) -> None:
        self.settings = settings
        self.parent = parent  # a `sphere serve` whose end ends this node
        self.name = name or node_name(settings)
        self.stopping = threading.Event()
        self.ran: list[int] = []
        self.current: Running | None = None
        self._swept: date | None = None  # the day this node last swept or saw it claimed

    def run(self, *, once: bool = False) -> None:
        """Take jobs until stopped (`once`: until none is left)."""
        opts = self.settings.jobs
        try:
            while not self.stopping.is_set():
                if self.parent is not None and os.getppid() != self.parent:
                    return  # the server that started this node is gone
                job = self.take()
                if job is None:
                    self.sweep()
                    if once:
                        return
                    self.stopping.wait(opts.poll_s)
                    continue
                self.execute(job)
        finally:
            self.core.close()

    @cached_property
    def core(self) -> Core:
        """The node's own core: leases, heartbeats, ends (trusted side: a pull needs it)."""
        return Core(self.settings)

    def sweep(self, today: date | None = None) -> bool:
        """The daily retention sweep, when idle: the first node to claim the day purges every
        project past its retention end (audited as this node). Whether it ran here."""
        today = today or date.today()
        if self._swept == today:
            return False
        try:
            if not self.core.catalog.claim_day("retention", today, self.name):
                self._swept = today
                return False
        except Exception as e:  # the catalog is away: the next idle poll tries again
            log.warning("retention sweep not claimed (%s)", type(e).__name__)
            return False
        self._swept = today
        from gateway.purge import purge_expired

        def failed(project: str, e: SphereError) -> None:
            log.warning("retention: %s not purged today: %s", project, e)

        try:
            done = purge_expired(self.core, actor=f"node:{self.name}", today=today, on_error=failed)
        except Exception as e:  # the store or catalog failed mid-way: a re-run finishes it
            log.error(
                "retention sweep stopped (%s); `sphere project purge --expired` ends it",
                type(e).__name__,
            )
            return True
        if done:
            log.warning("retention: %d project(s) past their end purged", len(done))
        return True

    def stop(self) -> None:
        """Stop after the job in hand (a pull stops starting series; the job is queued again
        for any node)."""
        self.stopping.set()
        current = self.current
        if current is not None:
            current.why = current.why or "stopping"
            current.on_stop()

    def take(self) -> Running | None:
        """Lease the next job, if any."""
        token = uuid.uuid4().hex
        try:
            job = self.core.catalog.lease_job(self.name, token, self.settings.jobs.lease_s)
        except Exception as e:  # the catalog is away: try again at the next poll
            log.warning("no job leased (%s)", type(e).__name__)
            return None
        if job is None:
            return None
        gone = getattr(job, "taken_from", "")
        if gone:  # its node stopped renewing the lease: taken over, counted and audited
            log.warning("job %d taken over from %s (attempt %d)", job.id, gone, job.attempts)
            metrics.get().lease_expiries.labels("job").inc()
            self.core.catalog.audit(
                job.submitted_by,
                "jobs.lease",
                job.project,
                job=job.id,
                node=self.name,
                took_over=gone,
            )
        return Running(job, token)

    def execute(self, run: Running) -> None:
        """Run one leased job under a heartbeat; leave it done, failed, waiting or cancelled."""
        job = run.job
        self.ran.append(job.id)
        self.current = run
        beat = threading.Thread(target=self._heartbeat, args=(run,), daemon=True)
        beat.start()
        later = utcnow() + timedelta(seconds=self.settings.jobs.wait_s)
        try:
            state, outcome = self._do(run)
        except OutsideWindow as e:
            state, outcome, later = "waiting", f"waiting: {e}", e.until
        except PullBusy as e:
            state, outcome = "waiting", f"waiting: {e}"
        except Unavailable as e:
            state, outcome = "waiting", f"waiting: a source is unavailable: {e}"
        except PullStopped as e:  # the catalog, the store or a disk failed: tried again later
            state, outcome = "waiting", f"waiting: {e}"
        except SphereError as e:
            state, outcome = "failed", str(e)
        except Exception as e:  # noqa: BLE001 - a job's failure never ends the node
            log.exception("job %d", job.id)
            state, outcome = "failed", f"unexpected {type(e).__name__}"
        finally:
            run.stop.set()  # the heartbeat ends (a cancel seen by it has set `why`)
            beat.join()
        self.current = None
        if run.why == "lost":
            log.error("job %d: its lease was taken by another node; nothing more done", job.id)
            return
        if run.why == "window":  # its window closed mid-pull: what is done stays
            try:
                check_windows(self.settings.all_sources())
                state, outcome = "queued", f"requeued: {outcome}"
            except OutsideWindow as e:
                state, outcome, later = "waiting", f"waiting: {e}", e.until
        elif run.why == "cancelled":
            state = "cancelled"
            outcome = f"cancelled: {outcome}; what was stored is kept"
        elif run.why == "stopping":
            state, outcome = "queued", f"requeued: node {self.name} stopped ({outcome})"
        try:
            self.core.catalog.end_job(
                job.id, run.token, state, outcome, progress=_safe(run.progress), not_before=later
            )
        except Exception as e:  # the lease runs out and another node takes the job again
            log.error("job %d not ended in the catalog (%s)", job.id, type(e).__name__)

    def _do(self, run: Running) -> tuple[str, str]:
        job = run.job
        if job.kind == "pull":
            return self._pull(run)
        if job.kind == "run":
            return self._run(run)
        if job.kind == "export":
            return self._export(run)
        return "failed", f"unknown kind of job: {job.kind}"

    def _pull(self, run: Running) -> tuple[str, str]:
        job = run.job

        def started(puller: Puller) -> None:
            puller.holder = f"{job.submitted_by}, job {job.id}"
            run.progress = lambda: puller.progress().as_dict()
            run.on_stop = puller.cancelled.set
            if run.why:  # cancelled or stopping before the pull began
                puller.cancelled.set()

        with Core(self.settings, actor=job.submitted_by) as core:
            report = pull(core, job.project, actor=job.submitted_by, on_start=started)
        mb = report.nbytes / 1e6
        outcome = (
            f"{report.count('complete')} series stored, {report.count('skipped')} already "
            f"complete, {report.count('failed')} failed; {report.instances} instances, "
            f"{mb:.1f} MB in {report.seconds:.0f} s"
        )
        return ("done" if report.ok else "failed"), outcome

    def _run(self, run: Running) -> tuple[str, str]:
        from core import vaultkey
        from processing.bone_density import BoneDensity
        from processing.runner import run_pipeline

        job = run.job
        vaultkey.keep_out_of_environment()  # the pipeline's workers: the research side
        from gateway.run_cmd import summary_line

        rule = job.params.get("level_rule", "both")
        report = run_pipeline(
            self.settings, job.project, BoneDensity(level_rule=rule), progress=False
        )
        run.progress = lambda: {"series": len(report.outcomes), **report.counts()}
        failed = report.counts().get("failed", 0)
        return ("failed" if failed else "done"), summary_line(report)

    def _export(self, run: Running) -> tuple[str, str]:
        """Write a started export (again from its start, if a node was lost mid-way)."""
        from processing import export

        job = run.job
        with Core(self.settings, actor=job.submitted_by) as core:
            row = core.catalog.export(str(job.params.get("export")))
            if row is None:
                return "failed", "no such export"
            row = export.write(core, row)
        return "done", f"export {row.id}: {row.n_files} files, {row.nbytes / 1e6:.1f} MB"

    def _in_window(self) -> bool:
        try:
            check_windows(self.settings.all_sources())
        except OutsideWindow:
            return False
        return True

    def _heartbeat(self, run: Running) -> None:
        opts = self.settings.jobs
        catalog = self.core.catalog
        while not run.stop.wait(opts.beat_s):
            try:
                progress = _safe(run.progress)
                asked = catalog.renew_job(run.job.id, run.token, opts.lease_s, progress)
            except Exception as e:  # noqa: BLE001 - the catalog is away for a beat
                log.warning("job %d heartbeat failed (%s)", run.job.id, type(e).__name__)
                continue
            why = "lost" if asked is None else "cancelled" if asked else ""
            if not why and self.stopping.is_set():
                why = "stopping"
            if not why and run.job.kind == "pull" and not self._in_window():
                why = "window"
            if why and not run.why:  # stop starting series; keep the lease while it stops
                run.why = why
                run.on_stop()
            if asked is None:
                return


def _safe(progress: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    try:
        return progress()
    except Exception:  # noqa: BLE001 - a progress read never fails a job
        return None
