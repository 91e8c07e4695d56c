"""Bone density throughput on CPU: one 512x512x400 CT end to end, and a small project on the
embedded Dask cluster.

A spine phantom (harness.phantoms) is written as CT DICOM and committed to a local Zarr store
with the pull's SeriesWriter, as a pull would (without de-identification: it plants nothing
that matters here). Then:

- one series end to end, in a child process of its own (`processing.worker.process_series`:
  load from the store into a MetaTensor, segment, measure, write SEG, SR, PNG and the result
  row): seconds per series, and the child's peak memory (VmHWM, its own high-water mark);
- the science alone on that series, warm (load into the MetaTensor on the device, orient,
  segment, measure: `BoneDensity.run`), best of `--repeat`;
- `--series` clinical-size series (512x512, 2.5 mm slices) through `run_pipeline` on the
  embedded LocalCluster (2 worker processes): series per hour, cluster start included.

`--device cpu` hides any GPU from the child and the workers; `cuda` requires one; `auto`
(default) is what a worker picks (the pipeline wants a GPU: CUDA when there is one).

Figures are printed, not asserted.

    .venv/bin/python benchmarks/bench_bone.py [--slices 400 --size 512 --series 6 --device auto]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pydicom

from core.core import Core
from core.projects import create
from core.settings import Settings
from harness.phantom_dicom import write_phantom_study
from harness.phantoms import make_phantom
from storage.commit import commit_series
from storage.series import SeriesWriter, series_key

PROJECT = "bench"
FOV_MM = 384.0  # in-plane field of view: the phantom's body is 300 x 220 mm


def commit_phantom(settings: Settings, index: int, size: int, slices: int, spacing: float) -> str:
    """A phantom of `slices` x `size`^2 written as DICOM and committed; its storage key."""
    lo = -25.0
    vol, truth = make_phantom(
        shape_yx=(size, size),
        pixel_mm=FOV_MM / size,
        slice_spacing_mm=spacing,
        fov_mm=(lo, lo + slices * spacing + 1e-6),
        seed=index,
    )
    tmp = settings.home / "dicom" / str(index)
    study = write_phantom_study(vol, truth, tmp, index=index)
    key = series_key(PROJECT, study.study_uid, study.series_uid)
    with Core(settings) as core:
        writer = SeriesWriter(settings.home / "spool" / str(index), fsync=False)
        for f in study.files:
            writer.add(pydicom.dcmread(f))
        commit_series(
            core.store, core.catalog, writer, key, project_id=core.project(PROJECT).id,
            series_uid=study.series_uid, values={"study_uid": study.study_uid, "modality": "CT",
                                                 "patient_pseudonym": study.patient_id},
        )  # fmt: skip
    for f in study.files:
        f.unlink()
    return key


def one_series(settings_json: str, key: str, repeat: int) -> None:
    """The child: one series end to end, then the science alone (warm, best of `repeat`);
    prints seconds, status, device and peak memory as JSON."""
    import torch

    from processing.bone_density import BoneDensity
    from processing.loader import load_series
    from processing.pipeline import SeriesFacts
    from processing.worker import SeriesTask, cached_model, process_series
    from storage.series import SeriesReader

    settings = Settings.model_validate_json(settings_json)
    with Core(settings) as core:
        series = core.catalog.series(core.project(PROJECT).id)
        rec = next(r for r in series if r.storage_key == key)
    task = SeriesTask(PROJECT, rec.series_uid, rec.study_uid, rec.patient_pseudonym, key)
    started = time.perf_counter()
    out = process_series(settings_json, task, BoneDensity(), False)
    seconds = time.perf_counter() - started
    device = torch.device(out.device)
    with Core(settings) as core:
        facts = SeriesFacts.from_reader(SeriesReader(core.store, key))
        pipeline = BoneDensity()
        science = []
        for _ in range(repeat):
            t = time.perf_counter()
            image = load_series(core.store, key, device=device)
            found = pipeline.run(image, facts, model=cached_model(pipeline, device), device=device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            science.append(time.perf_counter() - t)
    hwm = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if "VmHWM" in ln)
    print(
        json.dumps(
            {
                "seconds": seconds,
                "science_s": min(science) if science else None,
                "science_l1_hu": found.values.get("l1_hu") if science else None,
                "device": out.device,
                "status": out.status,
                "l1_hu": out.values.get("l1_hu"),
                "peak_mib": int(hwm.split()[1]) / 1024,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--slices", type=int, default=400)
    ap.add_argument("--series", type=int, default=6, help="series of the small project")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs of the science alone")
    ap.add_argument("--one", nargs=2, metavar=("SETTINGS", "KEY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.one:
        settings_json, key = args.one
        one_series(settings_json, key, args.repeat)
        return
    if args.device == "cpu":  # the child and the cluster's workers see no GPU: they pick the CPU
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("bench_bone: --device cuda, but torch sees no CUDA device")
    from processing.bone_density import BoneDensity
    from processing.runner import run_pipeline

    logging.getLogger("distributed").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(home=Path(tmp), fsync=False)
        with Core(settings, create=True) as core:
            create(core, PROJECT, title="bench")
        t = time.perf_counter()
        spacing = 300.0 / args.slices  # the whole phantom, T10 to sacrum, in `slices` slices
        key = commit_phantom(settings, 0, args.size, args.slices, spacing)
        print(
            f"phantom {args.slices}x{args.size}x{args.size} ({spacing:.2f} mm slices) "
            f"written and committed in {time.perf_counter() - t:.1f} s"
        )
        child = subprocess.run(
            [sys.executable, __file__, "--one", settings.model_dump_json(), key]
            + ["--repeat", str(args.repeat)],
            capture_output=True,
            text=True,
            check=True,
        )
        one = json.loads(child.stdout.strip().splitlines()[-1])
        print(
            f"one series end to end (load, segment, measure, SEG, SR, PNG), one process, "
            f"{one['device']}: {one['seconds']:.1f} s, {one['status']} (L1 {one['l1_hu']}), "
            f"peak memory {one['peak_mib']:.0f} MiB"
        )
        if one["science_s"] is not None:
            print(
                f"the science alone (load to {one['device']}, orient, segment, measure), warm, "
                f"best of {args.repeat}: {one['science_s']:.2f} s (L1 {one['science_l1_hu']})"
            )
        if not args.series:
            return
        for i in range(1, args.series + 1):
            commit_phantom(settings, i, 512, 120, 2.5)
        t = time.perf_counter()
        report = run_pipeline(settings, PROJECT, BoneDensity(), workers=2, progress=False)
        seconds = time.perf_counter() - t
        n = len(report.outcomes)
        print(
            f"project of {n} series of 120x512x512 (2.5 mm) on the embedded cluster "
            f"(2 workers): {seconds:.1f} s, {3600 * n / seconds:.0f} series/hour "
            f"({report.counts()}, cluster start included)"
        )


if __name__ == "__main__":
    main()
