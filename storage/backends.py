"""Storage backends: what a local folder and an object store do differently, said once.

Both are zarr stores (zarr reads either the same way); `objectstore.open_store` picks one when
the store is opened, and the code above asks it through `Backend`, never by its type:

- `LocalFolder`: a commit hard-links the spool file holding the frames into the store as the
  volume's one shard (kernel copies onto another file system), fsyncs before the marker, and
  reads frames straight from the file (page cache: no request, nothing worth reading ahead).
- `ObjectBucket` (S3): a commit uploads shards, two in flight while the next is packed; frames
  are range requests, worth reading ahead; a prefix's sizes come from one listing.

Any other zarr store (a `MemoryStore`, a wrapper in tests) is used the object store's way
(`of`).
"""

from __future__ import annotations

import os
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from zarr.abc.store import ByteRequest, RangeByteRequest, Store, SuffixByteRequest
from zarr.core.buffer import Buffer, default_buffer_prototype
from zarr.storage import LocalStore, ObjectStore, WrapperStore

from storage import volume
from storage.spool import Spool, SpoolEntry, fsync_path
from storage.storeio import guard, run

_SHARDS_IN_FLIGHT = 2  # shard uploads overlapping the packing of the next


@runtime_checkable
class Backend(Protocol):
    """What series storage asks of a store beyond zarr's API."""

    # A ranged read costs a request (worth reading neighbours ahead), not a page-cache read.
    reads_are_requests: bool

    def before_commit(self, spool: Spool, entries: list[SpoolEntry]) -> list[SpoolEntry]:
        """Prepare the spool for `write_volume`; the entries as they are named now."""
        ...

    def write_volume(
        self, key: str, spool: Spool, frames: list[SpoolEntry], shape: tuple[int, ...], dtype: str
    ) -> bool:
        """Store the spooled compressed `frames` (in volume order) as the array `key/volume`.
        True when a spool file became part of the store (it must not be written again)."""
        ...

    def write_marker(self, key: str, doc: Buffer, *, durable: bool) -> None:
        """Write the commit marker `key/zarr.json`; with `durable`, what the series holds is
        on stable storage before the marker is, and the marker before this returns."""
        ...

    def read_range(self, key: str, byte_range: ByteRequest | None = None) -> bytes | None:
        """Bytes of the object `key` (those of `byte_range`), None when it is missing."""
        ...

    def sizes(self, folder: str) -> list[int]:
        """The size of every object under `folder` ("a/b/")."""
        ...

    def check(self) -> None:
        """One cheap request; raises when the store cannot be used."""
        ...

    def writer(self, key: str) -> Writer:
        """The object `key` written as a stream; it exists once the writer is closed."""
        ...

    def file_of(self, key: str) -> Path | None:
        """The file holding `key`, where the store is files (None for an object store)."""
        ...


class Writer(Protocol):
    """One object written piece by piece (`Backend.writer`)."""

    def write(self, data: bytes) -> None: ...

    def close(self) -> None:
        """Complete the object."""
        ...

    def abort(self) -> None:
        """Drop what was written; nothing is left behind."""
        ...


def of(store: Store) -> Backend:
    """The backend of `store`: itself when opened by `open_store`, else the object store's
    way over zarr's API."""
    return store if isinstance(store, Backend) else Adapted(store)


