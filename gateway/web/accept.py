"""Accept-header parsing and content negotiation for DICOMweb resources (PS3.18 8.7).

Clients send Accept headers in many shapes; all of these are handled::

    application/dicom+json, multipart/related; type=application/octet-stream; transfer-syntax=*
    multipart/related; type=application/octet-stream; transfer-syntax=*          (OHIF, unquoted)
    multipart/related; type="application/octet-stream"; transfer-syntax="1.2.840.10008.1.2.1"
    multipart/related; type="application/dicom"; transfer-syntax=*
    image/avif,image/webp,*/*;q=0.8                                              (a browser <img>)

This server only produces uncompressed pixel data, so the only transfer syntax it offers is
Explicit VR Little Endian (``1.2.840.10008.1.2.1``); ``transfer-syntax=*`` means "as stored",
which is that same uncompressed syntax.  A range with ``q=0`` excludes what it matches (the most
specific matching range decides, as in RFC 9110 12.5.1).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
DEFAULT_TRANSFER_SYNTAX = EXPLICIT_VR_LITTLE_ENDIAN

DICOM_JSON = "application/dicom+json"
DICOM_XML = "application/dicom+xml"  # PS3.19 Native DICOM Model, one multipart part a dataset
JSON = "application/json"
DICOM = "application/dicom"
OCTET_STREAM = "application/octet-stream"
JPEG = "image/jpeg"
PNG = "image/png"
MULTIPART_RELATED = "multipart/related"


class NotAcceptable(Exception):
    """No representation the server can produce is acceptable to the client (HTTP 406).

    ``str(exc)`` says what was asked and what the server can produce; ``available`` lists the
    producible media types in Accept-header syntax.
    """

    def __init__(self, accept: str, available: Sequence[str]):
        self.accept = accept
        self.available = tuple(available)
        super().__init__(
            f"None of the requested media types is available (Accept: {accept or '<empty>'}). "
            f"This server can produce: {', '.join(self.available)}"
        )


class Resource(StrEnum):
    """Kinds of DICOMweb resources, each with its own set of representations."""

    METADATA = "metadata"  # QIDO-RS results and WADO-RS /metadata
    DICOM = "dicom"  # WADO-RS study / series / instance retrieval
    BULKDATA = "bulkdata"  # WADO-RS /frames and bulkdata URIs
    RENDERED = "rendered"  # WADO-RS /rendered and /thumbnail


@dataclass(frozen=True)
class MediaRange:
    """One element of an Accept header. ``params`` has lower-cased names and unquoted values."""

    type: str
    subtype: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0
    index: int = 0  # position in the header, for tie-breaking

    @property
    def media_type(self) -> str:
        return f"{self.type}/{self.subtype}"


@dataclass(frozen=True)
class Negotiated:
    """The representation chosen for a response.

    ``media_type`` is the type of the payload (of each part when ``multipart``):
    ``application/dicom``, ``application/octet-stream``, ``application/dicom+json``,
    ``application/json``, ``image/jpeg`` or ``image/png``.  ``transfer_syntax`` is a UID for DICOM
    and bulk data, else ``None``.
    """

    media_type: str
    transfer_syntax: str | None
    multipart: bool

    @property
    def part_content_type(self) -> str:
        """Content-Type of the payload (each part's header when multipart)."""
        if self.transfer_syntax is None:
            return self.media_type
        return f"{self.media_type}; transfer-syntax={self.transfer_syntax}"

    def content_type(self, boundary: str | None = None) -> str:
        """Content-Type header value of the whole response."""
        if not self.multipart:
            return self.part_content_type
        value = f'{MULTIPART_RELATED}; type="{self.media_type}"'
        if boundary is not None:
            value += f"; boundary={boundary}"
        return value


# --------------------------------------------------------------------------- parsing


def split_unquoted(text: str, separator: str) -> list[str]:
    """Split on ``separator`` outside double-quoted strings (backslash escapes inside quotes)."""
    parts: list[str] = []
    current: list[str] = []
    in_quotes = escaped = False
    for char in text:
        if in_quotes:
            current.append(char)
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_quotes = False
        elif char == '"':
            in_quotes = True
            current.append(char)
        elif char == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def unquote(value: str) -> str:
    """Remove surrounding double quotes and backslash escapes from a parameter value."""
    value = value.strip()
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        inner = value[1:-1]
        out: list[str] = []
        escaped = False
        for char in inner:
            if escaped:
                out.append(char)
                escaped = False
            elif char == "\\":
                escaped = True
            else:
                out.append(char)
        return "".join(out)
    return value


def parse_media_type(text: str) -> tuple[str, str, dict[str, str]] | None:
    """Parse ``type/subtype; name=value; ...`` into (type, subtype, params), or None if invalid.

    Types and parameter names are lower-cased; parameter values are unquoted but keep their case.
    A bare ``*`` (sent by some old clients) is read as ``*/*``.
    """
    pieces = split_unquoted(text, ";")
    full = pieces[0].strip().lower()
    if full == "*":
        full = "*/*"
    if full.count("/") != 1:
        return None
    main, sub = (s.strip() for s in full.split("/"))
    if not main or not sub or any(c.isspace() or c in '",' for c in main + sub):
        return None
    if main == "*" and sub != "*":
        return None
    params: dict[str, str] = {}
    for piece in pieces[1:]:
        if not piece.strip():
            continue
        name, eq, value = piece.partition("=")
        name = name.strip().lower()
        if not eq or not name:
            return None
        params[name] = unquote(value)
    return main, sub, params


def parse_accept(header: str | Iterable[str] | None) -> list[MediaRange]:
    """Parse one Accept header value (or several header lines) into media ranges.

    Entries that cannot be parsed, or whose q-value is invalid, are skipped.  The ``q`` parameter
    is removed from ``params`` and clamped to [0, 1].
    """
    if header is None:
        return []
    text = header if isinstance(header, str) else ",".join(header)
    ranges: list[MediaRange] = []
    for index, element in enumerate(split_unquoted(text, ",")):
        if not element.strip():
            continue
        parsed = parse_media_type(element)
        if parsed is None:
            continue
        main, sub, params = parsed
        q = 1.0
        if "q" in params:
            try:
                q = float(params.pop("q"))
            except ValueError:
                continue
            if q != q:  # NaN
                continue
            q = min(max(q, 0.0), 1.0)
        ranges.append(MediaRange(main, sub, params, q, index))
    return ranges


# ----------------------------------------------------------------------- negotiation


@dataclass(frozen=True)
class _Offer:
    media_type: str
    transfer_syntax: str | None
    multipart: bool

    def describe(self) -> str:
        if self.multipart:
            text = f'{MULTIPART_RELATED}; type="{self.media_type}"'
        else:
            text = self.media_type
        if self.transfer_syntax is not None:
            text += f"; transfer-syntax={self.transfer_syntax}"
        return text


def _type_specificity(range_main: str, range_sub: str, media_type: str) -> int | None:
    main, sub = media_type.split("/")
    if range_main == "*":
        return 0
    if range_main != main:
        return None
    if range_sub == "*":
        return 1
    return 2 if range_sub == sub else None


def _specificity(r: MediaRange, offer: _Offer, default_ts: str) -> int | None:
    """How specifically ``r`` matches ``offer`` (higher is more specific), or None."""
    if offer.media_type == DICOM_XML and r.media_type == DICOM_XML:
        return 20  # a bare application/dicom+xml: XML datasets come only as multipart parts
    if offer.multipart:
        base = _type_specificity(r.type, r.subtype, MULTIPART_RELATED)
        if base is None:
            return None
        spec = base * 10
        type_param = r.params.get("type")
        if type_param is not None:
            inner = parse_media_type(type_param)
            if inner is None:
                return None
            inner_spec = _type_specificity(inner[0], inner[1], offer.media_type)
            if inner_spec is None:
                return None
            spec += 1 + inner_spec
    else:
        base = _type_specificity(r.type, r.subtype, offer.media_type)
        if base is None:
            return None
        spec = base * 10
    if offer.transfer_syntax is not None:
        requested = r.params.get("transfer-syntax")
        if requested is None:
            # An absent transfer-syntax means the default one for the media type (PS3.18 8.7.3).
            if offer.transfer_syntax != default_ts:
                return None
        elif requested.strip() == "*":
            spec += 4
        elif requested.strip() == offer.transfer_syntax:
            spec += 5
        else:
            return None
    return spec


def _offers(
    kind: Resource,
    stored_ts: str,
    supported_ts: Sequence[str],
    allow_single_part: bool,
) -> list[_Offer]:
    # The stored syntax first, so that "transfer-syntax=*" (as stored) picks it.
    syntaxes = [stored_ts] if stored_ts in supported_ts else []
    syntaxes += [ts for ts in supported_ts if ts not in syntaxes]
    if kind is Resource.METADATA:
        return [
            _Offer(DICOM_JSON, None, False),
            _Offer(JSON, None, False),
            _Offer(DICOM_XML, None, True),
        ]
    if kind is Resource.RENDERED:
        return [_Offer(JPEG, None, False), _Offer(PNG, None, False)]
    part = DICOM if kind is Resource.DICOM else OCTET_STREAM
    offers = [_Offer(part, ts, True) for ts in syntaxes]
    if allow_single_part:
        offers += [_Offer(part, ts, False) for ts in syntaxes]
    return offers


def negotiate(
    accept: str | Iterable[str] | None,
    kind: Resource | str,
    *,
    stored_transfer_syntax: str = EXPLICIT_VR_LITTLE_ENDIAN,
    supported_transfer_syntaxes: Sequence[str] = (EXPLICIT_VR_LITTLE_ENDIAN,),
    allow_single_part: bool | None = None,
    accept_query: str | None = None,
) -> Negotiated:
    """Choose the representation of ``kind`` to send for the given Accept header.

    A missing or empty header (or one with no parseable entry) means ``*/*``, i.e. the default
    representation: DICOM JSON for metadata, multipart ``application/dicom`` for DICOM
    resources, multipart ``application/octet-stream`` for bulk data, JPEG for rendered images.
    ``allow_single_part`` allows a bare ``application/dicom`` / ``application/octet-stream``
    (default: allowed for bulk data, not for DICOM resources).  Among acceptable offers the
    highest q wins, then the earliest range in the header, then the server's preference.

    ``accept_query`` is the value of an ``accept=`` query parameter (PS3.18 8.3.3.1), which
    takes precedence over the header when present.

    Raises :class:`NotAcceptable` when nothing acceptable can be produced.
    """
    kind = Resource(kind)
    if accept_query:
        accept = accept_query
    if allow_single_part is None:
        allow_single_part = kind is Resource.BULKDATA
    text = accept if isinstance(accept, str) or accept is None else ",".join(accept)
    return _negotiate(
        text, kind, stored_transfer_syntax, tuple(supported_transfer_syntaxes), allow_single_part
    )


@functools.lru_cache(maxsize=512)  # a client sends the same header with every request
def _negotiate(
    text: str | None,
    kind: Resource,
    stored_transfer_syntax: str,
    supported_transfer_syntaxes: tuple[str, ...],
    allow_single_part: bool,
) -> Negotiated:
    offers = _offers(kind, stored_transfer_syntax, supported_transfer_syntaxes, allow_single_part)
    ranges = parse_accept(text) or [MediaRange("*", "*")]
    best: tuple[float, int, int] | None = None
    chosen: _Offer | None = None
    for offer_index, offer in enumerate(offers):
        matched: tuple[int, MediaRange] | None = None
        for r in ranges:
            spec = _specificity(r, offer, DEFAULT_TRANSFER_SYNTAX)
            if spec is not None and (matched is None or spec > matched[0]):
                matched = (spec, r)
        if matched is None or matched[1].q <= 0:
            continue
        rank = (matched[1].q, -matched[1].index, -offer_index)
        if best is None or rank > best:
            best, chosen = rank, offer
    if chosen is None:
        raise NotAcceptable(text or "", [o.describe() for o in offers])
    return Negotiated(chosen.media_type, chosen.transfer_syntax, chosen.multipart)


def negotiate_metadata(
    accept: str | Iterable[str] | None, *, accept_query: str | None = None
) -> Negotiated:
    """QIDO-RS results and WADO-RS metadata: application/dicom+json (or application/json), or
    multipart/related; type="application/dicom+xml" (also for a bare application/dicom+xml)."""
    return negotiate(accept, Resource.METADATA, accept_query=accept_query)


def negotiate_dicom(
    accept: str | Iterable[str] | None,
    *,
    stored_transfer_syntax: str = EXPLICIT_VR_LITTLE_ENDIAN,
    allow_single_part: bool = False,
    accept_query: str | None = None,
) -> Negotiated:
    """Study/series/instance retrieval: multipart/related; type="application/dicom"."""
    return negotiate(
        accept,
        Resource.DICOM,
        stored_transfer_syntax=stored_transfer_syntax,
        allow_single_part=allow_single_part,
        accept_query=accept_query,
    )


def negotiate_bulkdata(
    accept: str | Iterable[str] | None,
    *,
    stored_transfer_syntax: str = EXPLICIT_VR_LITTLE_ENDIAN,
    allow_single_part: bool = True,
    accept_query: str | None = None,
) -> Negotiated:
    """Frames and bulk data: multipart/related; type="application/octet-stream" (or single)."""
    return negotiate(
        accept,
        Resource.BULKDATA,
        stored_transfer_syntax=stored_transfer_syntax,
        allow_single_part=allow_single_part,
        accept_query=accept_query,
    )


def negotiate_rendered(
    accept: str | Iterable[str] | None, *, accept_query: str | None = None
) -> Negotiated:
    """Rendered and thumbnail resources: image/jpeg (default) or image/png."""
    return negotiate(accept, Resource.RENDERED, accept_query=accept_query)


ZIP = "application/zip"


def wants_zip(accept: str | Iterable[str] | None, *, accept_query: str | None = None) -> bool:
    """Whether a study or series retrieval asks for a zip of its instances (DICOM Supplement
    211): `application/zip` named, and liked at least as well as anything multipart named
    (`*/*` alone keeps the multipart answer)."""
    ranges = parse_accept(accept_query if accept_query else accept)
    zips = [r.q for r in ranges if r.media_type == ZIP and r.q > 0]
    if not zips:
        return False
    multipart = [r.q for r in ranges if r.media_type == MULTIPART_RELATED and r.q > 0]
    return max(zips) >= max(multipart, default=0.0)
