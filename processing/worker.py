"""What a worker does with one series: qualify it, load it from the store, run the pipeline,
write its SEG, SR and PNG and the result row, with provenance.

Called by Dask tasks (`processing.runner`) with the settings and a storage key, never arrays:
the worker opens its own `Core` once per process, and loads a pipeline's model once per process
(`cached_model`, keyed by path, checksum and device). Errors of the method or the data become a
FAILED result; an unreachable store or catalog raises, for Dask to retry.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import highdicom
import monai
import numpy as np
import torch

from core import home
from core.core import Core
from core.errors import SphereError, Unavailable
from core.settings import Settings
from processing import outputs
from processing.loader import load_series, to_zyx_lps
from processing.pipeline import FAILED, INELIGIBLE, Finding, Pipeline, SeriesFacts, pick_device
from storage.objectstore import StorageUnavailable
from storage.series import SeriesReader, delete_series, series_key

log = logging.getLogger(__name__)
_MODELS: dict[tuple[str, str | None, str | None, str], Any] = {}
_MODELS_LOCK = threading.Lock()


@dataclass(frozen=True)
class SeriesTask:
    """One series to process: pseudonymous UIDs and its storage key."""

    project: str
    series_uid: str
    study_uid: str
    patient: str
    storage_key: str


@dataclass
class SeriesOutcome:
    series_uid: str
    status: str
    reason: str = ""
    values: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    device: str = ""


def process_series(
    settings_json: str, task: SeriesTask, pipeline: Pipeline, gpu: bool
) -> SeriesOutcome:
    """One series, on a worker: qualify, load, run, write outputs and the result row.

    Errors of the method or the data become a FAILED result (not retried); the store or the
    catalog being unreachable raises, for Dask to retry elsewhere.
    """
    core = _core(settings_json)
    device = _device(pipeline, gpu)
    started = time.time()
    p = core.project(task.project)
    base: dict[str, Any] = {
        "pipeline": pipeline.name,
        "version": pipeline.version,
        "parameters": pipeline.parameters(),
        "device": str(device),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "highdicom": highdicom.__version__,
        "host": socket.gethostname(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
    }
    row: dict[str, Any] = {"study_uid": task.study_uid, "version": pipeline.version}
    try:
        reader = SeriesReader(core.store, task.storage_key)
        facts = SeriesFacts.from_reader(reader)
        reason = pipeline.qualify(facts)
        if reason is not None:
            finding = Finding(INELIGIBLE, {}, reason=reason)
            _retire_outputs(core, p.id, task, pipeline, keep=set())
        else:
            image = load_series(core.store, task.storage_key, device=device, checksum=True)
            base["input_checksum"] = image.meta["input_checksum"]
            base["model_checksum"] = pipeline.model_checksum()
            transform = pipeline.transforms()
            if transform is not None:
                image = transform(image)
            model = cached_model(pipeline, device)
            finding = pipeline.run(image, facts, model=model, device=device)
            row.update(_write_outputs(core, task, pipeline, reader, image, finding))
    except (StorageUnavailable, Unavailable):
        raise  # transient: Dask retries the task
    except Exception as e:  # the method or the data: recorded, the batch goes on
        log.warning("series %s: %s failed: %s", task.series_uid, pipeline.name, type(e).__name__)
        finding = Finding(FAILED, {}, reason=reason_of(e))
        _retire_outputs(core, p.id, task, pipeline, keep=set())  # none stay from a past run
    seconds = round(time.time() - started, 3)
    core.catalog.upsert_result(
        p.id,
        task.series_uid,
        pipeline.name,
        status=finding.status,
        reason=finding.reason or None,
        values=_jsonable(finding.values),
        provenance={**base, "seconds": seconds},
        **row,
    )
    return SeriesOutcome(
        task.series_uid, finding.status, finding.reason, finding.values, seconds, str(device)
    )


def cached_model(pipeline: Pipeline, device: torch.device) -> Any:
    """The pipeline's model on `device`, loaded once per worker process (keyed by pipeline,
    model path, its checksum and the device): not shipped with every task."""
    key = (pipeline.name, pipeline.model_path, pipeline.model_checksum(), str(device))
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = pipeline.load_model(device)
        return _MODELS[key]


def _write_outputs(
    core: Core,
    task: SeriesTask,
    pipeline: Pipeline,
    reader: SeriesReader,
    image: Any,
    finding: Finding,
) -> dict[str, Any]:
    """SEG, SR (derived series) and the PNG report of a finding; the result row's columns."""
    out: dict[str, Any] = {}
    spool = core.settings.spool_dir / "derived" / task.project
    keep: set[str] = set()
    if finding.segments and ({"seg", "sr"} & pipeline.outputs):
        sources = outputs.source_images(reader)
        seg = None
        if "seg" in pipeline.outputs and outputs.segmentable(reader):  # else the SR alone
            order = outputs.frame_order(reader)
            seg = outputs.build_seg(sources, finding, pipeline, task.series_uid, order)
            d = outputs.store_derived(
                core, task.project, task.study_uid, task.patient, [seg], spool
            )
            out["seg_series_uid"] = d.series_uid
            keep.add("seg")
        if "sr" in pipeline.outputs:
            where = outputs.slice_images(reader)
            sr = outputs.build_sr(sources, seg, finding, pipeline, task.series_uid, where)
            d = outputs.store_derived(core, task.project, task.study_uid, task.patient, [sr], spool)
            out["sr_series_uid"] = d.series_uid
            keep.add("sr")
    _retire_outputs(core, core.project(task.project).id, task, pipeline, keep)
    if "png" in pipeline.outputs:
        vol, affine = to_zyx_lps(image)
        title = f"{pipeline.name} {pipeline.version}: {finding.summary or finding.status}"
        png = outputs.report_png(vol, affine, finding, title)  # one plane off the device
        key = outputs.report_key(task.project, pipeline.name, task.series_uid)
        outputs.put_bytes(core.store, key, png)
        out["report_key"] = key
    return out


def _retire_outputs(
    core: Core, project_id: int, task: SeriesTask, pipeline: Pipeline, keep: set[str]
) -> None:
    """Remove derived series an earlier run made that this one does not: a re-run replaces."""
    for kind in ("seg", "sr"):
        if kind in keep:
            continue
        uid = outputs.derived_uid(task.series_uid, pipeline.name, kind)
        key = series_key(task.project, task.study_uid, uid)
        if SeriesReader(core.store, key).complete:
            delete_series(core.store, key)
            core.catalog.unindex_series(project_id, uid)
            core.catalog.upsert_series(project_id, uid, status="removed", storage_key=None)


@cache
def _core(settings_json: str) -> Core:
    """The worker's own Core, opened once per process (the research side: no vault)."""
    home.owner_only()  # a worker of a scheduler started elsewhere: what it writes is ours only
    return Core(Settings.model_validate_json(settings_json), research=True)


def _device(pipeline: Pipeline, gpu: bool) -> torch.device:
    device = pick_device(pipeline, gpu=gpu or None)
    if device.type == "cuda" and torch.cuda.device_count() > 1:
        from distributed import get_worker

        try:
            name = get_worker().name  # LocalCluster names its workers 0, 1, ...
        except ValueError:  # called outside a worker
            name = 0
        index = name if isinstance(name, int) else 0
        device = torch.device("cuda", index % torch.cuda.device_count())
    return device


def reason_of(e: BaseException) -> str:
    """A one-line reason: our errors carry no PHI; others are named by type and message."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, SphereError | ValueError):
        return text[:300] or type(e).__name__
    return f"{type(e).__name__}: {text}"[:300]


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in values.items():
        if isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    return out
