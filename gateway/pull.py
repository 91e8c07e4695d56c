"""Pull a project's cohort from the PACS: plan with C-FIND, retrieve per series, verify, store.

The way of one series: C-FIND gives the PACS's instance count; the series is registered with the
`Receiver` (which refuses anything not registered); C-MOVE (or C-GET) brings the instances, each one
de-identified and spooled before it is acknowledged (flushed when the association ends, see
Receiver); the received count is checked against the PACS's count and the C-MOVE sub-operation
counts; only then is the series committed to Zarr and marked complete in the catalog. A re-run
skips complete series and resumes the others from their spool.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from sqlalchemy import func, select

from deid.keys import ProjectKeys
from gateway.dimse.scu import (
    DimseError,
    Mover,
    Peer,
    RetrieveResult,
    Scu,
    SeriesHit,
    StudyHit,
)
from gateway.receiver import Receiver, SpoolLayout
from storage.catalog import AuditEvent, Catalog, CohortItem, Project, SeriesRecord, utcnow
from storage.series import SeriesError, SeriesWriter

log = logging.getLogger(__name__)


class PullRefused(Exception):
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
    quarantined: dict[str, int] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"projects/{self.project}/{self.pseudo_study}/{self.pseudo_series}"

    @property
    def n_quarantined(self) -> int:
        return sum(self.quarantined.values())


@dataclass
class SeriesOutcome:
    pseudo_series: str
    status: str  # complete|failed|skipped|quarantined
    expected: int
    stored: int
    nbytes: int = 0
    error: str | None = None  # why it failed, or what was quarantined
    quarantined: int = 0


@dataclass
class PullReport:
    project: str
    studies: int = 0
    series: list[SeriesOutcome] = field(default_factory=list)
    unresolved: int = 0  # cohort items the PACS knows nothing of
    refused_unsolicited: int = 0
    seconds: float = 0.0
    storage: str = ""

    def count(self, status: str) -> int:
        return sum(1 for s in self.series if s.status == status)

    @property
    def instances(self) -> int:
        return sum(s.stored for s in self.series if s.status == "complete")

    @property
    def quarantined(self) -> int:
        """Instances held back by de-identification: reported, never stored."""
        return sum(s.quarantined for s in self.series)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.series)

    @property
    def ok(self) -> bool:
        return all(s.status in ("complete", "skipped") for s in self.series)


@dataclass
class Planned:
    study: StudyHit
    series: SeriesHit


def plan(scu: Scu, peer: Peer, items: list[CohortItem]) -> tuple[list[Planned], dict[int, int]]:
    """Resolve cohort items to studies, then series, with the PACS's instance counts.

    Only the cohort's own keys are ever queried, so nothing outside the cohort is requested.
    Returns the planned series and, per cohort item id, how many studies it matched.
    """
    studies: dict[str, StudyHit] = {}
    found: dict[int, int] = {}
    for item in items:
        hits = scu.find_studies(peer, **{item.kind: item.value})
        found[item.id] = len(hits)
        for h in hits:
            studies.setdefault(h.study_uid, h)
    planned = []
    for st in studies.values():
        for se in scu.find_series(peer, st.study_uid):
            planned.append(Planned(st, se))
    return planned, found


class Puller:
    """Runs one project's pull. Construct with the gateway's parts; call `run()`.

    Instances are received by `Receiver`s (in the Storage SCP's worker processes, or here for
    C-GET); this class only plans, opens and closes the door per series, verifies and commits.
    """

    def __init__(
        self,
        *,
        catalog: Catalog,
        project: Project,
        keys: ProjectKeys,
        scu: Scu,
        peer: Peer,
        layout: SpoolLayout,
        store: Any,
        storage_url: str,
        dest_ae: str,
        get_receiver: Receiver | None = None,
        max_associations: int = 2,
        retries: int = 3,
        backoff_s: float = 1.0,
        fsync: bool = True,
        actor: str = "",
    ) -> None:
        self.catalog, self.project, self.keys = catalog, project, keys
        self.scu, self.peer, self.layout, self.store = scu, peer, layout, store
        self.storage_url, self.dest_ae, self.get_receiver = storage_url, dest_ae, get_receiver
        self.max_assoc = max(1, max_associations)
        self.retries, self.backoff_s, self.fsync, self.actor = retries, backoff_s, fsync, actor
        self._movers: dict[int, Mover] = {}  # by retrieving thread
        self._movers_lock = threading.Lock()

    def check_allowed(self, today: date | None = None) -> None:
        """Raise `PullRefused` (and audit it) unless the project is approved and in date."""
        problem = self.project.approval_problem(today or date.today())
        if problem:
            self.catalog.audit(self.actor, "pull", self.project.name, "refused", reason=problem)
            raise PullRefused(problem)

    def run(self, today: date | None = None) -> PullReport:
        name = self.project.name
        self.check_allowed(today)
        t0 = time.perf_counter()
        started = utcnow()
        report = PullReport(project=name, storage=self.storage_url)
        self.catalog.audit(self.actor, "pull.start", name, retrieve=self.retrieve)
        planned, found = plan(self.scu, self.peer, self._cohort())
        self._record_resolution(found)
        report.unresolved = sum(1 for n in found.values() if n == 0)
        report.studies = len({p.study.study_uid for p in planned})
        done = self._complete_series()
        jobs: list[SeriesJob] = []
        for p in planned:
            pseudo = self.keys.uid(p.series.series_uid)
            if pseudo in done:
                outcome = SeriesOutcome(pseudo, "skipped", p.series.n_instances, done[pseudo])
                report.series.append(outcome)
            else:
                jobs.append(self._job(p))
        # Retrieval is bounded by the PACS's association limit; commits overlap with it.
        with (
            ThreadPoolExecutor(self.max_assoc, thread_name_prefix="retrieve") as pool,
            ThreadPoolExecutor(1, thread_name_prefix="commit") as committer,
        ):
            commits: list[Future[SeriesOutcome]] = []

            def retrieve_then_commit(job: SeriesJob) -> None:
                outcome = self._retrieve(job)
                if outcome is None:
                    commits.append(committer.submit(self._commit, job))
                else:
                    report.series.append(outcome)

            try:
                for f in [pool.submit(retrieve_then_commit, j) for j in jobs]:
                    f.result()
            finally:
                pool.shutdown()
                self._close_movers()
            report.series.extend(c.result() for c in commits)
        report.refused_unsolicited = self._refusals_since(started)
        report.seconds = time.perf_counter() - t0
        self.catalog.audit(
            self.actor,
            "pull.end",
            name,
            "ok" if report.ok else "error",
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
        )
        return report

    @property
    def retrieve(self) -> str:
        return "get" if self.get_receiver is not None else "move"

    # -- steps -------------------------------------------------------------------------------

    def _cohort(self) -> list[CohortItem]:
        with self.catalog.session() as s:
            q = select(CohortItem).where(CohortItem.project_id == self.project.id)
            return list(s.scalars(q))

    def _record_resolution(self, found: dict[int, int]) -> None:
        with self.catalog.session() as s:
            for item_id, n in found.items():
                item = s.get(CohortItem, item_id)
                if item is not None:
                    item.studies_found = n

    def _complete_series(self) -> dict[str, int]:
        with self.catalog.session() as s:
            q = select(SeriesRecord.series_uid, SeriesRecord.stored).where(
                SeriesRecord.project_id == self.project.id, SeriesRecord.status == "complete"
            )
            return dict(s.execute(q).all())

    def _refusals_since(self, started: Any) -> int:
        with self.catalog.session() as s:
            q = select(func.count()).where(
                AuditEvent.project == self.project.name,
                AuditEvent.action == "store.refused",
                AuditEvent.at >= started,
            )
            return int(s.scalar(q) or 0)

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
            expected=p.series.n_instances,
            writer=SeriesWriter(self.layout.data(pseudo_series), fsync=self.fsync),
        )
        self._upsert(job, status="pending")
        return job

    def _retrieve(self, job: SeriesJob) -> SeriesOutcome | None:
        """Bring every instance of the series into the spool; None when it is all there."""
        if job.expected <= 0:
            return self._fail(job, "the PACS reports no instances for this series")
        error = ""
        self.layout.expect(job.pseudo_series, job.pseudo_study, job.patient_pseudonym)
        try:
            for attempt in range(self.retries + 1):
                if attempt:
                    time.sleep(self.backoff_s * 2 ** (attempt - 1))
                try:
                    result = self._retrieve_once(job)
                except DimseError as e:
                    error = f"retrieve failed: {e}"
                    log.warning("series %s attempt %d: %s", job.pseudo_series, attempt + 1, e)
                    continue
                job.quarantined = self.layout.quarantined(job.pseudo_series)
                error = self._verify(job, result)
                if not error:
                    return None
                log.warning("series %s attempt %d: %s", job.pseudo_series, attempt + 1, error)
        finally:
            self.layout.forget(job.pseudo_series)
        return self._fail(job, error)

    def _retrieve_once(self, job: SeriesJob) -> RetrieveResult:
        if self.get_receiver is not None:
            on_store = self.get_receiver.on_store
            result = self.scu.get_series(self.peer, job.study_uid, job.series_uid, on_store)
            self.get_receiver.on_release()
            return result
        return self._mover().move_series(job.study_uid, job.series_uid, self.dest_ae)

    def _mover(self) -> Mover:
        """This thread's association to the PACS, kept for the series it retrieves next."""
        with self._movers_lock:
            mover = self._movers.get(threading.get_ident())
            if mover is None:
                mover = self._movers[threading.get_ident()] = Mover(self.scu, self.peer)
        return mover

    def _close_movers(self) -> None:
        with self._movers_lock:
            movers, self._movers = self._movers, {}
        for mover in movers.values():
            mover.close()

    @staticmethod
    def _verify(job: SeriesJob, result: RetrieveResult) -> str:
        """Completeness is checked, not guessed: our count, the PACS's count, the sub-operations."""
        received = job.writer.count + job.n_quarantined
        if result.failed:
            return f"the PACS reports {result.failed} failed sub-operations"
        if received < job.expected:
            return f"received {received} of {job.expected} instances"
        reported = result.completed + result.warning + result.failed > 0  # counts are optional
        if reported and result.completed + result.warning < job.expected:
            return f"the PACS completed {result.completed} of {job.expected} sub-operations"
        return ""

    def _commit(self, job: SeriesJob) -> SeriesOutcome:
        note = _quarantine_text(job)
        if job.writer.count == 0:
            job.writer.discard()
            self._upsert(job, status="quarantined", error=note)
            return SeriesOutcome(
                job.pseudo_series,
                "quarantined",
                job.expected,
                0,
                error=note,
                quarantined=job.n_quarantined,
            )
        try:
            info = job.writer.commit(self.store, job.key)
        except SeriesError as e:
            return self._fail(job, f"could not assemble the series: {e}")
        except Exception as e:  # storage down: the spool is kept, a re-run resumes
            log.error("series %s: storage failed: %s", job.pseudo_series, type(e).__name__)
            return self._fail(job, f"storage failed ({type(e).__name__}): spool kept for resume")
        self.layout.clear_notes(job.pseudo_series)
        self._upsert(
            job,
            status="complete",
            stored=info.n_instances,
            nbytes=info.nbytes,
            shape=list(info.shape),
            error=note or None,
        )
        self.catalog.audit(
            self.actor,
            "series.stored",
            self.project.name,
            series=job.pseudo_series,
            instances=info.n_instances,
            quarantined=job.n_quarantined,
        )
        return SeriesOutcome(
            job.pseudo_series,
            "complete",
            job.expected,
            info.n_instances,
            info.nbytes,
            error=note or None,
            quarantined=job.n_quarantined,
        )

    def _fail(self, job: SeriesJob, error: str) -> SeriesOutcome:
        self._upsert(job, status="failed", error=error)
        self.catalog.audit(
            self.actor,
            "series.failed",
            self.project.name,
            "error",
            series=job.pseudo_series,
            reason=error,
        )
        return SeriesOutcome(
            job.pseudo_series, "failed", job.expected, job.writer.count, error=error
        )

    def _upsert(self, job: SeriesJob, **values: Any) -> None:
        with self.catalog.session() as s:
            row = s.scalar(
                select(SeriesRecord).where(
                    SeriesRecord.project_id == self.project.id,
                    SeriesRecord.series_uid == job.pseudo_series,
                )
            )
            if row is None:
                row = SeriesRecord(project_id=self.project.id, series_uid=job.pseudo_series)
                s.add(row)
            row.study_uid, row.modality = job.pseudo_study, job.modality
            row.patient_pseudonym, row.expected = job.patient_pseudonym, job.expected
            if values.get("status") == "complete":
                row.storage_key = job.key
            for k, v in values.items():
                setattr(row, k, v)


def _quarantine_text(job: SeriesJob) -> str:
    return "; ".join(f"{n} quarantined: {r}" for r, n in sorted(job.quarantined.items()))
