"""Rendering of stored frames to JPEG/PNG for WADO-RS /rendered and /thumbnail (PS3.18 8.3.5).

The pipeline for grayscale frames is the presentation pipeline of PS3.3 C.11 reduced to what
the header of a stored series carries: Modality LUT as rescale slope/intercept, a VOI window
(the ``window=`` query parameter, else the header's first window, else the frame's min/max),
MONOCHROME1 inversion, 8-bit output.  Colour frames (``(rows, columns, 3)``) are passed
through (YBR_FULL converted to RGB, more than 8 bits scaled down).  The output is scaled to fit
the ``viewport=`` (aspect ratio kept); thumbnails without a viewport fit in 128 x 128 and are
never enlarged.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
from PIL import Image

JPEG = "image/jpeg"
PNG = "image/png"
DEFAULT_JPEG_QUALITY = 90
THUMBNAIL_SIZE = 128


class RenderError(ValueError):
    """Invalid rendering parameters (HTTP 400) or an unrenderable frame."""


class VoiFunction(StrEnum):
    LINEAR = "LINEAR"
    LINEAR_EXACT = "LINEAR_EXACT"
    SIGMOID = "SIGMOID"


@dataclass(frozen=True)
class Window:
    center: float
    width: float
    function: VoiFunction = VoiFunction.LINEAR

    def valid(self) -> bool:
        if not (math.isfinite(self.center) and math.isfinite(self.width)):
            return False
        return self.width >= 1 if self.function is VoiFunction.LINEAR else self.width > 0


MAX_VIEWPORT = 2048  # pixels a side: an image is rendered in memory, then encoded


@dataclass(frozen=True)
class Viewport:
    """``viewport=vw,vh[,sx,sy[,sw,sh]]``: output bounds and an optional source region."""

    width: int
    height: int
    sx: int = 0
    sy: int = 0
    sw: int | None = None  # negative flips horizontally
    sh: int | None = None  # negative flips vertically


@dataclass(frozen=True)
class RenderOptions:
    window: Window | None = None
    viewport: Viewport | None = None
    quality: int | None = None


@dataclass(frozen=True)
class PixelAttributes:
    """Header attributes that affect rendering."""

    photometric: str = "MONOCHROME2"
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    windows: tuple[Window, ...] = ()
    bits_stored: int | None = None

    @classmethod
    def from_dataset_json(cls, dataset: Mapping[str, Any], frame_index: int = 0) -> PixelAttributes:
        """Read from a DICOM JSON model dataset; for enhanced multi-frame objects the per-frame
        and shared functional groups are consulted too (in that order, before top level)."""
        sources = _functional_group_sources(dataset, frame_index) + [dataset]

        def found(tag: str) -> list[Any]:
            for source in sources:
                values = _values(source.get(tag))
                if values:
                    return values
            return []

        slope = _to_float((found("00281053") or [1.0])[0], 1.0)
        intercept = _to_float((found("00281052") or [0.0])[0], 0.0)
        centers, widths = found("00281050"), found("00281051")
        functions = found("00281056")
        try:
            function = VoiFunction(str(functions[0]).strip().upper()) if functions else None
        except ValueError:
            function = None
        windows = []
        for center, width in zip(centers, widths, strict=False):
            c, w = _to_float(center, math.nan), _to_float(width, math.nan)
            windows.append(Window(c, w, function or VoiFunction.LINEAR))
        photometric = str((_values(dataset.get("00280004")) or ["MONOCHROME2"])[0]).strip()
        bits = _values(dataset.get("00280101"))
        return cls(
            photometric=photometric.upper(),
            rescale_slope=slope,
            rescale_intercept=intercept,
            windows=tuple(windows),
            bits_stored=int(bits[0]) if bits else None,
        )


def _values(element: Any) -> list[Any]:
    if isinstance(element, Mapping):
        values = element.get("Value")
        if isinstance(values, list):
            return [v for v in values if v is not None and v != ""]
    return []


def _to_float(value: Any, default: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) else default


def _functional_group_sources(dataset: Mapping[str, Any], frame_index: int) -> list[Mapping]:
    sources: list[Mapping] = []
    per_frame = _values(dataset.get("52009230"))
    shared = _values(dataset.get("52009229"))
    groups = ([per_frame[frame_index]] if 0 <= frame_index < len(per_frame) else []) + shared[:1]
    for group in groups:
        if not isinstance(group, Mapping):
            continue
        # Pixel Value Transformation Sequence, Frame VOI LUT Sequence
        for seq in ("00289145", "00289132"):
            sources += [i for i in _values(group.get(seq))[:1] if isinstance(i, Mapping)]
    return sources


# ------------------------------------------------------------------- query parameters


def parse_window(value: str) -> Window:
    """``window=center,width[,function]`` with function linear, linear-exact or sigmoid."""
    parts = [p.strip() for p in value.split(",")]
    if len(parts) not in (2, 3):
        raise RenderError(f"window must be center,width,function; got {value!r}")
    try:
        center, width = float(parts[0]), float(parts[1])
    except ValueError:
        raise RenderError(f"window center and width must be numbers; got {value!r}") from None
    function = VoiFunction.LINEAR
    if len(parts) == 3 and parts[2]:
        name = parts[2].upper().replace("-", "_")
        try:
            function = VoiFunction(name)
        except ValueError:
            raise RenderError(
                f"window function must be linear, linear-exact or sigmoid; got {parts[2]!r}"
            ) from None
    window = Window(center, width, function)
    if not window.valid():
        raise RenderError(f"invalid window width for {function.value.lower()}: {value!r}")
    return window


def parse_viewport(value: str) -> Viewport:
    """``viewport=vw,vh`` or ``vw,vh,sx,sy,sw,sh`` (source region; empty entries omitted)."""
    parts = [p.strip() for p in value.split(",")]
    if len(parts) not in (2, 4, 6):
        raise RenderError(f"viewport must be vw,vh or vw,vh,sx,sy,sw,sh; got {value!r}")
    try:
        numbers = [int(p) if p else None for p in parts]
    except ValueError:
        raise RenderError(f"viewport values must be integers; got {value!r}") from None
    vw, vh = numbers[0], numbers[1]
    if vw is None or vh is None or not (1 <= vw <= MAX_VIEWPORT and 1 <= vh <= MAX_VIEWPORT):
        raise RenderError(f"viewport width and height must be 1 to {MAX_VIEWPORT}; got {value!r}")
    rest = numbers[2:] + [None] * (6 - len(numbers))
    sx, sy, sw, sh = rest
    if (sx is not None and sx < 0) or (sy is not None and sy < 0) or sw == 0 or sh == 0:
        raise RenderError(f"invalid viewport source region: {value!r}")
    return Viewport(vw, vh, sx or 0, sy or 0, sw, sh)


def parse_quality(value: str) -> int:
    """``quality=1..100``."""
    try:
        quality = int(value.strip())
    except ValueError:
        raise RenderError(f"quality must be an integer 1 to 100; got {value!r}") from None
    if not 1 <= quality <= 100:
        raise RenderError(f"quality must be an integer 1 to 100; got {value!r}")
    return quality


def parse_render_params(
    params: Iterable[tuple[str, str]] | Mapping[str, str],
) -> RenderOptions:
    """Read ``window``, ``viewport`` and ``quality`` from query pairs; others are ignored
    (``accept`` is handled by content negotiation, ``annotation``/``iccprofile`` unsupported)."""
    pairs = params.items() if isinstance(params, Mapping) else params
    window = viewport = quality = None
    for key, value in pairs:
        name = key.lower()
        if name == "window":
            window = parse_window(value)
        elif name == "viewport":
            viewport = parse_viewport(value)
        elif name == "quality":
            quality = parse_quality(value)
    return RenderOptions(window, viewport, quality)


# ------------------------------------------------------------------------- pixels


def apply_window(values: np.ndarray, window: Window) -> np.ndarray:
    """PS3.3 C.11.2.1.2 VOI LUT functions, output float in [0, 255]."""
    c, w = window.center, window.width
    x = values if values.dtype.kind == "f" else values.astype(np.float64)
    if window.function is VoiFunction.SIGMOID:
        with np.errstate(over="ignore"):
            return 255.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    if window.function is VoiFunction.LINEAR_EXACT:
        y = ((x - c) / w + 0.5) * 255.0
        y = np.where(x <= c - w / 2, 0.0, y)
        return np.where(x > c + w / 2, 255.0, y)
    low, high = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
    y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255.0 if w > 1 else np.zeros_like(x)
    y = np.where(x <= low, 0.0, y)
    return np.where(x > high, 255.0, y)


def _min_max(values: np.ndarray) -> np.ndarray:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape)
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros(values.shape)
    return (values - lo) * (255.0 / (hi - lo))


def to_display(
    frame: np.ndarray,
    attrs: PixelAttributes = PixelAttributes(),
    window: Window | None = None,
) -> np.ndarray:
    """8-bit presentation values: ``(rows, cols)`` for grayscale, ``(rows, cols, 3)`` RGB."""
    frame = np.asarray(frame)
    photometric = attrs.photometric.upper()
    if frame.ndim == 3 and frame.shape[2] == 3:
        return _color_to_rgb(frame, photometric, attrs.bits_stored)
    if frame.ndim != 2:
        raise RenderError(f"cannot render a frame of shape {frame.shape}")
    if frame.dtype == np.bool_:
        frame = frame.astype(np.uint8)
    wide = frame.dtype.itemsize >= 4 or frame.dtype.kind == "f"
    values: np.ndarray = frame.astype(np.float64 if wide else np.float32)
    if attrs.rescale_slope != 1.0 or attrs.rescale_intercept != 0.0:
        values = values * attrs.rescale_slope + attrs.rescale_intercept
    if window is None:
        window = next((w for w in attrs.windows if w.valid()), None)
    display = _min_max(values) if window is None else apply_window(values, window)
    display = np.nan_to_num(display, nan=0.0)
    out = np.clip(np.rint(display), 0, 255).astype(np.uint8)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return out


def _color_to_rgb(frame: np.ndarray, photometric: str, bits_stored: int | None) -> np.ndarray:
    if frame.dtype != np.uint8:
        bits = bits_stored or frame.dtype.itemsize * 8
        frame = np.clip(frame.astype(np.int64) >> max(bits - 8, 0), 0, 255).astype(np.uint8)
    if photometric.startswith("YBR_FULL"):
        rows, cols = frame.shape[:2]
        ycc = Image.frombytes("YCbCr", (cols, rows), np.ascontiguousarray(frame).tobytes())
        return np.asarray(ycc.convert("RGB"))
    return frame


def _crop(image: np.ndarray, viewport: Viewport) -> np.ndarray:
    rows, cols = image.shape[:2]
    sx, sy = viewport.sx, viewport.sy
    if sx >= cols or sy >= rows:
        raise RenderError("viewport source region lies outside the image")
    sw = viewport.sw if viewport.sw is not None else cols - sx
    sh = viewport.sh if viewport.sh is not None else rows - sy
    region = image[sy : sy + abs(sh), sx : sx + abs(sw)]
    if sw < 0:
        region = region[:, ::-1]
    if sh < 0:
        region = region[::-1]
    return region


def _fit(width: int, height: int, box_w: int, box_h: int, enlarge: bool) -> tuple[int, int]:
    scale = min(box_w / width, box_h / height)
    if not enlarge:
        scale = min(scale, 1.0)
    return max(1, round(width * scale)), max(1, round(height * scale))


def render_frame(
    frame: np.ndarray,
    attrs: PixelAttributes = PixelAttributes(),
    *,
    media_type: str = JPEG,
    options: RenderOptions = RenderOptions(),
    thumbnail: bool = False,
    thumbnail_size: int = THUMBNAIL_SIZE,
) -> bytes:
    """Encode one frame as JPEG or PNG bytes.

    ``options`` come from :func:`parse_render_params`; ``thumbnail`` bounds the longest side to
    ``thumbnail_size`` (without enlarging) unless a viewport is given.
    """
    display = to_display(frame, attrs, options.window)
    if options.viewport is not None:
        display = _crop(display, options.viewport)
    image = Image.fromarray(np.ascontiguousarray(display))
    width, height = image.size
    if options.viewport is not None:
        size = _fit(width, height, options.viewport.width, options.viewport.height, True)
    elif thumbnail:
        size = _fit(width, height, thumbnail_size, thumbnail_size, False)
    else:
        size = (width, height)
    if size != (width, height):
        image = image.resize(size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    if media_type == JPEG:
        quality = options.quality if options.quality is not None else DEFAULT_JPEG_QUALITY
        image.save(buffer, format="JPEG", quality=quality)
    elif media_type == PNG:
        image.save(buffer, format="PNG")
    else:
        raise RenderError(f"cannot render to {media_type!r}; use image/jpeg or image/png")
    return buffer.getvalue()


def windows_from_values(
    centers: Sequence[float], widths: Sequence[float], function: str | None = None
) -> tuple[Window, ...]:
    """Windows from parallel center/width lists (e.g. pydicom's multi-valued DS)."""
    fn = VoiFunction(function.upper()) if function else VoiFunction.LINEAR
    return tuple(Window(float(c), float(w), fn) for c, w in zip(centers, widths, strict=False))