class _Requests(Store):
    """The object store's way, over zarr's store API alone."""

    reads_are_requests = True

    def before_commit(self, spool: Spool, entries: list[SpoolEntry]) -> list[SpoolEntry]:
        return entries

    def write_volume(
        self, key: str, spool: Spool, frames: list[SpoolEntry], shape: tuple[int, ...], dtype: str
    ) -> bool:
        """Pack the frames into shards; one upload per shard, `_SHARDS_IN_FLIGHT` of them
        overlapping the packing of the next (hides latency at the cost of that many shards)."""
        frame_nbytes = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
        depth = volume.shard_depth(len(frames), frame_nbytes)
        with guard("commit"):
            run(self.set(f"{key}/volume/zarr.json", volume.array_metadata(shape, dtype, depth)))
        prototype = default_buffer_prototype()
        pending: deque[Future[None]] = deque()
        with ThreadPoolExecutor(_SHARDS_IN_FLIGHT, thread_name_prefix="shard") as pool:
            try:
                for i, z0 in enumerate(range(0, len(frames), depth)):
                    part = frames[z0 : z0 + depth]
                    buf, slots = volume.pack_shard([e.pixel_len for e in part], depth, len(shape))
                    view = memoryview(buf)
                    for entry, slot in zip(part, slots, strict=True):
                        spool.read_pixels_into(entry, view[slot])
                    if len(pending) >= _SHARDS_IN_FLIGHT:
                        with guard("commit"):
                            pending.popleft().result()
                    shard_key = f"{key}/volume/{volume.shard_key(i, len(shape))}"
                    value = prototype.buffer.from_bytes(buf)
                    pending.append(pool.submit(_set, self, shard_key, value))
                while pending:
                    with guard("commit"):
                        pending.popleft().result()
            finally:
                for f in pending:
                    f.cancel()
        return False

    def write_marker(self, key: str, doc: Buffer, *, durable: bool) -> None:
        with guard("commit"):
            run(self.set(f"{key}/zarr.json", doc))  # an object is whole once the PUT returns

    def read_range(self, key: str, byte_range: ByteRequest | None = None) -> bytes | None:
        with guard("read"):
            buf = run(self.get(key, default_buffer_prototype(), byte_range))
        return None if buf is None else buf.to_bytes()

    def sizes(self, folder: str) -> list[int]:
        with guard("list"):
            keys = run(_keys(self, folder))
            return [run(self.getsize(k)) for k in keys]

    def check(self) -> None:
        with guard("check"):
            run(self.exists("zarr.json"))

    def writer(self, key: str) -> Writer:
        return _Buffered(self, key)

    def file_of(self, key: str) -> Path | None:
        return None


# A streamed upload holds at most about PART x (CONCURRENCY + 1) bytes in memory (obstore's
# defaults, 10 MiB x 12, would hold a 130 MB export whole); 5 MiB is S3's smallest part.
UPLOAD_PART = 5 << 20
UPLOAD_CONCURRENCY = 4


class ObjectBucket(_Requests, ObjectStore):
    """An S3 bucket (obstore): uploads, range reads, sizes from one listing."""

    def writer(self, key: str) -> Writer:
        """A multipart upload (obstore's writer); completed by `close` only."""
        import obstore as obs

        return _Multipart(
            obs.open_writer(
                self.store, key, buffer_size=UPLOAD_PART, max_concurrency=UPLOAD_CONCURRENCY
            )
        )

    def sizes(self, folder: str) -> list[int]:
        with guard("list"):
            return run(self._sizes(folder))

    async def _sizes(self, folder: str) -> list[int]:
        import obstore as obs

        metas = await obs.list(self.store, prefix=folder).collect_async()
        return [int(m["size"]) for m in metas]


class Adapted(_Requests, WrapperStore[Store]):
    """Any other zarr store, used the object store's way."""


class _Buffered:
    """A stream kept in memory and stored whole at `close` (a store without multipart)."""

    def __init__(self, store: Store, key: str) -> None:
        self._store, self._key, self._parts = store, key, bytearray()

    def write(self, data: bytes) -> None:
        self._parts += data

    def close(self) -> None:
        _set(self._store, self._key, default_buffer_prototype().buffer.from_bytes(self._parts))

    def abort(self) -> None:
        self._parts = bytearray()


