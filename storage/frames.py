"""One stored frame's bytes in one read: the slice's inner chunk of the volume's shard, at the
offset the shard's index gives (read once per shard and kept), decompressed by blosc.

This reads the layout `storage.volume` writes (zarr v3 sharding, index at the end with its
CRC32C, one blosc chunk per slice) without zarr's per-read machinery, which fetches the
index again for every chunk: a viewer asks for frames one by one, and on S3 each read is a
round trip.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import google_crc32c
import numpy as np
from numcodecs import blosc
from zarr.abc.store import RangeByteRequest, Store, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import LocalStore

from storage import volume
from storage.objectstore import guard, run
from storage.series import SeriesError

EMPTY = 2**64 - 1  # a shard index's offset for a chunk never written


class FrameReader:
    """Frames of one committed series' volume, by stored position (z)."""

    def __init__(self, store: Store, key: str, array: Any) -> None:
        self.store = store
        self.key = key.strip("/")
        self.shape: tuple[int, ...] = tuple(array.shape)
        self.dtype = np.dtype(array.dtype).newbyteorder("<")
        if not array.shards:
            raise SeriesError("the volume is not sharded as storage.volume writes it")
        self.depth = int(array.shards[0])
        self.frame_nbytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        self._root = str(store.root) if isinstance(store, LocalStore) else None
        self._indexes: dict[int, list[list[int]]] = {}
        self._lock = threading.Lock()

    def raw(self, z: int) -> bytes:
        """Frame `z` as little-endian bytes (as Explicit VR Little Endian carries it)."""
        if not 0 <= z < self.shape[0]:
            raise IndexError("frame index out of range")
        shard, slot = divmod(z, self.depth)
        offset, nbytes = self._index(shard)[slot]
        if offset == EMPTY:
            return bytes(self.frame_nbytes)  # never written: the fill value
        data = blosc.decompress(self._read(shard, RangeByteRequest(offset, offset + nbytes)))
        if len(data) != self.frame_nbytes:
            raise SeriesError("a stored frame has the wrong size")
        return data

    def frame(self, z: int) -> np.ndarray:
        return np.frombuffer(self.raw(z), dtype=self.dtype).reshape(self.shape[1:])

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
        """Bytes of a shard: straight from the file in a local folder (no event loop, no
        thread hop), else through the store."""
        key = f"{self.key}/volume/{volume.shard_key(shard, len(self.shape))}"
        if self._root is not None:
            try:
                with open(f"{self._root}/{key}", "rb") as f:
                    if isinstance(byte_range, SuffixByteRequest):
                        f.seek(-byte_range.suffix, os.SEEK_END)
                        return f.read(byte_range.suffix)
                    f.seek(byte_range.start)
                    return f.read(byte_range.end - byte_range.start)
            except FileNotFoundError:
                raise SeriesError("a shard of the volume is missing") from None
        with guard("read"):
            buf = run(self.store.get(key, default_buffer_prototype(), byte_range))
        if buf is None:
            raise SeriesError("a shard of the volume is missing")
        return buf.to_bytes()
