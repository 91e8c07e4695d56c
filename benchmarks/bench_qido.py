"""QIDO-RS at a project's target size (10,000 studies): sphere against Orthanc's DICOMweb plugin.

The same synthetic studies (default 10,000; a CT series and an SR series each, two instances a
series, 8 x 8 pixels: this measures searching, not pixels) are stored in Orthanc (REST upload)
and indexed in sphere's catalog by the code a commit runs (`Catalog.index_series`, from the
same datasets' DICOM JSON; no Zarr is needed to search). `sphere serve` and Orthanc then answer
the same searches, each asked 1 + 5 times over one keep-alive connection: the median of the
last five, both servers' result counts, and the ratio are printed. Nothing is asserted.

Orthanc runs as a tuned deployment would for searching: `StorageAccessOnFind` is `Never`, so it
answers from its database's main tags without opening files (the test PACS reads files to be
strict; that would only slow it down here).

    .venv/bin/python benchmarks/bench_qido.py [--studies 10000 --series 2 --instances 2]
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import date, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from core import users
from core.core import Core
from core.projects import approve, create
from core.settings import Settings
from dicom.json_model import to_json_dict
from harness.localpacs import LocalOrthanc
from harness.serve import sphere_serving
from storage.series import series_key

PROJECT = "bench-qido"
SURNAMES = ("MARTIN", "BERNARD", "DUBOIS", "THOMAS", "ROBERT", "RICHARD", "PETIT", "DURAND",
            "LEROY", "MOREAU", "SIMON", "LAURENT", "LEFEBVRE", "MICHEL", "GARCIA", "DAVID",
            "BERTRAND", "ROUX", "VINCENT", "FOURNIER")  # fmt: skip
CT, SR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.88.11"


def uid(*parts: int) -> str:
    return "2.25.7" + "".join(f".{p}" for p in parts)


def instance(study: int, series: int, number: int) -> Dataset:
    """One small instance of study `study`: the attributes searched on, 8 x 8 pixels for CT."""
    rng = np.random.default_rng(study)
    ds = Dataset()
    ds.PatientName = f"{SURNAMES[study % len(SURNAMES)]}^P{study:05d}"
    ds.PatientID = f"P{study // 2:06d}"  # two studies a patient
    ds.PatientBirthDate = f"{1940 + study % 50}0101"
    ds.PatientSex = "MF"[study % 2]
    day = date(2015, 1, 1) + timedelta(days=int(rng.integers(0, 3650)))
    ds.StudyDate = ds.SeriesDate = day.strftime("%Y%m%d")
    ds.StudyTime = f"{8 + study % 10:02d}{study % 60:02d}00"
    ds.AccessionNumber = f"A{study:07d}"
    ds.StudyID = str(study)
    ds.StudyDescription = "CT ABDOMEN"
    ds.ReferringPhysicianName = "REF^DOCTOR"
    ds.StudyInstanceUID = uid(study)
    ds.SeriesInstanceUID = uid(study, series)
    ds.SOPInstanceUID = uid(study, series, number)
    ds.SeriesNumber, ds.InstanceNumber = series + 1, number + 1
    ds.Modality = "CT" if series == 0 else "SR"
    ds.SOPClassUID = CT if series == 0 else SR
    if series == 0:
        ds.Rows = ds.Columns = 8
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 15, 1, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.ImagePositionPatient = [0, 0, float(number)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [1, 1]
        ds.PixelData = np.zeros((8, 8), "<i2").tobytes()
    return ds


def studies(n: int, n_series: int, n_instances: int) -> Iterator[list[list[Dataset]]]:
    for st in range(n):
        yield [[instance(st, se, i) for i in range(n_instances)] for se in range(n_series)]


def part10(ds: Dataset) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def fill_orthanc(pacs: LocalOrthanc, args: argparse.Namespace) -> float:
    """Upload every instance; seconds taken."""

    def one(body: bytes) -> None:
        pacs.request("POST", "/instances", body, "application/dicom")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        bodies = (
            part10(ds)
            for study in studies(args.studies, args.series, args.instances)
            for series in study
            for ds in series
        )
        for _ in pool.map(one, bodies):
            pass
    return time.perf_counter() - t0


def fill_sphere(home: Path, args: argparse.Namespace) -> tuple[Settings, str, float]:
    """A project with every series indexed as a commit indexes it; a viewer's token."""
    settings = Settings(home=home, fsync=False)
    core = Core(settings, create=True)
    create(core, PROJECT, title="QIDO benchmark")
    today = date.today()
    approve(core, PROJECT, committee_ref="BENCH", approved_on=today - timedelta(days=1),
            expires_on=today + timedelta(days=30))  # fmt: skip
    project = core.catalog.project(PROJECT)
    assert project is not None  # just created
    project_id = project.id
    t0 = time.perf_counter()
    for study in studies(args.studies, args.series, args.instances):
        for series in study:
            headers = [to_json_dict(ds) for ds in series]
            for h in headers:
                h.pop("7FE00010", None)
            key = series_key(PROJECT, series[0].StudyInstanceUID, series[0].SeriesInstanceUID)
            n_slices = len(series) if series[0].Modality == "CT" else 0
            core.catalog.index_series(project_id, key, headers, n_slices)
    took = time.perf_counter() - t0
    token = users.add(core, "bench")
    users.grant(core, PROJECT, "bench", "viewer")
    core.close()
    return settings, token, took


