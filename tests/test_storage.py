"""Series storage in a local folder: spool, commit, read back, crashes, resume, memory."""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
import zarr
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut
from pydicom.uid import BasicTextSRStorage, generate_uid

from dicom import json_model
from dicom.json_model import first
from harness.synthetic import generate
from storage.objectstore import open_store
from storage.series import (
    SeriesError,
    SeriesIncomplete,
    SeriesReader,
    SeriesWriter,
    delete_series,
    list_series,
    unreadable,
)
from storage.spool import LOG_NAME, SpoolError
from tests.samples import pydicom_sample

KEY = "projects/demo/2.25.1/2.25.2"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> list[Dataset]:
    """One synthetic CT series of 16 slices, as parsed datasets in shuffled order."""
    corpus = generate(
        tmp_path_factory.mktemp("ct"), n_patients=1, series_per_study=1, slices=16, size=32
    )
    dss: list[Dataset] = [pydicom.dcmread(f) for f in corpus.files]
    random.Random(3).shuffle(dss)
    return dss


def by_position(dss: list[Dataset]) -> list[Dataset]:
    return sorted(dss, key=lambda d: float(d.ImagePositionPatient[2]))


def same_header(a: Dataset, b: Dataset) -> bool:
    """Equal attributes (pydicom's own JSON model), pixel data and file meta aside."""
    skip = ("7FE00010",)
    ja = {k: v for k, v in a.to_json_dict().items() if k not in skip}
    jb = {k: v for k, v in b.to_json_dict().items() if k not in skip}
    return ja == jb


def spool_and_commit(tmp_path: Path, dss: list[Dataset], key: str = KEY, **kw):
    writer = SeriesWriter(tmp_path / "spool", fsync=kw.pop("fsync", False))
    for ds in dss:
        writer.add(ds)
    store = open_store(str(tmp_path / "store"))
    return writer, store, writer.commit(store, key)


def test_round_trip_orders_slices_and_rebuilds_instances(tmp_path, ct):
    writer = SeriesWriter(tmp_path / "spool", fsync=True)
    for ds in ct:
        writer.add(ds)
    writer.add(ct[0])  # a duplicate replaces, not doubles
    assert writer.count == 16
    store = open_store(f"file://{tmp_path / 'store'}")
    info = writer.commit(store, KEY)
    assert (info.n_instances, info.shape, info.dtype) == (16, (16, 32, 32), "int16")
    assert info.nbytes == 16 * 32 * 32 * 2
    assert not (tmp_path / "spool").exists()

    reader = SeriesReader(store, KEY)
    assert reader.complete and len(reader) == 16
    src = by_position(ct)
    vol = reader.volume[:]
    assert vol.dtype == np.int16
    np.testing.assert_array_equal(vol, np.stack([d.pixel_array for d in src]))
    np.testing.assert_array_equal(reader.volume[5], src[5].pixel_array)

    attrs = reader.attrs
    assert attrs["sphere_format"] == 1 and attrs["modality"] == "CT"
    assert attrs["n_instances"] == attrs["n_slices"] == 16
    dy, dx = (float(v) for v in src[0].PixelSpacing)
    assert attrs["spacing"] == pytest.approx([2.5, dy, dx])
    assert attrs["origin"] == pytest.approx([float(v) for v in src[0].ImagePositionPatient])
    assert attrs["direction"] == pytest.approx([1, 0, 0, 0, 1, 0, 0, 0, 1])
    assert attrs["rescale_slope"] == 1 and attrs["rescale_intercept"] == -1024
    affine = np.array(attrs["affine"])
    for k in (0, 7, 15):
        expect = [*(float(v) for v in src[k].ImagePositionPatient), 1.0]
        assert affine @ [k, 0, 0, 1] == pytest.approx(expect)

    headers = reader.headers()
    assert [first(h, "00080018") for h in headers] == [d.SOPInstanceUID for d in src]
    for i in (0, 9):
        rebuilt = reader.instance(i)
        assert same_header(rebuilt, src[i])
        np.testing.assert_array_equal(rebuilt.pixel_array, src[i].pixel_array)
    rebuilt = list(reader.iter_instances())
    assert [d.SOPInstanceUID for d in rebuilt] == [d.SOPInstanceUID for d in src]
    np.testing.assert_array_equal(rebuilt[15].pixel_array, src[15].pixel_array)
    assert list(list_series(store, "projects")) == [KEY]

    # Any zarr v3 reader sees one group with the volume and the headers.
    group = zarr.open_group(tmp_path / "store", path=KEY, mode="r")
    assert group["volume"].shape == (16, 32, 32)
    np.testing.assert_array_equal(group["volume"][:], vol)
    np.testing.assert_array_equal(group["volume"][7], src[7].pixel_array)
    assert json.loads(str(group["headers"][3]))["00200013"]["Value"] == [4]


