"""A learned vertebral-body segmenter: a small MONAI UNet, trained on labelled volumes, kept as a
MONAI bundle on local disk.

Why: the classical segmenter finds bodies from the anterior cortex; a network trained on labelled
volumes can stand in for that one step (`measure_bone_density(..., segmenter=...)`). L1 is still
named only when the rib count and the sacrum agree, so a network can lose a case, not mislabel it.

The network sees the canonical (S, P, L) volume resampled to a fixed spacing (MONAI `Spacing`)
and windowed to [0, 1]; it answers body vs background (the S1 body counts as a body). Training data
are the project's synthetic phantoms, made on the fly, and optionally a folder of `.npz` files
(`image`: HU (z, y, x), `labels`: > 0 on bodies, `spacing`: (z, y, x) mm, `affine` optional).

A bundle is `configs/metadata.json`, `configs/inference.json` and `models/model.pt` (a state
dict). It is only ever read from a path the user gives: nothing is downloaded, and the network is
built from an allowed list, not from an arbitrary `_target_`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from pickle import UnpicklingError
from typing import Any, cast

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from monai.transforms import RandCropByPosNegLabel, ScaleIntensityRange, Spacing, SpatialResample

from core import SphereError
from processing.bone.orient import canonical_orientation

NAME = "sphere_vertebral_body_unet"
VERSION = "0.1.0"
LABELS = {"0": "background", "1": "vertebral body"}
BUNDLE_FILES = ("configs/metadata.json", "configs/inference.json", "models/model.pt")
# processing.bone.phantoms.make_phantom: keywords of a PhantomSpec -> (HU volume, truth with
# .labels, .spacing, .affine)
PhantomMaker = Callable[..., tuple[np.ndarray, Any]]


class BundleError(SphereError):
    """A model bundle that is missing, incomplete or unreadable."""


@dataclass(frozen=True)
class Recipe:
    """What training does; everything here goes into the bundle's metadata."""

    phantoms: int = 12  # generated phantoms; a fifth of them (at least one) held out
    epochs: int = 15  # passes over the training volumes
    size: int = 64  # training crop edge, voxels at `spacing`
    seed: int = 0
    crops: int = 4  # crops per volume per epoch (half centred on a body)
    batch: int = 2
    lr: float = 3e-3
    spacing: tuple[float, float, float] = (2.0, 3.0, 3.0)  # canonical (S, P, L) mm
    window: tuple[float, float] = (-200.0, 1000.0)  # HU mapped to [0, 1], clipped
    channels: tuple[int, ...] = (8, 16, 32)
    data: str | None = None  # folder of labelled .npz volumes, added to the phantoms


@dataclass
class Volume:
    """One preprocessed case: image (1, S, P, L) in [0, 1] at the recipe's spacing, labels 0/1."""

    image: torch.Tensor
    labels: torch.Tensor
    source: str


@dataclass
class TrainResult:
    segmenter: Segmenter
    val_dice: float
    seconds: float
    n_train: int
    n_val: int
    history: list[float] = field(default_factory=list)  # mean loss per epoch


def network(channels: tuple[int, ...]) -> UNet:
    """The network, from its only free parameter (the channel counts)."""
    return UNet(**_network_args(channels))


def _network_args(channels: tuple[int, ...]) -> dict[str, Any]:
    return {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 2,
        "channels": list(channels),
        "strides": [2] * (len(channels) - 1),
        "num_res_units": 1,
    }


def _meta(out: Any) -> MetaTensor:
    """A MONAI transform's output: typed as a tensor or array, a MetaTensor for one in."""
    return cast(MetaTensor, out)


def preprocess(
    canonical_hu: np.ndarray | torch.Tensor,
    spacing: tuple[float, float, float],
    recipe: Recipe,
    labels: np.ndarray | None = None,
) -> tuple[MetaTensor, MetaTensor | None]:
    """Canonical HU volume (S, P, L) -> windowed image at the recipe's spacing (and labels),
    on the volume's device."""
    affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    img = MetaTensor(torch.as_tensor(canonical_hu).float()[None], affine=affine)
    lo, hi = recipe.window
    img = _meta(ScaleIntensityRange(lo, hi, 0.0, 1.0, clip=True)(img))
    img = _meta(Spacing(pixdim=recipe.spacing, mode="bilinear")(img))
    lab = None
    if labels is not None:
        lab = MetaTensor(torch.as_tensor(labels > 0).float()[None], affine=affine)
        lab = _meta(Spacing(pixdim=recipe.spacing, mode="nearest")(lab))
    return img, lab


