"""The engine on the adversarial study: no identity in any byte; data still useful, consistent."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from deid.engine import Deidentifier
from deid.keys import ProjectKeys
from deid.profile import Option, Profile
from tests.adversarial import PATIENT, PRIVATE_CREATOR, STUDY_DATE, TZ_DATETIME, make_study

SECRET = b"engine-test-secret-0123456789abcdef"
CLEAN_ALL = frozenset(
    {
        Option.RETAIN_LONG_MODIFIED_DATES,
        Option.RETAIN_PATIENT_CHARACTERISTICS,
        Option.CLEAN_DESCRIPTORS,
        Option.CLEAN_STRUCTURED_CONTENT,
        Option.CLEAN_GRAPHICS,
    }
)
PROFILES = {
    "default": Profile(),
    "basic": Profile(options=frozenset()),
    "clean-all": Profile(options=CLEAN_ALL),
}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return make_study(tmp_path_factory.mktemp("adversarial"))


def run(files: list[Path], profile: Profile, secret: bytes = SECRET) -> dict[str, Dataset]:
    d = Deidentifier(profile, ProjectKeys(secret))
    return {f.name: d.apply(pydicom.dcmread(f)) for f in files}


def encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("name", PROFILES)
def test_no_planted_identity_survives_in_any_byte(study, name):
    """Names, IDs, dates, addresses, UIDs, device and institution: none in the output files, in
    any letter case, whatever the depth, VR or place they were planted in."""
    out = run(study.files, PROFILES[name])
    hits = []
    for fname, ds in out.items():
        data = encode(ds).lower()
        hits += [(fname, p) for p in study.phi if p.lower().encode() in data]
    assert hits == []
    # The planted strings were really there to be found.
    for f in study.files:
        data = f.read_bytes().lower()
        assert PATIENT["surname"].lower().encode() in data and b"8675309421" in data


def test_images_stay_useful(study):
    """Pixels bit-identical; geometry, rescale, modality, age and sex kept; dates shifted."""
    out = run(study.ct, Profile())
    keys = ProjectKeys(SECRET)
    frames = set()
    for f in study.ct:
        src, ds = pydicom.dcmread(f), out[f.name]
        assert ds.PixelData == src.PixelData
        for kw in (
            "ImagePositionPatient",
            "ImageOrientationPatient",
            "PixelSpacing",
            "SliceThickness",
            "RescaleIntercept",
            "RescaleSlope",
            "Rows",
            "Columns",
            "BitsStored",
            "PixelRepresentation",
            "Modality",
            "PatientSex",
            "PatientAge",
            "SeriesNumber",
            "InstanceNumber",
            "KVP",
        ):
            assert ds[kw].value == src[kw].value, kw
        frames.add(ds.FrameOfReferenceUID)
        assert ds.PatientID == ds.PatientName == keys.pseudonym(PATIENT["id"])
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
        shift = keys.date_shift_days(PATIENT["id"])
        assert -365 <= shift <= -1
        assert ds.StudyDate == ds.ContentDate != STUDY_DATE
        assert ds.AcquisitionDateTime.endswith("101530.123456+0930")  # time and UTC offset kept
        assert ds.AcquisitionDateTime[:8] == ds.StudyDate
        assert "***" in ds.SeriesDescription and "matter survey" in ds.SeriesDescription
        assert "PatientBirthDate" not in ds or not ds.PatientBirthDate
    assert frames == {keys.uid(study.frame_uid)}  # one frame of reference, consistently remapped


def test_references_resolve_across_ct_sr_and_presentation_state(study):
    out = run(study.files, Profile(options=CLEAN_ALL))
    ct = {out[f.name].SOPInstanceUID: out[f.name] for f in study.ct}
    series = {ds.SeriesInstanceUID for ds in ct.values()}
    sr, pr = out["sr.dcm"], out["pr.dcm"]
    assert {ds.StudyInstanceUID for ds in out.values()} == {
        ProjectKeys(SECRET).uid(study.study_uid)
    }
    for ds in out.values():
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID

    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == sr.StudyInstanceUID
    for ref_series in evidence.ReferencedSeriesSequence:
        assert ref_series.SeriesInstanceUID in series
        assert all(r.ReferencedSOPInstanceUID in ct for r in ref_series.ReferencedSOPSequence)
    image_items = [i for i in sr.ContentSequence if i.ValueType == "IMAGE"]
    assert image_items[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID in ct
    uidref = [i for i in sr.ContentSequence if i.ValueType == "UIDREF"][0]
    assert sr.StudyInstanceUID == uidref.UID

    refs = [
        r.ReferencedSOPInstanceUID for r in pr.ReferencedSeriesSequence[0].ReferencedImageSequence
    ]
    assert refs and all(r in ct for r in refs)
    assert pr.ReferencedSeriesSequence[0].SeriesInstanceUID in series
    annotated = pr.GraphicAnnotationSequence[0].ReferencedImageSequence[0]
    assert annotated.ReferencedSOPInstanceUID in ct


def test_sr_and_graphics_text_cleaned_with_the_clean_options(study):
    """Clean Structured Content / Clean Graphics keep text with the identity cut out; without
    them the text is replaced by a dummy (Table E.1-1: D)."""
    cleaned = run([study.sr, study.pr], Profile(options=CLEAN_ALL))
    finding = cleaned["sr.dcm"].ContentSequence[0].TextValue
    # The surname is a common word: it goes wherever it appears, the rest of the report stays.
    assert finding.endswith("*** matter lesion, no mass effect.")
    assert "Rosalind" not in finding and "8675309421" not in finding
    deep = cleaned["sr.dcm"].ContentSequence[6].ContentSequence[0].ContentSequence
    assert deep[0].TextValue.startswith("Called") and "5550" not in deep[0].TextValue
    assert str(deep[1].PersonName) != PATIENT["referrer"]
    graphic = cleaned["pr.dcm"].GraphicAnnotationSequence[0].TextObjectSequence[0]
    assert (
        graphic.UnformattedTextValue.endswith("lesion")
        and "MRN" not in graphic.UnformattedTextValue
    )

    dummy = run([study.sr, study.pr], Profile())
    assert dummy["sr.dcm"].ContentSequence[0].TextValue == "ANONYMIZED"
    assert dummy["sr.dcm"].ContentSequence[0].ConceptNameCodeSequence[0].CodeMeaning == "Finding"
    text = dummy["pr.dcm"].GraphicAnnotationSequence[0].TextObjectSequence[0]
    assert text.UnformattedTextValue == "ANONYMIZED"


def test_same_secret_same_output_other_project_unlinkable(study):
    files = study.files
    first = {k: encode(v) for k, v in run(files, Profile()).items()}
    again = {k: encode(v) for k, v in run(files, Profile()).items()}
    assert first == again
    other = run(files, Profile(), secret=b"another-project-secret-0123456789")
    mine = run(files, Profile())
    for name in mine:
        a, b = mine[name], other[name]
        assert a.SOPInstanceUID != b.SOPInstanceUID and a.PatientID != b.PatientID
        assert a.StudyInstanceUID != b.StudyInstanceUID
    uids_a = {ds.SOPInstanceUID for ds in mine.values()}
    assert not uids_a & {ds.SOPInstanceUID for ds in other.values()}


def test_options_one_by_one_on_real_instances(study):
    ct = study.ct[0]
    src = pydicom.dcmread(ct)

    def one(*opts: Option) -> Dataset:
        return run([ct], Profile(options=frozenset(opts)))[ct.name]

    basic = one()
    assert "StudyDescription" not in basic and "PatientAge" not in basic
    assert basic.StudyDate == "" and basic.LongitudinalTemporalInformationModified == "REMOVED"
    assert "DeviceSerialNumber" not in basic and "InstitutionName" not in basic
    full = one(Option.RETAIN_LONG_FULL_DATES)
    assert full.StudyDate == STUDY_DATE and full.AcquisitionDateTime == TZ_DATETIME
    assert full.LongitudinalTemporalInformationModified == "UNMODIFIED"
    assert one(Option.RETAIN_DEVICE_IDENTITY).DeviceSerialNumber == src.DeviceSerialNumber
    assert one(Option.RETAIN_INSTITUTION_IDENTITY).InstitutionName == src.InstitutionName
    chars = one(Option.RETAIN_PATIENT_CHARACTERISTICS)
    assert chars.PatientAge == src.PatientAge and chars.PatientSex == src.PatientSex
    uids = one(Option.RETAIN_UIDS)
    assert uids.SOPInstanceUID == src.SOPInstanceUID
    assert uids.FrameOfReferenceUID == src.FrameOfReferenceUID
    desc = one(Option.CLEAN_DESCRIPTORS)
    assert desc.StudyDescription.startswith("CT HEAD") and "White" not in desc.StudyDescription


def test_safe_private_attributes_kept_only_when_listed(study):
    ct = study.ct[0]
    profile = Profile(
        options=frozenset({Option.RETAIN_SAFE_PRIVATE}),
        safe_private=frozenset({(PRIVATE_CREATOR, "(0011,xx18)")}),  # the FL attribute
    )
    ds = run([ct], profile)[ct.name]
    private = [e for e in ds if e.tag.is_private]
    assert sorted(e.tag for e in private) == [0x00110010, 0x00111018]
    assert ds[0x00111018].value == 1.5
    assert not [e for e in run([ct], Profile())[ct.name] if e.tag.is_private]


def test_mappings_collected_for_the_vault(study):
    keys = ProjectKeys(SECRET)
    batches: list = []
    d = Deidentifier(Profile(), keys, sink=batches.append, batch=4)
    for f in study.files:
        d.apply(pydicom.dcmread(f))
    d.flush()
    found = {m for b in batches for m in b}
    assert ("patient", PATIENT["id"], keys.pseudonym(PATIENT["id"])) in found
    assert ("study", study.study_uid, keys.uid(study.study_uid)) in found
    assert {("sop", u, keys.uid(u)) for u in study.ct_sop_uids} <= found
    assert len({m[2] for m in found}) == len(found)  # each pseudonym once


def test_report_counts_what_each_rule_did(study):
    d = Deidentifier(Profile(), ProjectKeys(SECRET), report=True)
    for f in study.ct:
        d.apply(pydicom.dcmread(f))
    # Patient's Name: at the top level and in each of the five nested levels.
    assert d.stats[(0x00100010, "Z")] == 6 * len(study.ct)
    assert d.stats[(0x0020000D, "U")] == len(study.ct)
    assert d.stats[("private", "X")] > len(study.ct) * 30


def test_implicit_vr_input_is_handled_like_explicit(study, tmp_path):
    """Implicit VR data carries no VRs: the dictionary's are used, private data goes as UN."""
    for f in study.ct[:2]:
        ds = pydicom.dcmread(f)
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        ds.save_as(tmp_path / f.name, enforce_file_format=True)
    files = [tmp_path / f.name for f in study.ct[:2]]
    assert pydicom.dcmread(files[0]).get_item(0x00100010).VR is None  # really implicit
    out = run(files, Profile())
    explicit = run(study.ct[:2], Profile())
    for name, ds in out.items():
        data = encode(ds).lower()
        assert not [p for p in study.phi if p.lower().encode() in data]
        assert ds.SOPInstanceUID == explicit[name].SOPInstanceUID
        assert ds.StudyDescription == explicit[name].StudyDescription


