"""Run a pipeline over a project's series with Dask distributed: one task per series.

The client lists the project's complete series, skips those with a result of the same pipeline
version (a run is restartable), and submits one task each to an embedded `LocalCluster` or to a
running scheduler. A task gets the settings and a storage key, never arrays: the worker opens
its own `Core`, reads the series from the store, loads the model once per worker process
(cached by path, checksum and device), runs the pipeline, writes SEG/SR/PNG and the result row.
A series that fails is recorded with its reason and the batch goes on; a worker lost or a store
that is down is retried by Dask (`retries`), then recorded as failed. What a task does with its
series is `processing.worker`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from core import vaultkey
from core.core import Core
from core.errors import Unavailable
from core.settings import Settings
from processing.pipeline import DONE, FAILED, Pipeline
from processing.worker import SeriesOutcome, SeriesTask, process_series, reason_of

log = logging.getLogger(__name__)
GPU = "GPU"  # the Dask resource name GPU workers declare


@dataclass
class RunReport:
    """What a run did: one outcome per series submitted, and how many were already done."""

    pipeline: str
    version: str
    outcomes: list[SeriesOutcome] = field(default_factory=list)
    already_done: int = 0

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for o in self.outcomes:
            out[o.status] = out.get(o.status, 0) + 1
        return out


def run_pipeline(
    settings: Settings,
    project: str,
    pipeline: Pipeline,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    gpus: int = 0,
    force: bool = False,
    retries: int = 2,
    progress: bool = True,
) -> RunReport:
    """Run `pipeline` over the complete series of `project`; see the module docstring.

    `scheduler`: address of a running Dask scheduler (its workers must reach the catalog and
    the store); else an embedded LocalCluster of `workers` processes (default 2), or of `gpus`
    GPU workers when `gpus` > 0. Tasks of a pipeline that wants a GPU require the GPU resource
    when `gpus` > 0 (with a scheduler: its workers started with `--resources GPU=1`).
    `force` re-runs series already done with this version (their results are replaced).
    """
    from distributed import Client  # heavy: only when a run starts

    report = RunReport(pipeline.name, pipeline.version)
    tasks = _plan(settings, project, pipeline, force, report)
    if not tasks:
        return report
    use_gpu = gpus > 0 and pipeline.wants_gpu
    cluster = local_cluster(workers, gpus) if scheduler is None else None
    try:
        target = cluster if cluster is not None else scheduler
        with Client(target, timeout=f"{settings.timeout_s}s") as client:
            _submit_and_collect(
                client, settings, pipeline, tasks, use_gpu, retries, progress, report
            )
    except OSError as e:
        raise Unavailable(f"the Dask scheduler cannot be reached ({type(e).__name__})") from None
    finally:
        if cluster is not None:
            cluster.close()
    return report


def local_cluster(workers: int | None = None, gpus: int = 0) -> Any:
    """The embedded cluster: `workers` processes (default 2) of one thread each, or `gpus`
    GPU workers declaring the GPU resource (one GPU each).

    Workers fork from a fork server that imported this module (torch, MONAI) once, instead
    of each importing it again (~10 s each on a small machine). The server never runs torch,
    so forking from it is safe.
    """
    import dask
    from distributed import LocalCluster
    from distributed.utils import get_mp_context

    # Dask sets its workers' environment (OMP_NUM_THREADS=1, MALLOC_TRIM_THRESHOLD_, a fixed
    # PYTHONHASHSEED...) in this process's os.environ and leaves it there: every process
    # started later (a pull's, a test's) would inherit it. Put ours back once they started.
    saved = dict(os.environ)
    with (
        dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}),
        _restored_environ(saved),
    ):
        get_mp_context().set_forkserver_preload(["distributed", __name__])
        vaultkey.keep_out_of_environment()  # the workers are the research side (put back after)
        return LocalCluster(
            n_workers=gpus if gpus > 0 else (workers or 2),
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            resources={GPU: 1} if gpus > 0 else None,
            silence_logs=logging.ERROR,
        )


@contextlib.contextmanager
def _restored_environ(saved: dict[str, str]) -> Iterator[None]:
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _plan(
    settings: Settings, project: str, pipeline: Pipeline, force: bool, report: RunReport
) -> list[SeriesTask]:
    with Core(settings, research=True) as core:
        p = core.project(project)
        rows = core.catalog.series(p.id, status="complete")
        derived = core.catalog.derived_series_uids(p.id)
        states = core.catalog.result_states(p.id, pipeline.name)
    tasks = []
    for r in rows:
        if r.series_uid in derived or not r.storage_key:
            continue  # pipelines' own outputs are never inputs
        version, status = states.get(r.series_uid, (None, None))
        if not force and version == pipeline.version and status in DONE:
            report.already_done += 1
            continue
        tasks.append(
            SeriesTask(project, r.series_uid, r.study_uid, r.patient_pseudonym, r.storage_key)
        )
    return tasks


def _submit_and_collect(
    client: Any,
    settings: Settings,
    pipeline: Pipeline,
    tasks: list[SeriesTask],
    use_gpu: bool,
    retries: int,
    show: bool,
    report: RunReport,
) -> None:
    from distributed import as_completed

    # Workers are the research side: the vault key never goes to them.
    settings_json = settings.model_dump_json(exclude={"vault_key", "vault_key_file"})
    futures = {
        client.submit(
            process_series,
            settings_json,
            task,
            pipeline,
            use_gpu,
            key=f"{pipeline.name}-{task.series_uid}-{time.time_ns()}",
            retries=retries,
            resources={GPU: 1} if use_gpu else None,
            pure=False,
        ): task
        for task in tasks
    }
    console = Console(stderr=True)
    columns = (
        TextColumn(f"{pipeline.name} {pipeline.version}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
    )
    with Progress(*columns, console=console, disable=not show, transient=False) as bar:
        job = bar.add_task("", total=len(futures))
        for future in as_completed(futures):
            task = futures[future]
            if future.status == "error":
                outcome = _record_lost(settings, pipeline, task, future.exception())
            else:
                outcome = future.result()
            report.outcomes.append(outcome)
            counts = report.counts()
            bar.update(job, advance=1, description=" ".join(f"{k} {v}" for k, v in counts.items()))


def _record_lost(
    settings: Settings, pipeline: Pipeline, task: SeriesTask, exc: BaseException | None
) -> SeriesOutcome:
    """A task that never returned (worker lost, store down after the retries): FAILED."""
    reason = f"task failed after retries: {reason_of(exc) if exc else 'unknown'}"
    with Core(settings, research=True) as core:
        p = core.project(task.project)
        core.catalog.upsert_result(
            p.id,
            task.series_uid,
            pipeline.name,
            study_uid=task.study_uid,
            version=pipeline.version,
            status=FAILED,
            reason=reason,
            provenance={"pipeline": pipeline.name, "version": pipeline.version},
        )
    return SeriesOutcome(task.series_uid, FAILED, reason)
