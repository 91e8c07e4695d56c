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
from pathlib import Path
from typing import Any

from core import users
from core.core import Core
from harness.serve import sphere_serving
from harness.stored import StoredCT, stored_ct

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
    from processing.remote import Client

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        stored = stored_ct(base, "bench", slices=args.slices, size=args.size)
        with Core(stored.settings) as core:
            token = users.add(core, "reader")
            users.grant(core, "bench", "reader", "viewer")
        nbytes = args.slices * args.size * args.size * 2
        with sphere_serving(stored.settings) as url:
            client = Client(url, "bench", token)
            with Core(stored.settings) as core:
                times = rounds(args.rounds, core, stored, client)
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


def rounds(n: int, core: Core, stored: StoredCT, client: Any) -> dict[str, list[float]]:
    """Each loader `n` times, in turn; seconds of each read."""
    from monai.transforms import LoadImage

    from processing.loader import load_series

    reader = LoadImage(reader="PydicomReader", image_only=True)
    fns = {
        "zarr": lambda: load_series(core.store, stored.key),
        "remote": lambda: client.load(stored.series_uid),
        "dicom": lambda: reader(str(stored.dicom_dir)),
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