def test_rebuilt_instance_is_a_valid_dicom_file(tmp_path, ct):
    _, store, _ = spool_and_commit(tmp_path, ct)
    ds = SeriesReader(store, KEY).instance(2)
    path = tmp_path / "out.dcm"
    ds.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    src = by_position(ct)[2]
    assert back.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert same_header(back, src)
    np.testing.assert_array_equal(back.pixel_array, src.pixel_array)


def test_concurrent_adds_from_two_threads(tmp_path, ct):
    writer = SeriesWriter(tmp_path / "spool", fsync=False)
    errors: list[BaseException] = []

    def feed(part: list[Dataset]) -> None:
        try:
            for ds in part:
                writer.add(ds)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    # Both threads also send a few of the other's instances (a PACS retry).
    halves = [ct[:10] + ct[12:14], ct[8:]]
    threads = [threading.Thread(target=feed, args=(h,)) for h in halves]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and writer.count == 16
    store = open_store(str(tmp_path / "store"))
    assert writer.commit(store, KEY).n_instances == 16
    vol = SeriesReader(store, KEY).volume[:]
    np.testing.assert_array_equal(vol, np.stack([d.pixel_array for d in by_position(ct)]))


def test_writer_refuses_adds_after_commit_and_a_second_commit(tmp_path, ct):
    writer, store, _ = spool_and_commit(tmp_path, ct[:3])
    with pytest.raises(SeriesError):
        writer.add(ct[4])
    with pytest.raises(SeriesError):
        writer.commit(store, KEY)


def test_one_writer_per_spool_folder(tmp_path, ct):
    first = SeriesWriter(tmp_path / "spool", fsync=False)
    first.add(ct[0])
    second = SeriesWriter(tmp_path / "spool")
    with pytest.raises(SpoolError):
        second.add(ct[1])
    first.close()
    assert SeriesWriter(tmp_path / "spool").count == 1


def test_a_writer_that_never_receives_anything_leaves_no_trace(tmp_path):
    writer = SeriesWriter(tmp_path / "spool")
    assert writer.count == 0
    writer.discard()
    assert not (tmp_path / "spool").exists()


def _variant(ds: Dataset, **changes) -> Dataset:
    out = copy.deepcopy(ds)
    out.SOPInstanceUID = generate_uid()
    for name, value in changes.items():
        if value is None:
            delattr(out, name)
        else:
            setattr(out, name, value)
    return out


def _uids_and_names(dss: list[Dataset]) -> list[str]:
    return [str(v) for d in dss for v in (d.SOPInstanceUID, d.SeriesInstanceUID, d.PatientName)]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ImagePositionPatient": None}, "ImagePositionPatient"),
        ({"ImageOrientationPatient": [0, 1, 0, 0, 0, -1]}, "ImageOrientationPatient"),
    ],
)
def test_inconsistent_series_fails_clearly_and_keeps_the_spool(tmp_path, ct, change, message):
    odd = _variant(ct[0], **change)
    writer = SeriesWriter(tmp_path / "spool", fsync=False)
    for ds in [*ct[:4], odd]:
        writer.add(ds)
    store = open_store(str(tmp_path / "store"))
    with pytest.raises(SeriesError, match=message) as err:
        writer.commit(store, KEY)
    assert not any(s in str(err.value) for s in _uids_and_names([*ct[:4], odd]))
    assert writer.count == 5 and not SeriesReader(store, KEY).complete
    writer.discard()
    assert not (tmp_path / "spool").exists()


def test_different_frame_sizes_fail_at_commit(tmp_path, ct):
    small = _variant(ct[0], Rows=16, Columns=16)
    small.PixelData = np.zeros((16, 16), np.int16).tobytes()
    writer = SeriesWriter(tmp_path / "spool", fsync=False)
    for ds in [*ct[:3], small]:
        writer.add(ds)
    with pytest.raises(SeriesError, match="Rows/Columns"):
        writer.commit(open_store(str(tmp_path / "store")), KEY)


