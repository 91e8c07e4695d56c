"""Streaming multipart/related (RFC 2387 / RFC 2046) writer and parser for DICOMweb.

The writer is a generator: it never holds more than one part (and, for parts given as
iterators of chunks, never more than one chunk).  The parser reads a stream of byte chunks,
split anywhere, and yields one :class:`Part` at a time; memory per part is bounded by
``max_part_size``, and malformed or truncated input raises :class:`ValueError` instead of
blocking or growing without bound.

Wire format written (each part carries a ``Content-Type`` header, as PS3.18 8.7.3 requires)::

    --<boundary>\\r\\n
    Content-Type: application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1\\r\\n
    \\r\\n
    <bytes>\\r\\n
    --<boundary>--\\r\\n
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from gateway.web.accept import parse_media_type

CRLF = b"\r\n"
MAX_BOUNDARY_LENGTH = 70  # RFC 2046 5.1.1
DEFAULT_MAX_PART_SIZE = 1 << 30
DEFAULT_MAX_HEADER_SIZE = 16 * 1024
DEFAULT_MAX_PREAMBLE_SIZE = 64 * 1024
_MAX_BOUNDARY_LINE_PADDING = 1024

Body = bytes | bytearray | memoryview | Iterable[bytes]
PartSpec = tuple[str, Body] | tuple[str, Body, Mapping[str, str] | None]


def new_boundary() -> str:
    """A random boundary (32 hex digits: 128 bits, so it cannot plausibly occur in a body)."""
    return secrets.token_hex(16)


def _check_boundary(boundary: str) -> None:
    if not 1 <= len(boundary) <= MAX_BOUNDARY_LENGTH:
        raise ValueError(f"multipart boundary must be 1 to 70 characters, got {len(boundary)}")
    if any(c in boundary for c in "\r\n") or not boundary.isascii():
        raise ValueError("multipart boundary must be ASCII without CR or LF")


def _check_header(name: str, value: str) -> None:
    if not name or any(c in name for c in ":\r\n ") or any(c in value for c in "\r\n"):
        raise ValueError(f"invalid multipart header {name!r}: {value!r}")


def multipart_content_type(part_type: str, boundary: str, **params: str) -> str:
    """``multipart/related; type="<part_type>"; boundary=<boundary>`` plus extra parameters.

    Extra parameters are given with underscores for hyphens (``transfer_syntax=...``).
    """
    value = f'multipart/related; type="{part_type}"; boundary={boundary}'
    for name, param in params.items():
        value += f"; {name.replace('_', '-')}={param}"
    return value


class MultipartWriter:
    """Stream parts as one multipart/related body; iterate it once to get the byte chunks.

    ``parts`` yields ``(content_type, body)`` or ``(content_type, body, headers)``; ``body`` is
    bytes or an iterable of byte chunks; ``headers`` are extra part headers such as
    ``Content-Location``.  ``part_type`` is the ``type`` parameter of the response's
    Content-Type (see :attr:`content_type`).
    """

    def __init__(
        self,
        parts: Iterable[PartSpec],
        *,
        part_type: str,
        boundary: str | None = None,
    ):
        self.boundary = boundary if boundary is not None else new_boundary()
        _check_boundary(self.boundary)
        self.part_type = part_type
        self._parts = parts
        self._delimiter = b"--" + self.boundary.encode("ascii")

    @property
    def content_type(self) -> str:
        """The Content-Type header value of the whole response."""
        return multipart_content_type(self.part_type, self.boundary)

    def __iter__(self) -> Iterator[bytes]:
        delimiter = self._delimiter
        first = True
        for spec in self._parts:
            content_type, body = spec[0], spec[1]
            extra = spec[2] if len(spec) > 2 else None
            headers = [("Content-Type", content_type), *(extra or {}).items()]
            lines = [] if first else [CRLF]
            lines += [delimiter, CRLF]
            for name, value in headers:
                _check_header(name, value)
                lines += [f"{name}: {value}".encode(), CRLF]
            lines.append(CRLF)
            yield b"".join(lines)
            first = False
            if isinstance(body, bytes | bytearray | memoryview):
                if body[: len(delimiter)] == delimiter or (CRLF + delimiter) in body:
                    raise ValueError("part body contains the multipart boundary")
                if len(body):
                    yield bytes(body)
            elif isinstance(body, str):
                raise TypeError("part body must be bytes or an iterable of bytes, not str")
            else:
                for chunk in body:
                    if not isinstance(chunk, bytes | bytearray | memoryview):
                        raise TypeError(f"part body chunk must be bytes, not {type(chunk)}")
                    if len(chunk):
                        yield bytes(chunk)
        yield (b"" if first else CRLF) + delimiter + b"--" + CRLF


def write_multipart(
    parts: Iterable[PartSpec], *, part_type: str, boundary: str | None = None
) -> tuple[str, Iterator[bytes]]:
    """Convenience: ``(content_type_header, chunk_iterator)`` for a multipart/related body."""
    writer = MultipartWriter(parts, part_type=part_type, boundary=boundary)
    return writer.content_type, iter(writer)


# ---------------------------------------------------------------------------- parser


@dataclass
class Part:
    """One parsed body part: headers (in order, names as sent) and content."""

    headers: list[tuple[str, str]] = field(default_factory=list)
    content: bytes = b""

    def header(self, name: str, default: str | None = None) -> str | None:
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return default

    @property
    def content_type(self) -> str | None:
        return self.header("Content-Type")

    @property
    def content_location(self) -> str | None:
        return self.header("Content-Location")


def boundary_from_content_type(content_type: str) -> str:
    """The boundary parameter of a multipart Content-Type value (quoted or not)."""
    parsed = parse_media_type(content_type)
    if parsed is None or parsed[0] != "multipart":
        raise ValueError(f"not a multipart content type: {content_type!r}")
    boundary = parsed[2].get("boundary")
    if not boundary:
        raise ValueError(f"multipart content type has no boundary: {content_type!r}")
    _check_boundary(boundary)
    return boundary


Chunk = bytes | bytearray | memoryview  # what a body's chunks may be


class _Stream:
    """A byte buffer refilled from an iterator of chunks."""

    def __init__(self, chunks: Iterable[Chunk]):
        self._chunks = iter(chunks)
        self._buf = bytearray()
        self._eof = False

    def _fill(self) -> bool:
        while not self._eof:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                self._eof = True
                return False
            if not isinstance(chunk, bytes | bytearray | memoryview):
                raise TypeError(f"multipart stream chunks must be bytes, not {type(chunk)}")
            if chunk:
                self._buf += chunk
                return True
        return False

    def ensure(self, n: int) -> bool:
        """Buffer at least ``n`` bytes if the stream has them."""
        while len(self._buf) < n:
            if not self._fill():
                return False
        return True

    def startswith(self, prefix: bytes) -> bool:
        self.ensure(len(prefix))
        return self._buf.startswith(prefix)

    def skip(self, n: int) -> None:
        del self._buf[:n]

    def read_until(self, marker: bytes, limit: int, what: str) -> bytes:
        """Bytes before ``marker`` (consuming the marker); at most ``limit`` bytes before it."""
        start = 0
        while True:
            index = self._buf.find(marker, start)
            if index >= 0:
                if index > limit:
                    break
                data = bytes(self._buf[:index])
                del self._buf[: index + len(marker)]
                return data
            start = max(0, len(self._buf) - len(marker) + 1)
            if start > limit:
                break
            if not self._fill():
                raise ValueError(f"truncated multipart body: end of stream in {what}")
        raise ValueError(f"multipart {what} exceeds {limit} bytes")


def _parse_headers(block: bytes) -> list[tuple[str, str]]:
    headers: list[tuple[str, str]] = []
    for raw in block.split(CRLF):
        line = raw.decode("utf-8", errors="replace")
        if line[:1] in (" ", "\t") and headers:  # obsolete line folding
            name, value = headers[-1]
            headers[-1] = (name, f"{value} {line.strip()}")
            continue
        name, colon, value = line.partition(":")
        if not colon or not name.strip() or name != name.rstrip():
            raise ValueError(f"malformed multipart part header line: {line[:80]!r}")
        headers.append((name.strip(), value.strip()))
    return headers


def iter_parts(
    chunks: Iterable[Chunk],
    boundary: str | None = None,
    *,
    content_type: str | None = None,
    max_part_size: int = DEFAULT_MAX_PART_SIZE,
    max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
    max_preamble_size: int = DEFAULT_MAX_PREAMBLE_SIZE,
) -> Iterator[Part]:
    """Parse a multipart body from a stream of byte chunks, yielding parts as they complete.

    Give either ``boundary`` or the response's ``content_type``.  Raises :class:`ValueError` on
    a missing close delimiter (truncation), a part or header block over its limit, a preamble
    over ``max_preamble_size`` (garbage instead of multipart), or a malformed boundary line or
    header.  The epilogue after the close delimiter is not read.
    """
    if boundary is None:
        if content_type is None:
            raise ValueError("iter_parts needs a boundary or a content type")
        boundary = boundary_from_content_type(content_type)
    _check_boundary(boundary)
    delimiter = b"--" + boundary.encode("ascii")
    body_end = CRLF + delimiter
    stream = _Stream(chunks)

    if stream.startswith(delimiter):
        stream.skip(len(delimiter))
    else:
        stream.read_until(body_end, max_preamble_size, "preamble (no boundary found)")

    while True:
        if not stream.ensure(2):
            raise ValueError("truncated multipart body: end of stream after a boundary")
        if stream.startswith(b"--"):
            return  # close delimiter
        padding = stream.read_until(CRLF, _MAX_BOUNDARY_LINE_PADDING, "boundary line")
        if padding.strip(b" \t"):
            raise ValueError(f"unexpected bytes after multipart boundary: {padding[:40]!r}")
        if stream.startswith(CRLF):
            stream.skip(2)
            headers: list[tuple[str, str]] = []
        else:
            block = stream.read_until(CRLF + CRLF, max_header_size, "part headers")
            headers = _parse_headers(block)
        content = stream.read_until(body_end, max_part_size, "part body")
        yield Part(headers, content)


def parse_multipart(
    data: Chunk | Iterable[Chunk],
    boundary: str | None = None,
    *,
    content_type: str | None = None,
    max_part_size: int = DEFAULT_MAX_PART_SIZE,
) -> list[Part]:
    """All parts of a multipart body (bytes or chunks); see :func:`iter_parts`."""
    chunks: Iterable[Chunk] = [data] if isinstance(data, bytes | bytearray | memoryview) else data
    return list(
        iter_parts(chunks, boundary, content_type=content_type, max_part_size=max_part_size)
    )
