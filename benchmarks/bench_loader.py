"""Loading throughput: a series from the Zarr store into a MONAI MetaTensor (HU, RAS affine)
against MONAI's `LoadImage` (PydicomReader) reading the same series from DICOM files, and the
same MetaTensor read through `sphere serve` (`RemoteSeriesDataset`'s loader, over loopback HTTP).

One synthetic CT series (512x512 by default) is written as DICOM files and committed to a local
Zarr store with the pull's SeriesWriter; then, in the same run, each loader reads it `--rounds`
times (the page cache is warm for all after the first round). `sphere serve` runs in a process of
its own (harness/serve.py). Prints the median seconds, slices/s and MB/s (of int16 pixels) of
each, and the ratios. Nothing is asserted.

    .venv/bin/python benchmarks/bench_loader.py [--slices 200 --size 512 --rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from core import projects, users
from core.core import Core
from core.settings import Settings
from harness.localpacs import free_port
from harness.serve import start_sphere
from harness.synthetic import generate
from storage.series import SeriesWriter, series_key

LOADERS = (
    ("zarr", "Zarr -> MetaTensor"),
    ("remote", "over HTTP (remote)"),
    ("dicom", "LoadImage (DICOM files)"),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import pydicom

    from processing.remote import Client

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        corpus = generate(
            base / "dicom", n_patients=1, series_per_study=1, slices=args.slices, size=args.size
        )
        settings = Settings(home=base / "home", fsync=False)
        with Core(settings, create=True) as core:
            users.first_admin(core)
            projects.create(core, "bench")
            today = date.today()
            projects.approve(core, "bench", committee_ref="B", approved_on=today,
                             expires_on=today + timedelta(30))  # fmt: skip
            token = users.add(core, "reader")
            users.grant(core, "bench", "reader", "viewer")
            writer = SeriesWriter(base / "spool", fsync=False)
            for f in corpus.files:
                writer.add(pydicom.dcmread(f))
            key = series_key("bench", "study", "series")
            info = writer.commit(core.store, key)
            core.catalog.mark_complete(core.project("bench").id, "series", key, info,
                                       study_uid="study", modality="CT")  # fmt: skip
            nbytes = args.slices * args.size * args.size * 2
        port = free_port()
        server = start_sphere(settings, port)
        try:
            client = Client(f"http://127.0.0.1:{port}", "bench", token)
            with Core(settings) as core:
                times = rounds(args.rounds, core, key, client, str(base / "dicom"))
        finally:
            server.terminate()
            server.wait(30)
    shape = f"{args.slices}x{args.size}x{args.size}"
    print(f"series {shape} int16 ({nbytes / 1e6:.0f} MB), {args.rounds} rounds, median:")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, label in LOADERS:
        s = med[name]
        rate = f"{args.slices / s:8.0f} slices/s  {nbytes / s / 1e6:7.0f} MB/s"
        print(f"  {label:<24} {s:7.3f} s (best {min(times[name]):.3f})  {rate}")
    print(f"  ratio: Zarr loader is {med['dicom'] / med['zarr']:.1f}x LoadImage")
    print(
        f"  ratio: remote loader is {med['zarr'] / med['remote']:.2f}x the local Zarr loader, "
        f"{med['dicom'] / med['remote']:.1f}x LoadImage"
    )


def rounds(n: int, core: Core, key: str, client: Any, folder: str) -> dict[str, list[float]]:
    """Each loader `n` times, in turn; seconds of each read."""
    from monai.transforms import LoadImage

    from processing.loader import load_series

    reader = LoadImage(reader="PydicomReader", image_only=True)
    fns = {
        "zarr": lambda: load_series(core.store, key),
        "remote": lambda: client.load("series"),
        "dicom": lambda: reader(folder),
    }
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(n):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


if __name__ == "__main__":
    main()
