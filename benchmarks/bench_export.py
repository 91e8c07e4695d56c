"""Exports: the NIfTI export of one CT series against Debian's `dcm2niix` converting the same
series from DICOM files, and the zip export's rate against copying the same bytes.

One synthetic CT series (500x512² by default) is written as DICOM files and committed to a local
Zarr store with the pull's SeriesWriter (and indexed, as a pull leaves it). Each round times:
  nifti      `sphere export --format nifti` (the whole zip, manifest and sidecar included)
  dcm2niix   `dcm2niix -z y` on the DICOM files (its default gzip level), and `-z y -1`
  dicom      `--format dicom` (every instance rebuilt as WADO-RS serves it), against `cp -r` of
             the DICOM files (about the same bytes)
  zarr       `--format zarr`, against `cp -r` of the stored series folder (the same bytes)
Prints medians (seconds, MB/s of what was written) and the ratios; nothing is asserted. The page
cache is warm for all after the first round.

    .venv/bin/python benchmarks/bench_export.py [--slices 500 --size 512 --rounds 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

from core.core import Core
from harness.stored import stored_ct
from storage.objectstore import local_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=500)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    from processing import export

    dcm2niix = shutil.which("dcm2niix")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        stored = stored_ct(base, "bench", slices=args.slices, size=args.size)
        dicom_dir, dicom_bytes = stored.dicom_dir, stored.dicom_bytes
        with Core(stored.settings) as core:
            series_dir = local_path(core.store, stored.key)
            times: dict[str, list[float]] = {}
            sizes: dict[str, int] = {}

            def timed(name: str, fn) -> None:
                t0 = time.perf_counter()
                out = fn()
                times.setdefault(name, []).append(time.perf_counter() - t0)
                if out is not None:
                    sizes[name] = out

            for r in range(args.rounds):
                for fmt in ("nifti", "dicom", "zarr"):
                    timed(fmt, lambda fmt=fmt: export.export(core, "bench", fmt).nbytes)
                if dcm2niix:
                    for name, extra in (("dcm2niix", []), ("dcm2niix -1", ["-1"])):
                        out = base / f"nii-{r}-{len(extra)}"
                        out.mkdir()
                        cmd = [
                            dcm2niix,
                            "-z",
                            "y",
                            *extra,
                            "-b",
                            "n",
                            "-o",
                            str(out),
                            str(dicom_dir),
                        ]

                        def run(cmd=cmd, out=out) -> int:
                            subprocess.run(cmd, check=True, capture_output=True)
                            return sum(f.stat().st_size for f in out.iterdir())

                        timed(name, run)
                for name, src in (("cp dicom", dicom_dir), ("cp zarr", series_dir)):
                    dst = base / f"copy-{r}-{name.split()[1]}"
                    timed(name, lambda src=src, dst=dst: _copy(src, dst))
    med = {k: statistics.median(v) for k, v in times.items()}
    raw = args.slices * args.size * args.size * 2
    print(f"one CT series of {args.slices}x{args.size}², {raw / 1e6:.0f} MB of int16 pixels, "
          f"DICOM files {dicom_bytes / 1e6:.0f} MB; medians of {args.rounds} rounds")  # fmt: skip
    for name in ("nifti", "dcm2niix", "dcm2niix -1", "dicom", "cp dicom", "zarr", "cp zarr"):
        if name in med:
            mb = sizes.get(name, 0) / 1e6
            print(f"  {name:<12} {med[name]:7.2f} s  {mb:8.1f} MB written  "
                  f"{mb / med[name]:7.1f} MB/s")  # fmt: skip
    if "dcm2niix" in med:
        print(f"NIfTI: sphere {med['dcm2niix'] / med['nifti']:.2f}x dcm2niix (default gzip), "
              f"{med['dcm2niix -1'] / med['nifti']:.2f}x dcm2niix -1 (fastest gzip)")  # fmt: skip
    else:
        print("dcm2niix is not installed (scripts/setup.sh installs it): no NIfTI baseline")
    for fmt, cp in (("dicom", "cp dicom"), ("zarr", "cp zarr")):
        rate, base_rate = sizes[fmt] / med[fmt], sizes[cp] / med[cp]
        print(f"zip export ({fmt}): {rate / 1e6:.0f} MB/s, copying the same bytes "
              f"{base_rate / 1e6:.0f} MB/s ({rate / base_rate:.2f}x)")  # fmt: skip


def _copy(src: Path, dst: Path) -> int:
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    return sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())


if __name__ == "__main__":
    main()
