"""The contract every storage backend keeps (`storage.backends.Backend`), as zarr-python's
`StoreTests`: one base class of tests, a subclass per backend giving its store. A local folder
and S3 on SeaweedFS (both as `open_store` opens them), and a plain zarr `MemoryStore` (the
object store's way, adapted)."""

from __future__ import annotations

import random

import numpy as np
import pydicom
import pytest
import zarr
from pydicom.dataset import Dataset
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, Store, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import MemoryStore

from harness.synthetic import generate
from storage import backends
from storage.frames import FrameReader, ReadAhead
from storage.objectstore import (
    Upload,
    check_store,
    delete_prefix,
    leftovers,
    local_path,
    open_store,
    run,
    usage,
)
from storage.series import SeriesReader, SeriesWriter, list_series

KEY = "projects/p/2.25.1/2.25.2"
DATA = bytes(range(256)) * 4


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> list[Dataset]:
    """A synthetic CT series of 12 slices of 32², shuffled."""
    corpus = generate(
        tmp_path_factory.mktemp("ct"), n_patients=1, series_per_study=1, slices=12, size=32
    )
    dss: list[Dataset] = [pydicom.dcmread(f) for f in corpus.files]
    random.Random(5).shuffle(dss)
    return dss


def put(store: Store, key: str, data: bytes) -> None:
    run(store.set(key, default_buffer_prototype().buffer.from_bytes(data)))


def commit(tmp_path, store: Store, dss: list[Dataset], key: str = KEY, name: str = "spool"):
    writer = SeriesWriter(tmp_path / name, fsync=True)
    for ds in dss:
        writer.add(ds)
    return writer.commit(store, key)


class BackendContract:
    """What series storage relies on from any backend; subclasses give `store`."""

    @pytest.fixture
    def store(self, tmp_path) -> Store:
        raise NotImplementedError

    def test_is_a_backend(self, store):
        backend = backends.of(store)
        assert isinstance(backend, backends.Backend)
        assert isinstance(backend.reads_are_requests, bool)
        check_store(store)

    def test_read_range(self, store):
        put(store, "a/b/obj", DATA)
        backend = backends.of(store)
        assert backend.read_range("a/b/obj") == DATA
        assert backend.read_range("a/b/obj", RangeByteRequest(10, 30)) == DATA[10:30]
        assert backend.read_range("a/b/obj", SuffixByteRequest(20)) == DATA[-20:]
        assert backend.read_range("a/b/obj", OffsetByteRequest(1000)) == DATA[1000:]
        assert backend.read_range("a/b/missing") is None
        assert backend.read_range("a/b/missing", SuffixByteRequest(4)) is None

    def test_sizes_of_a_folder_only(self, store):
        put(store, "projects/p/x/1", b"a" * 10)
        put(store, "projects/p/y/2", b"b" * 32)
        put(store, "projects/p2/z", b"c" * 7)  # a sibling prefix: not under projects/p/
        assert sorted(backends.of(store).sizes("projects/p/")) == [10, 32]
        assert usage(store, "projects/p") == (2, 42)
        assert delete_prefix(store, "projects/p") == (2, 42)
        assert leftovers(store, "projects/p") == []
        assert usage(store, "projects/p2") == (1, 7)

    def test_a_stream_exists_once_closed_and_abort_leaves_nothing(self, store):
        upload = Upload(store, "exports/p/a.zip")
        for i in range(3):
            upload.write(DATA[i * 100 : (i + 1) * 100])
        assert backends.of(store).read_range("exports/p/a.zip") is None  # not yet
        upload.close()
        assert backends.of(store).read_range("exports/p/a.zip") == DATA[:300]
        path = local_path(store, "exports/p/a.zip")  # a file, where the store is files
        assert path is None or path.read_bytes() == DATA[:300]
        dropped = Upload(store, "exports/p/b.zip")
        dropped.write(DATA)
        dropped.abort()
        assert leftovers(store, "exports/p") == ["exports/p/a.zip"]

    def test_committed_series_reads_back(self, tmp_path, store, ct):
        info = commit(tmp_path, store, ct)
        assert info.shape == (12, 32, 32)
        src = sorted(ct, key=lambda d: float(d.ImagePositionPatient[2]))
        expected = np.stack([d.pixel_array for d in src])
        reader = SeriesReader(store, KEY)
        assert reader.complete and len(reader) == 12
        np.testing.assert_array_equal(reader.volume[:], expected)
        assert reader.instance(3).SOPInstanceUID == src[3].SOPInstanceUID
        assert list(list_series(store, "projects")) == [KEY]
        # Frames read one by one, as WADO-RS does, through the backend (read ahead or not).
        for cache in (None, ReadAhead()):
            frames = FrameReader(store, KEY, reader.volume, cache)
            for z in range(12):
                np.testing.assert_array_equal(frames.frame(z), expected[z])

    def test_recommit_replaces_the_series_whole(self, tmp_path, store, ct):
        commit(tmp_path, store, ct)
        commit(tmp_path, store, ct[:5], name="spool2")
        reader = SeriesReader(store, KEY)
        assert len(reader) == 5 and reader.volume.shape[0] == 5
        assert zarr.open_array(store, path=f"{KEY}/volume", mode="r").shape[0] == 5
        n_before = usage(store, KEY)[0]
        commit(tmp_path, store, ct[:5], name="spool3")
        assert usage(store, KEY)[0] == n_before  # nothing of an older commit left over

    def test_a_missing_shard_is_an_error_not_zeros(self, tmp_path, store, ct):
        commit(tmp_path, store, ct)
        reader = SeriesReader(store, KEY)
        frames = FrameReader(store, KEY, reader.volume)
        frames.raw(0)
        shards = [k for k in leftovers(store, KEY) if "/volume/c/" in k]
        run(store.delete(shards[0]))
        with pytest.raises(Exception, match="missing"):
            FrameReader(store, KEY, reader.volume).raw(0)


class TestLocalFolder(BackendContract):
    @pytest.fixture
    def store(self, tmp_path) -> Store:
        return open_store(str(tmp_path / "store"))

    def test_reads_are_not_requests(self, store):
        assert backends.of(store).reads_are_requests is False


class TestObjectBucket(BackendContract):
    @pytest.fixture
    def store(self, s3_server) -> Store:
        return open_store(s3_server.url(s3_server.new_bucket(), "research"), s3_server.options())

    def test_reads_are_requests(self, store):
        assert backends.of(store).reads_are_requests is True


class TestAdaptedZarrStore(BackendContract):
    @pytest.fixture
    def store(self) -> Store:
        return MemoryStore()


class IgnoresRanges(backends.LocalFolder):
    """A broken backend: reads whole objects whatever range is asked."""

    def read_range(self, key, byte_range=None):
        return super().read_range(key)


def test_control_the_contract_catches_a_broken_backend(tmp_path):
    store = IgnoresRanges(tmp_path / "store")
    with pytest.raises(AssertionError):
        BackendContract().test_read_range(store)