class Segmenter:
    """A trained network and its recipe: `bodies(canonical_hu, spacing)` -> bool mask."""

    def __init__(self, net: UNet, recipe: Recipe, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.recipe = recipe

    def probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """Body probability (S, P, L) of a preprocessed image (1, S, P, L), on the CPU."""
        return self._probabilities(image).cpu()

    def _probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """`probabilities` on the net's device."""
        roi = (self.recipe.size,) * 3
        with torch.no_grad():
            if isinstance(image, MetaTensor):
                image = image.as_tensor()
            x = image[None].float().to(self.device)
            logits = sliding_window_inference(x, roi, 4, self.net, overlap=0.25)
        return torch.softmax(torch.as_tensor(logits).float(), 1)[0, 1]

    def bodies(
        self, canonical_hu: np.ndarray | torch.Tensor, spacing: tuple[float, float, float]
    ) -> np.ndarray:
        """Vertebral-body mask on the input's own grid (canonical order, input spacing): the
        volume is windowed, resampled and segmented where it lies (the pipeline's: on its
        device), and only the mask comes back to the host."""
        shape = tuple(canonical_hu.shape)
        img, _ = preprocess(canonical_hu, spacing, self.recipe)
        prob = MetaTensor(self._probabilities(img)[None], affine=img.affine)
        dst = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
        back = SpatialResample(mode="bilinear")(prob, dst_affine=dst, spatial_size=shape)
        return (torch.as_tensor(back)[0] > 0.5).cpu().numpy()

    def __call__(
        self, canonical_hu: np.ndarray | torch.Tensor, spacing: tuple[float, float, float]
    ) -> np.ndarray:
        return self.bodies(canonical_hu, spacing)


# --- data ------------------------------------------------------------------------------------


def phantom_specs(n: int, seed: int) -> list[dict[str, Any]]:
    """Varied phantom settings: resolution, noise, density, contrast, ribs, fractures, metal."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        px = float(rng.choice([1.6, 2.0, 2.4]))
        side = int(round(340.0 / px))
        out.append(
            dict(
                shape_yx=(side, side),
                pixel_mm=px,
                slice_spacing_mm=float(rng.choice([1.25, 2.0, 2.5, 3.0, 5.0])),
                noise_sd=float(rng.uniform(5.0, 30.0)),
                trabecular_hu=float(rng.uniform(50.0, 250.0)),
                psf_fwhm_mm=float(rng.choice([0.0, 0.0, 1.2])),
                contrast_hu=float(rng.choice([0.0, 0.0, 250.0])),
                rib_pairs=int(rng.choice([11, 12, 12, 12, 13])),
                fracture_l1=bool(rng.random() < 0.15),
                metal_l1=bool(rng.random() < 0.1),
                seed=int(seed * 1000 + i),
            )
        )
    return out


def phantom_volume(spec: dict[str, Any], recipe: Recipe, make_phantom: PhantomMaker) -> Volume:
    """One phantom, made now and preprocessed."""
    vol, truth = make_phantom(**spec)
    return labelled_volume(vol, truth.labels, truth.spacing, truth.affine, recipe, "phantom")


def labelled_volume(
    hu: np.ndarray,
    labels: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    affine: np.ndarray | None,
    recipe: Recipe,
    source: str,
) -> Volume:
    orient, spacing = canonical_orientation(spacing_zyx, affine)
    img, lab = preprocess(
        np.ascontiguousarray(orient.to_canonical(hu)),
        spacing,
        recipe,
        np.ascontiguousarray(orient.to_canonical(labels)),
    )
    assert lab is not None
    return Volume(img.as_tensor(), lab.as_tensor(), source)


def folder_volumes(folder: str, recipe: Recipe) -> list[Volume]:
    """Labelled `.npz` volumes of a folder (see the module docstring for their keys)."""
    paths = sorted(Path(folder).glob("*.npz"))
    if not paths:
        raise SphereError(f"no labelled volumes (*.npz) in {folder}")
    out = []
    for p in paths:
        try:
            with np.load(p) as z:
                affine = z["affine"] if "affine" in z.files else None
                sz, sy, sx = (float(s) for s in z["spacing"])
                spacing = (sz, sy, sx)
                out.append(
                    labelled_volume(z["image"], z["labels"], spacing, affine, recipe, p.name)
                )
        except (OSError, KeyError, ValueError) as e:
            raise SphereError(f"cannot read labelled volume {p.name}: {e}") from None
    return out


def _crops(vols: list[Volume], recipe: Recipe, rng: np.random.Generator) -> Iterator[tuple]:
    """Random crops of every volume (shuffled), half centred on a body voxel."""
    size = (recipe.size,) * 3
    order = rng.permutation(len(vols))
    for i in order:
        v = vols[int(i)]
        crop = RandCropByPosNegLabel(size, pos=1, neg=1, num_samples=recipe.crops)
        crop.set_random_state(int(rng.integers(2**31)))
        img_pad, lab_pad = _pad_to(v.image, size), _pad_to(v.labels, size)
        imgs = crop(img_pad, label=lab_pad)
        labs = crop(lab_pad, label=lab_pad, randomize=False)
        yield from zip(imgs, labs, strict=True)


def _pad_to(t: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    pads = []
    for n, s in zip(reversed(t.shape[1:]), reversed(size), strict=True):
        extra = max(s - n, 0)
        pads += [extra // 2, extra - extra // 2]
    return torch.nn.functional.pad(torch.as_tensor(t), pads) if any(pads) else torch.as_tensor(t)


# --- training and validation -----------------------------------------------------------------


def dice(segmenter: Segmenter, vols: list[Volume]) -> float:
    """Mean foreground Dice over volumes, at the recipe's spacing."""
    scores = []
    for v in vols:
        pred = segmenter.probabilities(v.image) > 0.5
        truth = v.labels[0] > 0.5
        inter = float((pred & truth).sum())
        denom = float(pred.sum() + truth.sum())
        scores.append(2.0 * inter / denom if denom else 1.0)
    return float(np.mean(scores))


def make_data(recipe: Recipe, make_phantom: PhantomMaker) -> tuple[list[Volume], list[Volume]]:
    """Training and held-out volumes: phantoms (a fifth held out), plus the folder's, if any.

    `make_phantom` is `processing.bone.phantoms.make_phantom`, passed in."""
    specs = phantom_specs(recipe.phantoms, recipe.seed)
    n_val = max(1, recipe.phantoms // 5)
    vols = [phantom_volume(s, recipe, make_phantom) for s in specs]
    train, val = vols[n_val:], vols[:n_val]
    if recipe.data:
        extra = folder_volumes(recipe.data, recipe)
        k = max(1, len(extra) // 5) if len(extra) > 1 else 0
        train += extra[k:]
        val += extra[:k]
    if not train:
        raise SphereError("no training volumes: give at least 2 phantoms")
    return train, val


def train(
    recipe: Recipe,
    data: tuple[list[Volume], list[Volume]],
    *,
    label_fn: Callable[[torch.Tensor, np.random.Generator], torch.Tensor] | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train from scratch on the CPU (deterministic for a seed); validate on held-out volumes.

    `label_fn` rewrites each training crop's labels (a negative control: shuffled labels)."""
    t0 = time.perf_counter()
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    train_vols, val_vols = data
    net = network(recipe.channels)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), lr=recipe.lr)
    steps = recipe.epochs * math.ceil(len(train_vols) * recipe.crops / recipe.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.lr, total_steps=max(steps, 1))
    history = []
    for epoch in range(recipe.epochs):
        net.train()
        losses: list[float] = []
        batch: list[tuple] = []
        for pair in _crops(train_vols, recipe, rng):
            batch.append(pair)
            if len(batch) == recipe.batch:
                losses.append(_step(net, opt, sched, loss_fn, batch, label_fn, rng))
                batch = []
        if batch:
            losses.append(_step(net, opt, sched, loss_fn, batch, label_fn, rng))
        history.append(float(np.mean(losses)))
        if log:
            log(f"epoch {epoch + 1}/{recipe.epochs}: loss {history[-1]:.3f}")
    seg = Segmenter(net, recipe)
    val_dice = dice(seg, val_vols) if val_vols else float("nan")
    return TrainResult(
        seg, val_dice, time.perf_counter() - t0, len(train_vols), len(val_vols), history
    )


def _step(net, opt, sched, loss_fn, batch, label_fn, rng) -> float:
    x = torch.stack([torch.as_tensor(b[0]) for b in batch]).float()
    y = torch.stack([torch.as_tensor(b[1]) for b in batch]).float()
    if label_fn is not None:
        y = label_fn(y, rng)
    opt.zero_grad()
    loss = loss_fn(net(x), y)
    loss.backward()
    opt.step()
    if sched.last_epoch + 1 < sched.total_steps:
        sched.step()
    return float(loss.detach())


# --- bundle ----------------------------------------------------------------------------------


def save_bundle(result: TrainResult, out: str | Path) -> Path:
    """Write the MONAI bundle (configs/metadata.json, configs/inference.json, models/model.pt)."""
    out = Path(out)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir(parents=True, exist_ok=True)
    r = result.segmenter.recipe
    net_def = {"_target_": "monai.networks.nets.UNet", **_network_args(r.channels)}
    meta = {
        "name": NAME,
        "version": VERSION,
        "task": "vertebral body segmentation (body vs background) on abdominal CT, for sphere "
        "bone-density: L1 trabecular attenuation",
        "monai_version": _version("monai"),
        "pytorch_version": torch.__version__.split("+")[0],
        "network_def": net_def,
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield",
                    "modality": "CT",
                    "num_channels": 1,
                    "spatial_shape": [r.size] * 3,
                    "axes": "canonical (superior, posterior, left)",
                    "pixdim_mm": list(r.spacing),
                    "intensity_window_hu": list(r.window),
                }
            },
            "outputs": {"pred": {"type": "image", "num_channels": 2, "channel_def": LABELS}},
        },
        "labels": LABELS,
        "input_spacing_mm": list(r.spacing),
        "input_size": [r.size] * 3,
        "intensity_window_hu": list(r.window),
        "training": {
            "data": "sphere synthetic abdominal CT phantoms (processing.bone.phantoms), "
            "generated on the fly with varied resolution, noise, density, contrast, rib count, "
            "fracture, metal"
            + (f"; plus labelled volumes from {Path(r.data).name}" if r.data else ""),
            "phantoms": r.phantoms,
            "epochs": r.epochs,
            "crop_size": r.size,
            "crops_per_volume": r.crops,
            "batch": r.batch,
            "learning_rate": r.lr,
            "seed": r.seed,
            "n_train": result.n_train,
            "n_val": result.n_val,
            "seconds": round(result.seconds, 1),
            "loss_per_epoch": [round(v, 4) for v in result.history],
        },
        "validation_dice": round(result.val_dice, 4),
        "recipe": {k: list(v) if isinstance(v, tuple) else v for k, v in r.__dict__.items()},
    }
    inference = {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cpu')",
        "network_def": net_def,
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {
                    "_target_": "ScaleIntensityRanged",
                    "keys": "image",
                    "a_min": r.window[0],
                    "a_max": r.window[1],
                    "b_min": 0.0,
                    "b_max": 1.0,
                    "clip": True,
                },
                {"_target_": "Spacingd", "keys": "image", "pixdim": list(r.spacing)},
            ],
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": [r.size] * 3,
            "sw_batch_size": 4,
            "overlap": 0.25,
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [{"_target_": "AsDiscreted", "keys": "pred", "argmax": True}],
        },
        "note": "sphere loads this bundle with processing.bone.learned.load_bundle, which "
        "reorients to canonical (S, P, L) first",
    }
    (out / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "configs" / "inference.json").write_text(json.dumps(inference, indent=2) + "\n")
    torch.save(result.segmenter.net.state_dict(), out / "models" / "model.pt")
    return out


