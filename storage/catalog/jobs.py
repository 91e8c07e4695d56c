"""The catalog's queries for jobs (`storage.models.Job`): submit, lease, heartbeat, finish, cancel.

A lease is a compare-and-swap on the job's `token`: on PostgreSQL the candidates are read
`FOR UPDATE SKIP LOCKED` (nodes never wait on each other's rows), on SQLite (one node) the
conditional update alone decides. Mixed into `Catalog`, so callers ask `core.catalog`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError

from storage.catalog.db import Queries
from storage.models import (
    DailyTask,
    Job,
    SourceBreaker,
    SourceBucket,
    SourceSlot,
    rowcount,
    utcnow,
)

ACTIVE = ("queued", "running", "waiting")
TERMINAL = ("done", "failed", "cancelled")
_SourceRow = TypeVar("_SourceRow", SourceBucket, SourceBreaker)
_T = TypeVar("_T")


class JobQueries(Queries):
    """Jobs."""

    def submit_job(
        self, kind: str, project: str, params: dict[str, Any], by: str
    ) -> tuple[Job, Job | None]:
        """Queue a job; for a pull, unless the project has one queued or running already.
        Returns (the new job, None), or (the job in the way, the same) when refused."""
        with self.session() as s:
            if kind == "pull":
                busy = s.scalar(
                    select(Job)
                    .where(Job.kind == "pull", Job.project == project, Job.state.in_(ACTIVE))
                    .order_by(Job.id)
                    .limit(1)
                )
                if busy is not None:
                    return busy, busy
            job = Job(kind=kind, project=project, params=params, submitted_by=by, state="queued")
            s.add(job)
            s.flush()
            return job, None

    def job(self, job_id: int) -> Job | None:
        with self.session() as s:
            return s.get(Job, job_id)

    def jobs(self, project: str | None = None, *, limit: int = 50) -> list[Job]:
        """The latest jobs first (of one project, or all)."""
        q = select(Job).order_by(Job.id.desc()).limit(limit)
        if project is not None:
            q = q.where(Job.project == project)
        with self.session() as s:
            return list(s.scalars(q))

    def job_counts(self) -> dict[tuple[str, str], int]:
        """How many jobs of each (kind, state): for /metrics."""
        with self.session() as s:
            rows = s.execute(
                select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state)
            )
            return {(k, st): int(n) for k, st, n in rows}

    def lease_job(
        self,
        node: str,
        token: str,
        lease_s: float,
        kinds: tuple[str, ...] = ("pull", "run", "export"),
    ) -> Job | None:
        """Take the oldest job that is queued, waiting past its time, or running under a lease
        that ran out (its node is gone); None when there is none."""
        now = utcnow()
        leasable = or_(
            Job.state == "queued",
            and_(Job.state == "running", Job.lease_expires < now),
            and_(Job.state == "waiting", or_(Job.not_before.is_(None), Job.not_before <= now)),
        )
        q = select(Job).where(leasable, Job.kind.in_(kinds)).order_by(Job.id).limit(5)
        with self.session() as s:
            if s.get_bind().dialect.name == "postgresql":
                q = q.with_for_update(skip_locked=True)
            for cand in s.scalars(q).all():
                was = (
                    (cand.node or "") if cand.state == "running" else ""
                )  # before the update below
                same = Job.token.is_(None) if cand.token is None else Job.token == cand.token
                took = s.execute(
                    update(Job)
                    .where(Job.id == cand.id, Job.state == cand.state, same)
                    .values(
                        state="running",
                        token=token,
                        node=node,
                        heartbeat=now,
                        lease_expires=now + timedelta(seconds=lease_s),
                        started_at=cand.started_at or now,
                        not_before=None,
                        attempts=Job.attempts + 1,
                    )
                    .execution_options(synchronize_session=False)
                )
                if rowcount(took):
                    job = s.get(Job, cand.id, populate_existing=True)
                    if job is not None:  # it is: updated in this transaction
                        # the node whose lease ran out, if one's (not stored: for the taker)
                        job.taken_from = was
                    return job
        return None

    def renew_job(
        self, job_id: int, token: str, lease_s: float, progress: dict[str, Any] | None = None
    ) -> bool | None:
        """The holder's heartbeat (and progress). None when the job is no longer its own,
        else whether a cancel was asked for."""
        now = utcnow()
        values: dict[str, Any] = {"heartbeat": now}
        values["lease_expires"] = now + timedelta(seconds=lease_s)
        if progress is not None:
            values["progress"] = progress
        with self.session() as s:
            q = update(Job).where(Job.id == job_id, Job.token == token, Job.state == "running")
            if not rowcount(s.execute(q.values(**values))):
                return None
            return bool(s.scalar(select(Job.cancel_requested).where(Job.id == job_id)))

    def end_job(
        self,
        job_id: int,
        token: str,
        state: str,
        outcome: str,
        *,
        progress: dict[str, Any] | None = None,
        not_before: datetime | None = None,
    ) -> bool:
        """Leave the job: done, failed, cancelled, or waiting (until `not_before`, queued
        again then). False when it was no longer the holder's."""
        values: dict[str, Any] = {"state": state, "outcome": outcome[:500], "token": None}
        values["lease_expires"] = None
        if state in TERMINAL:
            values["finished_at"] = utcnow()
        if state == "waiting":
            values["not_before"] = not_before
        if progress is not None:
            values["progress"] = progress
        with self.session() as s:
            q = update(Job).where(Job.id == job_id, Job.token == token)
            return bool(rowcount(s.execute(q.values(**values))))

    def cancel_job(self, job_id: int, by: str) -> str:
        """Cancel a job: at once when it waits, at its next heartbeat when it runs. Returns
        the state it was in."""
        with self.session() as s:
            job = s.get(Job, job_id, with_for_update=True)
            if job is None:
                return ""
            was = job.state
            if was in ("queued", "waiting"):
                job.state, job.finished_at = "cancelled", utcnow()
                job.outcome, job.token = f"cancelled by {by} before it ran", None
            elif was == "running":
                job.cancel_requested = True
            return was

    # -- source slots (gateway.pull.guard) --------------------------------------------------

    def take_source_slot(
        self, source: str, limit: int, token: str, holder: str, lease_s: float
    ) -> int | None:
        """One of the source's `limit` slots: a free one, or one whose holder stopped renewing
        it. None when all are held."""
        now = utcnow()
        expires = now + timedelta(seconds=lease_s)
        for slot in range(limit):
            try:
                with self.session() as s:
                    q = (
                        update(SourceSlot)
                        .where(
                            SourceSlot.source == source,
                            SourceSlot.slot == slot,
                            SourceSlot.expires < now,
                        )
                        .values(token=token, holder=holder, expires=expires)
                    )
                    if rowcount(s.execute(q)):
                        return slot
                    if s.get(SourceSlot, (source, slot)) is None:
                        s.add(
                            SourceSlot(
                                source=source,
                                slot=slot,
                                token=token,
                                holder=holder,
                                expires=expires,
                            )
                        )
                        s.flush()
                        return slot
            except IntegrityError:  # another holder inserted it first
                continue
        return None

    def renew_source_slots(self, source: str, token: str, lease_s: float) -> int:
        """Renew every slot of `source` held under `token`; how many."""
        with self.session() as s:
            q = (
                update(SourceSlot)
                .where(SourceSlot.source == source, SourceSlot.token == token)
                .values(expires=utcnow() + timedelta(seconds=lease_s))
            )
            return rowcount(s.execute(q))

    def release_source_slot(self, source: str, slot: int, token: str) -> None:
        with self.session() as s:
            s.execute(
                delete(SourceSlot).where(
                    SourceSlot.source == source, SourceSlot.slot == slot, SourceSlot.token == token
                )
            )

    def source_slots_held(self, source: str) -> int:
        """Slots of the source held now (for /metrics: associations in use)."""
        with self.session() as s:
            q = select(func.count()).where(
                SourceSlot.source == source, SourceSlot.expires >= utcnow()
            )
            return int(s.scalar(q) or 0)

    # -- source rate caps (gateway.pull.guard) ----------------------------------------------

    def take_source_tokens(
        self, source: str, n: int, rate: float, burst: float, now: datetime | None = None
    ) -> float:
        """Take `n` instances' worth from the source's bucket (refilled at `rate` a second, up
        to `burst`); the seconds to wait before using them (0: at once). One transaction for a
        whole batch, the row locked meanwhile so that nodes take in turn."""
        at = now or utcnow()

        def take(row: SourceBucket) -> float:
            elapsed = max(0.0, (at - row.updated).total_seconds())
            row.tokens = min(burst, row.tokens + elapsed * rate) - n
            row.updated = max(row.updated, at)
            row.taken += n
            return max(0.0, -row.tokens / rate)

        fresh = {"tokens": burst, "updated": at, "taken": 0}
        return self._on_source_row(SourceBucket, source, fresh, take, 0.0)

    def source_bucket(self, source: str) -> SourceBucket | None:
        with self.session() as s:
            return s.get(SourceBucket, source)

    # -- source breakers (gateway.pull.guard) -----------------------------------------------

    def source_breaker(self, source: str) -> SourceBreaker | None:
        with self.session() as s:
            return s.get(SourceBreaker, source)

    def breaker_missed(
        self, source: str, after: int, probe_s: float, now: datetime | None = None
    ) -> bool | None:
        """Count a call to `source` that got no answer, on any node. True when this one opened
        the breaker (`after` in a row: its caller tells the audit trail), False when it was
        open already, None while it stays closed."""
        at = now or utcnow()

        def miss(row: SourceBreaker) -> bool | None:
            if row.opened_at is not None:
                return False
            row.misses += 1
            if row.misses < after:
                return None
            row.opened_at, row.next_probe = at, at + timedelta(seconds=probe_s)
            row.probes, row.opening = 0, row.opening + 1
            return True

        fresh = {"misses": 0, "probes": 0, "opening": 0}
        return self._on_source_row(SourceBreaker, source, fresh, miss, None)

    def _on_source_row(
        self,
        model: type[_SourceRow],
        source: str,
        fresh: dict[str, Any],
        change: Callable[[_SourceRow], _T],
        given_up: _T,
    ) -> _T:
        """`change` the source's row (made from `fresh` when there is none) in one transaction,
        the row locked meanwhile so that nodes take in turn; `given_up` when it could not."""
        for _ in range(3):  # two nodes making the row at once: the loser reads it again
            try:
                with self.session() as s:
                    # a no-op write first: SQLite takes its write lock here, before the read
                    s.execute(
                        update(model).where(model.source == source).values(source=model.source)
                    )
                    row = s.get(model, source, with_for_update=True, populate_existing=True)
                    if row is None:
                        row = model(source=source, **fresh)
                        s.add(row)
                        s.flush()
                    return change(row)
            except IntegrityError:
                continue
        return given_up

    def breaker_answered(self, source: str) -> None:
        """A call to `source` got an answer: the misses in a row start again from none."""
        with self.session() as s:
            s.execute(
                update(SourceBreaker)
                .where(
                    SourceBreaker.source == source,
                    SourceBreaker.misses > 0,
                    SourceBreaker.opened_at.is_(None),
                )
                .values(misses=0)
            )

    def breaker_probe_turn(self, source: str, probe_s: float, now: datetime | None = None) -> bool:
        """Whether the caller is the one to probe the open breaker's source now (its probe
        time has come and no other node took this turn); the next turn is `probe_s` on."""
        now = now or utcnow()
        with self.session() as s:
            q = (
                update(SourceBreaker)
                .where(
                    SourceBreaker.source == source,
                    SourceBreaker.opened_at.is_not(None),
                    SourceBreaker.next_probe <= now,
                )
                .values(
                    next_probe=now + timedelta(seconds=probe_s), probes=SourceBreaker.probes + 1
                )
            )
            return bool(rowcount(s.execute(q)))

    def breaker_close(self, source: str, opening: int) -> SourceBreaker | None:
        """Close the breaker's `opening` (a probe was answered); the row as it was when open,
        or None when another node closed it first."""
        with self.session() as s:
            row = s.get(SourceBreaker, source)
            if row is None or row.opened_at is None or row.opening != opening:
                return None
            was = SourceBreaker(
                source=source, opened_at=row.opened_at, probes=row.probes, opening=opening
            )
            q = (
                update(SourceBreaker)
                .where(
                    SourceBreaker.source == source,
                    SourceBreaker.opening == opening,
                    SourceBreaker.opened_at.is_not(None),
                )
                .values(opened_at=None, next_probe=None, misses=0)
            )
            return was if rowcount(s.execute(q)) else None

    def claim_day(self, task: str, day: date, node: str) -> bool:
        """Whether this node is the one to do `task` on `day` (the first to ask, cluster-wide)."""
        try:
            with self.session() as s:
                s.add(DailyTask(task=task, day=day, node=node))
            return True
        except IntegrityError:  # another node claimed it
            return False
