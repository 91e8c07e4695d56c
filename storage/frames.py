"""One stored frame's bytes in one read: the slice's inner chunk of the volume's shard, at the
offset the shard's index gives (read once per shard and kept), decompressed by blosc.

This reads the layout `storage.volume` writes (zarr v3 sharding, index at the end with its
CRC32C, one blosc chunk per slice) without zarr's per-read machinery, which fetches the
index again for every chunk: a viewer asks for frames one by one, and on S3 each read is a
round trip.

On a remote store a request costs about as much as a few megabytes (SeaweedFS on loopback:
~3 ms for 300 KB, ~12 ms for 10 MB), and viewers ask for the frames of a series in order: given
a `ReadAhead`, a frame's read fetches the `WINDOW` frames around it (contiguous in the shard:
one range) and keeps them, compressed, within a byte budget shared by all readers.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import google_crc32c
import numpy as np
from numcodecs import blosc
from zarr.abc.store import RangeByteRequest, Store, SuffixByteRequest

from storage import backends, volume
from storage.errors import SeriesError

EMPTY = 2**64 - 1  # a shard index's offset for a chunk never written
WINDOW = 16  # frames fetched together from a remote store
_READERS = itertools.count()


class ReadAhead:
    """Compressed frames read ahead from a remote store, least recently used dropped past
    `max_bytes`; shared by the readers of a server."""

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._frames: OrderedDict[Hashable, bytes] = OrderedDict()
        self._fetching: dict[Hashable, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> bytes | None:
        with self._lock:
            found = self._frames.get(key)
            if found is not None:
                self._frames.move_to_end(key)
            return found

    def put(self, items: dict[Hashable, bytes]) -> None:
        with self._lock:
            for key, data in items.items():
                old = self._frames.pop(key, None)
                self.nbytes += len(data) - (len(old) if old is not None else 0)
                self._frames[key] = data
            while self.nbytes > self.max_bytes and self._frames:
                self.nbytes -= len(self._frames.popitem(last=False)[1])

    def fetching(self, window: Hashable) -> threading.Lock:
        """The lock held while `window` is fetched: concurrent readers wait for one fetch."""
        with self._lock:
            return self._fetching.setdefault(window, threading.Lock())

    def fetched(self, window: Hashable, lock: threading.Lock) -> None:
        with self._lock:
            if self._fetching.get(window) is lock:  # not a newer fetch's lock
                del self._fetching[window]


class FrameReader:
    """Frames of one committed series' volume, by stored position (z)."""

    def __init__(
        self, store: Store, key: str, array: Any, read_ahead: ReadAhead | None = None
    ) -> None:
        self.store = store
        self.key = key.strip("/")
        self.shape: tuple[int, ...] = tuple(array.shape)
        self.dtype = np.dtype(array.dtype).newbyteorder("<")
        if not array.shards:
            raise SeriesError("the volume is not sharded as storage.volume writes it")
        self.depth = int(array.shards[0])
        self.frame_nbytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        self._backend = backends.of(store)
        # Read ahead where a read is a request; a folder's reads are page-cache reads.
        self.read_ahead = read_ahead if self._backend.reads_are_requests else None
        self._id = next(_READERS)  # this reader's frames in the read-ahead (a re-commit: anew)
        self._indexes: dict[int, list[list[int]]] = {}
        self._lock = threading.Lock()

    def raw(self, z: int) -> bytes:
        """Frame `z` as little-endian bytes (as Explicit VR Little Endian carries it)."""
        if not 0 <= z < self.shape[0]:
            raise IndexError("frame index out of range")
        shard, slot = divmod(z, self.depth)
        index = self._index(shard)
        offset, nbytes = index[slot]
        if offset == EMPTY:
            return bytes(self.frame_nbytes)  # never written: the fill value
        if self.read_ahead is None:
            chunk = self._read(shard, RangeByteRequest(offset, offset + nbytes))
        else:
            chunk = self._read_window(shard, slot, index, self.read_ahead)
        data = blosc.decompress(chunk)
        if len(data) != self.frame_nbytes:
            raise SeriesError("a stored frame has the wrong size")
        return data

    def frame(self, z: int) -> np.ndarray:
        return np.frombuffer(self.raw(z), dtype=self.dtype).reshape(self.shape[1:])

    def _read_window(
        self, shard: int, slot: int, index: list[list[int]], cache: ReadAhead
    ) -> bytes:
        """Frame `slot`'s chunk, fetched with its window's when not read ahead already."""
        key = (self._id, shard, slot)
        found = cache.get(key)
        if found is not None:
            return found
        first = slot - slot % WINDOW
        window = (self._id, shard, first)
        lock = cache.fetching(window)
        try:
            with lock:  # another request may be fetching it: wait for that one
                found = cache.get(key)
                if found is not None:
                    return found
                slots = [
                    (s, *index[s]) for s in range(first, min(first + WINDOW, len(index)))
                    if index[s][0] != EMPTY
                ]  # fmt: skip
                start = min(o for _, o, _ in slots)
                end = max(o + n for _, o, n in slots)
                if end - start > 2 * sum(n for _, _, n in slots):  # not packed: no window
                    offset, nbytes = index[slot]
                    return self._read(shard, RangeByteRequest(offset, offset + nbytes))
                blob = self._read(shard, RangeByteRequest(start, end))
                chunks: dict[Hashable, bytes]
                chunks = {(self._id, shard, s): blob[o - start : o - start + n]
                          for s, o, n in slots}  # fmt: skip
                cache.put(chunks)
                return chunks[key]
        finally:
            cache.fetched(window, lock)

    def _index(self, shard: int) -> list[list[int]]:
        with self._lock:
            found = self._indexes.get(shard)
        if found is not None:
            return found
        size = self.depth * 16 + 4  # (offset, nbytes) per slot, a short last shard too; CRC32C
        raw = self._read(shard, SuffixByteRequest(size))
        body, crc = raw[:-4], int.from_bytes(raw[-4:], "little")
        if google_crc32c.value(body) != crc:
            raise SeriesError("a shard index of the volume is damaged")
        index = np.frombuffer(body, dtype="<u8").reshape(-1, 2).tolist()  # ints, read often
        with self._lock:
            self._indexes[shard] = index
        return index

    def _read(self, shard: int, byte_range: RangeByteRequest | SuffixByteRequest) -> bytes:
        """Bytes of a shard, as the backend reads them (a folder: straight from the file)."""
        key = f"{self.key}/volume/{volume.shard_key(shard, len(self.shape))}"
        data = self._backend.read_range(key, byte_range)
        if data is None:
            raise SeriesError("a shard of the volume is missing")
        return data
