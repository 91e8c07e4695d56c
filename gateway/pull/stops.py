"""How a pull stops when what it writes to fails: a full spool or catalog disk, the object
store down. The pull ends as any other (the summary, the `pull.end` audit row, no series left
pending, no `.tmp` left) with one line saying what failed and what to do, never "unexpected X".
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sqlalchemy.exc import SQLAlchemyError
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype

from core import SphereError, Unavailable
from gateway.pull.guard import SourceGone
from gateway.pull.report import PullReport
from storage.objectstore import StorageUnavailable, guard, run

log = logging.getLogger(__name__)
T = TypeVar("T")
_FULL = (errno.ENOSPC, errno.EDQUOT)
MAX_BACKOFF_S = 10.0


class PullStopped(SphereError):
    """The pull stopped on a failure of the spool, the catalog or the store; `report` holds
    what it did until then."""

    def __init__(self, message: str, report: PullReport) -> None:
        super().__init__(message)
        self.report = report


def why_stopped(exc: BaseException, spool: Path) -> str:
    """One line for a failure the operator can act on; "" for anything else (a bug)."""
    if isinstance(exc, OSError) and exc.errno in _FULL:
        where = exc.filename or spool
        return f"no space left on the disk of {where}: free some, then re-run the pull"
    if isinstance(exc, SQLAlchemyError):
        orig = getattr(exc, "orig", None)
        text = str(orig or exc).strip().splitlines()[0][:160] if (orig or str(exc)) else ""
        return f"the catalog database failed ({text or type(exc).__name__}): re-run when it is back"
    if isinstance(exc, SourceGone):
        return f"{exc}: the pull stopped; re-run when it answers"
    if isinstance(exc, StorageUnavailable):
        return f"{exc}: re-run when the store is back"
    if isinstance(exc, OSError):
        return f"a file system error ({os.strerror(exc.errno or 0)}) at {exc.filename or spool}"
    return ""


def spool_free(spool: Path) -> int:
    """Free bytes on the spool's disk (asked of the nearest folder that exists)."""
    path = Path(spool)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def check_spool(spool: Path, min_free_mb: float) -> None:
    """Raise OSError(ENOSPC) when the spool's disk has less than `min_free_mb` free (the
    receivers, in other processes, answer 0xA700 on a full disk: this is how the pull learns)."""
    free = spool_free(spool)
    if free < min_free_mb * 1e6:
        raise OSError(errno.ENOSPC, f"only {free // 1024} KiB free", os.fspath(spool))


def probe_store(store: Store, prefix: str) -> None:
    """Write and delete one small object under `prefix`: the store answers and takes writes.
    `Unavailable` (one line) when it does not; run before anything is asked of the PACS."""
    key = f"{prefix.strip('/')}/.probe-{uuid.uuid4().hex}"
    try:
        with guard("probe"):
            run(store.set(key, default_buffer_prototype().buffer.from_bytes(b"ok")))
            run(store.delete(key))
    except (StorageUnavailable, FileNotFoundError) as e:
        why = str(e) if isinstance(e, StorageUnavailable) else "storage folder missing"
        raise Unavailable(f"{why}: nothing was pulled; re-run when the store is back") from None


def while_store_down(
    fn: Callable[[], T], what: str, *, wait_s: float, backoff_s: float, stop: Callable[[], bool]
) -> T:
    """`fn()`, called again while the object store is unavailable (backing off, at most
    `wait_s` in all, or until `stop()`): a store down for a while holds a series' commit up,
    its instances kept in the spool, instead of failing it. The last `StorageUnavailable`
    is raised when it is not back in time."""
    deadline = time.monotonic() + wait_s
    wait = max(backoff_s, 0.05)
    told = False
    while True:
        try:
            return fn()
        except StorageUnavailable as e:
            if stop() or time.monotonic() + wait > deadline:
                raise
            if not told:
                log.warning("%s; the %s is tried again until it answers", e, what)
                told = True
        time.sleep(wait)
        wait = min(wait * 2, MAX_BACKOFF_S)
