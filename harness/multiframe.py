"""Multi-frame and colour DICOM samples with planted identifiers, as modalities write them.

From one phantom volume (harness.phantoms) `write_samples` writes the classic CT series
(harness.phantom_dicom) and, in the same study, the same volume as one Enhanced CT instance
(per-frame functional groups: plane positions, frame content; shared: orientation, pixel
measures, rescale, or rescale per frame), so the two can be compared voxel for voxel. In other
series of that study: a colour ultrasound cine (YBR_FULL_422 in JPEG Baseline, as scanners send
it), an RGB ultrasound cine (native), a native YBR_FULL ultrasound image, a palette-colour
ultrasound image, a monochrome XA cine and a DX radiograph (MONOCHROME1, 12 bits in 16).
On request (`only`), the same volume as one Enhanced MR instance (the Enhanced CT's geometry
and frames, MR's modules), to be compared with the classic series the same way.

Identifiers are planted inside the functional groups too (frame comments, frame date-times,
a private block, referenced SOP Instance UIDs); every one is listed in `MultiFrameStudy.phi`.
`MultiFrameSample.pixels` is what a reader of the file gets: (frames, rows, cols[, 3]), RGB for
colour (the JPEG decoded as pydicom decodes it, the palette applied), stored values otherwise.
"""

from __future__ import annotations

import copy
import io
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_color_lut, convert_color_space
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DigitalXRayImageStorageForPresentation,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    XRayAngiographicImageStorage,
)

from harness.phantom_dicom import PhantomStudy, _header, _identity, _uid, write_phantom_study
from harness.phantoms import PhantomTruth
from harness.synthetic import HOSPITAL_ROOT

FRAME_TIME_MS = 33.3  # ~30 frames a second, as ultrasound and cardiac XA cines run
_FRAME_TIME_TAG = 0x00181063  # FrameIncrementPointer's target
OPT_IN = ("enhanced_mr",)  # samples written only when `only` names them


@dataclass
class MultiFrameSample:
    """One instance written: where, what, and the pixels a reader must get back."""

    name: str
    path: Path
    sop_class: str
    sop_uid: str
    series_uid: str
    photometric: str  # as written
    pixels: np.ndarray  # (frames, rows, cols[, 3]); RGB for colour
    transfer_syntax: str = ExplicitVRLittleEndian
    frame_time_ms: float | None = None

    @property
    def n_frames(self) -> int:
        return int(self.pixels.shape[0])


@dataclass
class MultiFrameStudy:
    """The classic CT series, and the multi-frame and colour samples of the same study."""

    classic: PhantomStudy
    samples: dict[str, MultiFrameSample] = field(default_factory=dict)
    phi: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        return [*self.classic.files, *(s.path for s in self.samples.values())]

    @property
    def accession(self) -> str:
        return self.classic.accession

    @property
    def study_uid(self) -> str:
        return self.classic.study_uid


