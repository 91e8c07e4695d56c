"""Durable on-disk spool of one series: append-only segment logs of instance records.

A series folder holds one log per writer ("segment"): `spool.log` for the default segment,
`spool-<name>.log` for a named one. Writers in different processes append to their own
segments at the same time without waiting for each other; a segment is locked (flock) by its
live writer so two writers never share one. A record is a fixed head (magic, lengths, CRC32C
of the rest), a small JSON `meta` (what commit needs to order and check slices, with the time
the record was written), the instance header (DICOM JSON) and the pixel bytes (compressed by
the caller). `put` returns once the record is written to the file: it then survives a crash
of the process. With `fsync`, it also survives power loss: after each `put` (`sync_each`), or
once `sync` or `close` returns (one flush for many records: what a receiver uses). Meanwhile,
every `FLUSH_BEHIND` bytes appended start a flush in the background, so that the one `sync`
waits for has little left to write.

Readers (the coordinator that counts and commits) scan every segment, keep each whole record
and ignore a torn tail; a later record for the same SOPInstanceUID replaces an earlier one
(within a segment by position, across segments by write time). A writer reopening its own
segment after a crash cuts the torn tail off before appending.

`spool.lock` seals the folder: while a writer appends it holds a shared lock on it; sealing
takes the exclusive lock and marks the file (one byte), so once `seal` returns no record can
land any more, and a writer that tries gets `SpoolSealed`. Commit and discard seal first.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import struct
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import google_crc32c

BytesLike = bytes | bytearray | memoryview
LOG_NAME = "spool.log"  # the default segment
LOCK_NAME = "spool.lock"
MAGIC = b"SPHREC01"
# magic, meta length, header length, pixel length, CRC32C(meta + header), CRC32C(pixels)
_HEAD = struct.Struct("<8sIIQII")
FLUSH_BEHIND = 16 << 20  # bytes appended between background flushes (fsync without sync_each)
_SEGMENT_RE = re.compile(r"[A-Za-z0-9_.-]{1,100}")
# Segment logs: writers' (spool.log, spool-<name>.log) and frozen ones, which commit made
# part of a stored volume and which no writer opens by name any more.
_SEGMENT_FILE_RE = re.compile(r"spool(?:-[A-Za-z0-9_.-]{1,100})?\.log|frozen-[0-9]+\.log")


class SpoolError(RuntimeError):
    """The spool cannot be used: busy in another process, or unreadable (no PHI)."""


class SpoolSealed(SpoolError):
    """The series folder was sealed (committed or discarded): nothing more can be added."""


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    """Where one spooled instance lives and what commit needs to know about it."""

    meta: dict[str, Any]
    header_offset: int
    header_len: int
    pixel_offset: int
    pixel_len: int
    segment: str = LOG_NAME  # file name of the segment log holding it


def segment_file(segment: str | None) -> str:
    """File name of a segment's log."""
    if segment is None:
        return LOG_NAME
    if not _SEGMENT_RE.fullmatch(segment) or segment in (".", ".."):
        raise ValueError("segment name must be 1-100 characters of [A-Za-z0-9_.-]")
    return f"spool-{segment}.log"


class _Segment:
    """What a reader knows of one segment log: where its scan stopped, what it found."""

    __slots__ = ("end", "entries", "fd", "ino")

    def __init__(self, fd: int, ino: int) -> None:
        self.fd, self.ino, self.end = fd, ino, 0
        self.entries: dict[str, SpoolEntry] = {}


