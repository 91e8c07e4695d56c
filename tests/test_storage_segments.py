"""One series spooled by several writer processes at once (one segment each), committed by a
coordinator that is none of them."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom.json_model import first
from harness.synthetic import generate
from storage.objectstore import StorageUnavailable, open_store
from storage.series import SeriesError, SeriesReader, SeriesWriter
from storage.spool import SpoolError, segment_file

KEY = "projects/demo/2.25.3/2.25.4"
REPO = Path(__file__).resolve().parents[1]

# A worker process: keeps one writer open (like a worker serving an association) and adds
# the files it is told to, answering one line per command, until stdin closes.
WORKER = """
    import sys
    from pathlib import Path
    import pydicom
    from storage.series import SeriesError, SeriesWriter

    spool, segment = sys.argv[1:3]
    writer = SeriesWriter(Path(spool), fsync=False, segment=segment)
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        try:
            if cmd == "add":
                for f in args:
                    writer.add(pydicom.dcmread(f))
            elif cmd == "sync":
                writer.sync()
            elif cmd == "close":
                writer.close()
            print("ok", flush=True)
        except SeriesError as exc:
            print("SeriesError", exc, flush=True)
"""


class Worker:
    def __init__(self, spool: Path, segment: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(WORKER), str(spool), segment],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        assert self.stdout.readline().strip() == "ready"

    def send(self, cmd: str, *files: Path) -> None:
        self.stdin.write(" ".join([cmd, *map(str, files)]) + "\n")
        self.stdin.flush()

    def answer(self) -> str:
        return self.stdout.readline().strip()

    def call(self, cmd: str, *files: Path) -> str:
        self.send(cmd, *files)
        return self.answer()

    def stop(self) -> None:
        self.stdin.close()
        self.proc.wait(timeout=60)
        self.stdout.close()


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory) -> list[Path]:
    """A synthetic CT series of 16 slices, as files in shuffled order."""
    corpus = generate(
        tmp_path_factory.mktemp("ct"), n_patients=1, series_per_study=1, slices=16, size=32
    )
    files = list(corpus.files)
    random.Random(7).shuffle(files)
    return files


def stacked(files: list[Path]) -> np.ndarray:
    dss = sorted(
        (pydicom.dcmread(f) for f in files), key=lambda d: float(d.ImagePositionPatient[2])
    )
    return np.stack([d.pixel_array for d in dss])


def test_two_worker_processes_spool_one_series_and_a_coordinator_commits(tmp_path, ct_files):
    spool = tmp_path / "spool"
    a, b = Worker(spool, "101-1"), Worker(spool, "102-1")
    try:
        # Both add at the same time; each also gets a few of the other's (a PACS retry).
        a.send("add", *ct_files[:10])
        b.send("add", *ct_files[6:])
        assert (a.answer(), b.answer()) == ("ok", "ok")
        assert {p.name for p in spool.glob("*.log")} == {
            segment_file("101-1"),
            segment_file("102-1"),
        }

        coordinator = SeriesWriter.open_existing(spool, fsync=False)
        assert coordinator.count == 16
        # Neither worker closed its writer: they are idle, holding their files open.
        store = open_store(str(tmp_path / "store"))
        info = coordinator.commit(store, KEY)
        assert info.n_instances == 16 and info.shape == (16, 32, 32)
        assert not spool.exists()
        np.testing.assert_array_equal(SeriesReader(store, KEY).volume[:], stacked(ct_files))

        # A worker that adds after the commit is told so, and nothing reappears.
        assert a.call("add", ct_files[0]).startswith("SeriesError")
        assert not spool.exists()
        assert b.call("close") == "ok"
    finally:
        a.stop()
        b.stop()


def test_count_follows_what_workers_add(tmp_path, ct_files):
    spool = tmp_path / "spool"
    coordinator = SeriesWriter.open_existing(spool, fsync=False)
    assert coordinator.count == 0
    w = Worker(spool, "7-1")
    try:
        assert w.call("add", *ct_files[:5]) == "ok"
        assert coordinator.count == 5
        assert w.call("add", *ct_files[3:9]) == "ok"  # two repeated
        assert coordinator.count == 9
        assert w.call("sync") == "ok"
        coordinator.discard()
        assert not spool.exists()
        assert w.call("add", ct_files[10]).startswith("SeriesError")
    finally:
        w.stop()


def test_a_segment_has_one_live_writer_but_segments_do_not_block_each_other(tmp_path, ct_files):
    spool = tmp_path / "spool"
    ds = [pydicom.dcmread(f) for f in ct_files[:3]]
    first = SeriesWriter(spool, fsync=False, segment="a")
    first.add(ds[0])
    with pytest.raises(SpoolError):
        SeriesWriter(spool, fsync=False, segment="a").add(ds[1])
    other = SeriesWriter(spool, fsync=False, segment="b")
    other.add(ds[1])
    first.add(ds[2])
    assert SeriesWriter.open_existing(spool).count == 3
    first.close()
    reopened = SeriesWriter(spool, fsync=False, segment="a")  # released by close
    reopened.add(ds[0])
    assert reopened.count == 3
    with pytest.raises(ValueError):
        SeriesWriter(spool, segment="../x")


def test_the_later_copy_of_an_instance_wins_across_segments(tmp_path, ct_files):
    spool = tmp_path / "spool"
    old = pydicom.dcmread(ct_files[0])
    new = pydicom.dcmread(ct_files[0])
    new.SeriesDescription = "resent"
    SeriesWriter(spool, fsync=False, segment="z").add(old)  # "z" sorts after "a"
    SeriesWriter(spool, fsync=False, segment="a").add(new)
    store = open_store(str(tmp_path / "store"))
    assert SeriesWriter.open_existing(spool).commit(store, KEY).n_instances == 1
    assert SeriesReader(store, KEY).instance(0).SeriesDescription == "resent"


KILLED_WORKER = """
    import sys
    from pathlib import Path
    import pydicom
    from storage.series import SeriesWriter

    spool, segment, *files = sys.argv[1:]
    writer = SeriesWriter(Path(spool), fsync=True, segment=segment)
    for f in files * 1000:  # keeps adding (duplicates) until killed
        ds = pydicom.dcmread(f)
        writer.add(ds)
        print(ds.SOPInstanceUID, flush=True)  # acknowledged