def write_samples(
    volume: np.ndarray,
    truth: PhantomTruth,
    out_dir: Path,
    *,
    index: int = 0,
    seed: int = 0,
    intercept: float = -1024.0,
    per_frame_rescale: bool = False,
    reverse_frames: bool = False,
    cine_frames: int = 6,
    cine_shape: tuple[int, int] = (48, 64),
    burned_in_text: bool = False,
    enhanced_parts: int = 1,
    only: tuple[str, ...] | None = None,
) -> MultiFrameStudy:
    """Write the classic CT of `volume` and the multi-frame and colour samples of its study.

    `per_frame_rescale` gives every other Enhanced CT frame another intercept (in the
    per-frame groups); `reverse_frames` writes its frames from head to feet. With
    `burned_in_text` the ultrasound and XA images carry the patient's name in their top rows
    and BurnedInAnnotation YES (for the blanking policy); otherwise they say NO.
    `enhanced_parts` > 1 splits the Enhanced CT into that many instances of one series, frames
    dealt out in turn (samples "enhanced_ct", "enhanced_ct_2", ...). `only` limits
    the samples written (names of `MultiFrameStudy.samples`); those of `OPT_IN` are written
    only when named there.
    """
    out_dir = Path(out_dir)
    classic = write_phantom_study(
        volume, truth, out_dir / "classic", index=index, seed=seed, intercept=intercept
    )
    who = _identity(random.Random(f"phantom {seed} {index}"), index)  # the classic's identity
    rng = random.Random(f"multiframe {seed} {index}")
    study = MultiFrameStudy(classic)
    phi: list[str] = list(classic.phi)
    writers = {
        "enhanced_ct": lambda d: _enhanced_ct(
            volume, truth, d, who, rng, classic, intercept, per_frame_rescale, reverse_frames
        ),
        "us_cine_ybr422": lambda d: _us_cine(d, who, rng, cine_frames, cine_shape, "jpeg"),
        "us_cine_rgb": lambda d: _us_cine(d, who, rng, cine_frames, cine_shape, "rgb"),
        "sc_ybr_full": lambda d: _us_cine(d, who, rng, 1, cine_shape, "ybr_full"),
        "us_palette": lambda d: _us_palette(d, who, rng, cine_shape),
        "xa_cine": lambda d: _xa_cine(d, who, rng, cine_frames, cine_shape),
        "dx": lambda d: _dx(d, who, rng),
        "enhanced_mr": lambda d: _enhanced_mr(volume, truth, d, who, rng, classic, intercept),
    }
    for number, (name, write) in enumerate(writers.items(), start=2):
        if (only is None and name in OPT_IN) or (only is not None and name not in only):
            continue
        ds, expected = write(out_dir / name)
        ds.SeriesNumber = number
        ds.InstanceNumber = 1
        if burned_in_text and name not in ("enhanced_ct", "enhanced_mr", "dx"):
            expected = _burn_in(ds, expected, who["name"])
        parts = [(ds, expected)]
        if name == "enhanced_ct" and enhanced_parts > 1:
            parts = _split(ds, expected, enhanced_parts, rng)
        for i, (part, pixels) in enumerate(parts, start=1):
            key = name if i == 1 else f"{name}_{i}"
            study.samples[key] = _save(key, part, pixels, out_dir / name)
            phi += _hospital_uids(part)
    for k in ("id", "surname", "given", "birth_date", "address", "phone", "accession"):
        phi.append(who[k])
    study.phi = sorted(set(phi), key=len, reverse=True)
    return study


def _hospital_uids(ds: Dataset) -> list[str]:
    """Every UID of the hospital's in `ds`, sequences included (all are identifiers)."""
    found: list[str] = []

    def visit(d: Dataset, elem: DataElement) -> None:
        if elem.VR == "UI" and elem.value:
            values = elem.value if elem.VM > 1 else [elem.value]
            found.extend(str(v) for v in values if str(v).startswith(HOSPITAL_ROOT))

    ds.walk(visit)
    return found


def _base(who: dict[str, str], rng: random.Random, sop_class: str, modality: str) -> Dataset:
    """The phantom's header (identifiers planted) made into `modality`'s, new series and SOP."""
    sop = _uid(rng)
    ds = _header(who, sop, 0)
    for kw in ("RescaleIntercept", "RescaleSlope", "RescaleType", "WindowCenter", "WindowWidth"):
        if kw in ds:
            delattr(ds, kw)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.Modality = modality
    ds.SeriesInstanceUID = _uid(rng)
    ds.ContentTime = "101700"
    if modality not in ("CT", "DX"):  # which say laterality per frame or image instead
        ds.Laterality = ""  # Type 2C: the abdomen and chest are not paired
    if modality != "CT":
        ds.PatientOrientation = ""  # Type 2C: no patient-frame geometry
    return ds