class Spool:
    """One series folder: writes one segment, reads all of them.

    `put` appends to this spool's own segment (created and locked on first use); `entries`
    and `__len__` re-read every segment from disk (only bytes not yet scanned).
    """

    def __init__(
        self, path: Path, fsync: bool = True, segment: str | None = None, sync_each: bool = True
    ) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.sync_each = fsync and sync_each
        self.segment = segment_file(segment)
        self._lock = threading.Lock()
        self._fd = -1  # own segment, locked exclusively
        self._lock_fd = -1  # spool.lock, for the shared lock around appends
        self._end = 0
        self._unflushed = 0  # bytes appended since the last flush started
        self._behind: Future[None] | None = None  # the background flush under way
        self._closed = False
        self._segments: dict[str, _Segment] = {}
        # Nothing is opened or created yet: a gateway may plan thousands of series, and only
        # those that receive instances (or were spooled before a crash) need a file.

    # -- reading (any process) --------------------------------------------------------------

    def __len__(self) -> int:
        with self._lock:
            return len(self._merged())

    def entries(self) -> list[SpoolEntry]:
        """Snapshot of the spooled instances over all segments, in write order."""
        with self._lock:
            merged = self._merged()
        return sorted(merged.values(), key=lambda e: e.meta.get("t", 0))

    def read_header(self, entry: SpoolEntry) -> bytes:
        """The instance header (DICOM JSON bytes)."""
        return _pread_all(self._reader_fd(entry), entry.header_len, entry.header_offset)

    def read_pixels_into(self, entry: SpoolEntry, out: memoryview) -> None:
        """Copy the instance's pixel bytes into `out` (exactly `pixel_len` bytes long)."""
        view = out.cast("B")
        if view.nbytes != entry.pixel_len:
            raise ValueError("output buffer does not match the spooled pixel length")
        fd, pos = self._reader_fd(entry), 0
        while pos < entry.pixel_len:
            n = os.preadv(fd, [view[pos:]], entry.pixel_offset + pos)
            if n <= 0:
                raise SpoolError("spool log is shorter than its records say")
            pos += n

    def copy_pixels(self, entry: SpoolEntry, dst_fd: int, dst_offset: int) -> None:
        """Copy the instance's pixel bytes into file `dst_fd` at `dst_offset`, in the kernel."""
        src, done = self._reader_fd(entry), 0
        while done < entry.pixel_len:
            try:
                n = os.copy_file_range(
                    src,
                    dst_fd,
                    entry.pixel_len - done,
                    entry.pixel_offset + done,
                    dst_offset + done,
                )
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                # Across file systems (some kernels): through this process instead.
                data = _pread_all(src, entry.pixel_len - done, entry.pixel_offset + done)
                _pwrite_all(dst_fd, [data], dst_offset + done)
                n = len(data)
            if n <= 0:
                raise SpoolError("spool log is shorter than its records say")
            done += n

    def _reader_fd(self, entry: SpoolEntry) -> int:
        seg = self._segments.get(entry.segment)
        if seg is None:
            raise SpoolError("spool segment is no longer open")
        return seg.fd

    def _merged(self) -> dict[str, SpoolEntry]:
        """Scan what is new in every segment; the latest record of each instance wins."""
        if self._closed:
            raise SpoolError("spool is closed")
        try:
            names = [n for n in os.listdir(self.path) if _SEGMENT_FILE_RE.fullmatch(n)]
        except FileNotFoundError:
            names = []
        merged: dict[str, SpoolEntry] = {}
        for name in sorted(names):
            seg = self._scan_segment(name)
            if seg is None:
                continue
            for sop, entry in seg.entries.items():
                old = merged.get(sop)
                if old is None or entry.meta.get("t", 0) >= old.meta.get("t", 0):
                    merged[sop] = entry
        return merged

    def _scan_segment(self, name: str) -> _Segment | None:
        seg = self._segments.get(name)
        try:
            st = os.stat(self.path / name)
        except FileNotFoundError:
            return None
        if seg is not None and seg.ino != st.st_ino:  # replaced: start over
            os.close(seg.fd)
            seg = None
        if seg is None:
            try:
                fd = os.open(self.path / name, os.O_RDONLY)
            except FileNotFoundError:
                return None
            seg = self._segments[name] = _Segment(fd, os.fstat(fd).st_ino)
        seg.end = _scan(seg.fd, seg.end, name, seg.entries)
        return seg

    # -- writing (this spool's own segment) ---------------------------------------------------

    def put(self, sop_uid: str, meta: dict[str, Any], header: BytesLike, pixels: BytesLike) -> None:
        """Append one instance; on return it is in the log (flushed too with `sync_each`).

        Raises SpoolSealed once the folder was committed or discarded (or deleted).
        """
        meta_b = json.dumps(
            {**meta, "sop": sop_uid, "t": time.time_ns()}, separators=(",", ":")
        ).encode()
        crc = google_crc32c.extend(google_crc32c.value(meta_b), header)
        head = _HEAD.pack(
            MAGIC, len(meta_b), len(header), len(pixels), crc, google_crc32c.value(pixels)
        )
        size = _HEAD.size + len(meta_b) + len(header) + len(pixels)
        # Writes are serialised: a record must never start before the previous one ended.
        with self._lock:
            self._open_segment()
            fcntl.flock(self._lock_fd, fcntl.LOCK_SH)
            try:
                st = os.fstat(self._lock_fd)
                if st.st_size or not st.st_nlink:
                    raise SpoolSealed("series spool was committed or discarded")
                _pwrite_all(self._fd, [head, meta_b, header, pixels], self._end)
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            self._end += size
            fd = self._fd
            if self.fsync and not self.sync_each:
                self._flush_behind(size)
        if self.sync_each:
            os.fdatasync(fd)  # outside the lock: concurrent adds share the flush

    def sync(self) -> None:
        """Make everything this spool appended durable (fdatasync of its segment), unless
        built with `fsync=False`."""
        with self._lock:
            if self._fd >= 0 and self.fsync:
                self._flush()

    def _flush(self) -> None:
        """fdatasync the segment; caller holds the lock. A background flush's error surfaces
        here: it shares the open file, so this fdatasync might no longer report it."""
        behind, self._behind = self._behind, None
        if behind is not None:
            behind.result()
        os.fdatasync(self._fd)
        self._unflushed = 0

    def _flush_behind(self, size: int) -> None:
        """Count appended bytes; past FLUSH_BEHIND, start a flush in the background (on a
        duplicate descriptor: closing ours never races it). Caller holds the lock."""
        self._unflushed += size
        if self._unflushed < FLUSH_BEHIND or (self._behind and not self._behind.done()):
            return
        if self._behind is not None:
            self._behind.result()  # raises the last one's error, if any
        self._unflushed = 0
        self._behind = _flusher().submit(_fdatasync_dup, os.dup(self._fd))

    def _open_segment(self) -> None:
        """Open and lock this spool's segment if not yet done; caller holds the lock."""
        if self._fd >= 0:
            return
        if self._closed:
            raise SpoolError("spool is closed")
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock_fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        log = self.path / self.segment
        created = not log.exists()
        fd = os.open(log, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            os.close(lock_fd)
            raise SpoolError("spool segment is in use by another writer") from None
        if created and self.fsync:
            fsync_path(self.path)
        # Whole records stay; a tail torn by a crash of this segment's last writer goes.
        end = _scan(fd, 0, self.segment, {})
        if end != os.fstat(fd).st_size:
            os.ftruncate(fd, end)
        self._fd, self._lock_fd, self._end = fd, lock_fd, end

    def segment_path(self, name: str) -> Path:
        """Path of a segment log (as named in SpoolEntry.segment)."""
        return self.path / name

    def freeze(self, name: str) -> str:
        """Rename segment `name` so that no writer opens it by name again; its records stay
        readable under the new name, which is returned (entries read before name the old
        one: replace it). Used by commit before the file becomes stored data."""
        if name.startswith("frozen-"):
            return name
        new = f"frozen-{time.time_ns()}.log"
        with self._lock:
            os.rename(self.path / name, self.path / new)
            seg = self._segments.pop(name, None)
            if seg is not None:
                self._segments[new] = seg
                seg.entries = {k: replace(e, segment=new) for k, e in seg.entries.items()}
        if self.fsync:
            fsync_path(self.path)
        return new

    # -- sealing and cleanup ------------------------------------------------------------------

    def seal(self) -> None:
        """Refuse every later append to this folder, by any writer; waits for appends under
        way. A missing folder stays missing."""
        self._set_seal(True)

    def unseal(self) -> None:
        """Accept appends again (after a commit that failed)."""
        self._set_seal(False)

    def _set_seal(self, sealed: bool) -> None:
        try:
            fd = os.open(self.path / LOCK_NAME, os.O_RDWR | (os.O_CREAT if sealed else 0), 0o600)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if sealed:
                os.pwrite(fd, b"S", 0)
            else:
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # also drops the lock

    def close(self, flush: bool = True) -> None:
        """Flush (with `fsync`) and release the files and the segment's lock; the files stay
        for a later resume."""
        with self._lock:
            try:
                if flush and self._fd >= 0 and self.fsync and not self.sync_each:
                    self._flush()
            finally:  # a failed flush still releases the files and the lock
                self._behind = None
                self._closed = True
                for fd in (self._fd, self._lock_fd):
                    if fd >= 0:
                        os.close(fd)
                self._fd = self._lock_fd = -1
                for seg in self._segments.values():
                    os.close(seg.fd)
                self._segments.clear()

    def remove(self) -> None:
        """Seal, close and delete the spool folder."""
        self.seal()
        self.close(flush=False)
        shutil.rmtree(self.path, ignore_errors=True)


def _scan(fd: int, pos: int, segment: str, entries: dict[str, SpoolEntry]) -> int:
    """Index the whole records from `pos` on into `entries`; return where they stop."""
    size = os.fstat(fd).st_size
    while pos + _HEAD.size <= size:
        magic, mlen, hlen, plen, crc, pcrc = _HEAD.unpack(_pread_all(fd, _HEAD.size, pos))
        end = pos + _HEAD.size + mlen + hlen + plen
        if magic != MAGIC or end > size:
            break
        body = _pread_all(fd, mlen + hlen, pos + _HEAD.size)
        if google_crc32c.value(body) != crc:
            break
        poff = pos + _HEAD.size + mlen + hlen
        if google_crc32c.value(_pread_all(fd, plen, poff)) != pcrc:
            break
        try:
            meta = json.loads(body[:mlen])
        except ValueError:
            break
        entries[meta["sop"]] = SpoolEntry(meta, poff - hlen, hlen, poff, plen, segment)
        pos = end
    return pos


_FLUSHER: ThreadPoolExecutor | None = None
_FLUSHER_LOCK = threading.Lock()


def _flusher() -> ThreadPoolExecutor:
    """The process's one background flushing thread (made on first use: after any fork)."""
    global _FLUSHER
    with _FLUSHER_LOCK:
        if _FLUSHER is None:
            _FLUSHER = ThreadPoolExecutor(1, thread_name_prefix="spool-flush")
        return _FLUSHER


def _fdatasync_dup(fd: int) -> None:
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, parts: list[BytesLike], offset: int) -> None:
    views = [memoryview(p).cast("B") for p in parts]
    while views:
        n = os.pwritev(fd, views, offset)
        offset += n
        while views and n >= views[0].nbytes:
            n -= views[0].nbytes
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def _pread_all(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    while len(data) < length:
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            raise SpoolError("spool log is shorter than its records say")
        data += more
    return data


def fsync_path(path: Path) -> None:
    """fsync a file or folder by path (a folder: so a new name in it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
