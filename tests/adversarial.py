"""An adversarial study for the de-identification tests: identity planted wherever it can hide.

One patient, one study: two CT series (valid CT Image IOD, from `harness.synthetic.ct_series`), a
Comprehensive SR and a Grayscale Softcopy Presentation State that reference the CT images. PHI
sits in the usual attributes and in the unusual places: 4+ levels deep in sequences, private tags
of every VR (UN included), free text, SR TEXT and PN content items, graphic annotations, UIDs with
a record number inside, dates in text, DT values with a UTC offset, a surname that is a common
word, overlay comments and curve data. Every planted string is in `AdversarialStudy.phi`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ComprehensiveSRStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    SecondaryCaptureImageStorage,
)

from harness.synthetic import ct_series

MRN = "8675309421"
SURNAME, GIVEN = "WHITE", "ROSALIND"  # the surname is also a common word in reports
PATIENT = {
    "id": "MRN" + MRN,
    "name": f"{SURNAME}^{GIVEN}^MARIETTE",
    "surname": SURNAME,
    "given": GIVEN,
    "birth_date": "19530714",
    "sex": "F",
    "address": "42 WALLABY WAY SYDNEY",
    "phone": "+61255501234",
    "other_id": "OLD77120934",
    "referrer": "OKONKWO^ADAEZE",
}
STUDY_DATE = "20230405"
ACCESSION = "ACC4471902"
ROOT = "1.2.826.0.1.3680043.99."  # a hospital root; the record number is embedded after it
OPERATOR = "BRIGHTWATER"
READER = "QUILLFEATHER^THADDEUS"
INSTITUTION = "SAINT SWITHUN INFIRMARY"
SERIAL = "SNQX9917Z3"
TZ_DATETIME = "20230405101530.123456+0930"
PRIVATE_CREATOR = "EVIL CORP 1.0"
# Every identifying string planted (the tests look for each, case-insensitively, in output bytes).
PHI = [
    PATIENT["id"],
    MRN,
    SURNAME,
    GIVEN,
    "MARIETTE",
    PATIENT["birth_date"],
    PATIENT["address"],
    "WALLABY",
    PATIENT["phone"],
    PATIENT["other_id"],
    "OKONKWO",
    "ADAEZE",
    STUDY_DATE,
    "2023-04-05",
    "05/04/2023",
    ACCESSION,
    OPERATOR,
    "QUILLFEATHER",
    "THADDEUS",
    "SWITHUN",
    SERIAL,
    "20230405101530",
]


@dataclass
class AdversarialStudy:
    files: list[Path] = field(default_factory=list)
    ct: list[Path] = field(default_factory=list)
    sr: Path | None = None
    pr: Path | None = None
    study_uid: str = ""
    frame_uid: str = ""
    series_uids: list[str] = field(default_factory=list)
    ct_sop_uids: list[str] = field(default_factory=list)
    phi: list[str] = field(default_factory=list)


def uid(n: int) -> str:
    """A UID with the record number and study date embedded, as some PACS make them."""
    return f"{ROOT}{MRN}.{STUDY_DATE}.{n}"


def _meta(ds: Dataset, sop_class: str) -> None:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.SourceApplicationEntityTitle = "CT" + SERIAL[:8]


def _patient_study(ds: Dataset, study_uid: str) -> None:
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = PATIENT["name"]
    ds.PatientID = PATIENT["id"]
    ds.PatientBirthDate = PATIENT["birth_date"]
    ds.PatientSex = "F"
    ds.PatientAge = "069Y"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate, ds.StudyTime = STUDY_DATE, "101500"
    ds.AccessionNumber = ACCESSION
    ds.ReferringPhysicianName = PATIENT["referrer"]
    ds.StudyID = "S" + MRN[-6:]
    ds.Manufacturer = "SPHERE SYNTHETIC"
    ds.InstitutionName = INSTITUTION
    ds.DeviceSerialNumber = SERIAL
    ds.StationName = "CT" + SERIAL[:6]


def _deep_item(level: int) -> Dataset:
    """Identity at every level of a chain of sequences, private tags included."""
    item = Dataset()
    item.PatientName = PATIENT["name"]
    item.PatientID = PATIENT["id"]
    item.OperatorsName = "TECH^" + OPERATOR
    item.AccessionNumber = ACCESSION
    item.StudyDate = STUDY_DATE
    item.InstitutionName = INSTITUTION
    item.ReferencedSOPInstanceUID = uid(900 + level)
    item.AcquisitionDateTime = TZ_DATETIME
    block = item.private_block(0x0019, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", PATIENT["name"])
    block.add_new(0x02, "UN", f"{SURNAME} {MRN}".encode())
    if level < 5:
        item.DerivationCodeSequence = Sequence([_deep_item(level + 1)])
    return item


def _private_every_vr(ds: Dataset) -> None:
    """A private block with identity in every VR, a private sequence and an orphan private tag."""
    text = f"{SURNAME}^{GIVEN} {MRN} {STUDY_DATE}"
    b = ds.private_block(0x0011, PRIVATE_CREATOR, create=True)
    values = {
        "AE": OPERATOR[:16],
        "AS": "069Y",
        "AT": 0x00100010,
        "CS": SURNAME,
        "DA": STUDY_DATE,
        "DS": MRN,
        "DT": TZ_DATETIME,
        "FD": float(MRN),
        "FL": 1.5,
        "IS": MRN,
        "LO": text,
        "LT": text,
        "OB": text.encode(),
        "OD": np.array([float(MRN)], dtype="<f8").tobytes(),
        "OF": np.array([1.0, 2.0], dtype="<f4").tobytes(),
        "OL": text.encode()[:24],
        "OV": text.encode()[:24],
        "OW": text.encode()[:24],
        "PN": PATIENT["name"],
        "SH": PATIENT["id"],
        "SL": int(MRN[:9]),
        "SS": 1,
        "ST": text,
        "SV": int(MRN),
        "TM": "101530",
        "UC": text,
        "UI": uid(777),
        "UL": int(MRN[:9]),
        "UN": text.encode(),
        "UR": f"http://pacs.example/{PATIENT['id']}",
        "US": 7,
        "UT": text,
        "UV": int(MRN),
    }
    for i, (vr, value) in enumerate(values.items()):
        b.add_new(0x10 + i, vr, value)
    inner = Dataset()
    inner.PatientName = PATIENT["name"]
    inner.add_new(0x00111001, "LO", text)
    b.add_new(0x60, "SQ", Sequence([inner]))
    ds.add_new(0x00131010, "LO", text)  # no creator at all


def _overlay_and_curve(ds: Dataset, rows: int, cols: int) -> None:
    ds.add_new(0x60000010, "US", rows)
    ds.add_new(0x60000011, "US", cols)
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60004000, "LT", f"Annotated for {SURNAME} {GIVEN}")
    ds.add_new(0x60003000, "OW", bytes((rows * cols + 7) // 8 + (((rows * cols + 7) // 8) & 1)))
    ds.add_new(0x50003000, "OB", f"{SURNAME} {MRN}".encode())


def _ct(out: Path, study_uid: str, frame_uid: str, n: int, size: int) -> AdversarialStudy:
    study = {"uid": study_uid, "accession": ACCESSION, "date": STUDY_DATE}
    adv = AdversarialStudy(study_uid=study_uid, frame_uid=frame_uid)
    for s in range(2):
        series_uid = uid(100 + s)
        sops = [uid(1000 + 100 * s + i) for i in range(n)]
        adv.series_uids.append(series_uid)
        for i, ds in enumerate(
            ct_series(
                patient=PATIENT,
                study=study,
                series_uid=series_uid,
                series_number=s + 1,
                slices=n,
                size=size,
                description=f"white matter survey {GIVEN} {STUDY_DATE}",
                frame_uid=frame_uid,
                sop_uids=sops,
                seed=s,
            )
        ):
            _patient_study(ds, study_uid)
            ds.file_meta.SourceApplicationEntityTitle = "CT" + SERIAL[:8]
            ds.StudyDescription = f"CT HEAD {SURNAME.title()} {GIVEN.title()} 2023-04-05"
            ds.ImageComments = (
                f"Pt {SURNAME.title()} seen 05/04/2023; MRN{MRN}; call {PATIENT['phone']}"
            )
            ds.AcquisitionDateTime = TZ_DATETIME
            ds.TimezoneOffsetFromUTC = "+0930"
            ds.DateOfLastCalibration = "20190102"
            ds.AcquisitionNumber = 1
            ds.Laterality = ""
            ds.NameOfPhysiciansReadingStudy = READER
            ds.PerformingPhysicianName = READER
            ds.OperatorsName = "TECH^" + OPERATOR
            ds.DerivationCodeSequence = Sequence([_deep_item(1)])
            _private_every_vr(ds)
            _overlay_and_curve(ds, ds.Rows, ds.Columns)
            path = out / f"ct{s}_{i:03d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            adv.ct.append(path)
            adv.ct_sop_uids.append(sops[i])
    return adv


def _content(value_type: str, code: tuple[str, str], rel: str = "CONTAINS", **kw) -> Dataset:
    item = Dataset()
    item.RelationshipType = rel
    item.ValueType = value_type
    name = Dataset()
    name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning = code[0], "99SPH", code[1]
    item.ConceptNameCodeSequence = Sequence([name])
    for k, v in kw.items():
        setattr(item, k, v)
    return item


def _sr(out: Path, adv: AdversarialStudy) -> Path:
    ds = Dataset()
    ds.SOPClassUID = ComprehensiveSRStorage
    ds.SOPInstanceUID = uid(5000)
    _meta(ds, ComprehensiveSRStorage)
    _patient_study(ds, adv.study_uid)
    ds.Modality = "SR"
    ds.SeriesInstanceUID = uid(500)
    ds.SeriesNumber = 50
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = STUDY_DATE, "111500"
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "VERIFIED"
    obs = Dataset()
    obs.VerifyingObserverName = READER
    obs.VerifyingOrganization = INSTITUTION
    obs.VerificationDateTime = TZ_DATETIME
    obs.VerifyingObserverIdentificationCodeSequence = Sequence()
    ds.VerifyingObserverSequence = Sequence([obs])
    ref_sop = Dataset()
    ref_sop.ReferencedSOPClassUID = CTImageStorage
    ref_sop.ReferencedSOPInstanceUID = adv.ct_sop_uids[0]
    ref_series = Dataset()
    ref_series.SeriesInstanceUID = adv.series_uids[0]
    ref_series.ReferencedSOPSequence = Sequence([ref_sop])
    evidence = Dataset()
    evidence.StudyInstanceUID = adv.study_uid
    evidence.ReferencedSeriesSequence = Sequence([ref_series])
    ds.CurrentRequestedProcedureEvidenceSequence = Sequence([evidence])
    image = Dataset()
    image.ReferencedSOPClassUID = CTImageStorage
    image.ReferencedSOPInstanceUID = adv.ct_sop_uids[0]
    report_text = (
        f"Mrs {SURNAME.title()} {GIVEN.title()} (MRN{MRN}), seen 05/04/2023 by Dr Okonkwo. "
        "Small white matter lesion, no mass effect."
    )
    deep_text = _content("TEXT", ("T4", "Addendum"), TextValue=f"Called {PATIENT['phone']}")
    level3 = _content("CONTAINER", ("C3", "Level 3"), ContinuityOfContent="SEPARATE")
    level3.ContentSequence = Sequence(
        [deep_text, _content("PNAME", ("P4", "Reader"), PersonName=READER)]
    )
    level2 = _content("CONTAINER", ("C2", "Level 2"), ContinuityOfContent="SEPARATE")
    level2.ContentSequence = Sequence([level3])
    children = [
        _content("TEXT", ("T1", "Finding"), TextValue=report_text),
        _content("PNAME", ("P1", "Referrer"), PersonName=PATIENT["referrer"]),
        _content("DATE", ("D1", "Exam date"), Date=STUDY_DATE),
        _content("DATETIME", ("D2", "Exam time"), DateTime=TZ_DATETIME),
        _content("UIDREF", ("U1", "Study"), UID=adv.study_uid),
        _content("IMAGE", ("I1", "Key image"), ReferencedSOPSequence=Sequence([image])),
        level2,
    ]
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    root = Dataset()
    root.CodeValue, root.CodingSchemeDesignator, root.CodeMeaning = "R1", "99SPH", "Report"
    ds.ConceptNameCodeSequence = Sequence([root])
    ds.ContentSequence = Sequence(children)
    path = out / "sr.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _pr(out: Path, adv: AdversarialStudy) -> Path:
    ds = Dataset()
    ds.SOPClassUID = GrayscaleSoftcopyPresentationStateStorage
    ds.SOPInstanceUID = uid(6000)
    _meta(ds, GrayscaleSoftcopyPresentationStateStorage)
    _patient_study(ds, adv.study_uid)
    ds.Modality = "PR"
    ds.SeriesInstanceUID = uid(600)
    ds.SeriesNumber = 60
    ds.InstanceNumber = 1
    ds.ContentLabel = "ANNOTATION"
    ds.ContentDescription = f"Arrows for {SURNAME.title()}"
    ds.ContentCreatorName = READER
    ds.PresentationCreationDate, ds.PresentationCreationTime = STUDY_DATE, "120000"
    refs = []
    for sop in adv.ct_sop_uids[: len(adv.ct_sop_uids) // 2]:
        r = Dataset()
        r.ReferencedSOPClassUID = CTImageStorage
        r.ReferencedSOPInstanceUID = sop
        refs.append(r)
    series = Dataset()
    series.SeriesInstanceUID = adv.series_uids[0]
    series.ReferencedImageSequence = Sequence(refs)
    ds.ReferencedSeriesSequence = Sequence([series])
    text = Dataset()
    text.UnformattedTextValue = f"{SURNAME} {GIVEN} MRN{MRN} lesion"
    text.AnchorPointAnnotationUnits = "PIXEL"
    text.AnchorPoint = [10.0, 10.0]
    text.AnchorPointVisibility = "Y"
    annotation = Dataset()
    annotation.GraphicLayer = "LAYER1"
    one = Dataset()
    one.ReferencedSOPClassUID = CTImageStorage
    one.ReferencedSOPInstanceUID = adv.ct_sop_uids[1]
    annotation.ReferencedImageSequence = Sequence([one])
    annotation.TextObjectSequence = Sequence([text])
    ds.GraphicAnnotationSequence = Sequence([annotation])
    layer = Dataset()
    layer.GraphicLayer, layer.GraphicLayerOrder = "LAYER1", 1
    ds.GraphicLayerSequence = Sequence([layer])
    ds.PresentationLUTShape = "IDENTITY"
    path = out / "pr.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def make_study(out: Path, *, n: int = 3, size: int = 16) -> AdversarialStudy:
    """Write the adversarial study (2 CT series of `n` slices, an SR, a PR) to `out`."""
    out.mkdir(parents=True, exist_ok=True)
    adv = _ct(out, uid(1), uid(2), n, size)
    adv.sr = _sr(out, adv)
    adv.pr = _pr(out, adv)
    adv.files = [*adv.ct, adv.sr, adv.pr]
    adv.phi = sorted(
        {*PHI, adv.study_uid, adv.frame_uid, *adv.series_uids, *adv.ct_sop_uids}, key=len
    )[::-1]
    return adv


def secondary_capture(path: Path, *, burned_in: str | None, size: int = 32) -> Path:
    """A screen capture of a dose report: pixels with 'text', BurnedInAnnotation as given."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = uid(7000 + size)
    _meta(ds, SecondaryCaptureImageStorage)
    _patient_study(ds, uid(1))
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.SeriesInstanceUID = uid(700)
    ds.SeriesNumber = 70
    ds.InstanceNumber = 1
    ds.SeriesDescription = "Dose Report"
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    pixels = np.full((size, size), 200, dtype=np.uint8)
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path