def _enhanced_ct(
    volume: np.ndarray,
    truth: PhantomTruth,
    out: Path,
    who: dict[str, str],
    rng: random.Random,
    classic: PhantomStudy,
    intercept: float,
    per_frame_rescale: bool,
    reverse: bool,
) -> tuple[Dataset, np.ndarray]:
    """The volume as one Enhanced CT Image (PS3.3 A.38), frames in the classic's order."""
    ds = _base(who, rng, EnhancedCTImageStorage, "CT")
    for kw in ("SliceLocation", "PatientPosition"):
        if kw in ds:
            delattr(ds, kw)
    ds.PatientPosition = "FFS"
    ds.AcquisitionNumber = 1
    ds.AcquisitionDateTime = who["date"] + "101600"
    ds.AcquisitionDuration = 4.2
    ds.ContentQualification = "PRODUCT"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.AcquisitionContextSequence = Sequence([])
    ds.SeriesDescription = "ENHANCED CT " + who["surname"]
    ds.DeviceSerialNumber = "SN" + who["id"][-5:]
    ds.SoftwareVersions = "1.0"
    ds.KVP = 120.0
    a = np.asarray(truth.affine, dtype=float)
    sz, sy, sx = (float(v) for v in np.linalg.norm(a[:3, :3], axis=0))
    row_dir, col_dir = a[:3, 2] / sx, a[:3, 1] / sy
    nz, ny, nx = volume.shape
    ds.Rows, ds.Columns = ny, nx
    ds.PixelRepresentation = 1
    ds.NumberOfFrames = nz
    ds.FrameOfReferenceUID = who["frame_uid"]

    shared = Dataset()
    spacing = [round(sy, 6), round(sx, 6)]
    thickness = round(sz, 4)
    shared.PixelMeasuresSequence = _seq(
        PixelSpacing=spacing, SliceThickness=thickness, SpacingBetweenSlices=thickness
    )
    orientation = [round(float(v), 6) for v in (*row_dir, *col_dir)]
    shared.PlaneOrientationSequence = _seq(ImageOrientationPatient=orientation)
    _frame_type(ds, shared, "CTImageFrameTypeSequence", ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"])
    shared.FrameVOILUTSequence = _seq(WindowCenter=40, WindowWidth=400)
    _ct_acquisition(shared, rng, sy, sx)
    if not per_frame_rescale:
        shared.PixelValueTransformationSequence = Sequence([_rescale(intercept)])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])

    order = list(range(nz))[::-1] if reverse else list(range(nz))
    frames = []
    per_frame = []
    for n, k in enumerate(order):
        icpt = intercept + (24.0 if per_frame_rescale and n % 2 else 0.0)
        stored = volume[k].astype(np.int32) - int(round(icpt))
        frames.append(stored.astype(np.int16))
        item = Dataset()
        acquired = f"{who['date']}1016{k % 60:02d}"
        item.FrameContentSequence = _seq(
            FrameAcquisitionDateTime=acquired,
            FrameReferenceDateTime=acquired,
            FrameAcquisitionDuration=50.0,
            StackID="1",
            InStackPositionNumber=k + 1,
            DimensionIndexValues=[1, k + 1],
            FrameComments=f"Slice {k + 1} for {who['surname']}",
        )
        ipp = a @ np.array([k, 0.0, 0.0, 1.0])
        item.PlanePositionSequence = _seq(
            ImagePositionPatient=[round(float(v), 4) for v in ipp[:3]]
        )
        if per_frame_rescale:
            item.PixelValueTransformationSequence = Sequence([_rescale(icpt)])
        z = round(float(ipp[2]), 4)  # CT Position: where the table and the reconstruction were
        item.CTPositionSequence = _seq(
            TablePosition=z,
            ReconstructionTargetCenterPatient=[0.0, 0.0, z],
            DataCollectionCenterPatient=[0.0, 0.0, z],
        )
        block = item.private_block(0x0029, "ACME CT 1.0", create=True)
        block.add_new(0x11, "SH", who["id"])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    dim_uid = _uid(rng)
    ds.DimensionOrganizationSequence = _seq(DimensionOrganizationUID=dim_uid)
    ds.DimensionIndexSequence = Sequence(
        [
            _dimension(dim_uid, 0x00209056, 0x00209111, "Stack ID"),
            _dimension(dim_uid, 0x00209057, 0x00209111, "In-Stack Position Number"),
        ]
    )
    ds.DimensionOrganizationType = "3D"
    stack = np.stack(frames)
    ds.PixelData = stack.tobytes()
    for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if kw in ds:
            delattr(ds, kw)
    return ds, stack


