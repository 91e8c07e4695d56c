"""What a pipeline leaves per series: a DICOM SEG of its ROIs, a DICOM SR measurement report
(TID 1500) referencing them, both stored as derived series of the project, and a PNG report.

SEG and SR reference the stored (de-identified) instances: they are built from the stored
headers and copy only their already de-identified patient and study attributes. Their series
UIDs derive from the source series and the pipeline, so a re-run replaces them in place.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import torch
from PIL import Image, ImageDraw
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from zarr.core.buffer import default_buffer_prototype

from core.core import Core
from dicom import IMPLEMENTATION_CLASS_UID, json_model
from processing.pipeline import Finding, Pipeline
from storage.commit import commit_series
from storage.objectstore import guard, run
from storage.series import SeriesReader, SeriesWriter, series_key

MANUFACTURER = "sphere"
SEG_SERIES_NUMBER, SR_SERIES_NUMBER = 9001, 9002
# Qualitative evaluation of the bone class (SNOMED CT findings; a private concept name).
BONE_CLASS = hd.sr.CodedConcept("BONECLASS", "99SPHERE", "Bone density class")
CLASS_CODES = {
    "osteoporosis": hd.sr.CodedConcept("64859006", "SCT", "Osteoporosis"),
    "osteopenia": hd.sr.CodedConcept("312894000", "SCT", "Osteopenia"),
    "normal": hd.sr.CodedConcept("17621005", "SCT", "Normal"),
}


@dataclass(frozen=True)
class Derived:
    """A derived series written: its UID, storage key and modality."""

    series_uid: str
    key: str
    modality: str


def derived_uid(source_series_uid: str, pipeline: str, kind: str) -> str:
    """A UID fixed by the source series, pipeline and kind (2.25 form, from a digest)."""
    digest = hashlib.sha256(f"{source_series_uid}|{pipeline}|{kind}".encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def source_images(reader: SeriesReader) -> list[Dataset]:
    """The stored image instances as datasets without pixel data (headers only), in stored
    order: what SEG and SR reference; volume index z is `[z]` here."""
    n = int(reader.attrs["n_slices"])
    out = []
    for header in reader.headers()[:n]:
        ds = json_model.from_json(header)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out.append(ds)
    return out


def frame_order(reader: SeriesReader) -> list[int] | None:
    """For a series of one multi-frame image (an Enhanced CT), the volume index z of each of its
    frames in frame-number order: a SEG of it has one frame per source frame, in that order."""
    if reader.n_images == 1 and reader.attrs.get("frames"):
        return reader.frame_slices(0)
    return None


def segmentable(reader: SeriesReader) -> bool:
    """Whether a SEG can reference the series' images: single-frame images, or one multi-frame
    image (a SEG's source is never several multi-frame instances)."""
    return reader.n_images == 1 or not reader.attrs.get("frames")


def slice_images(reader: SeriesReader) -> list[tuple[int, int | None]]:
    """For each volume index z, the stored image holding it and its frame number (None for a
    single-frame image): where an image region of the SR points."""
    n = int(reader.attrs["n_slices"])
    if not reader.attrs.get("frames"):
        return [(z, None) for z in range(n)]
    out: list[tuple[int, int | None]] = [(0, None)] * n
    for i in range(reader.n_images):
        for k, z in enumerate(reader.frame_slices(i), start=1):
            out[z] = (i, k)
    return out


def image_region(
    sources: list[Dataset], where: list[tuple[int, int | None]], mask: np.ndarray
) -> hd.sr.ImageRegion | None:
    """The ROI on its largest slice as a closed polygon (its convex hull, in the image's pixel
    coordinates) on that source image: an SCOORD a viewer draws. None for a degenerate ROI."""
    areas = mask.reshape(mask.shape[0], -1).sum(axis=1)
    z = int(np.argmax(areas))
    rows, cols = np.nonzero(mask[z])
    if len(rows) < 3:
        return None
    from scipy.spatial import ConvexHull, QhullError

    points = np.stack([cols + 0.5, rows + 0.5], axis=1).astype(np.float64)
    try:
        hull = points[ConvexHull(points).vertices]
    except QhullError:  # all in a line
        return None
    i, frame = where[z]
    ds = sources[i]
    source = hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=ds.SOPClassUID,
        referenced_sop_instance_uid=ds.SOPInstanceUID,
        referenced_frame_numbers=[frame] if frame is not None else None,
    )
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.vstack([hull, hull[:1]]),
        source_image=source,
    )


