"""Pull a project's cohort from the PACS: plan, retrieve per series, verify, commit.

The way of one series: the plan gives the PACS's instance count; the series is announced to the
receivers (which refuse anything not announced); the `Retriever` brings the instances, each one
de-identified and spooled before it is acknowledged; the received count is checked against the
PACS's count and the retrieve's sub-operation counts; only then is the series committed to Zarr
and marked complete in the catalog. A re-run skips complete series and resumes the others from
their spool.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import NoReturn, TypeVar

from sqlalchemy.exc import SQLAlchemyError

from core import Core, SphereError, Unavailable, metrics
from core.optout import Register
from core.projects import CohortEntry, cohort
from deid.keys import ProjectKeys
from gateway.pull.guard import SourceGone, check_windows
from gateway.pull.layout import SpoolLayout
from gateway.pull.lock import ProjectPullLock, PullBusy
from gateway.pull.report import PullProgress, PullReport, SeriesOutcome
from gateway.pull.retrievers import SourceError, open_retrievers
from gateway.pull.source import Retriever, RetrieveResult, SeriesHit, StudyHit
from gateway.pull.stops import (
    PullStopped,
    check_spool,
    probe_store,
    while_store_down,
    why_stopped,
)
from storage.catalog import Project, utcnow
from storage.commit import IndexingFailed, SeriesUnreadable, commit_series
from storage.series import SeriesError, SeriesWriter, series_key
from storage.spool import SpoolError

log = logging.getLogger(__name__)
T = TypeVar("T")


class PullRefused(SphereError):
    """The project may not be pulled (not approved, expired, revoked); the message says why."""


@dataclass
class SeriesJob:
    """One series being retrieved. Original UIDs stay in memory, never in logs or the catalog."""

    project: str
    study_uid: str
    series_uid: str
    pseudo_study: str
    pseudo_series: str
    patient_pseudonym: str
    modality: str
    expected: int
    writer: SeriesWriter  # the coordinator's view of the spool, written to by the receivers
    source: Retriever  # where it is pulled from
    quarantined: dict[str, int] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return series_key(self.project, self.pseudo_study, self.pseudo_series)

    @property
    def n_quarantined(self) -> int:
        return sum(self.quarantined.values())


@dataclass
class Planned:
    study: StudyHit
    series: SeriesHit
    source: Retriever


def plan(
    sources: list[Retriever], items: list[CohortEntry]
) -> tuple[list[Planned], dict[int, set[str]]]:
    """Resolve cohort items on every source to studies, then series, with instance counts.

    A study found on several sources is planned once, from the first that holds it whole (the
    most instances; the earlier source on a tie). Only the cohort's own keys are ever queried,
    so nothing outside the cohort is requested. Returns the planned series and, per cohort item
    id, the distinct studies (original UIDs: never stored) it matched.
    """
    studies: dict[str, tuple[StudyHit, Retriever]] = {}
    found: dict[int, set[str]] = {}
    for source in sources:
        for item in items:
            for h in source.find_studies(item.kind, item.value):
                found.setdefault(item.id, set()).add(h.study_uid)
                have = studies.get(h.study_uid)
                if have is None or (h.n_instances or 0) > (have[0].n_instances or 0):
                    studies[h.study_uid] = (h, source)
    planned = []
    for st, source in studies.values():
        for se in source.find_series(st.study_uid):
            planned.append(Planned(st, se, source))
    return planned, {item.id: found.get(item.id, set()) for item in items}


def verify(job: SeriesJob, result: RetrieveResult) -> str:
    """Completeness is checked, not guessed: our count, the PACS's count, the sub-operations.
    Returns what is wrong, or "" when the series is all there."""
    received = job.writer.count + job.n_quarantined
    if result.failed:
        return f"the PACS reports {result.failed} failed sub-operations"
    if received < job.expected:
        return f"received {received} of {job.expected} instances"
    reported = result.completed + result.warning + result.failed > 0  # counts are optional
    if reported and result.completed + result.warning < job.expected:
        return f"the PACS completed {result.completed} of {job.expected} sub-operations"
    return ""


def pull(
    core: Core,
    name: str,
    *,
    actor: str | None = None,
    today: date | None = None,
    on_start: Callable[[Puller], None] | None = None,
) -> PullReport:
    """Pull a project's cohort from the sources the settings name. Raises `PullRefused` when
    the project may not be pulled, `Unavailable` when a source cannot be queried.
    `on_start` gets the `Puller` before it runs (a progress bar, a job's heartbeat)."""
    check_windows(core.settings.all_sources())  # before any port is opened
    puller = Puller(core, name, actor=actor)
    if on_start is not None:
        on_start(puller)
    puller.check_allowed(today)  # before any port is opened
    return puller.run(open_retrievers(core, name, actor=puller.actor), today)


class Puller:
    """Runs one project's pull: plans, opens and closes the door per series, verifies and
    commits. Instances are received by `Receiver`s the retriever feeds."""

    def __init__(self, core: Core, name: str, *, actor: str | None = None) -> None:
        self.core = core
        self.project: Project = core.project(name)
        self.keys: ProjectKeys = core.keys(name)
        self.actor = actor or core.actor
        self.layout = SpoolLayout(core.settings.spool_dir.resolve(), name)
        self.lock: ProjectPullLock | None = None
        self._jobs: list[SeriesJob] = []  # the series this pull set out to retrieve
        self._stopping = False
        self.holder = ""  # who holds the pull lock, in the refusals others get (a job's name)
        # Progress: `on_progress` is called once planned and after each series; `progress()`
        # also counts the instances spooled so far (read from the spool: call it sparingly).
        self.on_progress: Callable[[PullProgress], None] | None = None
        self.cancelled = threading.Event()  # set: series not yet started are left for later
        self._progress = PullProgress()
        self._inflight: dict[str, SeriesJob] = {}
        self._t0 = time.monotonic()
        self._before = 0  # instances stored before this pull (skipped series)

    def check_allowed(self, today: date | None = None) -> None:
        """Raise `PullRefused` (and audit it) unless the project is approved and in date."""
        problem = self.project.approval_problem(today or date.today())
        if problem:
            self.core.catalog.audit(
                self.actor, "pull", self.project.name, "refused", reason=problem
            )
            raise PullRefused(problem)

    def run(self, sources: list[Retriever], today: date | None = None) -> PullReport:
        """Plan on every source, retrieve each series from the one chosen, verify, commit.
        Raises `PullBusy` when another pull of the project runs (on any node)."""
        self.check_allowed(today)
        with self._exclusive():
            return self._run(sources)

    @contextmanager
    def _exclusive(self) -> Iterator[ProjectPullLock]:
        """The project's pull lock, held for the whole pull; a refusal is audited."""
        lock = ProjectPullLock(self.core.catalog, self.project, self.holder or self.actor)
        try:
            lock.take()
        except SQLAlchemyError as e:  # a catalog that cannot be written (full, down)
            raise Unavailable(why_stopped(e, self.layout.root)) from None
        except PullBusy as e:
            self.core.catalog.audit(self.actor, "pull", self.project.name, "refused", reason=str(e))
            raise
        if lock.took_over:
            metrics.get().lease_expiries.labels("pull_lock").inc()
            self.core.catalog.audit(
                self.actor, "pull.lock", self.project.name, "ok", took_over=lock.took_over
            )
        self.lock = lock
        with lock.held():
            yield lock

    def _run(self, sources: list[Retriever]) -> PullReport:
        name = self.project.name
        catalog = self.core.catalog
        t0 = time.perf_counter()
        started = utcnow()
        report = PullReport(project=name, storage=self.core.settings.resolved_storage_url())
        try:
            catalog.audit(
                self.actor,
                "pull.start",
                name,
                sources=[f"{r.name} ({r.protocol})" for r in sources],
            )
            self._pull(sources, report, started)
        except BaseException as e:
            self._stopped(report, e, t0)
        report.seconds = time.perf_counter() - t0
        self._progress.phase = "done"
        self._tell()
        self._audit_end(report)
        return report

    def _pull(self, sources: list[Retriever], report: PullReport, started: datetime) -> None:
        name = self.project.name
        catalog = self.core.catalog
        with ExitStack() as opened:
            for source in sources:
                opened.enter_context(source)  # our Storage SCP listens: its port is free
            self._check_writable()  # before anything is asked of the PACS
            try:
                _items, planned, found = self.resolve(sources, purpose="pull")
            except SourceError as e:
                raise Unavailable(f"cannot be queried: {e}") from None
            catalog.record_resolution(
                {i: [self.keys.uid(u) for u in uids] for i, uids in found.items()}
            )
            report.unresolved = sum(1 for uids in found.values() if not uids)
            report.studies = len({p.study.study_uid for p in planned})
            done = catalog.complete_series(self.project.id)
            jobs: list[SeriesJob] = []
            for p in planned:
                pseudo = self.keys.uid(p.series.series_uid)
                if pseudo in done:
                    expected = p.series.n_instances or 0
                    outcome = SeriesOutcome(pseudo, "skipped", expected, done[pseudo])
                    report.series.append(outcome)
                else:
                    jobs.append(self._job(p))
            self._planned(report, jobs)
            self._retrieve_all(sources, jobs, report)
        report.refused_unsolicited = catalog.refusals_since(name, started)

    # -- ending --------------------------------------------------------------------------------

    def _check_writable(self) -> None:
        """The store takes a write and the spool's disk has room: found before the PACS is
        asked for anything, not after everything was fetched."""
        probe_store(self.core.store, f"projects/{self.project.name}")
        check_spool(self.layout.root, self.core.settings.spool_min_free_mb)

    def _stopped(self, report: PullReport, exc: BaseException, t0: float) -> NoReturn:
        """End a pull that failed as any other (series not done marked failed, no `.tmp` left,
        the `pull.end` row), then raise: `PullStopped` (one line, with the report) for a
        failure of the disk, the catalog or the store; the error itself otherwise."""
        line = str(exc) if isinstance(exc, SphereError) else why_stopped(exc, self.layout.root)
        reason = line or f"unexpected {type(exc).__name__}"
        self._stopping = True
        done = {s.pseudo_series for s in report.series}
        for job in self._jobs:
            if job.pseudo_series not in done:
                report.series.append(
                    SeriesOutcome(job.pseudo_series, "failed", job.expected, 0, error=reason)
                )
        self.layout.remove_tmp()
        report.seconds = time.perf_counter() - t0
        try:
            left = self.core.catalog.fail_pending(self.project.id, f"the pull stopped: {reason}")
            self._audit_end(report, reason=reason)
        except Exception as e:  # the catalog itself failed: the line says so
            log.error("pull %s: the catalog could not record the end (%s)", report.project, e)
            left = -1
        if left < 0 and not line.startswith("the catalog"):
            line = f"{line or reason}; the catalog could not record it (series left pending)"
        if isinstance(exc, SphereError) or not line:
            raise exc
        raise PullStopped(line, report) from exc

    def _audit_end(self, report: PullReport, reason: str = "") -> None:
        extra = {"reason": reason} if reason else {}
        self.core.catalog.audit(
            self.actor,
            "pull.end",
            report.project,
            "ok" if report.ok and not reason else "error",
            studies=report.studies,
            complete=report.count("complete"),
            skipped=report.count("skipped"),
            failed=report.count("failed"),
            quarantined=report.count("quarantined"),
            quarantined_instances=report.quarantined,
            instances=report.instances,
            bytes=report.nbytes,
            unresolved_items=report.unresolved,
            refused_unsolicited=report.refused_unsolicited,
            seconds=round(report.seconds, 3),
            **extra,
        )

    def resolve(
        self, sources: list[Retriever], *, purpose: str
    ) -> tuple[list[CohortEntry], list[Planned], dict[int, set[str]]]:
        """The cohort (read from the vault for `purpose`) and what a pull of it fetches: the
        plan on every source, opted-out patients left out (`plan` raises `SourceError`)."""
        items = cohort(self.core, self.project.name, purpose=purpose, actor=self.actor)
        register = Register(self.core)
        planned, found = plan(sources, self._without_opted_out(register, items))
        return items, self._without_opted_out_studies(register, planned), found

    def _without_opted_out(self, register: Register, items: list[CohortEntry]) -> list[CohortEntry]:
        """The cohort less the patient IDs whose patients opted out (audited: a count)."""
        kept = [i for i in items if not (i.kind == "patient_id" and register.refuses(i.value))]
        if len(kept) < len(items):
            self.core.catalog.audit(
                self.actor, "pull.optout", self.project.name, cohort_items=len(items) - len(kept)
            )
        return kept

    def _without_opted_out_studies(
        self, register: Register, planned: list[Planned]
    ) -> list[Planned]:
        """The plan less the studies whose PACS answer names a patient who opted out: never
        retrieved (audited: counts)."""
        kept = [p for p in planned if not register.refuses(p.study.patient_id)]
        if len(kept) < len(planned):
            dropped = {p.study.study_uid for p in planned} - {p.study.study_uid for p in kept}
            self.core.catalog.audit(
                self.actor,
                "pull.optout",
                self.project.name,
                studies=len(dropped),
                series=len(planned) - len(kept),
            )
        return kept

    def _retrieve_all(
        self, sources: list[Retriever], jobs: list[SeriesJob], report: PullReport
    ) -> None:
        # Each source is bounded by its own limit, all of them at once; commits overlap.
        with ExitStack() as pools:
            committer = pools.enter_context(ThreadPoolExecutor(1, thread_name_prefix="commit"))
            pool = {
                id(s): pools.enter_context(
                    ThreadPoolExecutor(s.max_concurrent, thread_name_prefix=f"pull-{s.name}")
                )
                for s in sources
            }
            commits: list[Future[SeriesOutcome]] = []

            def retrieve_then_commit(job: SeriesJob) -> None:
                if self._stopping:  # left to _stopped
                    return
                if self.cancelled.is_set():  # left pending: the next pull resumes it
                    report.series.append(
                        SeriesOutcome(job.pseudo_series, "cancelled", job.expected, 0)
                    )
                    return
                self._inflight[job.pseudo_series] = job
                try:
                    outcome = self._retrieve(job)
                except BaseException:
                    self._stopping = True  # the series still queued are not started
                    raise
                if outcome is None:
                    commits.append(committer.submit(self._commit_counted, job))
                else:
                    self._inflight.pop(job.pseudo_series, None)
                    self._series_done(outcome)
                    report.series.append(outcome)

            for f in [pool[id(j.source)].submit(retrieve_then_commit, j) for j in jobs]:
                f.result()
            report.series.extend(c.result() for c in commits)

    # -- progress ----------------------------------------------------------------------------

    def progress(self) -> PullProgress:
        """Where the pull is now, spooled instances of the series in flight included."""
        p = self._progress
        spooled = 0
        for job in list(self._inflight.values()):
            with suppress(Exception):  # committed or discarded meanwhile
                spooled += job.writer.count
        now = PullProgress(**{**p.__dict__})
        now.instances = p.instances + spooled
        seconds = time.monotonic() - self._t0
        now.rate = (now.instances - self._before) / seconds if seconds > 0 else 0.0
        return now

    def _planned(self, report: PullReport, jobs: list[SeriesJob]) -> None:
        skipped = [s for s in report.series if s.status == "skipped"]
        p = self._progress
        p.series_total = len(skipped) + len(jobs)
        p.series_done = len(skipped)
        p.instances_total = sum(s.expected for s in skipped) + sum(j.expected for j in jobs)
        p.instances = self._before = sum(s.stored for s in skipped)
        p.phase = "retrieving"
        self._t0 = time.monotonic()
        self._tell()

    def _series_done(self, outcome: SeriesOutcome) -> None:
        p = self._progress
        p.series_done += 1
        if outcome.status == "complete":
            p.instances += outcome.stored
            p.nbytes += outcome.nbytes
        self._tell()

    def _tell(self) -> None:
        if self.on_progress is not None:
            try:
                self.on_progress(self.progress())
            except Exception as e:  # a progress display never stops a pull
                log.warning("progress hook failed (%s)", type(e).__name__)

    def _commit_counted(self, job: SeriesJob) -> SeriesOutcome:
        try:
            outcome = self._commit_or_stop(job)
        finally:
            self._inflight.pop(job.pseudo_series, None)
        self._series_done(outcome)
        return outcome

    # -- steps -------------------------------------------------------------------------------

    def _job(self, p: Planned) -> SeriesJob:
        pseudo_series = self.keys.uid(p.series.series_uid)
        job = SeriesJob(
            project=self.project.name,
            study_uid=p.study.study_uid,
            series_uid=p.series.series_uid,
            pseudo_study=self.keys.uid(p.study.study_uid),
            pseudo_series=pseudo_series,
            patient_pseudonym=self.keys.pseudonym(p.study.patient_id) if p.study.patient_id else "",
            modality=p.series.modality or "",
            expected=p.series.n_instances or 0,
            writer=SeriesWriter(self.layout.data(pseudo_series), fsync=self.core.settings.fsync),
            source=p.source,
        )
        self._upsert(job, status="pending")
        self._jobs.append(job)
        return job

    def _retrieve(self, job: SeriesJob) -> SeriesOutcome | None:
        """Bring every instance of the series into the spool; None when it is all there."""
        if job.expected <= 0:
            return self._fail(job, "the PACS reports no instances for this series")
        s = self.core.settings
        error = ""
        pace = getattr(job.source, "pace", None)  # the source's rate cap, if it has one
        self.layout.expect(job.pseudo_series, job.pseudo_study, job.patient_pseudonym)
        try:
            for attempt in range(s.retries + 1):
                if attempt:
                    time.sleep(s.backoff_s * 2 ** (attempt - 1))
                if pace is not None:  # each attempt: the source sends the whole series again
                    pace(job.expected)
                try:
                    result = job.source.retrieve(job.study_uid, job.series_uid)
                except SourceGone:  # the breaker gave up on the source: the pull stops
                    raise
                except SourceError as e:
                    error = f"retrieve failed: {e}"
                    log.warning("series %s attempt %d: %s", job.pseudo_series, attempt + 1, e)
                    continue
                job.quarantined = self.layout.quarantined(job.pseudo_series)
                error = verify(job, result)
                if not error:
                    # What the source sent (every protocol), for `sphere status --series`.
                    syntaxes = self.layout.syntaxes(job.pseudo_series)
                    if syntaxes:
                        self._upsert(job, transfer_syntax=" ".join(syntaxes))
                    return None
                check_spool(self.layout.root, s.spool_min_free_mb)
                log.warning("series %s attempt %d: %s", job.pseudo_series, attempt + 1, error)
        finally:
            self.layout.forget(job.pseudo_series)
        return self._fail(job, error)

    def _commit(self, job: SeriesJob) -> SeriesOutcome:
        note = _quarantine_text(job)
        if job.writer.count == 0:
            job.writer.discard()
            self._upsert(job, status="quarantined", error=note)
            metrics.get().series.labels(job.project, job.source.name, "quarantined").inc()
            return SeriesOutcome(
                job.pseudo_series,
                "quarantined",
                job.expected,
                0,
                error=note,
                quarantined=job.n_quarantined,
            )
        if self.lock is not None and self.lock.lost:
            return self._fail(job, "another pull took this project's pull lock: not committed")
        # Stored, read back, indexed from the writer's headers, complete and audited: one call.
        values = self._row(job, error=note or None)
        audit = {
            "actor": self.actor,
            "action": "series.stored",
            "project": self.project.name,
            "detail": {
                "series": job.pseudo_series,
                "quarantined": job.n_quarantined,
            },
        }
        try:  # the store down for a while holds the commit up, the spool kept
            info = commit_series(
                self.core.store,
                self.core.catalog,
                job.writer,
                job.key,
                project_id=self.project.id,
                series_uid=job.pseudo_series,
                values=values,
                audit=audit,
                retry=self._store_retried,
            )
        except SeriesUnreadable as e:  # never "complete" unless it reads back whole
            return self._fail(job, f"the stored series does not read back: {e}")
        except SeriesError as e:
            return self._fail(job, f"could not assemble the series: {e}")
        except SQLAlchemyError:  # the catalog itself fails (full, down): the pull stops
            raise
        except IndexingFailed as e:  # not findable: failed, so a re-run pulls it again
            log.error("series %s: indexing failed: %s", job.pseudo_series, e)
            return self._fail(job, f"indexing failed ({e})")
        except Exception as e:  # storage down too long: the spool is kept, a re-run resumes
            log.error("series %s: storage failed: %s", job.pseudo_series, type(e).__name__)
            return self._fail(job, f"storage failed ({type(e).__name__}): spool kept for resume")
        self.layout.clear_notes(job.pseudo_series)
        m = metrics.get()
        m.series.labels(job.project, job.source.name, "complete").inc()
        m.stored.labels(job.project, job.source.name).inc(info.n_instances)
        m.stored_bytes.labels(job.project, job.source.name).inc(info.nbytes)
        return SeriesOutcome(
            job.pseudo_series,
            "complete",
            job.expected,
            info.n_instances,
            info.nbytes,
            error=note or None,
            quarantined=job.n_quarantined,
        )

    def _store_retried(self, fn: Callable[[], T], what: str) -> T:
        """`fn()` while the object store is down, up to `store_wait_s` (not once the pull is
        stopping: the spool keeps the series for the next)."""
        s = self.core.settings
        return while_store_down(
            fn,
            what,
            wait_s=s.store_wait_s,
            backoff_s=s.backoff_s,
            stop=lambda: self._stopping or self.cancelled.is_set(),
        )

    def _commit_or_stop(self, job: SeriesJob) -> SeriesOutcome:
        """`_commit`; an error it does not handle stops the pull (no more series started)."""
        try:
            return self._commit(job)
        except BaseException:
            self._stopping = True
            raise

    def _fail(self, job: SeriesJob, error: str) -> SeriesOutcome:
        self._upsert(job, status="failed", error=error)
        m = metrics.get()
        m.series.labels(job.project, job.source.name, "failed").inc()
        m.failed.labels(job.project, job.source.name).inc(job.expected)
        self.core.catalog.audit(
            self.actor,
            "series.failed",
            self.project.name,
            "error",
            series=job.pseudo_series,
            reason=error,
        )
        try:
            spooled = job.writer.count
        except SpoolError:  # committed (the spool removed) before a later step failed
            spooled = 0
        return SeriesOutcome(job.pseudo_series, "failed", job.expected, spooled, error=error)

    def _upsert(self, job: SeriesJob, **values: object) -> None:
        self.core.catalog.upsert_series(
            self.project.id, job.pseudo_series, **self._row(job, **values)
        )

    def _row(self, job: SeriesJob, **values: object) -> dict[str, object]:
        """The catalog row's values of a series of this pull, with `values`."""
        return {
            "study_uid": job.pseudo_study,
            "modality": job.modality,
            "source": job.source.name,
            "patient_pseudonym": job.patient_pseudonym,
            "expected": job.expected,
            **values,
        }


def _quarantine_text(job: SeriesJob) -> str:
    return "; ".join(f"{n} quarantined: {r}" for r, n in sorted(job.quarantined.items()))