def _enhanced_mr(
    volume: np.ndarray,
    truth: PhantomTruth,
    out: Path,
    who: dict[str, str],
    rng: random.Random,
    classic: PhantomStudy,
    intercept: float,
) -> tuple[Dataset, np.ndarray]:
    """The volume as one Enhanced MR Image (PS3.3 A.36.2): the Enhanced CT's frames and
    geometry groups, MR's frame type, timing, echo, coils and pulse sequence instead of CT's.
    Each frame also references its classic slice (a hospital UID in the per-frame groups)."""
    ds, stack = _enhanced_ct(volume, truth, out, who, rng, classic, intercept, False, False)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(_uid(rng))
    ds.SeriesInstanceUID = _uid(rng)
    ds.Modality = "MR"
    ds.ManufacturerModelName = "PHANTOM-MR"
    ds.SeriesDescription = "ENHANCED MR " + who["surname"]
    del ds.KVP
    shared = ds.SharedFunctionalGroupsSequence[0]
    for keyword in [k for k in shared.dir() if k.startswith("CT")]:
        delattr(shared, keyword)
    del shared.IrradiationEventIdentificationSequence
    shared.PixelValueTransformationSequence[0].RescaleType = "US"
    _mr_acquisition(ds, shared)
    slices = [str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in classic.files]
    purpose = _code("121311", "DCM", "Localizer")
    for k, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        del item.CTPositionSequence
        ref = _item(ReferencedSOPClassUID="1.2.840.10008.5.1.4.1.1.2")
        ref.ReferencedSOPInstanceUID = slices[k]  # frame k is slice k
        ref.PurposeOfReferenceCodeSequence = Sequence([purpose])
        item.ReferencedImageSequence = Sequence([ref])
    sops = [
        _item(ReferencedSOPClassUID="1.2.840.10008.5.1.4.1.1.2", ReferencedSOPInstanceUID=u)
        for u in slices
    ]
    series = _item(SeriesInstanceUID=classic.series_uid, ReferencedSOPSequence=Sequence(sops))
    ds.ReferencedImageEvidenceSequence = _seq(
        StudyInstanceUID=classic.study_uid, ReferencedSeriesSequence=Sequence([series])
    )
    return ds, stack


def _mr_acquisition(ds: Dataset, shared: Dataset) -> None:
    """Enhanced MR Image and MR Pulse Sequence modules, and the MR functional groups a scanner
    fills once for a T1 spin-echo acquisition (PS3.3 C.8.13)."""
    ds.ResonantNucleus = "1H"
    ds.KSpaceFiltering = "NONE"
    ds.MagneticFieldStrength = 1.5
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.PulseSequenceName = "SE_T1"
    ds.MRAcquisitionType = "2D"
    ds.EchoPulseSequence = "SPIN"
    ds.MultipleSpinEcho = "NO"
    ds.MultiPlanarExcitation = "YES"
    ds.PhaseContrast = "NO"
    ds.TimeOfFlightContrast = "NO"
    ds.SteadyStatePulseSequence = "NONE"
    ds.EchoPlanarPulseSequence = "NO"
    ds.SaturationRecovery = "NO"
    ds.SpectrallySelectedSuppression = "NONE"
    ds.OversamplingPhase = "NONE"
    ds.GeometryOfKSpaceTraversal = "RECTILINEAR"
    ds.RectilinearPhaseEncodeReordering = "LINEAR"
    ds.SegmentedKSpaceTraversal = "SINGLE"
    ds.NumberOfKSpaceTrajectories = 1
    mr_type = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    _frame_type(
        ds,
        shared,
        "MRImageFrameTypeSequence",
        mr_type,
        ComplexImageComponent="MAGNITUDE",
        AcquisitionContrast="T1",
    )
    shared.MRTimingAndRelatedParametersSequence = _seq(
        RepetitionTime=500.0,
        FlipAngle=90.0,
        EchoTrainLength=1,
        RFEchoTrainLength=1,
        GradientEchoTrainLength=0,
        SpecificAbsorptionRateSequence=_seq(
            SpecificAbsorptionRateDefinition="IEC_WHOLE_BODY", SpecificAbsorptionRateValue=0.8
        ),
        OperatingModeSequence=_seq(OperatingModeType="STATIC FIELD", OperatingMode="IEC_NORMAL"),
    )
    shared.MRFOVGeometrySequence = _seq(
        InPlanePhaseEncodingDirection="COLUMN",
        MRAcquisitionFrequencyEncodingSteps=int(ds.Columns),
        MRAcquisitionPhaseEncodingStepsInPlane=int(ds.Rows),
        PercentSampling=100.0,
        PercentPhaseFieldOfView=100.0,
    )
    shared.MREchoSequence = _seq(EffectiveEchoTime=15.0)
    shared.MRModifierSequence = _seq(
        InversionRecovery="NO",
        FlowCompensation="NONE",
        Spoiling="NONE",
        T2Preparation="NO",
        SpectrallySelectedExcitation="NONE",
        SpatialPresaturation="NONE",
        PartialFourier="NO",
        ParallelAcquisition="NO",
    )
    shared.MRImagingModifierSequence = _seq(
        MagnetizationTransfer="NONE",
        BloodSignalNulling="NO",
        Tagging="NONE",
        TransmitterFrequency=63.87,
        PixelBandwidth=130.0,
    )
    shared.MRReceiveCoilSequence = _seq(
        ReceiveCoilName="BODY",
        ReceiveCoilManufacturerName="SPHERE PHANTOM",
        ReceiveCoilType="BODY",
        QuadratureReceiveCoil="YES",
    )
    shared.MRTransmitCoilSequence = _seq(
        TransmitCoilName="BODY",
        TransmitCoilManufacturerName="SPHERE PHANTOM",
        TransmitCoilType="BODY",
    )
    shared.MRAveragesSequence = _seq(NumberOfAverages=1.0)


