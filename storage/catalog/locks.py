"""The catalog's queries for pull locks (`gateway.pull.lock`): one row per project."""

from __future__ import annotations

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError

from storage.catalog.db import Queries
from storage.models import Project, PullLock, rowcount, utcnow


class PullLockQueries(Queries):
    """Take, renew, release a project's pull lock."""

    def pull_lock(self, project_id: int) -> PullLock | None:
        """Who holds the project's pull lock, if anyone."""
        with self.session() as s:
            return s.get(PullLock, project_id)

    def take_pull_lock(
        self, project_id: int, token: str, *, host: str, pid: int, actor: str, replace: str = ""
    ) -> bool:
        """Take the project's pull lock: a new row, or (`replace`) the row still held under
        that token. False when someone else holds it (or took it first)."""
        now = utcnow()
        values = {"token": token, "host": host, "pid": pid, "actor": actor}
        try:
            with self.session() as s:
                if not replace:
                    s.add(PullLock(project_id=project_id, since=now, heartbeat=now, **values))
                    return True
                q = (
                    update(PullLock)
                    .where(PullLock.project_id == project_id, PullLock.token == replace)
                    .values(since=now, heartbeat=now, **values)
                )
                return bool(rowcount(s.execute(q)))
        except IntegrityError:  # another pull inserted it first
            return False

    def renew_pull_lock(self, project_id: int, token: str) -> bool:
        """The holder's heartbeat; False when the lock is no longer its own."""
        with self.session() as s:
            q = (
                update(PullLock)
                .where(PullLock.project_id == project_id, PullLock.token == token)
                .values(heartbeat=utcnow())
            )
            return bool(rowcount(s.execute(q)))

    def held_pull_locks(self) -> list[str]:
        """The names of the projects whose pull lock is held now (for the metrics)."""
        with self.session() as s:
            q = select(Project.name).join(PullLock, PullLock.project_id == Project.id)
            return [str(n) for n in s.scalars(q)]

    def release_pull_lock(self, project_id: int, token: str) -> None:
        """Drop the lock, if it is still the holder's."""
        with self.session() as s:
            s.execute(
                delete(PullLock).where(PullLock.project_id == project_id, PullLock.token == token)
            )
