"""The `Pipeline` interface: which series qualify, the MONAI transforms, the method, its outputs.

A pipeline is a small picklable object (its fields are its parameters): the runner ships it to
Dask workers, which load the model once each (`load_model`, cached by path and checksum), read
the series from the store, and call `run`. Everything a result needs to be reproduced goes into
its provenance: name, version, parameters, input checksum, model checksum, device.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from monai.data import MetaTensor
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom import json_model
from storage.series import SeriesReader

OK, UNMEASURABLE, INELIGIBLE, FAILED = "ok", "unmeasurable", "ineligible", "failed"
DONE = frozenset({OK, UNMEASURABLE, INELIGIBLE})  # a re-run of the same version skips these


# How a stored header (compact DICOM JSON; dicom/lossy.py) says its original was lossy.
_LOSSY = '"00282110":{"vr":"CS","Value":["01"]}'


@dataclass(frozen=True)
class SeriesFacts:
    """What qualification looks at, from the stored attributes and the first image header."""

    modality: str | None
    n_slices: int
    shape: tuple[int, ...]
    spacing: tuple[float | None, ...]  # (z, y, x) mm
    slice_thickness: float | None
    normal: tuple[float, float, float] | None  # slice normal, LPS
    uniform: bool
    image_type: tuple[str, ...]
    kvp: float | None
    contrast: bool | None  # ContrastBolusAgent present (None when the header does not say)
    lossy: bool = False  # an instance was lossy compressed (Lossy Image Compression "01")

    @classmethod
    def from_reader(cls, reader: SeriesReader) -> SeriesFacts:
        a = reader.attrs
        n = int(a.get("n_slices") or 0)
        header = reader.header(0) if n else {}
        direction = a.get("direction")
        agent = header.get("00180010")  # ContrastBolusAgent: absent, empty or named
        return cls(
            modality=a.get("modality"),
            n_slices=n,
            shape=tuple(a.get("shape") or ()),
            spacing=tuple(a.get("spacing") or (None, None, None)),
            slice_thickness=_float(json_model.first(header, "00180050")),
            normal=tuple(direction[6:9]) if direction else None,
            uniform=bool(a.get("uniform_spacing")),
            image_type=tuple(str(v).upper() for v in json_model.values(header, "00080008")),
            kvp=_float(json_model.first(header, "00180060")),
            contrast=bool(agent.get("Value")) if agent is not None else None,
            lossy=n > 0 and any(_LOSSY in t for t in reader.header_texts()),
        )


@dataclass
class Segment:
    """One ROI of a result: a mask in stored (z, y, x) order, what it is, what was measured."""

    label: str
    site: Code  # anatomic structure (SNOMED CT), for the SEG and the SR finding site
    mask: np.ndarray  # bool (z, y, x)
    mean_hu: float | None = None
    median_hu: float | None = None
    sd_hu: float | None = None
    n_voxels: int = 0


@dataclass
class Finding:
    """What `run` returns: a status, the values for the results table, ROIs for SEG and SR,
    and what the PNG report draws (level ranges along z)."""

    status: str  # OK or UNMEASURABLE
    values: dict[str, Any]
    reason: str = ""
    segments: list[Segment] = field(default_factory=list)
    levels: dict[str, tuple[int, int]] = field(default_factory=dict)
    classification: str | None = None  # e.g. osteoporosis / osteopenia / normal
    summary: str = ""  # one line for the PNG report
    # more (name, value) qualitative evaluations for the SR's first ROI (how a result was had)
    evaluations: list[tuple[Code, Code]] = field(default_factory=list)


@dataclass(frozen=True)
class Pipeline:
    """Base of every pipeline; subclasses are frozen dataclasses whose fields are parameters."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = ""
    modalities: ClassVar[tuple[str, ...]] = ("CT",)
    wants_gpu: ClassVar[bool] = False  # prefers a GPU: tasks ask Dask for GPU resources
    outputs: ClassVar[frozenset[str]] = frozenset({"sr", "seg", "png"})
    family: ClassVar[Code] = codes.cid7162.MorphologicalOperations  # SEG algorithm family

    min_slices: int = 1
    max_thickness_mm: float | None = None
    max_tilt_deg: float = 30.0  # "axial": slice normal within this of the patient's S-I axis
    model_path: str | None = None

    def parameters(self) -> dict[str, Any]:
        """The parameters, as recorded in provenance."""
        return dataclasses.asdict(self)

    def qualify(self, facts: SeriesFacts) -> str | None:
        """Why the series does not qualify, or None when it does."""
        if facts.modality not in self.modalities:
            return f"modality {facts.modality or 'unknown'}, not {'/'.join(self.modalities)}"
        if facts.n_slices == 0:
            return "no pixel data"
        if len(facts.shape) != 3:
            return "not a greyscale volume"
        if any(k in facts.image_type for k in ("LOCALIZER", "SCOUT")):
            return "a localizer, not a volume"
        if facts.normal is None:
            return "no patient-frame geometry"
        tilt = math.degrees(math.acos(min(1.0, abs(facts.normal[2]))))
        if tilt > self.max_tilt_deg:
            return f"not axial (slice normal {tilt:.0f} degrees from the body axis)"
        if facts.n_slices < self.min_slices:
            return f"{facts.n_slices} slices, fewer than {self.min_slices}"
        if not facts.uniform:
            return "slices unevenly spaced or duplicated"
        thick = facts.slice_thickness or facts.spacing[0]
        if self.max_thickness_mm is not None and thick and thick > self.max_thickness_mm + 1e-6:
            return f"slice thickness {thick:g} mm > {self.max_thickness_mm:g} mm"
        return None

    def transforms(self) -> Any:
        """MONAI transform applied to the loaded image (a (1, x, y, z) HU MetaTensor) before
        `run`; None for none."""
        return None

    def load_model(self, device: torch.device) -> Any:
        """The model on `device` (None for a classical method). Called once per worker."""
        return None

    def model_checksum(self) -> str | None:
        """sha256 of the model file, None without one."""
        return file_checksum(self.model_path) if self.model_path else None

    def run(
        self, image: MetaTensor, facts: SeriesFacts, *, model: Any, device: torch.device
    ) -> Finding:
        raise NotImplementedError


def pick_device(pipeline: Pipeline, *, gpu: bool | None = None) -> torch.device:
    """CUDA when the pipeline wants it (or `gpu`) and one is there, else the CPU."""
    want = pipeline.wants_gpu if gpu is None else gpu
    return torch.device("cuda" if want and torch.cuda.is_available() else "cpu")


@cache
def file_checksum(path: str) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _float(value: Any) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