def _split(
    ds: Dataset, frames: np.ndarray, parts: int, rng: random.Random
) -> list[tuple[Dataset, np.ndarray]]:
    """One enhanced instance as `parts` instances of its series, frames dealt out in turn."""
    out = []
    groups = list(ds.PerFrameFunctionalGroupsSequence)
    for j in range(parts):
        part = copy.deepcopy(ds)
        part.SOPInstanceUID = part.file_meta.MediaStorageSOPInstanceUID = UID(_uid(rng))
        part.InstanceNumber = j + 1
        part.PerFrameFunctionalGroupsSequence = Sequence(groups[j::parts])
        part.NumberOfFrames = len(part.PerFrameFunctionalGroupsSequence)
        part.PixelData = np.ascontiguousarray(frames[j::parts]).tobytes()
        out.append((part, frames[j::parts]))
    return out


def _seq(**values: object) -> Sequence:
    """A one-item sequence of these values: the form of a functional group macro."""
    return Sequence([_item(**values)])


def _frame_type(
    ds: Dataset, shared: Dataset, keyword: str, image_type: list[str], **values: object
) -> None:
    """The image's type, said at the top and again in the frame type macro of the shared
    groups (`keyword`), as Enhanced CT and MR both do."""
    values = {
        "PixelPresentation": "MONOCHROME",
        "VolumetricProperties": "VOLUME",
        "VolumeBasedCalculationTechnique": "NONE",
        **values,
    }
    ds.ImageType = image_type
    for name, value in values.items():
        setattr(ds, name, value)
    setattr(shared, keyword, _seq(FrameType=list(image_type), **values))


def _item(**values: object) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    return _item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


def _ct_acquisition(shared: Dataset, rng: random.Random, sy: float, sx: float) -> None:
    """The Enhanced CT macros a scanner fills once for the whole acquisition (PS3.3 C.8.15.3),
    with the irradiation event's UID: a hospital UID inside the shared groups."""
    shared.CTAcquisitionTypeSequence = _seq(
        AcquisitionType="SPIRAL", ConstantVolumeFlag="NO", FluoroscopyFlag="NO"
    )
    shared.CTAcquisitionDetailsSequence = _seq(
        DataCollectionDiameter=500.0,
        GantryDetectorTilt=0.0,
        TableHeight=150.0,
        RotationDirection="CW",
        RevolutionTime=0.5,
        SingleCollimationWidth=0.625,
        TotalCollimationWidth=40.0,
    )
    shared.CTTableDynamicsSequence = _seq(
        TableSpeed=80.0, TableFeedPerRotation=40.0, SpiralPitchFactor=1.0
    )
    shared.CTGeometrySequence = _seq(
        DistanceSourceToDetector=1085.6, DistanceSourceToDataCollectionCenter=595.0
    )
    shared.CTReconstructionSequence = _seq(
        ReconstructionAlgorithm="FILTER_BACK_PROJ",
        ConvolutionKernel="B30F",
        ConvolutionKernelGroup="SOFT_TISSUE",
        ReconstructionDiameter=500.0,
        ReconstructionPixelSpacing=[round(sy, 6), round(sx, 6)],
        ReconstructionAngle=360.0,
        ImageFilter="NONE",
    )
    shared.CTExposureSequence = _seq(
        ExposureTimeInms=500.0,
        XRayTubeCurrentInmA=200.0,
        ExposureInmAs=100.0,
        ExposureModulationType="NONE",
        CTDIvol=10.0,
    )
    shared.CTXRayDetailsSequence = _seq(
        KVP=120.0, FocalSpots=[1.2], FilterType="FLAT", FilterMaterial="ALUMINUM"
    )
    shared.FrameAnatomySequence = _seq(
        AnatomicRegionSequence=Sequence([_code("818981001", "SCT", "Abdomen")]),
        FrameLaterality="U",
    )
    shared.IrradiationEventIdentificationSequence = _seq(IrradiationEventUID=_uid(rng))


