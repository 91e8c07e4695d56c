"""Durable on-disk spool of one series: an append-only log of instance records.

One file, `spool.log`, per series folder. A record is a fixed head (magic, lengths, CRC32C of
the rest), a small JSON `meta` (what commit needs to order and check slices), the instance
header as DICOM JSON, and the pixel bytes (already compressed by the caller). Appending to one
open file costs one write per instance; creating a file per instance costs several times more
on common file systems. With `fsync`, `put` returns after fdatasync, so the record survives a
crash. Reopening scans the log, keeps every whole record and cuts off a torn tail. A later
record for the same SOPInstanceUID replaces the earlier one.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c

BytesLike = bytes | bytearray | memoryview
LOG_NAME = "spool.log"
MAGIC = b"SPHREC01"
# magic, meta length, header length, pixel length, CRC32C(meta + header), CRC32C(pixels)
_HEAD = struct.Struct("<8sIIQII")


class SpoolError(RuntimeError):
    """The spool cannot be used: busy in another process, or unreadable (no PHI)."""


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    """Where one spooled instance lives in the log and what commit needs to know about it."""

    meta: dict[str, Any]
    header_offset: int
    header_len: int
    pixel_offset: int
    pixel_len: int


class Spool:
    """Per-series log of durably written instances, indexed by SOPInstanceUID."""

    def __init__(self, path: Path, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._entries: dict[str, SpoolEntry] = {}
        self._fd = -1
        self._end = 0
        self._closed = False
        # Nothing is opened or created yet: a gateway may plan thousands of series, and only
        # those that receive instances (or were spooled before a crash) need a file.

    def __len__(self) -> int:
        with self._lock:
            self._open(create=False)
            return len(self._entries)

    def entries(self) -> list[SpoolEntry]:
        """Snapshot of the spooled instances (in arrival order)."""
        with self._lock:
            self._open(create=False)
            return list(self._entries.values())

    def put(self, sop_uid: str, meta: dict[str, Any], header: bytes, pixels: bytes) -> None:
        """Append one instance; on return it is in the log (and on disk if `fsync`)."""
        meta_b = json.dumps({**meta, "sop": sop_uid}, separators=(",", ":")).encode()
        crc = google_crc32c.extend(google_crc32c.value(meta_b), header)
        head = _HEAD.pack(
            MAGIC, len(meta_b), len(header), len(pixels), crc, google_crc32c.value(pixels)
        )
        size = _HEAD.size + len(meta_b) + len(header) + len(pixels)
        # Writes are serialised: a record must never start before the previous one ended.
        with self._lock:
            self._open(create=True)
            offset = self._end
            _pwrite_all(self._fd, [head, meta_b, header, pixels], offset)
            self._end = offset + size
            hoff = offset + _HEAD.size + len(meta_b)
            entry = SpoolEntry(
                {**meta, "sop": sop_uid}, hoff, len(header), hoff + len(header), len(pixels)
            )
            fd = self._fd
        if self.fsync:
            os.fdatasync(fd)  # outside the lock: concurrent adds share the flush
        with self._lock:
            self._entries[sop_uid] = entry

    def read_header(self, entry: SpoolEntry) -> bytes:
        """The instance header (DICOM JSON bytes)."""
        return _pread_all(self._fd, entry.header_len, entry.header_offset)

    def read_pixels_into(self, entry: SpoolEntry, out: memoryview) -> None:
        """Copy the instance's pixel bytes into `out` (exactly `pixel_len` bytes long)."""
        view = out.cast("B")
        if view.nbytes != entry.pixel_len:
            raise ValueError("output buffer does not match the spooled pixel length")
        pos = 0
        while pos < entry.pixel_len:
            n = os.preadv(self._fd, [view[pos:]], entry.pixel_offset + pos)
            if n <= 0:
                raise SpoolError("spool log is shorter than its records say")
            pos += n

    def close(self) -> None:
        """Release the log (and its lock); the files stay for a later resume."""
        with self._lock:
            self._closed = True
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def _open(self, create: bool) -> None:
        """Open (and lock) the log if not yet done; caller holds the lock."""
        if self._fd >= 0:
            return
        if self._closed:
            raise SpoolError("spool is closed")
        log = self.path / LOG_NAME
        if not create and not log.exists():
            return
        self.path.mkdir(parents=True, exist_ok=True)
        created = not log.exists()
        fd = os.open(log, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolError("spool is in use by another writer") from None
        if created and self.fsync:
            _fsync_dir(self.path)
        self._fd = fd
        self._end = self._scan()

    def remove(self) -> None:
        """Close and delete the spool folder."""
        self.close()
        with self._lock:
            self._entries.clear()
        shutil.rmtree(self.path, ignore_errors=True)

    def _scan(self) -> int:
        """Index the whole records in the log; cut off anything after the last one."""
        size = os.fstat(self._fd).st_size
        pos = 0
        while pos + _HEAD.size <= size:
            magic, mlen, hlen, plen, crc, pcrc = _HEAD.unpack(_pread_all(self._fd, _HEAD.size, pos))
            end = pos + _HEAD.size + mlen + hlen + plen
            if magic != MAGIC or end > size:
                break
            body = _pread_all(self._fd, mlen + hlen, pos + _HEAD.size)
            if google_crc32c.value(body) != crc:
                break
            poff = pos + _HEAD.size + mlen + hlen
            if google_crc32c.value(_pread_all(self._fd, plen, poff)) != pcrc:
                break
            try:
                meta = json.loads(body[:mlen])
            except ValueError:
                break
            self._entries[meta["sop"]] = SpoolEntry(meta, poff - hlen, hlen, poff, plen)
            pos = end
        if pos != size:
            os.ftruncate(self._fd, pos)  # a record torn by a crash was never acknowledged
        return pos


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
