"""What WADO-RS serves, read from the store: metadata, whole instances, frames.

Instances are rebuilt from their stored header and their Zarr frame (`SeriesReader`), one at a
time, so a series streams without ever sitting whole in memory; a frame is one inner chunk,
one small read. Readers are kept per committed series (a re-commit gets a new one).
"""

from __future__ import annotations

import base64
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from pydicom import Dataset

from dicom import json_model, xml_model
from gateway.web.accept import DICOM_XML
from gateway.web.multipart import MultipartWriter
from storage import backends
from storage.catalog import IndexedSeries
from storage.frames import FrameReader, ReadAhead
from storage.series import SeriesError, SeriesReader, part10, part10_instances

PIXEL_DATA = "7FE00010"
_SOP = re.compile(r'"00080018":\{"vr":"UI","Value":\["([0-9.]{1,64})"\]\}')


class Readers:
    """Open `SeriesReader`s by series, least recently used dropped past `size`."""

    def __init__(self, store: Any, size: int = 64, read_ahead_bytes: int = 256 << 20) -> None:
        self.store = store
        self.read_ahead = ReadAhead(read_ahead_bytes)  # used on a remote store only
        # A folder's reads are page-cache reads, an object store's requests.
        self.reads_are_requests = backends.of(store).reads_are_requests
        self.size = size
        self._readers: OrderedDict[tuple[str, Any], tuple[SeriesReader, FrameReader | None]]
        self._readers = OrderedDict()
        self._lock = threading.Lock()

    def get(self, series: IndexedSeries) -> SeriesReader:
        return self._open(series)[0]

    def frames(self, series: IndexedSeries) -> FrameReader:
        """The series' frames, one read each (see storage.frames)."""
        reader, frames = self._open(series)
        if frames is None:
            if reader.volume is None:
                raise SeriesError("this series has no images")
            frames = FrameReader(self.store, reader.key, reader.volume, self.read_ahead)
            with self._lock:
                self._readers[(series.storage_key, series.committed_at)] = (reader, frames)
        return frames

    def _open(self, series: IndexedSeries) -> tuple[SeriesReader, FrameReader | None]:
        key = (series.storage_key, series.committed_at)
        with self._lock:
            found = self._readers.get(key)
            if found is not None:
                self._readers.move_to_end(key)
                return found
        reader = SeriesReader(self.store, series.storage_key)
        reader.attrs  # noqa: B018 - refuses an incomplete series (SeriesIncomplete)
        with self._lock:
            self._readers[key] = (reader, None)
            while len(self._readers) > self.size:
                self._readers.popitem(last=False)
        return reader, None


def frame_slices(reader: SeriesReader, position: int, numbers: Iterable[int]) -> list[int]:
    """The volume z of frames `numbers` (from 1) of the image at `position`; IndexError names
    none (a frame it does not have)."""
    zs = reader.frame_slices(position)
    out = []
    for n in numbers:
        if not 1 <= n <= len(zs):
            raise IndexError("no such frame")
        out.append(zs[n - 1])
    return out


def image_at_slice(reader: SeriesReader, z: int) -> tuple[int, int]:
    """(position of the image, frame index from 0) whose frame is volume slice `z`."""
    frames = reader.attrs.get("frames")
    if not frames:
        return z, 0
    for position, zs in enumerate(frames):
        if z in zs:
            return position, zs.index(z)
    raise IndexError("no image holds this slice")


def metadata(
    header: dict[str, Any], root: str, study: str, series: str, has_pixels: bool, frame_bits: int
) -> dict[str, Any]:
    """An instance's DICOM JSON for /metadata: its header with Pixel Data as a BulkDataURI."""
    out = dict(header)
    inline = header.get(PIXEL_DATA)  # a derived object's pixel data kept in its header
    if has_pixels or inline is not None:
        sop = json_model.first(header, "00080018")
        vr = inline.get("vr", "OW") if inline is not None else "OB" if frame_bits <= 8 else "OW"
        out[PIXEL_DATA] = {
            "vr": vr,
            "BulkDataURI": f"{root}/studies/{study}/series/{series}/instances/{sop}"
            f"/bulkdata/{PIXEL_DATA}",
        }
    return dict(sorted(out.items()))


def instance_metadata(
    reader: SeriesReader, root: str, study: str, series: str, position: int
) -> str:
    """The /metadata JSON text of one instance."""
    bits = 8 * np.dtype(reader.attrs.get("dtype") or "<i2").itemsize
    has_pixels = position < reader.n_images
    return _dumps(metadata(reader.header(position), root, study, series, has_pixels, bits))


def series_metadata(reader: SeriesReader, root: str, study: str, series: str) -> list[str]:
    """The /metadata JSON text of each instance of a series, from the stored header texts:
    the Pixel Data element is appended as text (it sorts last), with no parse and re-encode;
    a header it could not be appended to safely goes through `metadata`."""
    n_slices = reader.n_images
    vr = "OB" if np.dtype(reader.attrs.get("dtype") or "<i2").itemsize == 1 else "OW"
    bits = 8 if vr == "OB" else 16
    out = []
    for i, text in enumerate(reader.header_texts()):
        found = _SOP.search(text)
        if found is None or '"7FE0' in text or '"FFF' in text or not text.endswith("}"):
            header = json.loads(text)
            out.append(_dumps(metadata(header, root, study, series, i < n_slices, bits)))
        elif i < n_slices:
            uri = (
                f"{root}/studies/{study}/series/{series}/instances/{found[1]}/bulkdata/{PIXEL_DATA}"
            )
            entry = _dumps({"vr": vr, "BulkDataURI": uri})
            out.append(f'{text[:-1]},"{PIXEL_DATA}":{entry}}}')
        else:
            out.append(text)
    return out


def xml_multipart(datasets: Iterable[tuple[dict[str, Any], str | None]]) -> MultipartWriter:
    """multipart/related; type="application/dicom+xml": each (DICOM JSON model, URL) one part,
    the model as a PS3.19 Native DICOM Model document and the URL its Content-Location."""
    return MultipartWriter(
        (
            (DICOM_XML, xml_model.to_xml(model).encode(), {"Content-Location": url} if url else {})
            for model, url in datasets
        ),
        part_type=DICOM_XML,
    )


def encode(ds: Dataset) -> bytes:
    """A Part 10 file of a rebuilt instance (`storage.series.part10`)."""
    return part10(ds)


def instances(
    reader: SeriesReader, positions: Iterable[int] | None = None
) -> Iterator[tuple[str, bytes]]:
    """(SOP Instance UID, Part 10 bytes) of the series' instances, one at a time
    (`storage.series.part10_instances`)."""
    return part10_instances(reader, positions)


def inline_pixels(header: dict[str, Any]) -> bytes | None:
    """Pixel data kept inline in a stored header (InlineBinary), or None."""
    entry = header.get(PIXEL_DATA) or {}
    data = entry.get("InlineBinary")
    return base64.b64decode(data) if data else None


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))