def _rescale(intercept: float) -> Dataset:
    return _item(RescaleIntercept=intercept, RescaleSlope=1, RescaleType="HU")


def _dimension(org_uid: str, pointer: int, group: int, label: str) -> Dataset:
    return _item(
        DimensionOrganizationUID=org_uid,
        DimensionIndexPointer=pointer,
        FunctionalGroupPointer=group,
        DimensionDescriptionLabel=label,
    )


def _cine_rgb(n: int, shape: tuple[int, int], seed: int) -> np.ndarray:
    """A B-mode-like grey fan with a red/blue Doppler blob moving across it, uint8 RGB."""
    rows, cols = shape
    y, x = np.mgrid[0:rows, 0:cols]
    rng = np.random.default_rng(seed)
    grey = (60 + 80 * np.exp(-(((x - cols / 2) / (cols / 3)) ** 2)) * (y / rows)).astype(float)
    out = np.empty((n, rows, cols, 3), dtype=np.uint8)
    for f in range(n):
        img = np.repeat((grey + rng.normal(0, 6, grey.shape))[..., None], 3, axis=2)
        cx, cy = cols * (0.3 + 0.4 * f / max(n - 1, 1)), rows * 0.55
        blob = ((x - cx) ** 2 + (y - cy) ** 2) <= (min(rows, cols) / 6) ** 2
        img[blob] = (200, 40, 30) if f % 2 == 0 else (30, 60, 210)
        out[f] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def _multiframe(ds: Dataset, n: int) -> None:
    ds.NumberOfFrames = n
    ds.FrameTime = FRAME_TIME_MS
    ds.FrameIncrementPointer = _FRAME_TIME_TAG
    ds.CineRate = round(1000 / FRAME_TIME_MS)
    ds.RecommendedDisplayFrameRate = ds.CineRate


def _us_cine(
    out: Path, who: dict[str, str], rng: random.Random, n: int, shape: tuple[int, int], kind: str
) -> tuple[Dataset, np.ndarray]:
    """An ultrasound cine (or single image when n == 1) in colour: JPEG YBR_FULL_422 or native
    RGB; or a secondary capture of the same in native YBR_FULL, colour by plane (the US image
    module no longer allows YBR_FULL)."""
    if kind == "ybr_full":
        ds = _base(who, rng, SecondaryCaptureImageStorage, "OT")
        ds.ConversionType = "WSD"
    else:
        sop_class = UltrasoundMultiFrameImageStorage if n > 1 else UltrasoundImageStorage
        ds = _base(who, rng, sop_class, "US")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "ABDOMINAL", "0001"]
    ds.SeriesDescription = f"US CINE {kind.upper()}"
    ds.Rows, ds.Columns = shape
    ds.SamplesPerPixel = 3
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PlanarConfiguration = 0
    ds.LossyImageCompression = "00"
    if n > 1:
        _multiframe(ds, n)
    rgb = _cine_rgb(n, shape, rng.randrange(2**31))
    if kind == "jpeg":
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        ds.LossyImageCompressionRatio = 10
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.PixelData = encapsulate([_jpeg(f) for f in rgb])
        ds["PixelData"].VR = "OB"
        return ds, rgb  # replaced by the decoded pixels in _save
    if kind == "ybr_full":
        ds.PhotometricInterpretation = "YBR_FULL"
        ds.PlanarConfiguration = 1
        ds.PixelData = _ybr_planar(rgb)
        return ds, rgb
    ds.PhotometricInterpretation = "RGB"
    ds.PixelData = rgb.tobytes()
    return ds, rgb


