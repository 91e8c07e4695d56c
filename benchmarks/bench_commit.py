"""Committing one series to S3 (SeaweedFS on loopback): the one operation (`storage.commit`:
index from the writer's headers, one catalog transaction) against the steps the pull took
before (store, read-back check, index from the headers read back from the store, mark complete,
audit row), in the same run on the same series.

Prints, per way, the median seconds of the whole commit and of the part after the upload, and
the GETs it made (chunk objects and zarr.json documents), counted by `harness.storecount`.
Nothing is asserted.

    .venv/bin/python benchmarks/bench_commit.py [--slices 500 --size 256 --rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom

from harness.seaweed import SeaweedS3
from harness.storecount import chunks, counting
from harness.synthetic import generate
from storage.catalog import Catalog, Project
from storage.commit import commit_series
from storage.objectstore import open_store
from storage.series import SeriesReader, SeriesWriter, series_key, unreadable

STUDY, SERIES = "2.25.1", "2.25.2"
KEY = series_key("bench", STUDY, SERIES)


def old_way(store: Any, catalog: Catalog, pid: int, writer: SeriesWriter) -> float:
    """The pull's steps before: seconds after the upload."""
    info = writer.commit(store, KEY)
    t = time.perf_counter()
    assert not unreadable(store, KEY, info.n_instances)
    reader = SeriesReader(store, KEY)
    catalog.index_series(pid, KEY, reader.headers(), reader.n_images)
    catalog.mark_complete(pid, SERIES, KEY, info, study_uid=STUDY, modality="CT")
    catalog.audit("bench", "series.stored", "bench", series=SERIES, instances=info.n_instances)
    return time.perf_counter() - t


def one_call(store: Any, catalog: Catalog, pid: int, writer: SeriesWriter) -> float:
    """`commit_series`; seconds after the upload (the read-back check and the transaction)."""
    marks: list[float] = []

    def timed(fn: Callable[[], Any], what: str) -> Any:
        out = fn()
        if what == "commit":
            marks.append(time.perf_counter())
        return out

    commit_series(
        store,
        catalog,
        writer,
        KEY,
        project_id=pid,
        series_uid=SERIES,
        values={"study_uid": STUDY, "modality": "CT"},
        audit={"actor": "bench", "action": "series.stored", "project": "bench", "detail": {}},
        retry=timed,
    )
    return time.perf_counter() - marks[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=500)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    ways = {"before (read back)": old_way, "one call": one_call}
    with tempfile.TemporaryDirectory() as tmp, SeaweedS3(Path(tmp) / "s3") as s3:
        base = Path(tmp)
        corpus = generate(base / "dicom", 1, 1, 1, slices=args.slices, size=args.size)
        dss = [pydicom.dcmread(f) for f in corpus.files]
        store, gets = counting(open_store(s3.url(s3.new_bucket(), "research"), s3.options()))
        catalog = Catalog(f"sqlite:///{base / 'catalog.db'}")
        catalog.add_project(Project(name="bench", title=""))
        pid = catalog.project("bench").id  # type: ignore[union-attr]  # added just above
        whole: dict[str, list[float]] = {w: [] for w in ways}
        after: dict[str, list[float]] = {w: [] for w in ways}
        reads: dict[str, tuple[int, int]] = {}
        for r in range(args.rounds):
            for name, way in ways.items():  # alternating: the same conditions for both
                writer = SeriesWriter(base / f"spool{r}{name}", fsync=False)
                for ds in dss:
                    writer.add(ds)
                gets.clear()
                t = time.perf_counter()
                after[name].append(way(store, catalog, pid, writer))
                whole[name].append(time.perf_counter() - t)
                reads[name] = (len(chunks(gets)), len(gets) - len(chunks(gets)))
        catalog.dispose()
    print(f"one series {args.slices}x{args.size}x{args.size} int16 to SeaweedFS S3, "
          f"{args.rounds} rounds, median:")  # fmt: skip
    for name in ways:
        n_chunks, n_meta = reads[name]
        print(
            f"  {name:20s} commit {statistics.median(whole[name]):6.2f} s, "
            f"after the upload {statistics.median(after[name]) * 1000:7.1f} ms, "
            f"GETs: {n_chunks} chunk objects, {n_meta} zarr.json"
        )


if __name__ == "__main__":
    main()
