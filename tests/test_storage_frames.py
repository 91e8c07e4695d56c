"""`FrameReader` reads each frame as zarr does, shard by shard, short last shard included."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import LocalStore, MemoryStore

from storage import volume
from storage.frames import WINDOW, FrameReader, ReadAhead
from storage.objectstore import run
from storage.series import SeriesError


def stored(shape, dtype, depth, fill, store=None):
    store = store or MemoryStore()
    run(store.set("s/volume/zarr.json", volume.array_metadata(shape, dtype, depth)))
    arr = zarr.open_array(store, path="s/volume", mode="r+", zarr_format=3)
    rng = np.random.default_rng(1)
    data = rng.integers(-1000, 3000, size=shape).astype(dtype)
    for z in fill:
        arr[z] = data[z]
    return store, zarr.open_array(store, path="s/volume", mode="r", zarr_format=3), data


@pytest.mark.parametrize("local", [False, True], ids=["memory", "folder"])
@pytest.mark.parametrize("shape,dtype", [((10, 6, 5), "<i2"), ((7, 4, 3, 3), "|u1")])
def test_frames_equal_zarr(shape, dtype, local, tmp_path):
    store = LocalStore(tmp_path) if local else MemoryStore()  # a folder is read without zarr
    store, arr, data = stored(shape, dtype, 4, range(shape[0]), store)
    frames = FrameReader(store, "s", arr)
    for z in range(shape[0]):
        np.testing.assert_array_equal(frames.frame(z), arr[z])
        assert frames.raw(z) == np.ascontiguousarray(data[z], dtype=np.dtype(dtype)).tobytes()
    with pytest.raises(IndexError):
        frames.raw(shape[0])


def test_missing_frame_is_the_fill_value_and_a_damaged_index_is_refused(tmp_path):
    store, arr, _ = stored((6, 3, 3), "<i2", 4, [0, 1, 4], LocalStore(tmp_path))
    frames = FrameReader(store, "s", arr)
    assert not frames.frame(2).any() and frames.frame(2).shape == (3, 3)
    np.testing.assert_array_equal(frames.frame(4), arr[4])
    key = "s/volume/" + volume.shard_key(1, 3)
    raw = bytearray(run(store.get(key, default_buffer_prototype())).to_bytes())
    raw[-5] ^= 0xFF  # inside the index, before its CRC32C
    run(store.set(key, default_buffer_prototype().buffer.from_bytes(bytes(raw))))
    with pytest.raises(SeriesError, match="damaged"):
        FrameReader(store, "s", arr).raw(4)


class Counting(MemoryStore):
    """A remote store stand-in that counts its reads."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.reads: list[object] = []

    async def get(self, key, prototype, byte_range=None):
        self.reads.append(byte_range)
        return await super().get(key, prototype, byte_range)


def test_read_ahead_fetches_a_window_once_and_stays_in_budget():
    n = 2 * WINDOW + 5
    store, arr, data = stored((n, 8, 8), "<i2", WINDOW * 2, range(n), Counting())
    cache = ReadAhead(max_bytes=10**9)
    frames = FrameReader(store, "s", arr, cache)
    store.reads.clear()
    for z in range(n):
        assert frames.raw(z) == data[z].tobytes()
    # Per shard: its index, then one range per window of frames (2 shards, 3 windows).
    assert len(store.reads) == 2 + 3
    store.reads.clear()
    for z in reversed(range(n)):  # read ahead already
        np.testing.assert_array_equal(frames.frame(z), arr[z])
    assert store.reads == []
    control = FrameReader(store, "s", arr)  # the control: no read-ahead, a read a frame
    for z in range(n):
        control.raw(z)
    assert len(store.reads) == n + 2
    small = ReadAhead(max_bytes=3 * WINDOW * 8 * 8 * 2 // 4)
    tight = FrameReader(store, "s", arr, small)
    for z in range(n):
        assert tight.raw(z) == data[z].tobytes()
        assert small.nbytes <= small.max_bytes


def test_concurrent_readers_of_a_window_wait_for_one_fetch():
    import threading

    store, arr, data = stored((WINDOW, 64, 64), "<i2", WINDOW, range(WINDOW), Counting())
    frames = FrameReader(store, "s", arr, ReadAhead())
    frames.raw(0)  # the index
    frames.read_ahead = cache = ReadAhead()
    store.reads.clear()
    start = threading.Barrier(8)

    def read(z):
        start.wait()
        assert frames.raw(z) == data[z].tobytes()

    threads = [threading.Thread(target=read, args=(z,)) for z in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.reads) == 1 and cache.nbytes > 0