def test_short_multi_frame_and_unsupported_pixels_are_refused_per_instance(tmp_path, ct):
    writer = SeriesWriter(tmp_path / "spool", fsync=False)
    multi = _variant(ct[0], NumberOfFrames=2)  # one frame's bytes for two frames
    with pytest.raises(SeriesError, match="frames") as err:
        writer.add(multi)
    assert not any(s in str(err.value) for s in _uids_and_names([multi]))
    with pytest.raises(SeriesError, match="BitsAllocated"):
        writer.add(_variant(ct[0], BitsAllocated=1))
    with pytest.raises(SeriesError, match="shorter"):
        truncated = _variant(ct[0])
        truncated.PixelData = truncated.PixelData[:100]
        writer.add(truncated)
    assert writer.count == 0


def _sr(number: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = BasicTextSRStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.InstanceNumber = number
    item = Dataset()
    item.ValueType = "TEXT"
    item.TextValue = f"finding {number}"
    ds.ContentSequence = [item]
    return ds


def test_series_without_pixels_is_stored_as_headers(tmp_path):
    reports = [_sr(2), _sr(1)]
    _, store, info = spool_and_commit(tmp_path, reports)
    assert (info.n_instances, info.shape, info.dtype, info.nbytes) == (2, (), None, 0)
    reader = SeriesReader(store, KEY)
    assert reader.complete and reader.volume is None
    assert reader.attrs["modality"] == "SR" and reader.attrs["n_slices"] == 0
    first = reader.instance(0)
    assert same_header(first, reports[1]) and "PixelData" not in first


def test_images_and_a_report_in_one_series(tmp_path, ct):
    report = _sr(99)
    _, store, info = spool_and_commit(tmp_path, [*ct[:5], report])
    reader = SeriesReader(store, KEY)
    assert info.shape[0] == 5 and len(reader) == 6
    assert same_header(reader.instance(5), report)
    assert reader.instance(4).pixel_array.shape == (32, 32)


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_bigendian.dcm",  # big endian, 16 bit
        "MR_small_implicit.dcm",
        "MR_small_RLE.dcm",  # compressed: decoded once at add
        "ExplVR_BigEnd.dcm",  # RGB, planar configuration 1, big endian
        "SC_rgb_small_odd.dcm",  # 3x3 RGB, odd length (padded) pixel data
        "SC_rgb_rle_16bit.dcm",
        "SC_ybr_full_422_uncompressed.dcm",  # subsampled colour: stored as RGB
        "rtdose_expb_1frame.dcm",  # 32 bit, big endian
        "examples_palette.dcm",  # palette colour: stored as 8-bit RGB
        "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline YBR: needs a decoder plugin
    ],
)
@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's samples hold a few odd values
def test_pixel_encodings_are_stored_as_their_decoded_values(tmp_path, name):
    src = pydicom_sample(name)
    try:
        expected = src.pixel_array
    except Exception:
        pytest.skip("no decoder for this transfer syntax here")
    if src.PhotometricInterpretation == "PALETTE COLOR":
        expected = (apply_color_lut(expected, src) >> 8).astype(np.uint8)
    _, store, info = spool_and_commit(tmp_path, [src])
    reader = SeriesReader(store, KEY)
    np.testing.assert_array_equal(reader.volume[0], expected)
    rebuilt = reader.instance(0)
    np.testing.assert_array_equal(rebuilt.pixel_array, expected)
    assert info.dtype == str(reader.volume.dtype)


def test_recommit_replaces_the_old_series_whole(tmp_path, ct):
    spool_and_commit(tmp_path / "a", ct)
    store = open_store(str(tmp_path / "a" / "store"))
    smaller = by_position(ct)[:3]
    writer = SeriesWriter(tmp_path / "spool-b", fsync=False)
    for ds in smaller:
        writer.add(ds)
    writer.commit(store, KEY)
    reader = SeriesReader(store, KEY)
    assert reader.volume.shape == (3, 32, 32) and len(reader.headers()) == 3
    np.testing.assert_array_equal(reader.volume[:], np.stack([d.pixel_array for d in smaller]))
    delete_series(store, KEY)
    assert not SeriesReader(store, KEY).complete
    assert not (tmp_path / "a" / "store" / KEY).exists()


