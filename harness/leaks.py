"""Look for planted identifiers in everything the gateway keeps or says, decoded first.

Zarr chunks are compressed, so a scan of raw bytes cannot see a name inside a header array: each
array is read back through zarr (decompressed, decoded) and its values scanned, as are every
object key and every document (group and array metadata, attributes). Databases are scanned row
by row (any SQLAlchemy URL) and, for SQLite, byte by byte including freed pages and the WAL; logs
and folders as text and bytes. A PNG is decoded too: its text chunks and metadata scanned, and
each needle drawn in the font reports are drawn with looked for in its pixels (burned-in text).

    leaks = scan_store(store, corpus.phi) + scan_database(url, corpus.phi)
    assert leaks == []
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from PIL import Image, ImageDraw
from scipy.signal import fftconvolve
from sqlalchemy import MetaData, create_engine, select
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype

from storage.objectstore import run


@dataclass(frozen=True)
class Leak:
    """An identifier found: where, and which (the needle is test data, never real PHI)."""

    where: str
    needle: str


def scan_bytes(where: str, data: bytes, needles: Iterable[str]) -> list[Leak]:
    """Needles found in `data` (as UTF-8 and, for non-ASCII needles, Latin-1)."""
    found = []
    for n in needles:
        forms = {n.encode("utf-8"), n.encode("latin-1", "ignore")}
        if any(f and f in data for f in forms):
            found.append(Leak(where, n))
    return found


def scan_text(where: str, text: str, needles: Iterable[str]) -> list[Leak]:
    return [Leak(where, n) for n in needles if n in text]


def scan_store(store: Store, needles: Iterable[str], prefix: str = "") -> list[Leak]:
    """Every key, every zarr document and every array's decoded values under `prefix`."""
    needles = list(needles)
    keys = sorted(run(_list(store, prefix)))
    leaks = []
    for key in keys:
        leaks += scan_text(f"key {key}", key, needles)
        raw = run(store.get(key, default_buffer_prototype()))
        data = raw.to_bytes() if raw is not None else b""
        leaks += scan_bytes(f"object {key}", data, needles)
        if key.endswith("zarr.json"):
            doc = json.loads(data)
            path = key[: -len("zarr.json")].rstrip("/")
            if doc.get("node_type") == "array":
                values = np.asarray(zarr.open_array(store, path=path, mode="r")[...])
                leaks += scan_bytes(f"array {path} (decoded)", _value_bytes(values), needles)
    return leaks


def scan_database(url: str, needles: Iterable[str]) -> list[Leak]:
    """Every row of every table, as text; for SQLite also the files' bytes (freed pages, WAL)."""
    needles = list(needles)
    leaks = []
    engine = create_engine(url)
    try:
        meta = MetaData()
        meta.reflect(engine)
        with engine.connect() as c:
            for table in meta.sorted_tables:
                for row in c.execute(select(table)):
                    text = " ".join(_text(v) for v in row)
                    leaks += scan_text(f"table {table.name}", text, needles)
    finally:
        engine.dispose()
    if url.startswith("sqlite:///"):
        db = Path(url[len("sqlite:///") :])
        for f in db.parent.glob(db.name + "*"):
            leaks += scan_bytes(f"file {f.name}", f.read_bytes(), needles)
    return leaks


def scan_folder(root: Path, needles: Iterable[str]) -> list[Leak]:
    """Every file name and file under `root`, as bytes."""
    needles = list(needles)
    leaks = []
    for f in sorted(p for p in Path(root).rglob("*")):
        rel = str(f.relative_to(root))
        leaks += scan_text(f"path {rel}", rel, needles)
        if f.is_file():
            leaks += scan_bytes(f"file {rel}", f.read_bytes(), needles)
    return leaks


def date_forms(needles: Iterable[str]) -> list[str]:
    """The needles, and each DICOM date (YYYYMMDD) also as a page shows it (YYYY-MM-DD)."""
    needles = list(needles)
    iso = [f"{n[:4]}-{n[4:6]}-{n[6:]}" for n in needles if len(n) == 8 and n.isdigit()]
    return needles + iso


def scan_png(where: str, data: bytes, needles: Iterable[str]) -> list[Leak]:
    """A PNG decoded: its text chunks and metadata (tEXt, zTXt, iTXt, eXIf ...) as text, and
    its pixels searched for each needle as `ImageDraw.text` draws it with the default font (the
    reports' font): text burned into pixels is not in the bytes. Other fonts are not seen."""
    needles = list(needles)
    img = Image.open(io.BytesIO(data))
    img.load()
    meta = "\n".join(f"{k}={_text(v)}" for k, v in img.info.items())
    found = scan_text(f"{where} (png metadata)", meta, needles)
    ink = _ink(img)
    found += [Leak(f"{where} (png pixels)", n) for n in needles if _drawn(ink, n) >= 0.8]
    return found


def _ink(img: Image.Image) -> np.ndarray:
    """Light pixels (white or yellow text on black) as 1.0, the rest 0.0."""
    return (np.asarray(img.convert("L")) >= 128).astype(np.float64)


def _drawn(ink: np.ndarray, needle: str) -> float:
    """The best overlap (intersection over union of light pixels) of `needle`, drawn in the
    default font, with any window of `ink`: 1.0 where it is drawn, about 0.3-0.4 elsewhere."""
    font = ImageDraw.Draw(Image.new("L", (1, 1))).getfont()
    _, _, right, bottom = font.getbbox(needle)
    pic = Image.new("L", (int(right) + 4, int(bottom) + 4), 0)
    ImageDraw.Draw(pic).text((2, 2), needle, fill=255)
    t = _ink(pic)
    ys, xs = np.nonzero(t)
    if not len(ys):
        return 0.0
    t = t[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = t.shape
    if ink.shape[0] < h or ink.shape[1] < w:
        return 0.0
    overlap = fftconvolve(ink, t[::-1, ::-1], mode="valid")
    c = np.pad(ink.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    window = c[h:, w:] - c[:-h, w:] - c[h:, :-w] + c[:-h, :-w]
    return float((overlap / (t.sum() + window - overlap + 1e-9)).max())


async def _list(store: Store, prefix: str) -> list[str]:
    return [k async for k in store.list_prefix(prefix)]


def _value_bytes(values: np.ndarray) -> bytes:
    if values.dtype.kind in ("U", "O", "T"):
        return "\n".join(str(v) for v in values.ravel()).encode("utf-8")
    return np.ascontiguousarray(values).tobytes()


def _text(value: Any) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("latin-1")
    return str(value)