def _ybr_planar(rgb: np.ndarray) -> bytes:
    """RGB frames as YBR_FULL, colour by plane (Y, then Cb, then Cr, frame after frame)."""
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    return np.ascontiguousarray(np.moveaxis(ybr, -1, -3)).tobytes()


def _jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # subsampling 1 is 4:2:2 (two luminance samples per chrominance pair): YBR_FULL_422
    Image.fromarray(rgb, "RGB").save(buf, "JPEG", quality=92, subsampling=1)
    return buf.getvalue()


def _us_palette(
    out: Path, who: dict[str, str], rng: random.Random, shape: tuple[int, int]
) -> tuple[Dataset, np.ndarray]:
    """A palette-colour ultrasound image: 8-bit indices, 16-bit LUT entries (value * 257)."""
    ds = _base(who, rng, UltrasoundImageStorage, "US")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "ABDOMINAL", "0002"]
    ds.SeriesDescription = "US PALETTE"
    ds.Rows, ds.Columns = shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "00"
    i = np.arange(256)
    lut = np.stack([i, 255 - i, (i * 7) % 256]).astype(np.uint16)  # r, g, b
    for colour, values in zip(("Red", "Green", "Blue"), lut, strict=True):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        ds.add_new(
            {"Red": 0x00281201, "Green": 0x00281202, "Blue": 0x00281203}[colour],
            "OW",
            (values * 257).astype("<u2").tobytes(),
        )
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]]
    index = ((x * 255) // max(shape[1] - 1, 1)).astype(np.uint8)
    index[y < 4] = 7
    ds.PixelData = index.tobytes()
    rgb = lut.T[index].astype(np.uint8)
    return ds, rgb[None]


def _xa_cine(
    out: Path, who: dict[str, str], rng: random.Random, n: int, shape: tuple[int, int]
) -> tuple[Dataset, np.ndarray]:
    """A monochrome XA cine: a contrast-filled vessel filling frame by frame, 8 bits."""
    ds = _base(who, rng, XRayAngiographicImageStorage, "XA")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "SINGLE PLANE"]
    ds.SeriesDescription = "XA CORONARY"
    ds.Rows, ds.Columns = shape
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelIntensityRelationship = "LIN"
    ds.PositionerPrimaryAngle = 30.0
    ds.PositionerSecondaryAngle = 20.0
    ds.DistanceSourceToDetector = 1100.0
    ds.RadiationSetting = "GR"
    ds.KVP = 80.0
    ds.XRayTubeCurrent = 500
    ds.ExposureTime = 6
    ds.Exposure = 3
    ds.PositionerMotion = "STATIC"
    ds.LossyImageCompression = "00"
    _multiframe(ds, n)
    rows, cols = shape
    y, x = np.mgrid[0:rows, 0:cols]
    g = np.random.default_rng(rng.randrange(2**31))
    frames = np.empty((n, rows, cols), dtype=np.uint8)
    for f in range(n):
        img = 170 + g.normal(0, 5, shape)
        vessel = (np.abs(y - rows / 2 - 6 * np.sin(x / 9)) < 3) & (x < cols * (f + 1) / n)
        img[vessel] = 60
        frames[f] = np.clip(img, 0, 255).astype(np.uint8)
    ds.PixelData = frames.tobytes()
    return ds, frames