class Client:
    """One keep-alive connection to a DICOMweb root."""

    def __init__(self, root: str, headers: dict[str, str]) -> None:
        u = urlsplit(root)
        self.path, self.headers = u.path, {**headers, "Accept": "application/dicom+json"}
        self.conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=600)

    def get(self, query: str) -> list[dict[str, Any]]:
        for attempt in (1, 2):
            try:
                self.conn.request("GET", self.path + query, headers=self.headers)
                r = self.conn.getresponse()
                body = r.read()
                break
            except (http.client.RemoteDisconnected, ConnectionError):
                self.conn.close()  # an idle keep-alive closed: reconnect once
                if attempt == 2:
                    raise
        if r.status == 204:
            return []
        if r.status != 200:
            raise RuntimeError(f"{query} -> HTTP {r.status}: {body[:200]!r}")
        return json.loads(body) if body else []

    def timed(self, query: str, repeat: int = 5) -> tuple[float, int]:
        """(median seconds of `repeat` runs after a warm-up, results)."""
        n = len(self.get(query))
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            self.get(query)
            times.append(time.perf_counter() - t0)
        return statistics.median(times), n


def searches(args: argparse.Namespace) -> list[tuple[str, str]]:
    n = args.studies
    mid = n // 2 + 1
    last_page = max(n - 100, 0)
    return [
        ("studies, first 100", "/studies?limit=100"),
        (f"studies, 100 from {last_page}", f"/studies?limit=100&offset={last_page}"),
        ("PatientName=MART* (1 in 20)", "/studies?PatientName=MART*"),
        ("PatientID, exact", f"/studies?PatientID=P{mid // 2:06d}"),
        ("AccessionNumber, exact", f"/studies?AccessionNumber=A{mid:07d}"),
        ("StudyDate, one month", "/studies?StudyDate=20200101-20200131"),
        ("ModalitiesInStudy=SR, first 100", "/studies?ModalitiesInStudy=SR&limit=100"),
        ("series of a study", f"/studies/{uid(mid)}/series"),
        ("instances of a series", f"/studies/{uid(mid)}/series/{uid(mid, 0)}/instances"),
        ("series Modality=CT, first 100", "/series?Modality=CT&limit=100"),
        ("instances, first 100", "/instances?limit=100"),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--studies", type=int, default=10_000)
    ap.add_argument("--series", type=int, default=2, choices=(1, 2), help="CT, then SR")
    ap.add_argument("--instances", type=int, default=2, help="instances a series")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    total = args.studies * args.series * args.instances
    tmp = Path(tempfile.mkdtemp(prefix="sphere-bench-qido-"))
    print(f"{args.studies:,} studies, {args.studies * args.series:,} series, {total:,} instances")
    try:
        run(tmp, args, total)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def run(tmp: Path, args: argparse.Namespace, total: int) -> None:
    settings, token, took = fill_sphere(tmp / "home", args)
    print(f"sphere: indexed in {took:.1f} s ({total / took:,.0f} instances/s)")
    with LocalOrthanc(tmp / "orthanc", extra={"StorageAccessOnFind": "Never"}) as pacs:
        took = fill_orthanc(pacs, args)
        print(f"Orthanc: stored in {took:.1f} s ({total / took:,.0f} instances/s)")
        with sphere_serving(settings) as base:
            ours = Client(f"{base}/projects/{PROJECT}/dicom-web",
                          {"Authorization": f"Bearer {token}"})  # fmt: skip
            theirs = Client(f"{pacs.url}/dicom-web", {})
            report(ours, theirs, searches(args), args.repeat)


def report(ours: Client, theirs: Client, queries: list[tuple[str, str]], repeat: int) -> None:
    print()
    print(f"{'search':36} {'sphere ms':>10} {'Orthanc ms':>11} {'ratio':>7} {'results':>15}")
    ratios = []
    for name, query in queries:
        a, na = ours.timed(query, repeat)
        b, nb = theirs.timed(query, repeat)
        ratios.append(b / a)
        same = f"{na}" if na == nb else f"{na} vs {nb}"
        print(f"{name:36} {a * 1e3:10.1f} {b * 1e3:11.1f} {b / a:6.1f}x {same:>15}")
    print(f"\ngeometric mean: sphere answers {statistics.geometric_mean(ratios):.1f}x as fast")


if __name__ == "__main__":
    main()