# OHIF (3.13, through @cornerstonejs/adapters) restores a measurement group as one of its own
# tools when the tracking identifier starts with the tool's tag: the region it reads from the
# first NUM's INFERRED FROM SCOORD (taken as the area of a closed one: the region's own area
# goes first), the label from a Comment. Its measurement panel lists that label, beside the
# area and maximum it computes itself from the pixels (never a stored mean).
OHIF_FREEHAND = "Cornerstone3DTools@^0.1.0:PlanarFreehandROI"


def ohif_label(site: str, mean_hu: float | None) -> str:
    """The label OHIF lists a planar group by: its site and, when there is one, its mean."""
    return site if mean_hu is None else f"{site}: mean {mean_hu:.2f} HU"


def for_ohif(group: Any, region: hd.sr.ImageRegion, label: str) -> Any:
    """A planar group (TID 1410) as OHIF also reads it: its first measurement inferred from
    the same image region, and a Comment holding `label`."""
    items = group[0].ContentSequence
    first = next((item for item in items if item.ValueType == "NUM"), None)
    if first is not None:
        inferred = copy.deepcopy(region)
        inferred.RelationshipType = hd.sr.RelationshipTypeValues.INFERRED_FROM.value
        if "ContentSequence" not in first:
            first.ContentSequence = hd.sr.ContentSequence([], is_root=False)
        first.ContentSequence.append(inferred)
    items.append(hd.sr.TextContentItem(codes.DCM.Comment, label, "CONTAINS"))
    return group


def region_area_mm2(region: hd.sr.ImageRegion, image: Dataset) -> float | None:
    """The area of a closed polygon region in mm² (shoelace, by the image's pixel spacing:
    top-level, else its shared functional groups); None without a spacing."""
    spacing = image.get("PixelSpacing")
    if spacing is None:
        try:
            spacing = image.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        except (AttributeError, IndexError):
            return None
    x, y = np.asarray(region.value, np.float64).T  # columns, rows
    pixels = 0.5 * abs(float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])))
    return pixels * float(spacing[0]) * float(spacing[1])


def build_seg(
    sources: list[Dataset],
    finding: Finding,
    pipeline: Pipeline,
    source_series_uid: str,
    order: list[int] | None = None,
) -> hd.seg.Segmentation:
    """A binary SEG with one segment per ROI of `finding` (segment numbers from 1, in order);
    `order` (see `frame_order`) puts the masks' slices in the source's frame order."""
    algorithm = _algorithm(pipeline)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i,
            segment_label=s.label,
            segmented_property_category=codes.SCT.BodyStructure,
            segmented_property_type=s.site,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=derived_uid(source_series_uid, pipeline.name, f"track-{s.label}"),
            tracking_id=s.label,
        )
        for i, s in enumerate(finding.segments, start=1)
    ]
    masks = np.stack([s.mask for s in finding.segments], axis=-1)  # (z, y, x, segments)
    if order is not None:
        masks = masks[order]
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=derived_uid(source_series_uid, pipeline.name, "seg"),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=pipeline.name,
        software_versions=pipeline.version,
        device_serial_number="0",
        series_description=f"{pipeline.name} ROIs"[:64],
    )