class _Multipart:
    """obstore's writer; an upload never closed is never completed."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def write(self, data: bytes) -> None:
        self._inner.write(data)

    def close(self) -> None:
        self._inner.close()

    def abort(self) -> None:
        pass


class _PartFile:
    """A file written beside its place (`.part`) and renamed into it at `close`."""

    def __init__(self, path: Path) -> None:
        self._path, self._part = path, path.with_name(path.name + ".part")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._part, "wb")  # noqa: SIM115 - closed by close or abort

    def write(self, data: bytes) -> None:
        self._file.write(data)

    def close(self) -> None:
        self._file.close()
        os.replace(self._part, self._path)

    def abort(self) -> None:
        self._file.close()
        self._part.unlink(missing_ok=True)


class LocalFolder(LocalStore):
    """A folder: frames linked or copied in by the kernel, read straight from their file."""

    reads_are_requests = False

    def __init__(self, root: Path | str, *, read_only: bool = False) -> None:
        super().__init__(root, read_only=read_only)
        self._prefix = f"{self.root}/"

    def before_commit(self, spool: Spool, entries: list[SpoolEntry]) -> list[SpoolEntry]:
        if not any("rows" in e.meta for e in entries):
            return entries
        # The segment holding most images is about to become the volume's shard file:
        # from now on no writer may open it by name (see _link_volume).
        spool.freeze(most_images(entries))
        return spool.entries()

    def write_volume(
        self, key: str, spool: Spool, frames: list[SpoolEntry], shape: tuple[int, ...], dtype: str
    ) -> bool:
        root = self.root / key / "volume"
        with guard("commit"):
            one_shard = volume.array_metadata(shape, dtype, len(frames))
            run(self.set(f"{key}/volume/zarr.json", one_shard))
            if _link_volume(spool, root, frames, len(shape)):
                return True
        frame_nbytes = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
        depth = volume.shard_depth(len(frames), frame_nbytes)
        with guard("commit"):
            run(self.set(f"{key}/volume/zarr.json", volume.array_metadata(shape, dtype, depth)))
            _write_shards(spool, root, frames, depth, len(shape))
        return False

    def write_marker(self, key: str, doc: Buffer, *, durable: bool) -> None:
        root = self.root / key
        with guard("commit"):
            if durable:
                _fsync_tree(root)  # data durable before the marker says complete
            run(self.set(f"{key}/zarr.json", doc))
            if durable:
                fsync_path(root / "zarr.json")
                fsync_path(root)

    def read_range(self, key: str, byte_range: ByteRequest | None = None) -> bytes | None:
        """Straight from the file: no event loop, no thread hop."""
        try:
            with open(self._prefix + key, "rb") as f:
                if isinstance(byte_range, SuffixByteRequest):
                    f.seek(max(0, os.fstat(f.fileno()).st_size - byte_range.suffix))
                    return f.read()
                if isinstance(byte_range, RangeByteRequest):
                    f.seek(byte_range.start)
                    return f.read(byte_range.end - byte_range.start)
                if byte_range is not None:  # an OffsetByteRequest
                    f.seek(byte_range.offset)
                return f.read()
        except FileNotFoundError:
            return None

    def sizes(self, folder: str) -> list[int]:
        with guard("list"):
            return [run(self.getsize(k)) for k in run(_keys(self, folder))]

    def check(self) -> None:
        with guard("check"):
            run(self.exists("zarr.json"))
            if self.root.exists() and not os.access(self.root, os.R_OK | os.X_OK):
                raise PermissionError(13, "the store's folder cannot be read")

    def writer(self, key: str) -> Writer:
        return _PartFile(self.root / key)

    def file_of(self, key: str) -> Path | None:
        return self.root / key


def most_images(entries: Sequence[SpoolEntry]) -> str:
    """The segment holding the most images."""
    counts = Counter(e.segment for e in entries if "rows" in e.meta)
    return counts.most_common(1)[0][0]


def _link_volume(spool: Spool, root: Path, images: list[SpoolEntry], ndim: int) -> bool:
    """Make the frozen segment holding most images the volume's only shard, in place.

    A zarr v3 shard is read through the index at its end, so its inner chunks may sit
    anywhere in the file with other bytes between them: the spooled frames stay where
    they are, frames from other segments are appended (kernel copies), then the index,
    and the file is hard-linked into the store. No pixel byte is rewritten in the common
    case of one writer per series. False when the store is on another file system.
    """
    base = most_images(images)
    if not base.startswith("frozen-"):
        return False
    src = spool.segment_path(base)
    mode = os.stat(root / "zarr.json").st_mode & 0o777  # as the store makes its files
    fd = os.open(src, os.O_WRONLY)
    try:
        end = os.fstat(fd).st_size
        chunks = []
        for e in images:
            if e.segment != base:
                spool.copy_pixels(e, fd, end)
                chunks.append((end, e.pixel_len))
                end += e.pixel_len
            else:
                chunks.append((e.pixel_offset, e.pixel_len))
        _pwrite(fd, volume.shard_index(chunks, len(images), ndim), end)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    shard = root / volume.shard_key(0, ndim)
    shard.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, shard)
    except OSError:
        return False
    return True


def _write_shards(
    spool: Spool, root: Path, images: list[SpoolEntry], depth: int, ndim: int
) -> None:
    """Shard files filled by kernel copies from the spool (the pixel bytes never pass through
    this process): for a store on another file system than the spool."""
    for i, z0 in enumerate(range(0, len(images), depth)):
        part = images[z0 : z0 + depth]
        path = root / volume.shard_key(i, ndim)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            chunks, pos = [], 0
            for entry in part:
                spool.copy_pixels(entry, fd, pos)
                chunks.append((pos, entry.pixel_len))
                pos += entry.pixel_len
            _pwrite(fd, volume.shard_index(chunks, depth, ndim), pos)
        finally:
            os.close(fd)


def _pwrite(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def _set(store: Store, key: str, value: Any) -> None:
    run(store.set(key, value))


async def _keys(store: Store, folder: str) -> list[str]:
    return [k async for k in store.list_prefix(folder) if k.startswith(folder)]
