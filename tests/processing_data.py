"""Test data for the processing tests: CT series written from an HU volume in any orientation,
committed to a project's store with the real SeriesWriter and registered in the catalog."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from monai.data import MetaTensor
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from core import projects, users
from core.core import Core
from core.settings import Settings
from processing.body_hu import BodyHu
from storage.commit import commit_series
from storage.series import SeriesWriter, series_key


def ct_series(
    hu: np.ndarray,
    *,
    spacing: tuple[float, float, float] = (2.5, 0.8, 0.8),
    flip_rows: bool = False,
    descending: bool = False,
    thickness: float | None = None,
    modality: str = "CT",
    slope: float = 1.0,
    intercept: float = -1024.0,
    seed: int = 0,
) -> list[Dataset]:
    """CT datasets of `hu` (z, y, x), z running superior. `flip_rows`: the row direction runs
    to the patient's right (IOP -1,0,0), columns mirrored so the anatomy stays the same;
    `descending`: instance numbers run head to feet, files in that order."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = hu.shape
    sz, sy, sx = spacing
    study, series, frame = (generate_uid(entropy_srcs=[f"{seed}-{k}"]) for k in "abc")
    row = (-1.0, 0.0, 0.0) if flip_rows else (1.0, 0.0, 0.0)
    x0 = (nx - 1) * sx / 2 if flip_rows else -(nx - 1) * sx / 2
    stored = np.round((hu.astype(np.float64) - intercept) / slope).astype(np.int16)
    order = list(range(nz))[::-1] if descending else list(range(nz))
    out = []
    for n, k in enumerate(order):
        img = stored[k][:, ::-1] if flip_rows else stored[k]
        ds = Dataset()
        sop = generate_uid(entropy_srcs=[f"{seed}-{series}-{k}"])
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientID, ds.PatientName, ds.PatientSex = f"PSEUDO{seed}", f"PSEUDO^{seed}", "O"
        ds.PatientBirthDate = ""
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20200101", "120000", ""
        ds.ReferringPhysicianName, ds.StudyID = "", "1"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 2, n + 1
        ds.Manufacturer, ds.PositionReferenceIndicator = "TEST", ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientPosition = "FFS"
        ds.KVP = 120
        ds.SliceThickness = thickness if thickness is not None else sz
        ds.ImageOrientationPatient = [*row, 0.0, 1.0, 0.0]
        ds.ImagePositionPatient = [x0, -(ny - 1) * sy / 2, -100.0 + k * sz]
        ds.PixelSpacing = [sy, sx]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = ny, nx
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "HU"
        ds.AcquisitionNumber = 1
        ds.PixelData = np.ascontiguousarray(img).tobytes()
        out.append(ds)
    rng.shuffle(out)  # arrival order means nothing
    return out


def new_project(settings: Settings, name: str) -> None:
    """Create project `name` in a fresh home."""
    with Core(settings, create=True) as core:
        users.first_admin(core)  # the OS account running the tests, as `sphere init` makes it
        projects.create(core, name, title="processing test")
        today = date.today()  # pipelines run on approved, in-date projects only
        projects.approve(
            core, name, committee_ref="T-1", approved_on=today, expires_on=today + timedelta(365)
        )


def store_series(settings: Settings, project: str, datasets: list[Dataset], spool: Path) -> str:
    """Commit `datasets` as one series of `project`, complete and indexed; its storage key."""
    ds0 = datasets[0]
    study, series = ds0.StudyInstanceUID, ds0.SeriesInstanceUID
    key = series_key(project, study, series)
    with Core(settings) as core:
        writer = SeriesWriter(spool / series, fsync=False)
        for ds in datasets:
            writer.add(ds)
        commit_series(
            core.store, core.catalog, writer, key, project_id=core.project(project).id,
            series_uid=series, values={"study_uid": study, "modality": ds0.Modality,
                                       "patient_pseudonym": str(ds0.PatientID)},
        )  # fmt: skip
    return key


def write_files(datasets: list[Dataset], folder: Path) -> Path:
    """The series as DICOM files in `folder` (for MONAI's LoadImage)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, ds in enumerate(datasets):
        ds.save_as(folder / f"{i:04d}.dcm", enforce_file_format=True)
    return folder


def body_volume(shape: tuple[int, int, int] = (12, 48, 40), seed: int = 0) -> np.ndarray:
    """An asymmetric HU volume (air, a body ellipse, a bright marker off-centre), int16."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    z, y, x = np.ogrid[:nz, :ny, :nx]
    vol = np.full(shape, -1000.0)
    body = ((y - ny / 2) / (0.4 * ny)) ** 2 + ((x - nx / 2) / (0.45 * nx)) ** 2 <= 1
    vol[:, body[0]] = 40.0
    vol[: nz // 2, ny // 4 : ny // 3, nx // 5 : nx // 3] = 700.0  # marks inferior, anterior, right
    vol += z * 3.0  # varies along z too
    vol += rng.normal(0, 5, shape)
    return np.round(vol).astype(np.int16)


@dataclass(frozen=True)
class ScaledHu(BodyHu):
    """BodyHu after a tiny model (a 1x1x1 convolution scaling HU), loaded from a file: each
    load appends the worker's pid to `load_log`, so a test sees how often it was loaded."""

    name: ClassVar[str] = "scaled-hu"
    version: ClassVar[str] = "1.0"
    load_log: str = ""

    def load_model(self, device: torch.device) -> torch.nn.Module:
        with open(self.load_log, "a") as f:
            f.write(f"{os.getpid()}\n")
        model = torch.nn.Conv3d(1, 1, 1)
        assert self.model_path is not None  # set by the test that uses this pipeline
        model.load_state_dict(torch.load(self.model_path, map_location=device))
        return model.to(device).eval()

    def run(self, image: MetaTensor, facts: Any, *, model: Any, device: torch.device) -> Any:
        with torch.no_grad():
            scaled = model(image.as_tensor()[None].to(device))[0]
        return super().run(MetaTensor(scaled, meta=image.meta), facts, model=None, device=device)


def save_scale_model(path: Path, scale: float) -> Path:
    """The ScaledHu model: HU * scale."""
    model = torch.nn.Conv3d(1, 1, 1)
    with torch.no_grad():
        model.weight.fill_(scale)
        assert model.bias is not None  # Conv3d has one by default
        model.bias.zero_()
    torch.save(model.state_dict(), path)
    return path


@dataclass(frozen=True)
class GpuBodyHu(BodyHu):
    """BodyHu asking for a GPU: its tasks require the Dask GPU resource; without CUDA they
    run on the CPU and must give the same values."""

    name: ClassVar[str] = "gpu-body-hu"
    wants_gpu: ClassVar[bool] = True
