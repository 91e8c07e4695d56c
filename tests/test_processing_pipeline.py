"""One series through a pipeline, in-process: qualification with reasons, the result row and
its provenance, SEG and SR stored as derived series (read back with highdicom, valid for
dciodvfy), the PNG report, a re-run that replaces, a corrupt series reported as failed, and the
bone-density pipeline on a phantom."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
import typer
from monai.data import MetaTensor
from PIL import Image
from pydicom.sr.codedict import codes
from typer.testing import CliRunner
from zarr.core.buffer import default_buffer_prototype

from core.core import Core
from core.settings import Settings
from dicom.json_model import first
from gateway import run_cmd
from harness.phantoms import PhantomSpec, make_phantom
from processing.body_hu import BodyHu
from processing.bone_density import BoneDensity
from processing.loader import ras_affine
from processing.outputs import OHIF_FREEHAND
from processing.pipeline import SeriesFacts
from processing.results import result_rows, write_csv, write_parquet
from processing.worker import SeriesTask, process_series
from storage.objectstore import run
from storage.series import SeriesReader
from tests.processing_data import body_volume, ct_series, new_project, store_series

DCIODVFY = shutil.which("dciodvfy") or str(Path(sys.executable).parent / "dciodvfy")


def dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    assert "Assertion" not in text, text[-500:]
    return [ln for ln in text.splitlines() if "Error" in ln]


def task_for(settings: Settings, project: str, key: str) -> SeriesTask:
    with Core(settings) as core:
        rows = core.catalog.series(core.project(project).id)
    row = next(r for r in rows if r.storage_key == key)
    return SeriesTask(project, row.series_uid, row.study_uid, row.patient_pseudonym, key)


def fetch(settings: Settings, key: str) -> bytes:
    with Core(settings) as core:
        return run(core.store.get(key, default_buffer_prototype())).to_bytes()


@pytest.fixture
def home(tmp_path) -> Settings:
    settings = Settings(home=tmp_path, fsync=False)
    new_project(settings, "proc")
    return settings


FACTS = SeriesFacts("CT", 40, (40, 64, 64), (2.5, 0.8, 0.8), 2.5, (0.0, 0.0, 1.0), True,
                    ("ORIGINAL", "PRIMARY", "AXIAL"), 120.0, None)  # fmt: skip


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({}, None),
        ({"modality": "MR"}, "modality MR, not CT"),
        ({"n_slices": 0}, "no pixel data"),
        ({"shape": (40, 64, 64, 3)}, "not a greyscale volume"),
        ({"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")}, "a localizer"),
        ({"normal": (1.0, 0.0, 0.0)}, "not axial (slice normal 90 degrees"),
        ({"n_slices": 12}, "12 slices, fewer than 20"),
        ({"uniform": False}, "slices unevenly spaced"),
        ({"slice_thickness": 7.5}, "slice thickness 7.5 mm > 5 mm"),
        ({"normal": None}, "no patient-frame geometry"),
    ],
)
def test_qualification_says_why_a_series_does_not_qualify(change, reason):
    got = BoneDensity().qualify(dataclasses.replace(FACTS, **change))
    assert got == reason if reason is None else got.startswith(reason)


def test_a_series_gets_a_result_seg_sr_and_png_and_a_rerun_replaces_them(home, tmp_path):
    vol = body_volume(seed=4)
    key = store_series(home, "proc", ct_series(vol, seed=4), tmp_path / "spool")
    task = task_for(home, "proc", key)
    out = process_series(home.model_dump_json(), task, BodyHu(), False)
    assert out.status == "ok" and out.device == "cpu"
    expected_mean = float(vol[vol > -500].astype(np.float64).mean())
    assert out.values["body_mean_hu"] == pytest.approx(expected_mean, abs=0.01)

    with Core(home) as core:
        p = core.project("proc")
        (row,) = core.catalog.results(p.id)
        series = {s.series_uid: s for s in core.catalog.series(p.id)}
        reader = SeriesReader(core.store, key)
        stored = reader.volume[:]
        seg_ds = SeriesReader(core.store, series[row.seg_series_uid].storage_key).instance(0)
        sr_ds = SeriesReader(core.store, series[row.sr_series_uid].storage_key).instance(0)
    prov = row.provenance
    assert prov["pipeline"] == "body-hu" and prov["version"] == BodyHu.version
    assert prov["parameters"]["body_hu"] == -500.0 and prov["model_checksum"] is None
    assert len(prov["input_checksum"]) == 64
    assert series[row.seg_series_uid].status == series[row.sr_series_uid].status == "complete"
    assert {series[row.seg_series_uid].modality, series[row.sr_series_uid].modality} == {
        "SEG",
        "SR",
    }

    # Both validate, and read back with highdicom; they reference the stored instances.
    for name, ds in (("seg", seg_ds), ("sr", sr_ds)):
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], name
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    sr = hd.sr.srread(tmp_path / "sr.dcm")
    sources = {first(h, "00080018") for h in reader.headers()}
    assert {r.ReferencedSOPInstanceUID for r in seg.SourceImageSequence} <= sources
    assert seg.StudyInstanceUID == sr.StudyInstanceUID == first(reader.header(0), "0020000D")
    labels = [d.SegmentLabel for d in seg.SegmentSequence]
    assert labels == ["Body", "Soft tissue"]
    body = seg.get_volume(combine_segments=False).array[..., 0].astype(bool)
    assert body.sum() == out.values["body_voxels"]
    # The SEG mask placed on the stored volume gives the measured mean back.
    mask = np.zeros(stored.shape, bool)
    frames = seg.get_source_image_uids()
    order = [first(h, "00080018") for h in reader.headers()]
    vol_seg = seg.get_volume(combine_segments=False)
    assert vol_seg is not None and len(frames) == len(order)
    mask[:] = seg.get_pixels_by_source_instance(order, segment_numbers=[1]).astype(bool)[..., 0]
    assert float((stored[mask] - 1024.0).mean()) == pytest.approx(expected_mean, abs=0.01)
    group = (
        sr.content.get_planar_roi_measurement_groups()
        + sr.content.get_volumetric_roi_measurement_groups()
    )
    means = [
        m.value
        for g in group
        for m in g.get_measurements()
        if m.derivation and m.derivation.meaning == "Mean"
    ]
    assert float(means[0]) == pytest.approx(out.values["body_mean_hu"], abs=1e-3)

    png = Image.open(io.BytesIO(fetch(home, row.report_key)))
    assert png.format == "PNG" and png.width > 200

    # A re-run replaces: one result row, the same derived series, new instances.
    again = process_series(home.model_dump_json(), task, BodyHu(), False)
    assert again.values == out.values
    with Core(home) as core:
        p = core.project("proc")
        rows = core.catalog.results(p.id)
        counts = core.catalog.series_counts(p.id)
        new_seg = SeriesReader(core.store, series[row.seg_series_uid].storage_key).instance(0)
    assert len(rows) == 1 and rows[0].seg_series_uid == row.seg_series_uid
    assert counts == {"complete": 3}
    assert new_seg.SOPInstanceUID != seg_ds.SOPInstanceUID


def test_a_corrupt_series_is_failed_with_its_reason_and_outputs_removed_when_none(home, tmp_path):
    key = store_series(home, "proc", ct_series(body_volume(seed=6), seed=6), tmp_path / "spool")
    task = task_for(home, "proc", key)
    assert process_series(home.model_dump_json(), task, BodyHu(), False).status == "ok"
    shard = next((home.home / "store" / key / "volume").rglob("c/*/*/*"))
    data = bytearray(shard.read_bytes())
    data[-20:-10] = b"\xff" * 10  # the shard index: its CRC32C no longer matches
    shard.unlink()
    shard.write_bytes(bytes(data))
    out = process_series(home.model_dump_json(), task, BodyHu(), False)
    assert out.status == "failed" and "checksum" in out.reason
    with Core(home) as core:
        (row,) = core.catalog.results(core.project("proc").id)
    assert row.status == "failed" and "checksum" in row.reason and row.values == {}
    assert row.seg_series_uid is None and row.sr_series_uid is None
    with Core(home) as core:  # the SEG and SR of the earlier run are no longer served
        assert core.catalog.series_counts(core.project("proc").id) == {"complete": 1, "removed": 2}


def test_ineligible_series_are_recorded_with_the_reason(home, tmp_path):
    key = store_series(home, "proc", ct_series(body_volume(), modality="MR"), tmp_path / "sp")
    out = process_series(home.model_dump_json(), task_for(home, "proc", key), BodyHu(), False)
    assert (out.status, out.reason) == ("ineligible", "modality MR, not CT")


def test_an_unmeasurable_series_has_a_reason_and_a_png_but_no_seg_or_sr(home, tmp_path):
    air = np.full((6, 32, 32), -1000, np.int16)
    key = store_series(home, "proc", ct_series(air), tmp_path / "sp")
    out = process_series(home.model_dump_json(), task_for(home, "proc", key), BodyHu(), False)
    assert (out.status, out.reason) == ("unmeasurable", "no body in the field of view")
    with Core(home) as core:
        (row,) = core.catalog.results(core.project("proc").id)
    assert row.seg_series_uid is None and row.sr_series_uid is None and row.report_key
    assert Image.open(io.BytesIO(fetch(home, row.report_key))).format == "PNG"


def test_bone_density_on_a_phantom_scores_l1_and_writes_valid_sr_and_seg(home, tmp_path):
    vol, truth = make_phantom(PhantomSpec(shape_yx=(192, 192), pixel_mm=1.5, slice_spacing_mm=3.0))
    dss = ct_series(vol.astype(np.int16), spacing=truth.spacing, seed=11)
    key = store_series(home, "proc", dss, tmp_path / "spool")
    out = process_series(home.model_dump_json(), task_for(home, "proc", key), BoneDensity(), False)
    assert out.status == "ok", out.reason
    assert out.values["l1_hu"] == pytest.approx(truth.l1_hu, abs=10)
    assert out.values["class"] == "osteopenia"  # 150 HU: between 110 and 160
    with Core(home) as core:
        p = core.project("proc")
        (row,) = core.catalog.results(p.id)
        keys = {s.series_uid: s.storage_key for s in core.catalog.series(p.id)}
        seg_ds = SeriesReader(core.store, keys[row.seg_series_uid]).instance(0)
        sr_ds = SeriesReader(core.store, keys[row.sr_series_uid]).instance(0)
    for name, ds in (("seg", seg_ds), ("sr", sr_ds)):
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], name
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    assert "L1 trabecular ROI" in [d.SegmentLabel for d in seg.SegmentSequence]
    sr = hd.sr.srread(tmp_path / "sr.dcm")
    # Each ROI is drawn: a planar group (TID 1410) whose image region is a closed polygon on a
    # stored image of the series, with the mean HU (what OHIF lists and draws), the class on L1.
    planars = {
        g.tracking_identifier.removeprefix(f"{OHIF_FREEHAND}:"): g
        for g in sr.content.get_planar_roi_measurement_groups()
    }
    assert sr.content.get_volumetric_roi_measurement_groups() == []  # OHIF fails on them
    evaluations = [
        e.value.meaning for g in planars.values() for e in g.get_qualitative_evaluations()
    ]
    assert evaluations == ["Osteopenia"]
    planar = planars["L1 trabecular ROI"]
    region = planar.roi
    assert (
        region.GraphicType == "POLYLINE" and region.value[0].tolist() == region.value[-1].tolist()
    )
    ref = region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    with Core(home) as core:
        sops = {str(d.SOPInstanceUID) for d in SeriesReader(core.store, key).iter_instances()}
    assert ref in sops
    area, mean = planar.get_measurements()[:2]  # the region's area; mean, median, SD
    assert mean.derivation.meaning == "Mean" and mean.value == pytest.approx(
        out.values["l1_hu"], abs=0.5
    )
    # The region's area, its polygon's (shoelace) at the stored pixel spacing.
    x, y = region.value.T
    spacing = np.prod([float(v) for v in sr_ds_image(home, key, ref).PixelSpacing])
    shoelace = 0.5 * abs(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])) * spacing
    assert area.name == codes.SCT.Area and area.unit == codes.UCUM.SquareMillimeter
    assert float(area.value) == pytest.approx(shoelace) and 50 < shoelace < 2000
    # As OHIF reads it: its freehand tool's tag, the first NUM (the area) inferred from the
    # same region, and the label it lists (site and mean).
    assert planar.tracking_identifier == f"{OHIF_FREEHAND}:L1 trabecular ROI"
    (inferred,) = [i for i in area[0].ContentSequence if i.ValueType == "SCOORD"]
    assert inferred.RelationshipType == "INFERRED FROM"
    assert inferred.value.tolist() == region.value.tolist()
    ref2 = inferred.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    assert ref2 == ref
    (comment,) = [i for i in planar[0].ContentSequence if i.name == codes.DCM.Comment]
    assert comment.value == f"L1 vertebra: mean {out.values['l1_hu']:.2f} HU"


def sr_ds_image(home: Settings, key: str, sop_uid: str) -> pydicom.Dataset:
    """The stored image `sop_uid` of the series at `key` (headers)."""
    with Core(home) as core:
        return next(
            d for d in SeriesReader(core.store, key).iter_instances() if d.SOPInstanceUID == sop_uid
        )


def test_results_table_prints_in_80_columns_and_exports(home, tmp_path):
    for seed in (1, 2):
        key = store_series(home, "proc", ct_series(body_volume(seed=seed), seed=seed), tmp_path)
        process_series(home.model_dump_json(), task_for(home, "proc", key), BodyHu(), False)
    app = typer.Typer()

    @app.callback()
    def main(ctx: typer.Context) -> None:
        ctx.obj = {"settings": home}

    run_cmd.register(app)
    csv_path, pq_path = tmp_path / "r.csv", tmp_path / "r.parquet"
    res = CliRunner().invoke(
        app, ["results", "proc", "--csv", str(csv_path), "--parquet", str(pq_path)]
    )
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert max(len(ln) for ln in lines) <= 80
    assert sum(" ok " in ln for ln in lines) == 2
    header = csv_path.read_text().splitlines()[0].split(",")
    assert header[:8] == [
        "patient", "study_date", "study_uid", "series_uid", "pipeline", "version", "status",
        "reason",
    ]  # fmt: skip
    assert "PSEUDO1" in csv_path.read_text()  # the patient's pseudonym, as stored
    assert "body_mean_hu" in header and "input_checksum" in header
    import pyarrow.parquet as pq

    table = pq.read_table(pq_path)
    assert table.num_rows == 2 and table.column("body_mean_hu").type.id == 12  # double
    with Core(home) as core:
        rows = result_rows(core, "proc")
    write_csv(rows, tmp_path / "again.csv")
    write_parquet(rows, tmp_path / "again.parquet")
    assert (
        hashlib.sha256((tmp_path / "again.csv").read_bytes()).hexdigest()
        == hashlib.sha256(csv_path.read_bytes()).hexdigest()
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_bone_density_on_the_gpu_matches_the_cpu():
    vol, truth = make_phantom(PhantomSpec(shape_yx=(192, 192), pixel_mm=1.5, slice_spacing_mm=3.0))
    hu = torch.as_tensor(vol, dtype=torch.float32).permute(2, 1, 0)[None]
    image = MetaTensor(hu, meta={"affine": torch.as_tensor(ras_affine(truth.affine)),
                                 "spacing": np.array(truth.spacing[::-1])})  # fmt: skip
    facts = dataclasses.replace(FACTS, n_slices=vol.shape[0], slice_thickness=truth.spacing[0])
    cpu = BoneDensity().run(image, facts, model=None, device=torch.device("cpu"))
    gpu = BoneDensity().run(image, facts, model=None, device=torch.device("cuda"))
    assert gpu.status == cpu.status == "ok"
    for k, v in cpu.values.items():
        assert gpu.values[k] == (pytest.approx(v, abs=0.05) if isinstance(v, float) else v)
    for a, b in zip(cpu.segments, gpu.segments, strict=True):
        assert (a.mask != b.mask).mean() < 1e-4
