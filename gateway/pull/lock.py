"""One pull per project at a time, on every node that shares the catalog.

The lock is a row of `pull_locks` (storage.catalog), taken in a transaction: on PostgreSQL two
nodes racing for it are serialised by the primary key. The holder keeps it alive with a heartbeat
thread. A lock whose holder is gone — its process dead on this host, or no heartbeat for
`LEASE_S` on any host — is taken over, and the taking pull says so. Two pulls of one project
would otherwise share the spool and commit the same series keys at once (issue 19: series the
catalog called complete were unreadable).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

from core import SphereError
from storage.catalog import Catalog, Project, PullLock, utcnow

log = logging.getLogger(__name__)

LEASE_S = 60.0  # a holder silent this long is gone (clocks of the nodes agree within seconds)
BEAT_S = 10.0  # heartbeat interval


class PullBusy(SphereError):
    """Another pull of the project runs (the message names its host, process and start)."""


def holder_text(held: PullLock) -> str:
    """Who holds a lock, in words (no patient data: host, pid, operator, time)."""
    who = f", by {held.actor}" if held.actor else ""
    return f"{held.host} (pid {held.pid}{who}) since {held.since:%Y-%m-%d %H:%M:%S} UTC"


# The tokens of the locks this process holds now: a lock of this process that is not among
# them was left by one of its pulls that ended without releasing it (the catalog was down).
_HELD: set[str] = set()


def gone(held: PullLock, host: str) -> str:
    """Why a lock's holder is gone ("" when it may still be pulling)."""
    if held.host == host and not _alive(held.pid):
        return "its process is gone"
    if held.host == host and held.pid == os.getpid() and held.token not in _HELD:
        return "its pull in this process ended"
    silent = (utcnow() - held.heartbeat).total_seconds()
    if silent > LEASE_S:
        return f"no heartbeat for {silent:.0f} s"
    return ""


class ProjectPullLock:
    """Held while a pull of `project` runs: `with ProjectPullLock(...) as lock:`. Raises
    `PullBusy` on entry when another live pull holds it. `took_over` says whose stale lock was
    taken; `lost` turns true if another pull took this one, or while the heartbeat has not
    reached the catalog for a lease (the pull then commits nothing)."""

    def __init__(self, catalog: Catalog, project: Project, actor: str) -> None:
        self.catalog, self.project, self.actor = catalog, project, actor
        self.host = socket.gethostname()
        self.token = uuid.uuid4().hex
        self.took_over = ""
        self.lost = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> ProjectPullLock:
        self.take()
        self._hold()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._release()

    @contextmanager
    def held(self) -> Iterator[ProjectPullLock]:
        """Keep a lock already taken alive (heartbeat) for the block, then release it."""
        self._hold()
        try:
            yield self
        finally:
            self._release()

    def _hold(self) -> None:
        self._beat = threading.Thread(target=self._heartbeat, name="pull-lock", daemon=True)
        self._beat.start()

    def _release(self) -> None:
        _HELD.discard(self.token)
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        try:
            self.catalog.release_pull_lock(self.project.id, self.token)
        except Exception as e:  # the catalog is down: the lease runs out on its own
            log.warning("pull lock of %s not released (%s)", self.project.name, type(e).__name__)

    def take(self) -> None:
        """Take the lock, or take over a dead holder's; `PullBusy` when a live pull has it."""
        mine = {"host": self.host, "pid": os.getpid(), "actor": self.actor}
        _HELD.add(self.token)  # before it is in the catalog: no one here takes it for stale
        try:
            self._take(mine)
        except BaseException:
            _HELD.discard(self.token)
            raise

    def _take(self, mine: dict[str, Any]) -> None:
        for _ in range(3):  # a holder may release or die between our reads
            if self.catalog.take_pull_lock(self.project.id, self.token, **mine):
                return
            held = self.catalog.pull_lock(self.project.id)
            if held is None:
                continue
            why = gone(held, self.host)
            if not why:
                raise PullBusy(
                    f"project {self.project.name} is being pulled on {holder_text(held)}: "
                    "wait for that pull to end"
                )
            if self.catalog.take_pull_lock(self.project.id, self.token, replace=held.token, **mine):
                self.took_over = f"{holder_text(held)} ({why})"
                log.warning("took over the pull lock of %s", self.took_over)
                return
        raise PullBusy(f"project {self.project.name}: the pull lock keeps changing hands; retry")

    def _heartbeat(self) -> None:
        renewed = time.monotonic()
        while not self._stop.wait(BEAT_S):
            try:
                if not self.catalog.renew_pull_lock(self.project.id, self.token):
                    self.lost = True
                    log.error("the pull lock of %s was taken by another pull", self.project.name)
                    return
                renewed, self.lost = time.monotonic(), False
            except Exception as e:  # the catalog is down for a while: try again at the next beat
                log.warning("pull lock heartbeat failed (%s)", type(e).__name__)
                if time.monotonic() - renewed > LEASE_S:  # another pull may take it over now
                    self.lost = True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
