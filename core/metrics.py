"""What a node counts, for Prometheus (`prometheus_client`): pulls per project and source, web
requests per route template. `get()` gives this process's metrics; the web edge serves them at
/metrics (gateway.web.metrics).

Several processes count on one node: `sphere serve`'s workers, the pull and its Storage SCP
worker processes. With `PROMETHEUS_MULTIPROC_DIR` set (the CLI sets it to the home's `metrics/`
folder, `share()`), each writes its values to a file there and a scrape adds them up
(prometheus_client's multiprocess mode). Labels are project and source names, route templates
and status classes only: never a UID, a path as typed, or anything from a patient.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values

ENV = "PROMETHEUS_MULTIPROC_DIR"
FOLDER = "metrics"  # under the home
_PULL = ("project", "source")


class Metrics:
    """One process's metrics, in a registry of their own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.received = Counter(
            "sphere_instances_received", "Instances that reached a receiver.", _PULL, registry=r
        )
        self.received_bytes = Counter(
            "sphere_received_bytes", "Bytes of the instances received.", _PULL, registry=r
        )
        self.refused = Counter(
            "sphere_instances_refused",
            "Instances refused (reason: unsolicited, opted_out).",
            (*_PULL, "reason"),
            registry=r,
        )
        self.quarantined = Counter(
            "sphere_instances_quarantined",
            "Instances quarantined, never stored.",
            _PULL,
            registry=r,
        )
        self.stored = Counter(
            "sphere_instances_stored", "Instances committed to the store.", _PULL, registry=r
        )
        self.stored_bytes = Counter(
            "sphere_stored_bytes", "Bytes committed to the store.", _PULL, registry=r
        )
        self.failed = Counter(
            "sphere_instances_failed",
            "Instances of series that failed (expected by the source).",
            _PULL,
            registry=r,
        )
        self.series = Counter(
            "sphere_series",
            "Series a pull finished, by outcome (complete, failed, quarantined).",
            (*_PULL, "outcome"),
            registry=r,
        )
        self.connections = Gauge(
            "sphere_source_connections",
            "Associations (or HTTP retrieves) open to a source now.",
            ("source",),
            registry=r,
            multiprocess_mode="livesum",
        )
        self.lease_expiries = Counter(
            "sphere_lease_expiries",
            "Leases (pull locks, jobs) taken over after their holder went silent.",
            ("kind",),
            registry=r,
        )
        self.breaker_open = Gauge(
            "sphere_source_breaker_open",
            "1 while a source's breaker is open (its work paused), else 0.",
            ("source",),
            registry=r,
            multiprocess_mode="livemax",
        )
        self.http_requests = Counter(
            "sphere_http_requests",
            "HTTP requests by method, route template and status class.",
            ("method", "route", "status"),
            registry=r,
        )
        self.http_seconds = Histogram(
            "sphere_http_request_duration_seconds",
            "Time to answer, by method and route template.",
            ("method", "route"),
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )


_lock = threading.Lock()
_current: tuple[str | None, Metrics] | None = None


def get() -> Metrics:
    """This process's metrics: in files under `PROMETHEUS_MULTIPROC_DIR` when it is set (made
    owner-only if missing), else in memory. Built again when that variable changes."""
    global _current
    folder = os.environ.get(ENV)
    cur = _current
    if cur is None or cur[0] != folder:
        with _lock:
            cur = _current
            if cur is None or cur[0] != folder:
                if folder:
                    Path(folder).mkdir(mode=0o700, parents=True, exist_ok=True)
                values.ValueClass = values.get_value_class()  # chosen by the variable
                cur = _current = (folder, Metrics())
    return cur[1]


def folder(home: Path) -> Path:
    return home / FOLDER


def share(home: Path) -> Callable[[], None]:
    """Count in the home's metrics folder from now on, in this process and those it starts
    (unless `PROMETHEUS_MULTIPROC_DIR` is set already); returns what undoes it."""
    if os.environ.get(ENV):
        return lambda: None
    os.environ[ENV] = str(folder(home).resolve())

    def undo() -> None:
        os.environ.pop(ENV, None)

    return undo


def clear_ended() -> int:
    """Remove the shared folder's files of processes that have ended (a server starting counts
    afresh; a pull running beside it keeps its own). Returns how many were removed."""
    where = os.environ.get(ENV)
    if not where:
        return 0
    path, removed = Path(where), 0
    for f in path.glob("*.db") if path.is_dir() else ():
        pid = _pid(f)
        if pid is None or not _alive(pid):
            f.unlink(missing_ok=True)
            removed += 1
    return removed


def ended_pids(path: Path) -> set[int]:
    """The processes with files in `path` that are no longer running."""
    pids = {_pid(f) for f in path.glob("*.db")} if path.is_dir() else set()
    return {p for p in pids if p is not None and not _alive(p)}


def _pid(f: Path) -> int | None:
    tail = f.stem.rpartition("_")[2]
    return int(tail) if tail.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
