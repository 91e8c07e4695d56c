"""Zarr v3 storage of one de-identified series: a spooling writer and a reader.

A series group at `key` (given by the caller; pseudonymous) holds:

    key/volume/     array (z, y, x) or (z, y, x, 3) in the stored pixel type, z in stack order
                    (ascending along the slice normal); one chunk per slice (a frame), in
                    shards of ~32 MiB of pixels in object stores; in a local folder one shard
                    holding the whole series, which is the spool file itself (see storage.backends)
    key/headers/    string array (n_instances,): the DICOM JSON model of each instance without
                    pixel data; the first `n_images` have pixels, then come instances without
                    (SR, ...); headers[i] belongs to volume[i] unless attribute `frames` says
                    where each image's frames are
    key/zarr.json   group metadata and attributes, written last: the commit marker

A multi-frame instance's frames are slices of the same volume: an Enhanced CT or MR's frames
ordered by their functional groups' positions like a classic series' slices, cine frames
(ultrasound, XA) in frame order, instance after instance; `frames[i]` lists the z of instance
i's frames in frame-number order, so the instance is served back as it came.

Readers treat a group without its `zarr.json` (or without our attributes) as incomplete, so a
commit that dies half way never looks finished; committing again replaces it whole.
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import zarr
from pydicom.dataset import Dataset
from zarr.abc.store import Store
from zarr.codecs import ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import MemoryStore

from dicom import functional_groups, json_model
from dicom.geometry import GeometryError, order_slices
from dicom.part10 import Chunk, Encoder
from dicom.part10 import rebuild as _rebuild
from dicom.part10 import write as part10  # noqa: F401 - WADO-RS writes one instance with it
from storage import backends, pixels, volume
from storage.errors import SeriesError, SeriesIncomplete
from storage.frames import FrameReader, ReadAhead
from storage.objectstore import StorageUnavailable, guard, run
from storage.spool import Spool, SpoolEntry, SpoolSealed

FORMAT_VERSION = 1
_HEADER_CHUNK = 128  # instances per headers chunk
_HEADER_CODEC = ZstdCodec(level=3)
_OPEN, _COMMITTING, _CLOSED = "open", "committing", "closed"


@dataclass(frozen=True)
class SeriesInfo:
    """What a commit wrote."""

    n_instances: int
    shape: tuple[int, ...]  # volume shape; () when the series has no images
    dtype: str | None  # numpy name of the volume type; None without images
    nbytes: int  # uncompressed volume bytes
    # What the commit stored, as it had it in memory: each instance's DICOM JSON header in
    # stored order (the first `n_images` with pixels), for the index without a read-back.
    headers: tuple[dict[str, Any], ...] = field(default=(), repr=False, compare=False)
    n_images: int = 0


class SeriesWriter:
    """Collects the instances of one series in a spool folder, then commits them to a store.

    Several writers, in different processes too, may add to one folder at once when each has
    its own `segment` name (one append-only log each; none waits for another). A writer with
    no segment (see `open_existing`) is the coordinator: `count`, `commit` and `discard` see
    every segment, and the writers need not be closed for a commit. After a commit or discard
    a writer that had already added gets SeriesError; a new writer on the removed folder
    starts a new spool there.

    `add` may be called from several threads; it returns once the instance is in the spool
    file (and flushed to stable storage with `fsync` and `sync_each`; with `sync_each=False`,
    `sync` and `close` flush). Reopening a writer on the spool folder of a crashed process
    resumes with what every segment holds.
    """

    def __init__(
        self,
        spool_dir: Path,
        fsync: bool = True,
        segment: str | None = None,
        *,
        sync_each: bool = True,
        bulk_threshold: int = json_model.DEFAULT_BULK_THRESHOLD,
    ) -> None:
        self.fsync = fsync
        self.bulk_threshold = bulk_threshold
        self._spool = Spool(Path(spool_dir), fsync=fsync, segment=segment, sync_each=sync_each)
        self._cond = threading.Condition()
        self._state = _OPEN
        self._inflight = 0
        self._linked = False  # this commit made a spool file part of the store

    @classmethod
    def open_existing(cls, spool_dir: Path, fsync: bool = True) -> SeriesWriter:
        """The coordinator's writer on a series folder: counts, commits or discards what all
        segments hold (it adds to the default segment, if asked to add)."""
        return cls(spool_dir, fsync=fsync)

    @property
    def count(self) -> int:
        """Distinct SOPInstanceUIDs spooled, over all segments (re-read from disk)."""
        return len(self._spool)

    @property
    def spool_dir(self) -> Path:
        """The folder this writer spools to."""
        return self._spool.path

    def add(
        self,
        ds: Dataset,
        reuse: Mapping[int, json_model.Part | None] | None = None,
        *,
        inline_pixels: bool = False,
    ) -> dict[int, json_model.Part | None]:
        """Spool one de-identified instance; a repeated SOPInstanceUID replaces it.

        Returns the encoded header's parts, element by element; `reuse` takes such parts of
        an earlier `add` for elements known to be the same objects (see json_model.encode).
        Raises SeriesError for an instance that cannot be stored (unsupported pixel type); the
        rest of the series is unaffected. With `inline_pixels` the instance's
        native pixel data stays in its header (InlineBinary) instead of the volume: for
        derived multi-frame objects (a SEG) made by pipelines, never for what a PACS sends.
        """
        parts: dict[int, json_model.Part | None] = {}
        header, text = json_model.encode(ds, self.bulk_threshold, reuse, parts)
        sop = json_model.first(header, "00080018")
        if not sop or not isinstance(sop, str):
            raise SeriesError("instance has no SOPInstanceUID")
        meta: dict[str, Any] = {
            "n": _int(json_model.first(header, "00200013")),
            "mod": json_model.first(header, "00080060") or None,
        }
        frame: bytes = b""
        if inline_pixels and pixels.has_pixels(ds):
            header = {**header, "7FE00010": _inline_pixels(ds)}
            text = json.dumps(header, separators=(",", ":"))
        elif pixels.has_pixels(ds):
            try:
                layout, raw, patches = pixels.extract(ds, header)
            except pixels.PixelError as exc:
                raise SeriesError(str(exc)) from None
            photometric = json_model.first(header, "00280004")
            if patches:
                merged = {**header, **patches}
                header = {t: e for t, e in sorted(merged.items()) if e is not None}
                text = json.dumps(header, separators=(",", ":"))
            meta.update(_image_meta(header, layout))
            if photometric != meta["photo"]:
                meta["src_photo"] = photometric  # the colour model it came in (YBR, palette)
            frame = _compress_frames(raw, layout, header, meta)
        with self._cond:
            if self._state != _OPEN:
                raise SeriesError("series writer is no longer accepting instances")
            self._inflight += 1
        try:
            self._spool.put(sop, meta, text.encode(), frame)
        except SpoolSealed:
            raise SeriesError("series spool was committed or discarded") from None
        finally:
            with self._cond:
                self._inflight -= 1
                self._cond.notify_all()
        return parts

    def commit(self, store: Store, key: str) -> SeriesInfo:
        """Write the spooled series to `store` at `key`, then delete the spool.

        Raises SeriesError when the instances do not form one series volume, and
        StorageUnavailable when the store fails; in both cases the spool is kept, so the
        commit can be retried or the writer discarded.
        """
        key = _check_key(key)
        with self._cond:
            if self._state != _OPEN:
                raise SeriesError("series writer is already committing or closed")
            self._state = _COMMITTING
            while self._inflight:  # let adds that were accepted finish first
                self._cond.wait()
        self._linked = False
        try:
            self._spool.seal()  # and those of other writers; later ones are refused
            info = self._commit(store, key)
        except BaseException:
            if self._linked:  # the stored shard is a spool file writers may append to again
                with contextlib.suppress(Exception):
                    delete_series(store, key)
            self._spool.unseal()
            with self._cond:
                self._state = _OPEN
            raise
        with self._cond:
            self._state = _CLOSED
        self._spool.remove()
        return info

    def sync(self) -> None:
        """Make every instance this writer added durable (fdatasync of its segment)."""
        self._spool.sync()

    def close(self) -> None:
        """Stop accepting instances, flush and release the spool, keeping it for a resume."""
        self._stop_accepting()
        self._spool.close()

    def discard(self) -> None:
        """Drop everything spooled; the writer accepts nothing afterwards."""
        self._stop_accepting()
        self._spool.remove()

    def _stop_accepting(self) -> None:
        """Refuse further adds and wait for the ones under way."""
        with self._cond:
            if self._state == _COMMITTING:
                raise SeriesError("series writer is committing")
            self._state = _CLOSED
            while self._inflight:
                self._cond.wait()

    def _commit(self, store: Store, key: str) -> SeriesInfo:
        backend = backends.of(store)
        entries = self._spool.entries()
        if not entries:
            raise SeriesError("no instances to commit")
        entries = backend.before_commit(self._spool, entries)
        images = [e for e in entries if "rows" in e.meta]
        others = sorted(
            (e for e in entries if "rows" not in e.meta),
            key=lambda e: (e.meta.get("n") or 0, e.meta["sop"]),
        )
        attrs: dict[str, Any] = {
            "sphere_format": FORMAT_VERSION,
            "complete": True,
            "modality": _first(e.meta.get("mod") for e in entries),
            "n_instances": len(entries),
            "n_slices": len(images),
        }
        shape: tuple[int, ...] = ()
        dtype: str | None = None
        slices: list[SpoolEntry] = []
        if images:
            slices, images, image_attrs = _plan_volume(images)
            attrs.update(image_attrs)
            shape, dtype = tuple(image_attrs["shape"]), image_attrs["dtype"]
            attrs["n_slices"] = len(slices)
        attrs["n_images"] = len(images)
        with guard("commit"):
            delete_series(store, key)
        if images:
            assert dtype is not None  # planned with the images above
            self._linked = backend.write_volume(key, self._spool, slices, shape, dtype)
        texts = self._write_headers(store, key, images + others)
        backend.write_marker(key, _group_doc(attrs), durable=self.fsync)
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize if images else 0
        headers = tuple(json.loads(t) for t in texts)
        return SeriesInfo(len(entries), shape, dtype, nbytes, headers, len(images))

    def _write_headers(self, store: Store, key: str, entries: list[SpoolEntry]) -> list[str]:
        """Store the headers of `entries` at `key/headers`; returns their texts as stored."""
        n, written = len(entries), []
        arr = _create_array(
            store,
            f"{key}/headers",
            shape=(n,),
            chunks=(min(n, _HEADER_CHUNK),),
            dtype=str,
            compressors=_HEADER_CODEC,
        )
        for i0 in range(0, n, _HEADER_CHUNK):
            part = entries[i0 : i0 + _HEADER_CHUNK]
            texts = [self._spool.read_header(e).decode() for e in part]
            with guard("commit"):
                arr[i0 : i0 + len(part)] = np.array(texts, dtype=object)
            written += texts
        return written


class SeriesReader:
    """Read a committed series: volume, attributes, headers and rebuilt instances."""

    def __init__(self, store: Store, key: str) -> None:
        self.store = store
        self.key = _check_key(key)
        with guard("read"):
            try:
                raw = run(store.get(f"{self.key}/zarr.json", default_buffer_prototype()))
            except FileNotFoundError:  # a local store folder that was never written
                raw = None
        self._attrs: dict[str, Any] | None = None
        self.node_type: str | None = None  # what zarr.json at `key` says, if there is one
        if raw is not None:
            try:
                doc = json.loads(raw.to_bytes())
                self.node_type = doc.get("node_type")
                attrs = doc.get("attributes") or {}
            except (ValueError, AttributeError):
                attrs = {}
            if attrs.get("sphere_format") and attrs.get("complete"):
                self._attrs = attrs
        self._volume: zarr.Array | None = None
        self._headers: zarr.Array | None = None

    @property
    def complete(self) -> bool:
        """Whether a commit of this series finished."""
        return self._attrs is not None

    @property
    def attrs(self) -> dict[str, Any]:
        """Group attributes: geometry, rescale, modality, counts, format version."""
        if self._attrs is None:
            raise SeriesIncomplete("series is missing or its commit did not finish")
        return self._attrs

    @property
    def volume(self) -> zarr.Array | None:
        """The (z, y, x[, c]) pixel array, or None for a series without images."""
        if not self.attrs["n_slices"]:
            return None
        if self._volume is None:
            with guard("read"):
                self._volume = zarr.open_array(
                    self.store, path=f"{self.key}/volume", mode="r", zarr_format=3
                )
        return self._volume

    def __len__(self) -> int:
        return int(self.attrs["n_instances"])

    @property
    def n_images(self) -> int:
        """Instances with pixels: the first `n_images` headers."""
        return int(self.attrs.get("n_images", self.attrs["n_slices"]))

    def frame_slices(self, i: int) -> list[int]:
        """Where the frames of image instance `i` are in the volume, in frame-number order."""
        if not 0 <= i < self.n_images:
            raise IndexError("instance has no pixels")
        frames = self.attrs.get("frames")
        return [int(z) for z in frames[i]] if frames else [i]

    def frames_of(self, i: int) -> np.ndarray:
        """The pixels of image instance `i`: (rows, cols[, 3]) for one frame, else with the
        frames first."""
        zs = self.frame_slices(i)
        vol = self.pixels()
        with guard("read"):
            if len(zs) == 1:
                return _ndarray(vol[zs[0]])
            if zs == list(range(zs[0], zs[0] + len(zs))):
                return _ndarray(vol[zs[0] : zs[0] + len(zs)])
            return _ndarray(vol.get_orthogonal_selection((np.asarray(zs),)))

    def headers(self) -> list[dict[str, Any]]:
        """DICOM JSON model of every instance, in stored order."""
        with guard("read"):
            texts = _ndarray(self._header_array()[:])
        return [json.loads(t) for t in texts]

    def header_texts(self) -> list[str]:
        """The DICOM JSON text of every instance, in stored order, as stored (not parsed)."""
        with guard("read"):
            return [str(t) for t in _ndarray(self._header_array()[:])]

    def header(self, i: int) -> dict[str, Any]:
        """DICOM JSON model of instance `i`."""
        self._check_index(i)
        with guard("read"):
            return json.loads(str(self._header_array()[i]))

    def instance(self, i: int) -> Dataset:
        """Rebuild instance `i` as a Dataset (Explicit VR Little Endian, native pixels)."""
        header = self.header(i)
        frame = self.frames_of(i) if i < self.n_images else None
        return _rebuild(header, frame)

    def iter_instances(self) -> Iterator[Dataset]:
        """Rebuild every instance in stored order, reading each volume chunk once."""
        for header, frame in self.iter_raw():
            yield _rebuild(header, frame)

    def iter_raw(
        self, positions: Iterable[int] | None = None
    ) -> Iterator[tuple[dict[str, Any], np.ndarray | None]]:
        """(DICOM JSON header, pixels or None) of every instance in stored order (each volume
        chunk read once), or of those at the stored positions given."""
        if positions is not None or self.attrs.get("frames"):  # multi-frame: one by one
            for i in range(len(self)) if positions is None else positions:
                yield self.header(i), self.frames_of(i) if i < self.n_images else None
            return
        n, n_slices = len(self), self.attrs["n_slices"]
        headers = self._header_array()
        vol = self.volume
        if vol is not None:  # a shard at a time, but never more than ~SHARD_BYTES of pixels
            frame_nbytes = int(np.prod(vol.shape[1:])) * vol.dtype.itemsize
            cz = min((vol.shards or vol.chunks)[0], volume.shard_depth(n_slices, frame_nbytes))
            frames = self._frames(vol)
            for z0 in range(0, n_slices, cz):
                z1 = min(z0 + cz, n_slices)
                with guard("read"):
                    texts = _ndarray(headers[z0:z1])
                    block = _ndarray(vol[z0:z1]) if frames is None else None
                for j in range(z1 - z0):
                    frame = frames.frame(z0 + j) if frames is not None else _ndarray(block)[j]
                    yield json.loads(texts[j]), frame
        with guard("read"):
            rest: Iterable[Any] = _ndarray(headers[n_slices:n]) if n > n_slices else []
        for text in rest:
            yield json.loads(text), None

    def _frames(self, vol: zarr.Array) -> FrameReader | None:
        """A `storage.frames.FrameReader` of a sharded volume (None otherwise): a frame's one
        read and one blosc call, without zarr's machinery per chunk (a remote store's frames
        read ahead a window at a time)."""
        if not vol.shards:
            return None
        return FrameReader(self.store, self.key, vol, ReadAhead(64 << 20))

    def pixels(self) -> zarr.Array:
        """The volume, of a series known to have images (IndexError otherwise)."""
        vol = self.volume
        if vol is None:
            raise IndexError("the series has no pixels")
        return vol

    def _header_array(self) -> zarr.Array:
        self.attrs  # noqa: B018 - refuses an incomplete series
        if self._headers is None:
            with guard("read"):
                self._headers = zarr.open_array(
                    self.store, path=f"{self.key}/headers", mode="r", zarr_format=3
                )
        return self._headers

    def _check_index(self, i: int) -> None:
        if not 0 <= i < len(self):
            raise IndexError("instance index out of range")


def part10_chunks(
    reader: SeriesReader, positions: Iterable[int] | None = None
) -> Iterator[tuple[str, list[Chunk]]]:
    """(SOP Instance UID, Part 10 bytes in pieces) of the series' instances (all, or those at
    the stored positions given), one at a time: `dicom.part10.Encoder`, equal to `part10` of
    each rebuilt instance, the pixels not copied."""
    encoder = Encoder()
    for header, frame in reader.iter_raw(positions):
        yield encoder.encode(header, frame)


def part10_instances(
    reader: SeriesReader, positions: Iterable[int] | None = None
) -> Iterator[tuple[str, bytes]]:
    """(SOP Instance UID, Part 10 bytes) of the series' instances (all, or those at the stored
    positions given), one at a time."""
    for sop, chunks in part10_chunks(reader, positions):
        yield sop, b"".join(chunks)


def _ndarray(read: Any) -> np.ndarray:
    """A zarr read: typed as any array-like or scalar, a numpy array with zarr's default
    buffer for the slices read here."""
    return cast(np.ndarray, read)


def unreadable(
    store: Store, key: str, n_instances: int | None = None, *, deep: bool = False
) -> str:
    """Why the committed series at `key` does not read back whole ("" when it does).

    Cheap by default: the commit marker, the headers' and the volume's array metadata, their
    shapes against the marker's counts (and `n_instances`, what the catalog says is stored).
    `deep` also checks that every chunk is stored and reads it. StorageUnavailable (the store
    down) is raised, not reported: it says nothing of the series.
    """
    reader = SeriesReader(store, key)
    if not reader.complete:
        return "no commit marker (zarr.json)"
    try:
        n = len(reader)
        if n_instances is not None and n != n_instances:
            return f"the marker says {n} instances, the catalog {n_instances}"
        arrays = {"headers": reader._header_array()}
        if arrays["headers"].shape != (n,):
            return f"headers hold {arrays['headers'].shape[0]} of {n} instances"
        if reader.attrs["n_slices"]:
            vol = arrays["volume"] = reader.pixels()
            if list(vol.shape) != list(reader.attrs["shape"]):
                return "the volume's shape differs from the marker's"
        if deep:
            for name, arr in arrays.items():
                with guard("read"):
                    stored, whole = arr.nchunks_initialized, arr.nchunks
                    if stored < whole:
                        return f"{name}: {whole - stored} of {whole} chunks missing"
                    step = (arr.shards or arr.chunks)[0]
                    for z0 in range(0, arr.shape[0], step):
                        arr[z0 : z0 + step]  # decodes every chunk: a damaged one raises
    except StorageUnavailable:
        raise
    except Exception as e:  # a missing or damaged array: zarr's errors vary
        return f"unreadable ({type(e).__name__})"
    return ""


def series_key(project: str, pseudo_study: str, pseudo_series: str) -> str:
    """Where a project's series lives in the store: `projects/<project>/<study>/<series>`, by
    pseudonymous UIDs only (object keys are visible to whoever lists the bucket)."""
    return _check_key(f"projects/{project}/{pseudo_study}/{pseudo_series}")


def list_series(store: Store, prefix: str = "") -> Iterator[str]:
    """Keys of complete series at or below `prefix` (walks folders; stops at each series)."""
    stack = [prefix.strip("/")]
    while stack:
        path = stack.pop()
        with guard("list"):
            names = run(_list_dir(store, path))
        if "zarr.json" in names and path:
            reader = SeriesReader(store, path)
            if reader.complete:
                yield path
                continue
            if reader.node_type == "array":
                continue  # e.g. the volume of an unfinished series: nothing below
        for name in sorted(names, reverse=True):
            if name != "zarr.json":
                stack.append(f"{path}/{name}" if path else name)


def delete_series(store: Store, key: str) -> None:
    """Remove a series: its commit marker first, so it never looks complete half deleted."""
    key = _check_key(key)
    with guard("delete"):
        run(store.delete(f"{key}/zarr.json"))
        run(store.delete_dir(key))


def _plan_volume(
    images: list[SpoolEntry],
) -> tuple[list[SpoolEntry], list[SpoolEntry], dict[str, Any]]:
    """Check the frames agree, order them and derive the volume attributes.

    Returns the frames in volume order (one entry each, pointing at its compressed bytes),
    the image instances in the order of their first frame, and the attributes.
    """
    first = images[0].meta
    for e in images:
        m = e.meta
        if (m["rows"], m["cols"]) != (first["rows"], first["cols"]):
            raise SeriesError("instances differ in Rows/Columns")
        if (m["spp"], m["dtype"]) != (first["spp"], first["dtype"]):
            raise SeriesError("instances differ in pixel type or samples per pixel")
    if any("fl" in e.meta for e in images):  # cines: instance after instance, frames in order
        images = sorted(images, key=lambda e: (e.meta.get("n") or 0, e.meta["sop"]))
    frames = [f for e in images for f in _frames(e)]
    try:
        geom = order_slices(
            [e.meta.get("ipp") for e in frames],
            [e.meta.get("iop") for e in frames],
            [e.meta.get("n") for e in frames],
            pixel_spacing=first.get("ps") or frames[0].meta.get("ps"),
            slice_thickness=first.get("st") or frames[0].meta.get("st"),
        )
    except GeometryError as exc:
        raise SeriesError(str(exc)) from None
    ordered = [frames[i] for i in geom.order]
    where: dict[str, list[tuple[int, int]]] = {}
    for z, f in enumerate(ordered):
        where.setdefault(f.meta["sop"], []).append((f.meta.get("k", 0), z))
    by_sop = {e.meta["sop"]: e for e in images}
    instances = [by_sop[sop] for sop in where]  # in the order of their first frame
    samples = [first["spp"]] if first["spp"] > 1 else []
    shape = [len(ordered), first["rows"], first["cols"], *samples]
    slopes = [e.meta.get("slope", 1.0) for e in ordered]
    intercepts = [e.meta.get("icpt", 0.0) for e in ordered]
    attrs = {
        "shape": shape,
        "dtype": first["dtype"],
        "photometric_interpretation": first.get("photo"),
        **geom.attrs(),
        # One value when all slices agree (CT); per-slice lists otherwise (e.g. PET).
        "rescale_slope": slopes[0] if len(set(slopes)) == 1 else slopes,
        "rescale_intercept": intercepts[0] if len(set(intercepts)) == 1 else intercepts,
    }
    if len(ordered) != len(instances):
        attrs["frames"] = [[z for _, z in sorted(where[e.meta["sop"]])] for e in instances]
    sources = {e.meta.get("src_photo") for e in images} - {None}
    if sources:
        attrs["source_photometric"] = sorted(sources)
    times = {e.meta.get("ft") for e in images} - {None}
    if len(times) == 1:
        attrs["frame_time_ms"] = times.pop()
    return ordered, instances, attrs


def _frames(entry: SpoolEntry) -> list[SpoolEntry]:
    """One entry a frame of a spooled instance: its compressed bytes and its own facts."""
    lengths = entry.meta.get("fl")
    if not lengths:
        return [entry]
    facts = entry.meta.get("ff") or [{}] * len(lengths)
    base = {k: v for k, v in entry.meta.items() if k not in ("fl", "ff")}
    out, offset = [], entry.pixel_offset
    for k, (n, own) in enumerate(zip(lengths, facts, strict=True)):
        meta = {**base, "ipp": None, "iop": None, **own, "k": k}
        out.append(replace(entry, meta=meta, pixel_offset=offset, pixel_len=n))
        offset += n
    return out


def _compress_frames(
    raw: bytes | memoryview, layout: pixels.PixelLayout, header: dict[str, Any], meta: dict
) -> bytes:
    """The frames compressed one by one (one volume chunk each), end to end; for several,
    their lengths and (enhanced objects) their functional groups' facts go in `meta`."""
    itemsize = np.dtype(layout.dtype).itemsize
    if layout.frames == 1:
        return volume.compress_frame(raw, itemsize)
    view, n = memoryview(raw).cast("B"), layout.nbytes
    parts = [
        volume.compress_frame(view[k * n : (k + 1) * n], itemsize) for k in range(layout.frames)
    ]
    meta["fl"] = [len(p) for p in parts]
    if functional_groups.has_functional_groups(header):
        meta["ff"] = functional_groups.frame_facts(header, layout.frames)
    else:  # a cine: frames share the instance's position, if any: no stack geometry
        meta["ipp"] = meta["iop"] = None
    meta["ft"] = _float(json_model.first(header, "00181063"))  # FrameTime, ms
    return b"".join(parts)


