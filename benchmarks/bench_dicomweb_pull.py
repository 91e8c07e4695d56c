"""DICOMweb pull: sphere over WADO-RS against sphere over C-MOVE and against dicomweb-client.

The same series from the same Orthanc (Debian, with its DICOMweb plugin, started with
TCP_NODELAY=1), in the same run:
- sphere's whole pull over DICOMweb (QIDO-RS plan, WADO-RS series streamed, de-identified,
  spooled, verified, Zarr);
- sphere's whole pull over C-MOVE (the same work, DIMSE transport);
- dicomweb-client retrieving each series (`iter_series`, parsed by pydicom) and writing every
  instance to a file: what a script would do, with no de-identification at all.
Prints instances/s for each and the ratios; nothing is asserted.

    .venv/bin/python benchmarks/bench_dicomweb_pull.py [--patients 2 --slices 250 --size 512]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench_pull import timed_pull
from dicomweb_client.api import DICOMwebClient

from core.settings import Settings, Source
from harness.localpacs import LocalOrthanc, free_port
from harness.synthetic import generate


def sphere_round(source: Source, port: int, accessions: list[str], home: Path) -> tuple[float, int]:
    """The whole pull of the cohort from one source; seconds and instances."""
    return timed_pull(Settings(home=home, port=port, sources=[source]), accessions)


def client_round(
    url: str, series: list[tuple[str, str]], assoc: int, out: Path
) -> tuple[float, int]:
    """dicomweb-client fetching each series and writing its instances to files."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    def one(s: tuple[str, str]) -> int:
        client = DICOMwebClient(url)
        n = 0
        for ds in client.iter_series(s[0], s[1]):
            ds.save_as(out / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
            n += 1
        return n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(assoc) as pool:
        n = sum(pool.map(one, series))
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--patients", type=int, default=2)
    ap.add_argument("--slices", type=int, default=250, help="slices of the thin series per study")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--concurrent", type=int, default=2, help="series fetched at once, each way")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sphere-bench-web-"))
    corpus = generate(work / "corpus", n_patients=args.patients, slices=args.slices, size=args.size)
    n = corpus.n_instances
    series = [(st.study_uid, se.series_uid) for st in corpus.studies for se in st.series]
    accessions = [st.accession for st in corpus.studies]
    port = free_port()
    with LocalOrthanc(
        work / "orthanc", modalities={"SPHERE": ("SPHERE", "127.0.0.1", port)}
    ) as pacs:
        pacs.upload(corpus.files)
        url = f"{pacs.url}/dicom-web"
        web = Source(name="web", protocol="dicomweb", url=url, max_concurrent=args.concurrent)
        move = Source(name="dimse", protocol="move", ae_title=pacs.aet, port=pacs.dicom_port,
                      max_concurrent=args.concurrent)  # fmt: skip
        print(f"corpus: {n} CT instances of {args.size}x{args.size}, {len(series)} series; "
              f"{args.concurrent} at once; {args.rounds} rounds")  # fmt: skip
        rates: dict[str, list[float]] = {"dicomweb": [], "c-move": [], "dicomweb-client": []}
        for r in range(args.rounds):
            w_sec, w_n = sphere_round(web, port, accessions, work / "gw-web")
            m_sec, m_n = sphere_round(move, port, accessions, work / "gw-move")
            c_sec, c_n = client_round(url, series, args.concurrent, work / "client")
            assert w_n == m_n == c_n == n, (w_n, m_n, c_n, n)
            for k, sec in (("dicomweb", w_sec), ("c-move", m_sec), ("dicomweb-client", c_sec)):
                rates[k].append(n / sec)
            print(f"round {r + 1}: sphere dicomweb {n / w_sec:5.0f} inst/s, sphere c-move "
                  f"{n / m_sec:5.0f}, dicomweb-client to files {n / c_sec:5.0f}")  # fmt: skip
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(
        f"median: sphere over DICOMweb {med['dicomweb']:.0f} instances/s, over C-MOVE "
        f"{med['c-move']:.0f}, dicomweb-client {med['dicomweb-client']:.0f}; "
        f"ratios DICOMweb/C-MOVE = {med['dicomweb'] / med['c-move']:.2f}, "
        f"sphere DICOMweb/dicomweb-client = "
        f"{med['dicomweb'] / med['dicomweb-client']:.2f}"
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
