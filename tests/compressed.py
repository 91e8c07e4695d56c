"""The same CT images in every transfer syntax a PACS sends, made by real encoders: dcmtk's
dcmconv, dcmcjpeg, dcmcjpls and dcmcrle, OpenJPEG (JPEG 2000, through pydicom) and OpenJPH
(HTJ2K, through imagecodecs)."""

from __future__ import annotations

import copy
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)


@dataclass(frozen=True)
class Syntax:
    name: str
    uid: str
    bits: int  # of the source image: 8, 12 (unsigned, in 16 bits) or 16 (signed)
    lossy: bool
    how: tuple[str, ...]  # a dcmtk command (the file names follow), or ("py", what)


SYNTAXES = [
    Syntax("implicit-le", ImplicitVRLittleEndian, 16, False, ("dcmconv", "+ti")),
    Syntax("big-endian", ExplicitVRBigEndian, 16, False, ("dcmconv", "+tb")),
    Syntax("deflate", DeflatedExplicitVRLittleEndian, 16, False, ("dcmconv", "+td")),
    Syntax("jpeg-baseline", JPEGBaseline8Bit, 8, True, ("dcmcjpeg", "+eb")),
    Syntax("jpeg-extended-12", JPEGExtended12Bit, 12, True, ("dcmcjpeg", "+ee")),
    Syntax("jpeg-lossless-sv1", JPEGLosslessSV1, 16, False, ("dcmcjpeg", "+e1")),
    Syntax("jpeg-lossless-sv1-12", JPEGLosslessSV1, 12, False, ("dcmcjpeg", "+e1")),
    Syntax("jpeg-lossless-sv6", JPEGLossless, 12, False, ("dcmcjpeg", "+el", "+sv", "6")),
    Syntax("jpeg-lossless-sv3", JPEGLossless, 16, False, ("dcmcjpeg", "+el", "+sv", "3")),
    Syntax("jpeg-ls", JPEGLSLossless, 16, False, ("dcmcjpls", "+el")),
    Syntax("jpeg-ls-near", JPEGLSNearLossless, 12, True, ("dcmcjpls", "+en", "+md", "3")),
    Syntax("rle", RLELossless, 16, False, ("dcmcrle",)),
    Syntax("j2k-lossless", JPEG2000Lossless, 16, False, ("py", "j2k")),
    Syntax("j2k-reversible", JPEG2000, 12, False, ("py", "j2k")),
    Syntax("j2k-lossy", JPEG2000, 12, True, ("py", "j2k", "5")),
    Syntax("htj2k-lossless", HTJ2KLossless, 16, False, ("py", "htj2k")),
    Syntax("htj2k-rpcl", HTJ2KLosslessRPCL, 12, False, ("py", "htj2k")),
    Syntax("htj2k-lossy", HTJ2K, 12, True, ("py", "htj2k", "lossy")),
]
BY_NAME = {s.name: s for s in SYNTAXES}


def as_bits(ds: Dataset, bits: int) -> Dataset:
    """`ds` (a signed 16-bit synthetic CT, HU + 1024) as `bits`: 8 (a grey window), 12
    (unsigned in 16 bits, as many CTs store it) or 16 (unchanged)."""
    if bits == 16:
        return ds
    arr = ds.pixel_array.astype(np.int32)
    if bits == 8:
        out = np.clip((arr - 800) / 2, 0, 255).astype(np.uint8)
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
    else:
        out = np.clip(arr, 0, 4095).astype(np.uint16)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.PixelData = out.tobytes()
    return ds


def transcode(src: Path, dst: Path, syntax: Syntax) -> Path:
    """Write `src` (Explicit VR Little Endian) as `syntax` to `dst`."""
    if syntax.how[0] != "py":
        subprocess.run([*syntax.how, str(src), str(dst)], check=True, capture_output=True)
        return dst
    ds = pydicom.dcmread(src)
    arr = ds.pixel_array
    lossy = len(syntax.how) > 2
    if syntax.how[1] == "j2k":
        from openjpeg.utils import encode_array  # OpenJPEG (pylibjpeg-openjpeg)

        ratios = [float(syntax.how[2])] if lossy else None
        frame = encode_array(arr, bits_stored=int(ds.BitsStored), compression_ratios=ratios)
    else:
        import imagecodecs  # a test dependency: OpenJPH, the HTJ2K encoder

        frame = bytes(imagecodecs.htj2k_encode(arr, reversible=not lossy))
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = UID(syntax.uid)
    ds.save_as(dst, enforce_file_format=True)
    return dst


def reference(src: Dataset, syntax: Syntax, folder: Path) -> tuple[Path, Path]:
    """(uncompressed reference, encoded file) of `src` for `syntax`, in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    sop = str(src.SOPInstanceUID)
    ref = folder / f"{sop}.ref.dcm"
    ds = as_bits(copy.deepcopy(src), syntax.bits)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(ref, enforce_file_format=True)
    return ref, transcode(ref, folder / f"{sop}.{syntax.name}.dcm", syntax)
