"""The learned vertebral-body segmenter: it learns (an untrained net does not pass), its bundle
round-trips from a local path, a bad bundle is one clear error, and with it L1 is found exactly
or refused, never mislabelled."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.phantoms import make_phantom
from processing.bone import measure_bone_density
from processing.bone.learned import (
    BundleError,
    Recipe,
    Segmenter,
    bundle_checksum,
    dice,
    load_bundle,
    make_data,
    network,
    save_bundle,
    train,
)
from processing.bone.orient import canonical_orientation
from processing.bone_density import BoneDensity

# tiny: 32-voxel crops, 5 training phantoms, 200 steps (~13 s on one core)
TINY = Recipe(phantoms=6, epochs=20, size=32, seed=0)
PASS_DICE = 0.4  # trained reaches ~0.6 here; untrained or on shuffled labels, under 0.1
SMALL = dict(shape_yx=(200, 200), pixel_mm=1.6, slice_spacing_mm=2.5)


@pytest.fixture(scope="module")
def data():
    return make_data(TINY, make_phantom)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """On two shared cores, torch's thread pool stalls when other work runs: several-fold slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained(data):
    return train(TINY, data)


def _shuffled(y: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Labels moved half a crop away: the same amount of body, unrelated to the image."""
    half = y.shape[-1] // 2
    return torch.roll(y, shifts=(half, half, half), dims=(2, 3, 4))


@pytest.fixture(scope="module")
def bundle(trained, tmp_path_factory) -> Path:
    return save_bundle(trained, tmp_path_factory.mktemp("bundle") / "bone")


def test_training_beats_untrained(data, trained):
    _, val = data
    assert trained.val_dice >= PASS_DICE, trained.val_dice
    torch.manual_seed(TINY.seed)
    untrained = Segmenter(network(TINY.channels), TINY)
    assert dice(untrained, val) < PASS_DICE
    assert trained.history[-1] < trained.history[0]  # the loss went down
    control = train(TINY, data, label_fn=_shuffled)
    assert control.val_dice < PASS_DICE, control.val_dice


def test_bundle_round_trip(data, trained, bundle):
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["network_def"]["_target_"] == "monai.networks.nets.UNet"
    assert meta["labels"] == {"0": "background", "1": "vertebral body"}
    assert meta["input_spacing_mm"] == list(TINY.spacing)
    assert meta["intensity_window_hu"] == list(TINY.window)
    assert meta["training"]["phantoms"] == 6 and meta["training"]["epochs"] == 20
    assert meta["validation_dice"] == round(trained.val_dice, 4)
    assert (bundle / "configs" / "inference.json").is_file()
    loaded = load_bundle(bundle)
    image = data[1][0].image
    assert torch.equal(loaded.probabilities(image), trained.segmenter.probabilities(image))
    # provenance: the pipeline records the bundle's checksum and loads it from the path
    pipe = BoneDensity(model_path=str(bundle))
    assert pipe.model_checksum() == bundle_checksum(bundle) and len(pipe.model_checksum()) == 64
    assert isinstance(pipe.load_model(torch.device("cpu")), Segmenter)
    assert BoneDensity().model_checksum() is None and BoneDensity().load_model("cpu") is None


def test_bad_bundles_are_one_clear_error(bundle, tmp_path):
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nope")
    broken = tmp_path / "broken"
    (broken / "configs").mkdir(parents=True)
    for name in ("metadata.json", "inference.json"):
        (broken / "configs" / name).write_bytes((bundle / "configs" / name).read_bytes())
    with pytest.raises(BundleError, match=r"incomplete: missing models/model\.pt"):
        load_bundle(broken)
    (broken / "models").mkdir()
    (broken / "models" / "model.pt").write_bytes(b"not a state dict")
    with pytest.raises(BundleError, match="unreadable"):
        load_bundle(broken)
    # another network than the one sphere builds is refused, not instantiated
    (broken / "models" / "model.pt").write_bytes((bundle / "models" / "model.pt").read_bytes())
    meta = json.loads((broken / "configs" / "metadata.json").read_text())
    meta["network_def"]["_target_"] = "os.system"
    (broken / "configs" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="not one sphere builds"):
        load_bundle(broken)
    assert bundle_checksum(broken) != bundle_checksum(bundle)


def _not_mislabelled(truth, rep) -> None:
    if rep.measurable:
        a, b = rep.levels["L1"].slices
        ta, tb = truth.z_slices["L1"]
        assert abs(a - ta) <= 1 and abs(b - tb) <= 1, (rep.levels["L1"], truth.z_slices["L1"])
    else:
        assert rep.reason and rep.l1_hu is None


@pytest.mark.parametrize("kw", [dict(seed=41), dict(seed=42, rib_pairs=13)])
def test_learned_bodies_never_mislabel(trained, kw):
    """The tiny net's bodies: L1 exact, or refused with a reason (merged discs, stray voxels)."""
    vol, truth = make_phantom(**SMALL, **kw)
    rep = measure_bone_density(vol, truth.spacing, affine=truth.affine, segmenter=trained.segmenter)
    _not_mislabelled(truth, rep)
    if not truth.l1_measurable:
        assert not rep.measurable


def _oracle(truth):
    """A segmenter that answers the phantom's true bodies: the plug-in path at its best."""
    orient, _ = canonical_orientation(truth.spacing, truth.affine)
    bodies = np.ascontiguousarray(orient.to_canonical(truth.labels > 0))

    def segment(vol, spacing):
        assert tuple(vol.shape) == bodies.shape
        return bodies

    return segment


@pytest.mark.parametrize(
    "kw", [dict(seed=43, flip_z=True, flip_x=True), dict(seed=42, rib_pairs=13)]
)
def test_true_bodies_find_l1_exactly(kw):
    vol, truth = make_phantom(**SMALL, **kw)
    rep = measure_bone_density(vol, truth.spacing, affine=truth.affine, segmenter=_oracle(truth))
    _not_mislabelled(truth, rep)
    assert rep.measurable == truth.l1_measurable, rep.reason
    if rep.measurable:
        assert abs(rep.l1_hu - truth.l1_hu) <= 5.0


def test_implausible_mask_is_refused():
    vol, truth = make_phantom(**SMALL, seed=44)

    def everything(v, spacing):
        return np.ones(tuple(v.shape), bool)

    def nothing(v, spacing):
        return np.zeros(tuple(v.shape), bool)

    for seg in (everything, nothing):
        rep = measure_bone_density(vol, truth.spacing, affine=truth.affine, segmenter=seg)
        assert not rep.measurable and rep.reason.startswith("learned segmenter output implausible")


def test_cli_train_and_missing_model(tmp_path):
    from typer.testing import CliRunner

    from gateway.cli import app

    env = {"SPHERE_HOME": str(tmp_path / "home")}
    out = tmp_path / "tiny"
    args = ["train", "bone-density", "--out", str(out), "--phantoms", "2", "--epochs", "1"]
    res = CliRunner().invoke(app, [*args, "--size", "32"], env=env)
    assert res.exit_code == 0, res.output
    assert "validation Dice" in res.output and str(out) in res.output
    load_bundle(out)
    again = CliRunner().invoke(app, [*args, "--size", "32"], env=env)
    assert again.exit_code == 2 and "--force" in again.output

    from core.settings import Settings
    from tests.processing_data import new_project

    new_project(Settings(home=tmp_path / "home"), "pp")  # access is checked before the model
    missing = CliRunner().invoke(
        app, ["run", "bone-density", "pp", "--model", str(tmp_path / "nope")], env=env
    )
    assert missing.exit_code == 2
    lines = [ln for ln in missing.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "model bundle not found" in lines[0], missing.output


def test_worker_runs_the_bundle_and_records_its_checksum(bundle, tmp_path):
    """A stored phantom through the series worker with `model_path`: the bundle's checksum is
    in the result's provenance; L1 measured exactly or refused with a reason."""
    from core.core import Core
    from core.settings import Settings
    from processing.worker import SeriesTask, process_series
    from tests.processing_data import ct_series, new_project, store_series

    settings = Settings(home=tmp_path / "home", fsync=False)
    new_project(settings, "learn")
    vol, truth = make_phantom(**SMALL, seed=41)
    key = store_series(settings, "learn", ct_series(vol, spacing=truth.spacing), tmp_path / "sp")
    with Core(settings) as core:
        (row,) = [r for r in core.catalog.series(core.project("learn").id) if r.storage_key == key]
    task = SeriesTask("learn", row.series_uid, row.study_uid, row.patient_pseudonym, key)
    pipe = BoneDensity(model_path=str(bundle))
    out = process_series(settings.model_dump_json(), task, pipe, False)
    assert out.status in ("ok", "unmeasurable"), out.reason
    if out.status == "ok":
        assert out.values["l1_hu"] == pytest.approx(truth.l1_hu, abs=10)
    else:
        assert out.reason
    with Core(settings) as core:
        (res,) = core.catalog.results(core.project("learn").id)
    assert res.provenance["model_checksum"] == bundle_checksum(bundle)
    assert res.provenance["parameters"]["model_path"] == str(bundle)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_learned_bodies_on_cuda_match_the_cpu(trained):
    """The net, the windowing and both resamplings run where the volume lies; the mask alone
    comes back to the host, and it is the CPU's."""
    import copy

    vol, truth = make_phantom(**SMALL, seed=41)
    orient, spacing = canonical_orientation(truth.spacing, truth.affine)
    can = torch.as_tensor(np.ascontiguousarray(orient.to_canonical(vol))).float()
    on_gpu = Segmenter(copy.deepcopy(trained.segmenter.net), trained.segmenter.recipe, "cuda")
    gpu = on_gpu.bodies(can.cuda(), spacing)
    cpu = trained.segmenter.bodies(can, spacing)
    assert gpu.shape == cpu.shape and (gpu != cpu).mean() < 1e-3