"""


def test_resume_after_workers_crash_uses_every_segment(tmp_path, ct_files):
    spool = tmp_path / "spool"
    acked: set[str] = set()
    for segment, part in (("1-1", ct_files[:6]), ("2-1", ct_files[6:11])):
        proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(KILLED_WORKER), str(spool), segment]
            + [str(f) for f in part],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            for n, line in enumerate(proc.stdout, 1):
                acked.add(line.strip())
                if n == len(part) + 2:
                    break
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
    assert len(acked) == 11
    with open(spool / segment_file("1-1"), "ab") as log:  # a record torn half way
        log.write(b"SPHREC01" + b"\x00" * 40)

    coordinator = SeriesWriter.open_existing(spool, fsync=True)
    assert coordinator.count == 11
    again = SeriesWriter(spool, fsync=True, segment="3-1")  # the PACS sends the rest
    for f in ct_files[9:]:
        again.add(pydicom.dcmread(f))
    assert coordinator.count == 16
    store = open_store(str(tmp_path / "store"))
    assert coordinator.commit(store, KEY).n_instances == 16
    uids = {first(h, "00080018") for h in SeriesReader(store, KEY).headers()}
    assert acked <= uids
    with pytest.raises(SeriesError):
        again.add(pydicom.dcmread(ct_files[0]))
    again.close()


def test_a_failed_commit_keeps_the_spool_open_to_writers(tmp_path, ct_files):
    spool = tmp_path / "spool"
    worker = SeriesWriter(spool, fsync=False, segment="w")
    for f in ct_files[:4]:
        worker.add(pydicom.dcmread(f))
    blocker = tmp_path / "store"
    blocker.write_text("not a folder")  # the store cannot be written
    coordinator = SeriesWriter.open_existing(spool, fsync=False)
    with pytest.raises(StorageUnavailable):
        coordinator.commit(open_store(str(blocker)), KEY)
    worker.add(pydicom.dcmread(ct_files[4]))  # not sealed any more
    assert coordinator.count == 5
    store = open_store(str(tmp_path / "store2"))
    assert coordinator.commit(store, KEY).n_instances == 5
    assert not spool.exists()


def test_a_commit_that_fails_after_linking_the_volume_can_be_retried(
    tmp_path, ct_files, monkeypatch
):
    spool = tmp_path / "spool"
    worker = SeriesWriter(spool, fsync=False, segment="w")
    for f in ct_files[:8]:
        worker.add(pydicom.dcmread(f))
    coordinator = SeriesWriter.open_existing(spool, fsync=False)
    store = open_store(str(tmp_path / "store"))

    def fail(*args, **kwargs):
        raise StorageUnavailable("store went away")

    with monkeypatch.context() as m:
        m.setattr(SeriesWriter, "_write_headers", fail)
        with pytest.raises(StorageUnavailable):
            coordinator.commit(store, KEY)
    assert not SeriesReader(store, KEY).complete
    # The worker still holds the segment that had become the shard; it goes on appending.
    for f in ct_files[8:]:
        worker.add(pydicom.dcmread(f))
    assert coordinator.count == 16
    assert coordinator.commit(store, KEY).n_instances == 16
    np.testing.assert_array_equal(SeriesReader(store, KEY).volume[:], stacked(ct_files))
    with pytest.raises(SeriesError):
        worker.add(pydicom.dcmread(ct_files[0]))


def test_a_store_on_another_file_system_gets_a_copy(tmp_path, ct_files):
    other = Path("/dev/shm")
    if not other.is_dir() or os.stat(other).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system here")
    spool = tmp_path / "spool"
    writer = SeriesWriter(spool, fsync=False)
    for f in ct_files:
        writer.add(pydicom.dcmread(f))
    root = Path(tempfile.mkdtemp(dir=other))
    try:
        store = open_store(str(root))
        writer.commit(store, KEY)
        assert not spool.exists()
        np.testing.assert_array_equal(SeriesReader(store, KEY).volume[:], stacked(ct_files))
    finally:
        shutil.rmtree(root)