def build_sr(
    sources: list[Dataset],
    seg: hd.seg.Segmentation | None,
    finding: Finding,
    pipeline: Pipeline,
    source_series_uid: str,
    where: list[tuple[int, int | None]] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 measurement report: per ROI its mean, median and SD attenuation (HU),
    and the classification, when there is one, on the first ROI. With `where`
    (`slice_images`) each ROI is a planar group (TID 1410) on an image region of its largest
    slice, the region's area first, also in the form OHIF restores as a measurement of its own
    (`for_ohif`; it fails on an SR holding any group without a region), else a volumetric
    group referencing its SEG segment (TID 1411)."""
    algorithm = hd.sr.AlgorithmIdentification(pipeline.name, pipeline.version)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid(pipeline.name, pipeline.version, "device"),
            name=f"{MANUFACTURER} {pipeline.name}",
        ),
    )
    groups: list[Any] = []
    library: dict[str, Dataset] = {}  # the images the regions are on (the image library)
    for i, s in enumerate(finding.segments, start=1):
        measurements = [
            hd.sr.Measurement(
                name=codes.DCM.MeanAttenuationCoefficient,
                value=value,
                unit=codes.UCUM.HounsfieldUnit,
                derivation=derivation,
                algorithm_id=algorithm,
            )
            for value, derivation in (
                (s.mean_hu, codes.SCT.Mean),
                (s.median_hu, codes.SCT.Median),
                (s.sd_hu, codes.SCT.StandardDeviation),
            )
            if value is not None
        ]
        evaluations = []
        if i == 1 and finding.classification in CLASS_CODES:
            evaluations.append(
                hd.sr.QualitativeEvaluation(BONE_CLASS, CLASS_CODES[finding.classification])
            )
        if i == 1:
            evaluations += [hd.sr.QualitativeEvaluation(n, v) for n, v in finding.evaluations]
        region = image_region(sources, where, s.mask) if where is not None else None
        image = None
        if region is not None:  # the region's own area first: where OHIF reads the region
            on = region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            image = next(d for d in sources if d.SOPInstanceUID == on)
            area = region_area_mm2(region, image)
            if area is not None:
                measurements.insert(
                    0,
                    hd.sr.Measurement(
                        name=codes.SCT.Area,
                        value=area,
                        unit=codes.UCUM.SquareMillimeter,
                        algorithm_id=algorithm,
                    ),
                )
        tracking = hd.sr.TrackingIdentifier(
            uid=derived_uid(source_series_uid, pipeline.name, f"track-{s.label}"),
            identifier=s.label if region is None else f"{OHIF_FREEHAND}:{s.label}",
        )
        common: dict[str, Any] = {
            "tracking_identifier": tracking,
            "finding_type": s.site,
            "finding_sites": [hd.sr.FindingSite(s.site)],
            "algorithm_id": algorithm,
            "measurements": measurements,
            "qualitative_evaluations": evaluations or None,
        }
        if region is not None and image is not None:  # planar only: OHIF fails on others
            # highdicom describes a library entry from top-level geometry, which an enhanced
            # multi-frame image keeps in its functional groups: such an image is left out
            # (the library is optional; the region still names its image).
            if int(image.get("NumberOfFrames", 1) or 1) == 1:
                library[image.SOPInstanceUID] = image
            group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                referenced_region=region, **common
            )
            groups.append(for_ohif(group, region, ohif_label(s.site.meaning, s.mean_hu)))
        elif seg is not None:
            ref = hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID,
                sop_instance_uid=seg.SOPInstanceUID,
                segment_number=i,
                source_series=hd.sr.SourceSeriesForSegmentation(source_series_uid),
            )
            groups.append(
                hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    referenced_segment=ref, **common
                )
            )
        else:
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(**common))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.ComputedTomography,
        imaging_measurements=groups,
        referenced_images=list(library.values()) or None,  # where a viewer finds the regions
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[*sources, *([seg] if seg is not None else [])],
        content=report,
        series_instance_uid=derived_uid(source_series_uid, pipeline.name, "sr"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=f"{pipeline.name} report"[:64],
    )


def store_derived(
    core: Core, project: str, study_uid: str, patient: str, datasets: list[Dataset], spool: Path
) -> Derived:
    """Commit `datasets` (one series) to the project's store, indexed for the web, complete in
    the catalog and audited, in one call (`storage.commit`): served with the project's data."""
    ds0 = datasets[0]
    uid, modality = str(ds0.SeriesInstanceUID), str(ds0.Modality)
    key = series_key(project, study_uid, uid)
    p = core.project(project)
    writer = SeriesWriter(spool / uid, fsync=core.settings.fsync)
    try:
        for ds in datasets:
            writer.add(_as_written(ds), inline_pixels=modality == "SEG")
        commit_series(
            core.store,
            core.catalog,
            writer,
            key,
            project_id=p.id,
            series_uid=uid,
            values={
                "study_uid": study_uid,
                "modality": modality,
                "patient_pseudonym": patient,
                "expected": len(datasets),
                "error": None,
            },
            audit={
                "actor": core.actor,
                "action": "series.stored",
                "project": project,
                "detail": {"series": uid, "derived": modality},
            },
        )
    except BaseException:
        with contextlib.suppress(Exception):  # gone already when the catalog part failed
            writer.discard()
        raise
    return Derived(uid, key, modality)


def report_png(
    hu_zyx: np.ndarray | torch.Tensor,
    affine_lps: np.ndarray,
    finding: Finding,
    title: str,
    *,
    window: tuple[float, float] = (400.0, 1800.0),
) -> bytes:
    """A sagittal view through the ROIs (or the middle), head up, at true aspect, with the
    levels marked and the ROIs in red; `window` is (level, width) in HU. A tensor stays on its
    device: only the drawn plane is copied off it."""
    nz, ny, nx = hu_zyx.shape
    roi = np.zeros((nz, ny, nx), bool)
    for s in finding.segments:
        roi |= s.mask
    x = int(np.round(np.nonzero(roi)[2].mean())) if roi.any() else nx // 2
    level, width = window
    plane = hu_zyx[:, :, x]
    sag = plane.cpu().numpy() if isinstance(plane, torch.Tensor) else np.asarray(plane)
    img = np.clip((sag - (level - width / 2)) / width * 255.0, 0, 255).astype(np.uint8)
    rgb = np.repeat(img[..., None], 3, axis=-1)
    cut = roi[:, :, x]
    rgb[cut] = rgb[cut] // 2 + np.array([127, 0, 0], np.uint8)  # ROIs tinted red
    a = np.asarray(affine_lps, float)
    head_up = a[2, 0] > 0  # index z grows toward the head: draw it reversed
    if head_up:
        rgb = rgb[::-1]
    sz, sy = float(np.linalg.norm(a[:3, 0])) or 1.0, float(np.linalg.norm(a[:3, 1])) or 1.0
    scale = 512.0 / max(ny * sy, nz * sz)
    size = (max(1, round(ny * sy * scale)), max(1, round(nz * sz * scale)))
    pic = Image.fromarray(np.ascontiguousarray(rgb)).resize(size, Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (size[0] + 60, size[1] + 24), "black")
    canvas.paste(pic, (60, 24))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), title[:90], fill="white")
    for name, (z0, z1) in finding.levels.items():
        zc = (z0 + z1) / 2
        row = (nz - zc if head_up else zc) * sz * scale + 24
        draw.line([(50, row), (60, row)], fill="yellow")
        draw.text((4, row - 6), name[:8], fill="yellow")
    out = io.BytesIO()
    canvas.save(out, format="PNG")
    return out.getvalue()


def report_key(project: str, pipeline: str, series_uid: str) -> str:
    """Where a series' PNG report goes in the store (pseudonymous UIDs only)."""
    return f"reports/{project}/{pipeline}/{series_uid}.png"


def put_bytes(store: Any, key: str, data: bytes) -> None:
    """Write one object to the store."""
    with guard("commit"):
        run(store.set(key, default_buffer_prototype().buffer.from_bytes(data)))


def get_bytes(store: Any, key: str) -> bytes | None:
    """One object of the store; None when there is none."""
    with guard("read"):
        buf = run(store.get(key, default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()


def _algorithm(pipeline: Pipeline) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=pipeline.name,
        family=pipeline.family,
        version=pipeline.version,
        parameters={k: str(v) for k, v in pipeline.parameters().items()},
    )


def _as_written(ds: Dataset) -> Dataset:
    """`ds` as read back from its file: decimal strings (DS) keep the text they are written
    as (highdicom formats floats to 16 characters; the float itself may need 19)."""
    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = meta.get("TransferSyntaxUID") or ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    ds.file_meta = meta
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return dcmread(io.BytesIO(buf.getvalue()))
