"""A phantom (harness.phantoms) written as a CT DICOM series, with planted identifiers.

One file per slice, geometry from the phantom's affine (array index (z, y, x) -> LPS mm), so
the gateway's pull and the bone-density pipeline see what a scanner would send. Stored values
are HU minus RescaleIntercept, as int16 or uint16. Every identifying string planted is listed in
`PhantomStudy.phi`, for the leak scan.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, CTImageStorage, ExplicitVRLittleEndian

from harness.phantoms import PhantomTruth
from harness.synthetic import GIVEN, HOSPITAL_ROOT, STREETS

# Surnames of six letters or more, not those of harness.synthetic: corpora can share a PACS.
SURNAMES = ["FONTAINE", "LAMBERTI", "ROUSSEL", "GIRARDOT", "BONNEVAL", "CHEVALIER"]


@dataclass
class PhantomStudy:
    """One study of one phantom series, as written; `truth` is the phantom's ground truth."""

    patient_id: str
    patient_name: str
    accession: str
    study_uid: str
    series_uid: str
    study_date: str
    truth: PhantomTruth
    files: list[Path] = field(default_factory=list)
    phi: list[str] = field(default_factory=list)

    @property
    def n_instances(self) -> int:
        return len(self.files)


def _uid(rng: random.Random, embed: str = "") -> str:
    tail = f"{embed}.{rng.randrange(10**12, 10**13)}" if embed else str(rng.randrange(10**15))
    return (HOSPITAL_ROOT + tail)[:64]


def _month_day(rng: random.Random) -> str:
    return f"{rng.randrange(1, 13):02d}{rng.randrange(1, 29):02d}"


def _identity(rng: random.Random, index: int) -> dict[str, str]:
    """A patient and a study: the values planted, all distinct from one index to the next."""
    surname = SURNAMES[index % len(SURNAMES)]
    given = GIVEN[(index * 5 + 2) % len(GIVEN)]
    pid = str(rng.randrange(10**9, 10**10))
    return {
        "surname": surname,
        "given": given,
        "name": f"{surname}^{given}",
        "id": pid,
        "birth_date": f"19{rng.randrange(40, 70)}{_month_day(rng)}",
        "address": f"{rng.randrange(1, 200)} {rng.choice(STREETS)} LYON",
        "phone": f"+334{rng.randrange(10**7, 10**8)}",
        "accession": f"PHA{rng.randrange(10**6, 10**7)}",
        # one study a year, even years from 2016: a date shift of under a year hits no other
        "date": f"{2016 + 2 * index}{_month_day(rng)}",
        "study_uid": _uid(rng, embed=pid),
        "series_uid": _uid(rng),
        "frame_uid": _uid(rng),
    }


def write_phantom_study(
    volume: np.ndarray,
    truth: PhantomTruth,
    out_dir: Path,
    *,
    index: int = 0,
    slice_thickness_mm: float | None = None,
    intercept: float = -1024.0,
    unsigned: bool = False,
    kvp: float = 120.0,
    contrast: bool = False,
    description: str = "ABDOMEN PHANTOM",
    seed: int = 0,
) -> PhantomStudy:
    """Write `volume` (int16 HU, (z, y, x)) as one CT series in `out_dir`, one file a slice.

    `index` picks the planted identity (patient, accession, study date), so phantoms written
    with different indices are different patients. `slice_thickness_mm` defaults to the spacing.
    """
    stored = volume.astype(np.int32) - int(round(intercept))
    dtype = np.uint16 if unsigned else np.int16
    info = np.iinfo(dtype)
    if stored.min() < info.min or stored.max() > info.max:
        raise ValueError(f"HU minus intercept {intercept} does not fit {np.dtype(dtype).name}")
    rng = random.Random(f"phantom {seed} {index}")  # not the seeds harness.synthetic uses
    who = _identity(rng, index)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study = PhantomStudy(
        who["id"],
        who["name"],
        who["accession"],
        who["study_uid"],
        who["series_uid"],
        who["date"],
        truth,
    )
    a = np.asarray(truth.affine, dtype=float)
    sz, sy, sx = (float(v) for v in np.linalg.norm(a[:3, :3], axis=0))
    row_dir, col_dir = a[:3, 2] / sx, a[:3, 1] / sy  # along a row (x index), down a column (y)
    thickness = slice_thickness_mm or sz
    nz, ny, nx = volume.shape
    sops = [_uid(rng) for _ in range(nz)]
    for k in range(nz):
        ds = _header(who, sops[k], k)
        ds.SliceThickness = round(thickness, 4)
        ds.SpacingBetweenSlices = round(sz, 4)
        ds.KVP = kvp
        if contrast:
            ds.ContrastBolusAgent = "IOMEPROL 350"
            ds.ContrastBolusRoute = "IV"
        position = a @ np.array([k, 0.0, 0.0, 1.0])
        ds.ImagePositionPatient = [round(float(v), 4) for v in position[:3]]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*row_dir, *col_dir)]
        ds.SliceLocation = round(float(position[2]), 4)
        ds.Rows, ds.Columns = ny, nx
        ds.PixelSpacing = [round(sy, 6), round(sx, 6)]
        ds.PixelRepresentation = 0 if unsigned else 1
        ds.RescaleIntercept = intercept
        ds.SeriesDescription = description
        ds.PixelData = np.ascontiguousarray(stored[k], dtype=dtype).tobytes()
        path = out_dir / f"{who['accession']}_{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        study.files.append(path)
    planted = [who[k] for k in ("id", "surname", "given", "birth_date", "address", "phone")]
    planted += [who[k] for k in ("accession", "date", "study_uid", "series_uid", "frame_uid")]
    study.phi = sorted(set(planted + sops), key=len, reverse=True)
    return study


def _header(who: dict[str, str], sop_uid: str, k: int) -> Dataset:
    """The header shared by every slice, identifiers planted in names, dates, UIDs, text."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = who["date"]
    ds.StudyTime = ds.SeriesTime = "101500"
    ds.AcquisitionTime = ds.ContentTime = f"1016{k % 60:02d}"
    ds.AccessionNumber = who["accession"]
    ds.Modality = "CT"
    ds.Manufacturer = "SPHERE PHANTOM"
    ds.ManufacturerModelName = "PHANTOM-CT"
    ds.InstitutionName = "CLINIQUE " + who["surname"]
    ds.ReferringPhysicianName = "DR^" + who["given"]
    ds.StudyDescription = "CT ABDOMEN " + who["surname"]
    ds.PatientName = who["name"]
    ds.PatientID = who["id"]
    ds.PatientBirthDate = who["birth_date"]
    ds.PatientSex = "F"
    ds.PatientAge = "066Y"
    ds.PatientAddress = who["address"]
    ds.PatientTelephoneNumbers = who["phone"]
    ds.ImageComments = f"Phantom for {who['surname']}"
    item = Dataset()
    item.RequestedProcedureID = who["accession"]
    item.RequestedProcedureDescription = "CT for " + who["surname"]
    ds.RequestAttributesSequence = Sequence([item])
    ds.PatientPosition = "FFS"
    ds.StudyInstanceUID = who["study_uid"]
    ds.SeriesInstanceUID = who["series_uid"]
    ds.StudyID = who["accession"][-6:]
    ds.SeriesNumber = 1
    ds.InstanceNumber = k + 1
    ds.FrameOfReferenceUID = who["frame_uid"]
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.BurnedInAnnotation = "NO"
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    block = ds.private_block(0x0029, "ACME CT 1.0", create=True)
    block.add_new(0x10, "LO", who["name"])
    block.add_new(0x11, "SH", who["id"])
    return ds