def load_bundle(path: str | Path, device: torch.device | str = "cpu") -> Segmenter:
    """A bundle from a local folder; any problem is one BundleError saying what is wrong."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"model bundle not found: {path} is not a folder")
    missing = [f for f in BUNDLE_FILES if not (root / f).is_file()]
    if missing:
        raise BundleError(f"model bundle {root.name} incomplete: missing {', '.join(missing)}")
    try:
        meta = json.loads((root / "configs" / "metadata.json").read_text())
        net_def = dict(meta["network_def"])
        target = net_def.pop("_target_", None)
        if target not in ("monai.networks.nets.UNet", "UNet"):
            raise ValueError(f"network {target!r} is not one sphere builds")
        known = set(Recipe.__dataclass_fields__)
        fields = {k: v for k, v in meta.get("recipe", {}).items() if k in known}
        fields |= {
            "spacing": tuple(meta["input_spacing_mm"]),
            "window": tuple(meta["intensity_window_hu"]),
            "size": int(meta["input_size"][0]),
            "channels": tuple(net_def["channels"]),
        }
        recipe = Recipe(**fields)
        if _network_args(recipe.channels) != net_def:
            raise ValueError("network_def differs from the network sphere builds")
        net = network(recipe.channels)
        state = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except (OSError, EOFError, ValueError, KeyError, TypeError, RuntimeError, UnpicklingError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BundleError(f"model bundle {root.name} unreadable: {first}"[:200]) from None
    return Segmenter(net, recipe, device)


def bundle_checksum(path: str | Path) -> str:
    """sha256 over the bundle's three files (names and contents): what provenance records."""
    root = Path(path)
    h = hashlib.sha256()
    for name in BUNDLE_FILES:
        p = root / name
        if not p.is_file():
            raise BundleError(f"model bundle {root.name} incomplete: missing {name}")
        h.update(name.encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
