"""Pull of a JPEG-Lossless CT series against the same series uncompressed, and against dcmtk.

One Orthanc (TCP_NODELAY=1) holds one CT series twice: uncompressed (Explicit VR LE) and as
JPEG Lossless SV1 (dcmtk's `dcmcjpeg +e1`, new UIDs, without the per-image ratio dcmtk writes
into DerivationDescription), each as received. In each round:
- dcmtk `storescp --fork +xa` (TCP_NODELAY=1) receives each series by C-MOVE, to disk as sent;
- sphere's whole pull of each (C-MOVE, decode on receipt, de-identify, spool, verify, Zarr).
Also timed on their own, in this process: decoding one instance's pixels as the receiver does
(`storage.pixels.extract`), compressed against uncompressed. A first pull, untimed, starts
what every later one reuses. Prints instances/s, the cost of
decoding per instance and the ratios; nothing is asserted.

    .venv/bin/python benchmarks/bench_compressed_pull.py [--slices 500 --size 512 --rounds 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
from bench_pull import sphere_round, storescp_round
from pydicom.uid import JPEGLosslessSV1

from core.settings import Settings
from gateway.api import Gateway
from harness.localpacs import LocalOrthanc, free_port
from harness.synthetic import generate
from storage import pixels

SUFFIX = ".7"  # appended to the hospital's UIDs for the compressed copy


def compressed_copy(files: list[Path], out: Path) -> tuple[list[Path], str]:
    """Each file as JPEG Lossless SV1 under new UIDs (another study, accession + "C")."""
    out.mkdir(parents=True, exist_ok=True)
    accession = ""

    def one(f: Path) -> Path:
        nonlocal accession
        ds = pydicom.dcmread(f)
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            setattr(ds, kw, str(getattr(ds, kw)) + SUFFIX)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.AccessionNumber = accession = f"{ds.AccessionNumber}C"
        plain, enc = out / f"{f.stem}.plain.dcm", out / f"{f.stem}.jls.dcm"
        ds.save_as(plain, enforce_file_format=True)
        subprocess.run(["dcmcjpeg", "+e1", str(plain), str(enc)], check=True)
        plain.unlink()
        # dcmtk writes each image's compression ratio into this free text, which a modality
        # compressing its images does not: it would send every instance the whole way.
        out_ds = pydicom.dcmread(enc)
        del out_ds.DerivationDescription
        out_ds.save_as(enc)
        return enc

    with ThreadPoolExecutor(4) as pool:
        encoded = list(pool.map(one, files))
    assert pydicom.dcmread(encoded[0]).file_meta.TransferSyntaxUID == JPEGLosslessSV1
    return encoded, accession


def decode_ms(files: list[Path], n: int = 50) -> float:
    """Median milliseconds to decode one instance's pixels as the receiver does."""
    times = []
    for f in files[:n]:
        ds = pydicom.dcmread(f)
        t0 = time.perf_counter()
        pixels.extract(ds)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def _came(folder: Path) -> str:
    """The transfer syntaxes of the files storescp wrote."""
    found = {
        str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        for f in folder.rglob("*")
        if f.is_file()
    }
    return " ".join(sorted(found))


def _recorded(home: Path) -> str:
    """The transfer syntax the last pull recorded for its series."""
    gw = Gateway(Settings(home=home))
    try:
        (row,) = gw.catalog.series(gw.core.project("bench").id)
        return row.transfer_syntax or "(none)"
    finally:
        gw.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--slices", type=int, default=500)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="sphere-bench-"))
    corpus = generate(
        work / "corpus", n_patients=1, series_per_study=1, slices=args.slices, size=args.size
    )
    study, n = corpus.studies[0], corpus.n_instances
    jls, jls_accession = compressed_copy(corpus.files, work / "jls")
    raw_mb = sum(f.stat().st_size for f in corpus.files) / 1e6
    jls_mb = sum(f.stat().st_size for f in jls) / 1e6
    series = {
        "uncompressed": (study.accession, [(study.study_uid, study.series[0].series_uid)]),
        "jpeg-lossless": (
            jls_accession,
            [(study.study_uid + SUFFIX, study.series[0].series_uid + SUFFIX)],
        ),
    }
    d_raw, d_jls = decode_ms(corpus.files), decode_ms(jls)
    print(
        f"series: {n} CT instances of {args.size}x{args.size}; {raw_mb:.0f} MB uncompressed, "
        f"{jls_mb:.0f} MB JPEG Lossless SV1 ({raw_mb / jls_mb:.2f}:1); {args.rounds} rounds"
    )
    print(
        f"decode one instance (storage.pixels.extract, median of 50): uncompressed "
        f"{d_raw:.2f} ms, JPEG Lossless {d_jls:.2f} ms (+{d_jls - d_raw:.2f} ms an instance)"
    )
    sphere_port, scp_port = free_port(), free_port()
    mods = {
        "SPHERE": ("SPHERE", "127.0.0.1", sphere_port),
        "STORESCP": ("STORESCP", "127.0.0.1", scp_port),
    }
    rates: dict[tuple[str, str], list[float]] = {}
    came: dict[str, tuple[str, str]] = {}  # kind -> (storescp's files', sphere's record)
    with LocalOrthanc(work / "orthanc", modalities=mods) as pacs:
        assert pacs.upload([*corpus.files, *jls]) == 2 * n
        # Untimed: the first pull of a process also starts the SCP workers' fork server.
        sphere_round(pacs, sphere_port, [study.accession], 1, work / "gateway")
        for r in range(args.rounds):
            line = []
            for kind, (accession, moves) in series.items():
                # +xa: storescp takes every syntax it knows, so Orthanc sends as held (by
                # default storescp takes uncompressed only and Orthanc decodes for it).
                s_sec, s_n = storescp_round(pacs, scp_port, moves, 1, work / "scp", ("+xa",))
                g_sec, g_n = sphere_round(pacs, sphere_port, [accession], 1, work / "gateway")
                came.setdefault(kind, (_came(work / "scp"), _recorded(work / "gateway")))
                assert s_n == n and g_n == n, (kind, s_n, g_n, n)
                rates.setdefault((kind, "storescp"), []).append(n / s_sec)
                rates.setdefault((kind, "sphere"), []).append(n / g_sec)
                line.append(f"{kind}: storescp {n / s_sec:5.0f}, sphere {n / g_sec:5.0f} inst/s")
            print(f"round {r + 1}: " + ";  ".join(line))
    for kind, (theirs, ours) in came.items():
        print(f"{kind} came as: to storescp {theirs}; to sphere {ours} (series.transfer_syntax)")
    med = {k: statistics.median(v) for k, v in rates.items()}
    u, c = med[("uncompressed", "sphere")], med[("jpeg-lossless", "sphere")]
    su, sc = med[("uncompressed", "storescp")], med[("jpeg-lossless", "storescp")]
    print(
        f"median: sphere {u:.0f} inst/s uncompressed, {c:.0f} JPEG Lossless ({c / u:.2f}x; "
        f"{1000 / c - 1000 / u:+.1f} ms an instance); storescp {su:.0f} uncompressed, "
        f"{sc:.0f} JPEG Lossless; sphere/storescp on JPEG Lossless {c / sc:.2f}x"
    )
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
