"""A zip written as a stream: its bytes come out as each file goes in, never whole anywhere.

    z = ZipStream()
    for piece in z.add("a/b.dcm", [data]):   # the zip's bytes so far, in pieces
        out.write(piece)
    for piece in z.close():                  # the central directory
        out.write(piece)
    z.entries                                # name, size and sha256 of each file

`zipfile` writes to an output it cannot seek as a stream (a data descriptor after each file,
ZIP64 where needed); files are stored, not deflated: pixels, gzip and Zarr chunks are compressed
already, and a deflate would bound the rate at one core's.
"""

from __future__ import annotations

import hashlib
import time
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

PIECE = 1 << 20  # bytes gathered before a piece is handed on


@dataclass(frozen=True)
class Entry:
    """A file in the zip: its name, size and sha256 (of its content)."""

    name: str
    size: int
    sha256: str


class _Sink:
    """What zipfile writes to: a buffer drained by the caller (no tell or seek: a stream)."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def write(self, data: bytes | memoryview) -> int:
        self.buf += data
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        out = bytes(self.buf)
        self.buf.clear()
        return out


class ZipStream:
    """Add files one at a time; each `add` and `close` yields the zip's next bytes."""

    def __init__(self) -> None:
        self._sink = _Sink()
        # ZipFile's stubs want an IO; _Sink has what it calls on an unseekable stream (write,
        # flush), not all of IO
        self._zip = zipfile.ZipFile(self._sink, "w", zipfile.ZIP_STORED)  # type: ignore[call-overload]
        self._stamp = time.localtime()[:6]
        self.entries: list[Entry] = []
        self.nbytes = 0  # zip bytes handed on so far

    def add(self, name: str, chunks: Iterable[bytes | memoryview]) -> Iterator[bytes]:
        """Write file `name` from `chunks`; yields the zip's bytes as they accumulate."""
        info = zipfile.ZipInfo(name, date_time=self._stamp)
        info.compress_type = zipfile.ZIP_STORED
        digest, size = hashlib.sha256(), 0
        with self._zip.open(info, "w", force_zip64=True) as f:
            for chunk in chunks:
                f.write(chunk)
                digest.update(chunk)
                size += len(chunk)
                if len(self._sink.buf) >= PIECE:
                    yield self._take()
        self.entries.append(Entry(name, size, digest.hexdigest()))
        yield self._take()

    def close(self) -> Iterator[bytes]:
        """The central directory: the zip's last bytes."""
        self._zip.close()
        yield self._take()

    def _take(self) -> bytes:
        out = self._sink.take()
        self.nbytes += len(out)
        return out
