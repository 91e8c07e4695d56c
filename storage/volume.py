"""The `volume` array of a series: one compressed chunk per slice, packed into shards.

Each frame is compressed once, when it is spooled (blosc lz4 level 1, byte shuffle: the
fastest codec that still halves CT), and those exact bytes become the slice's inner chunk.
Commit then only gathers spooled frames into shards with the index the zarr v3 sharding codec
expects (no decode or re-encode): ~32 MiB of pixels each (one object each in S3), or, in a
local folder, a spool file that keeps its frames where they are and gains an index at its end.
Any zarr v3 reader reads the result; reading one slice fetches one inner chunk.
"""

from __future__ import annotations

from typing import Any, Literal

import google_crc32c
import numpy as np
import zarr
from numcodecs import blosc
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import MemoryStore

SHARD_BYTES = 32 << 20  # target uncompressed pixel bytes per shard
_CNAME: Literal["lz4"] = "lz4"
_CLEVEL = 1
_BLOCKSIZE = 256 << 10  # blosc's automatic choice is smaller and ~25% slower on CT frames
_EMPTY = np.uint64(2**64 - 1)  # index entry of an inner chunk that is not there


def compress_frame(frame: bytes | bytearray | memoryview, itemsize: int) -> bytes:
    """Compress one frame's little-endian bytes the way the volume array's codec does."""
    shuffle = blosc.SHUFFLE if itemsize > 1 else blosc.NOSHUFFLE
    return blosc.compress(frame, _CNAME.encode(), _CLEVEL, shuffle, _BLOCKSIZE, itemsize)


def shard_depth(n_slices: int, frame_nbytes: int) -> int:
    """Slices per shard."""
    return max(1, min(n_slices, SHARD_BYTES // max(frame_nbytes, 1)))


def array_metadata(shape: tuple[int, ...], dtype: str, depth: int) -> Any:
    """`zarr.json` bytes (a zarr Buffer) of the volume array."""
    itemsize = np.dtype(dtype).itemsize
    inner = BloscCodec(
        cname=_CNAME,
        clevel=_CLEVEL,
        shuffle="shuffle" if itemsize > 1 else "noshuffle",
        typesize=itemsize,
        blocksize=_BLOCKSIZE,
    )
    names = ("z", "y", "x") if len(shape) == 3 else ("z", "y", "x", "c")
    sharding = ShardingCodec(
        chunk_shape=(1, *shape[1:]),
        codecs=[BytesCodec(endian="little"), inner],
        index_codecs=[BytesCodec(endian="little"), Crc32cCodec()],
        index_location="end",
    )
    # Built in memory: zarr's create_array also writes parent groups, which must not exist
    # in the real store before the series is complete.
    scratch = zarr.create_array(
        MemoryStore(),
        name="volume",
        shape=shape,
        chunks=(depth, *shape[1:]),
        dtype=dtype,
        serializer=sharding,
        compressors=None,
        filters=None,
        fill_value=0,
        dimension_names=names,
    )
    return scratch.metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"]


def shard_key(index: int, ndim: int) -> str:
    """Key of shard `index` (along z) relative to the array, default chunk key encoding."""
    return "c/" + "/".join([str(index)] + ["0"] * (ndim - 1))


def shard_index(chunks: list[tuple[int, int]], depth: int, ndim: int) -> bytes:
    """The index (with its CRC32C) that ends a shard: (offset, nbytes) of each inner chunk in
    z order. Slots past the last chunk (a short last shard) are marked empty."""
    index = np.full((depth, *([1] * (ndim - 1)), 2), _EMPTY, dtype="<u8")
    if chunks:
        index[: len(chunks)].reshape(len(chunks), 2)[:] = chunks
    raw = index.tobytes()
    return raw + google_crc32c.value(raw).to_bytes(4, "little")


def pack_shard(frame_lengths: list[int], depth: int, ndim: int) -> tuple[bytearray, list[slice]]:
    """A shard buffer sized for the frames, and where each frame goes in it.

    The caller fills each slice with a compressed frame; the index (with its CRC32C) is
    already written at the end.
    """
    slots, pos = [], 0
    for n in frame_lengths:
        slots.append(slice(pos, pos + n))
        pos += n
    index = shard_index([(s.start, s.stop - s.start) for s in slots], depth, ndim)
    buf = bytearray(pos + len(index))
    buf[pos:] = index
    return buf, slots