def test_names_in_other_character_sets_are_found_in_text(study):
    ds = pydicom.dcmread(study.ct[0])
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "MÜLLER^JÖRG"
    ds.StudyDescription = "CT für Müller, Jörg"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    out = Deidentifier(Profile(), ProjectKeys(SECRET)).apply(
        pydicom.dcmread(io.BytesIO(buf.getvalue()))
    )
    assert out.StudyDescription == "CT für ***, ***"
    data = encode(out)
    for word in ("MÜLLER", "Müller", "JÖRG", "Jörg"):
        assert word.encode("utf-8") not in data


def test_conditional_actions_follow_the_iod_else_the_stronger(study):
    """Z/D, X/D, X/Z/U*...: resolved from the attribute's type in the IOD where known."""
    basic = Profile(options=frozenset())
    out = run([study.ct[0], study.sr, study.pr], basic)
    ct, sr, pr = out[study.ct[0].name], out["sr.dcm"], out["pr.dcm"]
    assert ct.ContentDate == ""  # Z/D, type 2C in General Image: Z
    assert sr.ContentDate == "19000101"  # Z/D, type 1 in SR Document General: D
    assert pr.ContentCreatorName == ""  # Z/D, type 2 in Presentation State Identification
    assert "DeviceSerialNumber" not in ct  # X/Z/D, type 3 in General Equipment: X
    assert sr.ReferencedPerformedProcedureStepSequence == []  # X/Z/D, type 2 in SR: Z
    # X/Z/U*, type 1 inside a presentation state's Referenced Series Sequence: kept, remapped
    assert len(pr.ReferencedSeriesSequence[0].ReferencedImageSequence) == len(study.ct) // 2
    unknown = pydicom.dcmread(study.ct[0])
    unknown.SOPClassUID = "1.2.826.0.1.3680043.99.1"  # an IOD we know nothing of
    ds = Deidentifier(basic, ProjectKeys(SECRET)).apply(unknown)
    assert ds.ContentDate == "" and "DeviceSerialNumber" not in ds  # Z/D -> Z, X/Z/D -> X


def test_private_sop_class_uids_are_kept(study):
    """A vendor's SOP class says what the object is, not whose (PS3.15 keeps SOP Class UID):
    kept in the dataset, the file meta and references; instance UIDs beside them still go."""
    private_class = "1.3.12.2.1107.5.9.1"  # a vendor's private storage class
    ds = pydicom.dcmread(study.ct[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = private_class
    ref = Dataset()
    ref.ReferencedSOPClassUID = private_class
    ref.ReferencedSOPInstanceUID = "1.2.250.1.59.4242.77.1"
    ds.ReferencedInstanceSequence = [ref]  # not listed by the table: kept, walked
    out = Deidentifier(Profile(), ProjectKeys(SECRET)).apply(ds)
    assert out.SOPClassUID == private_class
    assert out.file_meta.MediaStorageSOPClassUID == private_class
    assert out.ReferencedInstanceSequence[0].ReferencedSOPClassUID == private_class
    # The control: a non-DICOM UID in the same item is an identifier, and is replaced.
    assert out.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID.startswith("2.25.")
    assert out.SOPInstanceUID.startswith("2.25.")