def _image_meta(header: dict[str, Any], layout: pixels.PixelLayout) -> dict[str, Any]:
    return {
        "rows": layout.rows,
        "cols": layout.cols,
        "spp": layout.samples,
        "dtype": layout.dtype,
        "photo": json_model.first(header, "00280004") or None,
        "ipp": _floats(json_model.values(header, "00200032"), 3),
        "iop": _floats(json_model.values(header, "00200037"), 6),
        "ps": _floats(json_model.values(header, "00280030"), 2),
        "st": _float(json_model.first(header, "00180050")),
        "slope": _float(json_model.first(header, "00281053"), 1.0),
        "icpt": _float(json_model.first(header, "00281052"), 0.0),
    }


def _inline_pixels(ds: Dataset) -> dict[str, Any]:
    """The DICOM JSON entry of native little-endian pixel data (SeriesError otherwise)."""
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if 0x7FE00010 not in ds._dict or (ts and (ts.is_compressed or not ts.is_little_endian)):
        raise SeriesError("inline pixel data must be native little-endian (PixelData)")
    vr = "OB" if int(ds.get("BitsAllocated") or 8) <= 8 else "OW"
    return {"vr": vr, "InlineBinary": base64.b64encode(bytes(ds.PixelData)).decode("ascii")}


def _create_array(store: Store, path: str, **kwargs: Any) -> zarr.Array:
    """Create an array at `path` without zarr writing parent group documents.

    zarr's create_array also writes `zarr.json` for every missing ancestor, which would make
    the series group exist before it is complete; so the metadata is built in memory and
    only the array's own document is written.
    """
    scratch = zarr.create_array(MemoryStore(), name="a", **kwargs)
    doc = scratch.metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"]
    with guard("commit"):
        run(store.set(f"{path}/zarr.json", doc))
        return zarr.open_array(store, path=path, mode="r+", zarr_format=3)


def _group_doc(attrs: dict[str, Any]) -> Any:
    doc = {"zarr_format": 3, "node_type": "group", "attributes": attrs}
    return default_buffer_prototype().buffer.from_bytes(json.dumps(doc).encode())


async def _list_dir(store: Store, path: str) -> list[str]:
    return [name async for name in store.list_dir(path)]


def _check_key(key: str) -> str:
    key = key.strip("/")
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") for p in parts):
        raise ValueError("series key must be a relative path like projects/p/study/series")
    return key


def _first(values: Iterator[Any]) -> Any:
    return next((v for v in values if v), None)


def _int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _float(value: Any, default: float | None = None) -> float | None:
    try:
        return float(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _floats(value: Any, n: int) -> list[float] | None:
    if value is None:
        return None
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None
