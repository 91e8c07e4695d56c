"""Loading throughput: a series from the Zarr store into a MONAI MetaTensor (HU, RAS affine)
against MONAI's `LoadImage` (PydicomReader) reading the same series from DICOM files.

One synthetic CT series (512x512 by default) is written as DICOM files and committed to a local
Zarr store with the pull's SeriesWriter; then, in the same run, each loader reads it `--rounds`
times (the page cache is warm for both after the first round). Prints the median seconds,
slices/s and MB/s (of int16 pixels) of each, and the ratio. Nothing is asserted.

    .venv/bin/python benchmarks/bench_loader.py [--slices 200 --size 512 --rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from core.core import Core
from core.settings import Settings
from harness.synthetic import generate
from storage.series import SeriesWriter, series_key


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import pydicom
    from monai.transforms import LoadImage

    from processing.loader import load_series

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        corpus = generate(
            base / "dicom", n_patients=1, series_per_study=1, slices=args.slices, size=args.size
        )
        settings = Settings(home=base / "home", fsync=False)
        with Core(settings, create=True) as core:
            writer = SeriesWriter(base / "spool", fsync=False)
            for f in corpus.files:
                writer.add(pydicom.dcmread(f))
            key = series_key("bench", "study", "series")
            writer.commit(core.store, key)
            nbytes = args.slices * args.size * args.size * 2

            def zarr_load() -> None:
                load_series(core.store, key)

            reader = LoadImage(reader="PydicomReader", image_only=True)

            def dicom_load() -> None:
                reader(str(base / "dicom"))

            times = {name: [] for name in ("zarr", "dicom")}
            for _ in range(args.rounds):
                for name, fn in (("zarr", zarr_load), ("dicom", dicom_load)):
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
    shape = f"{args.slices}x{args.size}x{args.size}"
    print(f"series {shape} int16 ({nbytes / 1e6:.0f} MB), {args.rounds} rounds, median:")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, label in (("zarr", "Zarr -> MetaTensor"), ("dicom", "LoadImage (DICOM files)")):
        s = med[name]
        rate = f"{args.slices / s:8.0f} slices/s  {nbytes / s / 1e6:7.0f} MB/s"
        print(f"  {label:<24} {s:7.3f} s (best {min(times[name]):.3f})  {rate}")
    print(f"  ratio: Zarr loader is {med['dicom'] / med['zarr']:.1f}x LoadImage")


if __name__ == "__main__":
    main()