def _dx(out: Path, who: dict[str, str], rng: random.Random) -> tuple[Dataset, np.ndarray]:
    """A DX chest radiograph, for presentation: MONOCHROME1, 12 bits stored in 16."""
    ds = _base(who, rng, DigitalXRayImageStorageForPresentation, "DX")
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SeriesDescription = "CHEST PA"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PhotometricInterpretation = "MONOCHROME1"
    rows, cols = 96, 80
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.ImagerPixelSpacing = [0.4, 0.4]
    ds.PixelSpacing = [0.4, 0.4]
    ds.ViewPosition = "PA"
    ds.BodyPartExamined = "CHEST"
    ds.PatientOrientation = ["L", "F"]
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.LossyImageCompression = "00"
    ds.ImageLaterality = "U"
    ds.AnatomicRegionSequence = Sequence([_code("51185008", "SCT", "Chest")])
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = -1
    ds.PresentationLUTShape = "INVERSE"  # MONOCHROME1
    ds.DetectorType = "SCINTILLATOR"
    ds.PositionerType = "NONE"
    ds.AcquisitionContextSequence = Sequence([])
    for kw in (
        "ImageOrientationPatient",
        "ImagePositionPatient",
        "FrameOfReferenceUID",
        "PositionReferenceIndicator",
    ):
        if kw in ds:
            delattr(ds, kw)
    y, x = np.mgrid[0:rows, 0:cols]
    lungs = ((x - cols * 0.3) / (cols * 0.18)) ** 2 + ((y - rows * 0.5) / (rows * 0.35)) ** 2 < 1
    lungs |= ((x - cols * 0.7) / (cols * 0.18)) ** 2 + ((y - rows * 0.5) / (rows * 0.35)) ** 2 < 1
    img = np.full((rows, cols), 3000, dtype=np.uint16)  # MONOCHROME1: bright is low attenuation
    img[lungs] = 900
    img[:, cols // 2 - 3 : cols // 2 + 3] = 3900  # the spine
    ds.PixelData = img.tobytes()
    return ds, img[None]


def _burn_in(ds: Dataset, expected: np.ndarray, text: str) -> np.ndarray:
    """Draw `text` in white in the top 12 rows of every frame; BurnedInAnnotation YES."""
    ds.BurnedInAnnotation = "YES"
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        frames = expected.copy()
        for f in frames:
            _draw(f, text)
        ds.PixelData = encapsulate([_jpeg(f) for f in frames])
        ds["PixelData"].VR = "OB"
        return frames
    photometric = ds.PhotometricInterpretation
    frames = expected.copy()
    for f in frames:
        _draw(f, text)
    if photometric == "PALETTE COLOR":  # the text in index 255, the palette applied again
        index = np.frombuffer(ds.PixelData, np.uint8).reshape(frames.shape[1:3]).copy()
        mask = np.zeros_like(index)
        _draw(mask, text)
        index[mask > 0] = 255
        ds.PixelData = index.tobytes()
        return (apply_color_lut(index, ds) >> 8).astype(np.uint8)[None]
    if photometric == "YBR_FULL":
        ds.PixelData = np.ascontiguousarray(
            convert_color_space(frames, "RGB", "YBR_FULL")
        ).tobytes()
    else:
        ds.PixelData = frames.tobytes()
    return frames


def _draw(frame: np.ndarray, text: str) -> None:
    img = Image.fromarray(frame)
    ImageDraw.Draw(img).text((2, 1), text, fill=(255, 255, 255) if frame.ndim == 3 else 255)
    frame[...] = np.asarray(img)


def _save(name: str, ds: Dataset, expected: np.ndarray, out: Path) -> MultiFrameSample:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    ts = ds.file_meta.TransferSyntaxUID
    if ts.is_compressed or ds.PhotometricInterpretation == "YBR_FULL":
        read = dcmread(path)
        expected = read.pixel_array  # what a reader decodes (RGB), lossy or not
        if int(read.get("NumberOfFrames", 1) or 1) == 1:
            expected = expected[None]
    return MultiFrameSample(
        name=name,
        path=path,
        sop_class=str(ds.SOPClassUID),
        sop_uid=str(ds.SOPInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        photometric=str(ds.PhotometricInterpretation),
        pixels=expected,
        transfer_syntax=str(ts),
        frame_time_ms=float(ds.FrameTime) if "FrameTime" in ds else None,
    )


def stack_pixels(path: Path) -> np.ndarray:
    """The decoded pixels of a file, always with a frame axis."""
    ds = dcmread(path)
    arr = ds.pixel_array
    return arr[None] if int(ds.get("NumberOfFrames", 1) or 1) == 1 else arr


__all__ = ["FRAME_TIME_MS", "MultiFrameSample", "MultiFrameStudy", "write_samples"]
