"""A stored series as a NIfTI-1 `.nii.gz`, written as a stream from the Zarr volume.

The stored (z, y, x) volume in C order is, byte for byte, NIfTI's (x, y, z) in its column-major
order, so the file is the header (nibabel's) and the stored slices as they are, gzipped a block
at a time (independent gzip members, compressed in parallel by ISA-L: one gzip file to every
reader).
Values stay the stored integers with the rescale in `scl_slope`/`scl_inter` (as dcm2niix does);
a per-slice rescale gives float32 HU. The affine is the loader's (`processing.loader`): RAS, so
`nibabel.load(f).get_fdata()` and its affine equal `load_series` (tested).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import nibabel as nib
import numpy as np
from isal import isal_zlib

from processing.loader import LoadError, ras_affine
from storage.objectstore import guard
from storage.series import SeriesReader

# ISA-L's deflate (gzip-compatible): level 2 packs CT as zlib's level 1 does, ~5x faster.
GZIP_LEVEL = 2
BLOCK_SLICES = 16  # slices gzipped as one member: enough blocks to keep every thread busy


def check(reader: SeriesReader) -> None:
    """LoadError (no PHI) when the series is no single-sample volume in the patient frame."""
    attrs = reader.attrs
    if not attrs.get("n_slices"):
        raise LoadError("series has no pixel data")
    if len(attrs["shape"]) != 3:
        raise LoadError("series is not a single-sample (greyscale) volume")
    if not attrs.get("affine"):
        raise LoadError("series has no patient-frame geometry")


def _rescale(attrs: dict[str, Any]) -> tuple[Any, Any, bool]:
    """(slope, intercept, per-slice): per-slice values are lists."""
    slope, intercept = attrs.get("rescale_slope", 1.0), attrs.get("rescale_intercept", 0.0)
    per_slice = isinstance(slope, list | tuple) or isinstance(intercept, list | tuple)
    return slope, intercept, per_slice


def header(reader: SeriesReader) -> bytes:
    """The 352 bytes before the voxels: NIfTI-1 header and the empty extension flag."""
    check(reader)
    attrs = reader.attrs
    nz, ny, nx = (int(n) for n in attrs["shape"])
    slope, intercept, per_slice = _rescale(attrs)
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((nx, ny, nz))
    hdr.set_data_dtype(np.float32 if per_slice else np.dtype(attrs["dtype"]))
    affine = ras_affine(attrs["affine"])
    hdr.set_qform(affine, code="scanner")
    hdr.set_sform(affine, code="scanner")
    hdr.set_xyzt_units("mm", "sec")
    hdr.set_slope_inter(*((1.0, 0.0) if per_slice else (float(slope), float(intercept))))
    hdr["vox_offset"] = 352
    buf = io.BytesIO()
    hdr.write_to(buf)
    return buf.getvalue()


def _blocks(reader: SeriesReader) -> Iterator[bytes]:
    """The voxels' bytes (little-endian), `BLOCK_SLICES` slices at a time."""
    vol = reader.volume
    assert vol is not None  # `check` refused a series without images
    n = int(reader.attrs["n_slices"])
    slope, intercept, per_slice = _rescale(reader.attrs)
    depth = BLOCK_SLICES
    for z0 in range(0, n, depth):
        with guard("read"):
            block = np.asarray(vol[z0 : z0 + depth])
        if per_slice:
            s = np.asarray(slope if isinstance(slope, list | tuple) else [slope] * n)
            b = np.asarray(intercept if isinstance(intercept, list | tuple) else [intercept] * n)
            z1 = z0 + len(block)
            block = block * s[z0:z1, None, None] + b[z0:z1, None, None]
            block = block.astype("<f4")
        yield block.astype(block.dtype.newbyteorder("<"), copy=False).tobytes()


def _gzip(data: bytes) -> bytes:
    c = isal_zlib.compressobj(GZIP_LEVEL, isal_zlib.DEFLATED, 31)  # 31: a gzip member
    return c.compress(data) + c.flush()


def nii_gz(reader: SeriesReader, threads: int | None = None) -> Iterator[bytes]:
    """The series' `.nii.gz` bytes, block after block (zlib leaves the GIL: blocks compress
    in parallel, at most `threads` + 1 held at once)."""
    head = header(reader)
    threads = threads or max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(threads) as pool:
        pending = [pool.submit(_gzip, head)]
        for block in _blocks(reader):
            pending.append(pool.submit(_gzip, block))
            while len(pending) > threads:
                yield pending.pop(0).result()
        for f in pending:
            yield f.result()


def sidecar(reader: SeriesReader) -> dict[str, Any]:
    """What a `.nii.gz` does not say plainly: spacing, orientation, rescale, modality."""
    attrs = reader.attrs
    affine = ras_affine(attrs["affine"])
    sz, sy, sx = attrs["spacing"]
    slope, intercept, per_slice = _rescale(attrs)
    return {
        "shape_xyz": [int(n) for n in reversed(attrs["shape"])],
        "spacing_xyz_mm": [sx, sy, sz],
        "orientation": "".join(nib.aff2axcodes(affine)),
        "affine_ras": affine.tolist(),
        "stored_dtype": attrs.get("dtype"),
        "rescale": {
            "slope": slope,
            "intercept": intercept,
            "applied": "voxels are float32 HU" if per_slice else "in scl_slope/scl_inter",
        },
        "modality": attrs.get("modality"),
        "uniform_spacing": attrs.get("uniform_spacing"),
    }
