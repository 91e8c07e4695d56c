"""Synthetic abdominal CT studies with planted identifiers, for the demo, the tests and benchmarks.

Every identifying string planted in a study is listed in `SyntheticCorpus.phi`, so a test can check
that none of them reaches de-identified output, byte for byte. Study dates fall in even years, one
study a year, so that a date shift of under a year can never land on another study's original date.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, CTImageStorage, ExplicitVRLittleEndian

# Names of six letters or more: a shorter string can turn up by chance in compressed pixel bytes.
SURNAMES = ["DUPONT", "MARTIN", "BERNARD", "PETITJEAN", "DURAND", "LEROYER", "MOREAU", "SIMONET"]
GIVEN = ["JEANNE", "MARIELLE", "LUCIEN", "CLAIRE", "PAULINE", "ANNETTE", "HUGUETTE", "LEANDRE"]
STREETS = ["RUE DES LILAS", "AVENUE FOCH", "BOULEVARD VOLTAIRE", "RUE CUVIER"]
# A root that is not ours, as a hospital's modality would use; identifiers get embedded after it.
HOSPITAL_ROOT = "1.2.250.1.59.4242."


@dataclass
class SyntheticSeries:
    series_uid: str
    n_instances: int
    modality: str = "CT"
    description: str = ""


@dataclass
class SyntheticStudy:
    patient_id: str
    patient_name: str
    accession: str
    study_uid: str
    study_date: str
    series: list[SyntheticSeries] = field(default_factory=list)

    @property
    def n_instances(self) -> int:
        return sum(s.n_instances for s in self.series)


@dataclass
class SyntheticCorpus:
    studies: list[SyntheticStudy] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    phi: list[str] = field(default_factory=list)

    @property
    def n_instances(self) -> int:
        return sum(s.n_instances for s in self.studies)


@dataclass
class _Patient:
    patient_id: str
    name: str
    birth_date: str
    sex: str
    address: str
    phone: str
    other_id: str

    @property
    def phi(self) -> list[str]:
        surname, given = self.name.split("^")
        return [
            self.patient_id,
            surname,
            given,
            self.birth_date,
            self.address,
            self.phone,
            self.other_id,
        ]


def _uid(rng: random.Random, embed: str = "") -> str:
    """A UID under the hospital root, with `embed` (digits of an identifier) inside, as PACS do."""
    tail = f"{embed}.{rng.randrange(10**12, 10**13)}" if embed else str(rng.randrange(10**15))
    return (HOSPITAL_ROOT + tail)[:64]


def phantom_slice(size: int, z_mm: float, rng: np.random.Generator) -> np.ndarray:
    """One axial slice (HU) of an abdomen: fat, muscle, liver, a vertebra with trabecular bone."""
    y, x = np.ogrid[-1.0 : 1.0 : size * 1j, -1.0 : 1.0 : size * 1j]
    img = np.full((size, size), -1000.0, dtype=np.float32)
    img[(x / 0.85) ** 2 + (y / 0.65) ** 2 <= 1] = -90.0  # subcutaneous fat
    img[(x / 0.78) ** 2 + (y / 0.58) ** 2 <= 1] = 40.0  # soft tissue
    img[((x + 0.3) / 0.3) ** 2 + ((y + 0.1) / 0.25) ** 2 <= 1] = 60.0  # liver
    vx, vy, vr = 0.0, 0.32, 0.11 + 0.01 * np.sin(z_mm / 20.0)
    body = (x - vx) ** 2 + (y - vy) ** 2
    img[body <= vr**2] = 700.0  # cortical shell
    img[body <= (0.8 * vr) ** 2] = 180.0 + 20.0 * np.cos(z_mm / 15.0)  # trabecular bone
    img += rng.normal(0.0, 8.0, img.shape).astype(np.float32)
    return img


def ct_series(
    *,
    patient: dict[str, str],
    study: dict[str, str],
    series_uid: str,
    series_number: int,
    slices: int,
    size: int = 512,
    thickness: float = 2.5,
    description: str = "ABDOMEN",
    frame_uid: str,
    sop_uids: list[str],
    seed: int = 0,
) -> Iterator[Dataset]:
    """Yield the CT datasets of one series (in-memory), with PHI planted in many places."""
    rng = np.random.default_rng(seed)
    spacing = 380.0 / size
    origin_z = -200.0
    for i in range(slices):
        z = origin_z + i * thickness
        hu = phantom_slice(size, z, rng)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uids[i])
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uids[i]
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study["date"]
        ds.StudyTime = ds.SeriesTime = "083000"
        ds.AcquisitionTime = ds.ContentTime = f"0831{i % 60:02d}"
        ds.AccessionNumber = study["accession"]
        ds.Modality = "CT"
        ds.Manufacturer = "SPHERE SYNTHETIC"
        ds.InstitutionName = "HOPITAL " + patient["surname"]
        ds.InstitutionAddress = patient["address"]
        ds.ReferringPhysicianName = "DR^" + patient["referrer"]
        ds.StationName = "CT-" + patient["other_id"][-4:]
        ds.StudyDescription = "CT ABDOMEN " + patient["surname"]
        ds.SeriesDescription = description
        ds.PerformingPhysicianName = "DR^" + patient["referrer"]
        ds.OperatorsName = "TECH^" + patient["given"]
        ds.ManufacturerModelName = "SYNTH-CT"
        ds.PatientName = patient["name"]
        ds.PatientID = patient["id"]
        ds.IssuerOfPatientID = "HOPITAL " + patient["surname"]
        ds.PatientBirthDate = patient["birth_date"]
        ds.PatientSex = patient["sex"]
        ds.PatientAge = "067Y"
        ds.PatientAddress = patient["address"]
        ds.PatientTelephoneNumbers = patient["phone"]
        ds.OtherPatientIDsSequence = Sequence([_other_id(patient["other_id"])])
        ds.AdditionalPatientHistory = f"Seen by {patient['name'].replace('^', ' ')} family doctor"
        ds.SliceThickness = thickness
        ds.KVP = 120
        ds.DeviceSerialNumber = "SN" + patient["other_id"]
        ds.SoftwareVersions = "1.0"
        ds.PatientPosition = "FFS"
        ds.StudyInstanceUID = study["uid"]
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = study["accession"][-6:]
        ds.SeriesNumber = series_number
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [-190.0, -190.0, z]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = z
        ds.ImageComments = f"Patient {patient['surname']} tolerated contrast"
        ds.RequestAttributesSequence = Sequence([_request(patient, study)])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.PixelSpacing = [spacing, spacing]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.BurnedInAnnotation = "NO"
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        # Private tags: a creator block with identifiers in several VRs.
        block = ds.private_block(0x0029, "ACME CT 1.0", create=True)
        block.add_new(0x10, "LO", patient["name"])
        block.add_new(0x11, "SH", patient["id"])
        block.add_new(
            0x12, "UT", "Exam of " + patient["surname"] + " born " + patient["birth_date"]
        )
        pixels = np.clip(hu + 1024.0, -32768, 32767).astype(np.int16)
        ds.PixelData = pixels.tobytes()
        yield ds


def _other_id(value: str) -> Dataset:
    item = Dataset()
    item.PatientID = value
    item.TypeOfPatientID = "TEXT"
    return item


def _request(patient: dict[str, str], study: dict[str, str]) -> Dataset:
    """Request attributes, with identifiers three levels deep."""
    inner = Dataset()
    inner.CodeValue = patient["other_id"]
    inner.CodingSchemeDesignator = "99HOSP"
    inner.CodeMeaning = "Requested by " + patient["referrer"]
    item = Dataset()
    item.RequestedProcedureID = study["accession"]
    item.ScheduledProcedureStepID = "SPS" + study["accession"][-5:]
    item.RequestedProcedureDescription = "CT for " + patient["surname"]
    item.ScheduledProtocolCodeSequence = Sequence([inner])
    return item


def _month_day(rng: random.Random) -> str:
    return f"{rng.randrange(1, 13):02d}{rng.randrange(1, 29):02d}"


def generate(
    out_dir: Path,
    n_patients: int = 3,
    studies_per_patient: int = 1,
    series_per_study: int = 2,
    slices: int = 20,
    size: int = 64,
    seed: int = 0,
) -> SyntheticCorpus:
    """Write a multi-patient, multi-series CT corpus to `out_dir` (files in shuffled order)."""
    rng = random.Random(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = SyntheticCorpus()
    jobs: list[tuple[dict, dict, SyntheticSeries, int, str, list[str]]] = []
    year = 2014
    for p in range(n_patients):
        surname, given = SURNAMES[p % len(SURNAMES)], GIVEN[(p * 3 + 1) % len(GIVEN)]
        pid = f"{rng.randrange(10**9, 10**10)}"
        pat = _Patient(
            patient_id=pid,
            name=f"{surname}^{given}",
            birth_date=f"19{rng.randrange(40, 70)}{_month_day(rng)}",
            sex=rng.choice(["M", "F"]),
            address=f"{rng.randrange(1, 200)} {rng.choice(STREETS)} PARIS",
            phone=f"+331{rng.randrange(10**7, 10**8)}",
            other_id=f"IPP{rng.randrange(10**8, 10**9)}",
        )
        referrer = SURNAMES[(p + 3) % len(SURNAMES)] + "^" + GIVEN[p % len(GIVEN)]
        patient = {
            "id": pid,
            "name": pat.name,
            "surname": surname,
            "given": given,
            "birth_date": pat.birth_date,
            "sex": pat.sex,
            "address": pat.address,
            "phone": pat.phone,
            "other_id": pat.other_id,
            "referrer": referrer,
        }
        corpus.phi += pat.phi + [referrer.split("^")[0]]
        for _ in range(studies_per_patient):
            date = f"{year}{_month_day(rng)}"
            year += 2
            accession = f"ACC{rng.randrange(10**6, 10**7)}"
            study = {"uid": _uid(rng, embed=pid), "accession": accession, "date": date}
            st = SyntheticStudy(pid, pat.name, accession, study["uid"], date)
            corpus.phi += [accession, study["uid"], date]
            frame_uid = _uid(rng)
            corpus.phi.append(frame_uid)
            for s in range(series_per_study):
                thickness = 2.5 if s % 2 == 0 else 5.0
                n = slices if s % 2 == 0 else max(1, slices // 2)
                se = SyntheticSeries(_uid(rng), n, "CT", f"ABDO {thickness}mm {surname}")
                sops = [_uid(rng) for _ in range(n)]
                corpus.phi += [se.series_uid, *sops]
                st.series.append(se)
                jobs.append((patient, study, se, s + 1, frame_uid, sops))
            corpus.studies.append(st)
    names = list(range(sum(j[2].n_instances for j in jobs)))
    rng.shuffle(names)
    k = 0
    for patient, study, se, number, frame_uid, sops in jobs:
        thickness = 2.5 if number % 2 == 1 else 5.0
        for ds in ct_series(
            patient=patient,
            study=study,
            series_uid=se.series_uid,
            series_number=number,
            slices=se.n_instances,
            size=size,
            thickness=thickness,
            description=se.description,
            frame_uid=frame_uid,
            sop_uids=sops,
            seed=rng.randrange(2**31),
        ):
            path = out_dir / f"{names[k]:06d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            corpus.files.append(path)
            k += 1
    corpus.phi = sorted(set(corpus.phi), key=len, reverse=True)
    return corpus