def _run_child(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


CRASH_IN_COMMIT = """
    import os, sys
    from pathlib import Path
    from zarr.storage import WrapperStore
    import storage.volume
    from storage.objectstore import open_store
    from storage.series import SeriesWriter

    storage.volume.SHARD_BYTES = 4 * 32 * 32 * 2  # four slices a shard: several writes

    class DiesMidVolume(WrapperStore):
        shards = 0

        async def set(self, key, value):
            if "/volume/c/" in key:
                DiesMidVolume.shards += 1
                if DiesMidVolume.shards == 3:  # the first is surely written by then
                    os._exit(17)  # the process dies: no cleanup, no exception handling
            await self._store.set(key, value)

    spool, root, key = sys.argv[1:4]
    writer = SeriesWriter(Path(spool), fsync=False)
    writer.commit(DiesMidVolume(open_store(root)), key)
"""


def test_commit_killed_midway_looks_incomplete_and_recommit_works(tmp_path, ct):
    root = tmp_path / "store"
    spool_and_commit(tmp_path, ct[:2])  # an older complete version is being replaced
    writer = SeriesWriter(tmp_path / "spool2", fsync=True)
    for ds in ct:
        writer.add(ds)
    writer.close()

    child = _run_child(CRASH_IN_COMMIT, str(tmp_path / "spool2"), str(root), KEY)
    assert child.returncode == 17, child.stderr
    assert any((root / KEY / "volume" / "c").iterdir())  # it died after writing data

    store = open_store(str(root))
    reader = SeriesReader(store, KEY)
    assert not reader.complete
    with pytest.raises(SeriesIncomplete):
        _ = reader.volume
    assert list(list_series(store)) == []
    with pytest.raises(FileNotFoundError):
        zarr.open_group(root, path=KEY, mode="r")

    resumed = SeriesWriter(tmp_path / "spool2", fsync=True)
    assert resumed.count == 16
    resumed.commit(store, KEY)
    vol = SeriesReader(store, KEY).volume[:]
    np.testing.assert_array_equal(vol, np.stack([d.pixel_array for d in by_position(ct)]))


KILLED_WHILE_ADDING = """
    import sys
    from pathlib import Path
    import pydicom
    from storage.series import SeriesWriter

    spool, *files = sys.argv[1:]
    writer = SeriesWriter(Path(spool), fsync=True)
    for f in files * 1000:  # keeps adding (duplicates) until killed
        ds = pydicom.dcmread(f)
        writer.add(ds)
        print(ds.SOPInstanceUID, flush=True)  # acknowledged
"""


def test_writer_killed_while_adding_resumes_with_every_acknowledged_instance(tmp_path, ct):
    files = []
    for i, ds in enumerate(ct):
        files.append(tmp_path / f"{i}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    spool = tmp_path / "spool"
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(KILLED_WHILE_ADDING), str(spool)]
        + [str(f) for f in files[:10]],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    acked: set[str] = set()
    try:
        for n, line in enumerate(proc.stdout, 1):
            acked.add(line.strip())
            if n == 15:  # all ten, and five of them twice
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert len(acked) == 10

    with open(spool / LOG_NAME, "ab") as log:  # and a record torn half way
        log.write(b"SPHREC01" + b"\x00" * 40)
    writer = SeriesWriter(spool, fsync=True)
    assert writer.count == 10
    for ds in ct:  # the PACS sends the series again
        writer.add(ds)
    assert writer.count == 16
    store = open_store(str(tmp_path / "store"))
    assert writer.commit(store, KEY).n_instances == 16
    uids = [first(h, "00080018") for h in SeriesReader(store, KEY).headers()]
    assert acked <= set(uids)


RSS_CHILD = """
    import sys
    from pathlib import Path
    import numpy as np, psutil
    from pydicom.dataset import Dataset
    from pydicom.uid import CTImageStorage, generate_uid
    from storage.objectstore import open_store
    from storage.series import SeriesReader, SeriesWriter

    n, size, tmp = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    rng = np.random.default_rng(0)
    base = rng.normal(1000, 20, (size, size)).astype(np.int16)

    def instance(k):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, generate_uid(), "CT"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(k)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.7, 0.7]
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.roll(base, k, axis=1).tobytes()
        return ds

    writer = SeriesWriter(tmp / "spool", fsync=False)
    store = open_store(str(tmp / "store"))
    instance(0)
    baseline = psutil.Process().memory_info().rss
    for k in range(n):
        writer.add(instance(k))
    info = writer.commit(store, "a/b/c")
    # This process's own high-water mark (VmHWM): ru_maxrss would start at the parent's RSS,
    # which Linux carries over at exec (a pytest that imported torch measures torch).
    status = Path("/proc/self/status").read_text().split("VmHWM:")[1]
    peak = int(status.split()[0]) * 1024
    assert SeriesReader(store, "a/b/c").volume.shape == (n, size, size)
    print(info.nbytes, peak - baseline)
"""


def test_peak_memory_of_a_500_slice_ct_stays_bounded(tmp_path):
    child = _run_child(RSS_CHILD, "500", "512", str(tmp_path))
    assert child.returncode == 0, child.stderr
    nbytes, growth = (int(v) for v in child.stdout.split())
    assert nbytes == 500 * 512 * 512 * 2  # 262 MB of pixels went through
    assert growth < 200 * 2**20, f"peak RSS grew by {growth / 2**20:.0f} MiB"


def test_open_store_urls(tmp_path):
    assert open_store(str(tmp_path / "a")).root == tmp_path / "a"
    assert open_store(f"file://{tmp_path}/b").root == tmp_path / "b"
    with pytest.raises(ValueError):
        open_store("s3:///no-bucket")
    with pytest.raises(ValueError):
        open_store("ftp://host/x")
    with pytest.raises(ValueError):
        SeriesReader(open_store(str(tmp_path)), "../escape")


def test_header_json_is_the_dicom_json_model(tmp_path, ct):
    _, store, _ = spool_and_commit(tmp_path, ct[:1])
    header = SeriesReader(store, KEY).header(0)
    assert header == json_model.to_json_dict(ct[0])


def test_a_background_flush_that_fails_is_reported_by_the_next_sync(tmp_path, monkeypatch):
    from storage import spool as spool_mod

    monkeypatch.setattr(spool_mod, "FLUSH_BEHIND", 1000)  # every record starts one
    s = spool_mod.Spool(tmp_path / "s", fsync=True, segment="w", sync_each=False)
    s.put("1.2.3.1", {}, b"{}", b"x" * 2000)
    s.sync()  # the background flush of that record, then our own: both fine
    real = os.fdatasync

    def failing(fd: int) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise OSError(5, "Input/output error")  # the disk failed under the background flush
        real(fd)

    monkeypatch.setattr(spool_mod.os, "fdatasync", failing)
    s.put("1.2.3.2", {}, b"{}", b"y" * 2000)
    with pytest.raises(OSError, match="Input/output"):
        s.sync()  # not swallowed: the acknowledgements it would cover are not durable
    monkeypatch.setattr(spool_mod.os, "fdatasync", real)
    assert len(s) == 2  # what was written stays readable
    s.close()


def test_unreadable_names_what_a_committed_series_lacks(tmp_path, ct):
    """A group reads back whole, or `unreadable` says what is missing: each damage the
    concurrent-pull trial of issue 19 left (a marker without headers, a volume without its
    zarr.json, a missing chunk) is caught; the intact group passes, cheap and deep."""
    _, store, info = spool_and_commit(tmp_path, ct)
    assert unreadable(store, KEY, info.n_instances) == ""
    assert unreadable(store, KEY, info.n_instances, deep=True) == ""
    assert "the catalog 17" in unreadable(store, KEY, 17)
    group = tmp_path / "store" / KEY
    shard = next(p for p in (group / "volume").rglob("*") if p.is_file() and p.name != "zarr.json")
    moved = shard.with_name("moved")
    shard.rename(moved)
    assert unreadable(store, KEY, info.n_instances) == ""  # cheap: metadata only
    assert "chunks missing" in unreadable(store, KEY, info.n_instances, deep=True)
    moved.rename(shard)
    (group / "volume" / "zarr.json").unlink()
    assert "unreadable" in unreadable(store, KEY, info.n_instances)
    delete_headers = group / "headers"
    import shutil

    shutil.rmtree(delete_headers)
    assert "unreadable" in unreadable(store, KEY)
    (group / "zarr.json").unlink()
    assert unreadable(store, KEY) == "no commit marker (zarr.json)"
