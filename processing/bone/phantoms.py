"""Synthetic abdominal CT phantoms with a spine, and their ground truth: what `sphere train`
trains the learned segmenter on, and what the bone-density tests measure.

Conventions
-----------
The volume is a numpy int16 array of HU in (z, y, x) order; `spacing` is (z, y, x) in mm.
Unflipped, the array is in LPS order on every axis: index z grows toward the head (superior),
y toward the patient's back (posterior), x toward the patient's left. `affine` maps a homogeneous
array index (i0, i1, i2, 1) (axis 0 = z, 1 = y, 2 = x) to patient LPS millimetres (x, y, z, 1);
a flipped axis has a negative column. `z_increases_superior` says the same for axis 0 alone.

Anatomy lives on an anatomical axis `s` in mm, 0 at the top endplate of S1, growing upward.
Vertebral bodies are elliptic cylinders with a cortical shell and endplates, a trabecular interior
at a per-level HU and a basivertebral vein channel in the posterior middle; discs lie between them;
posterior elements ring a CSF canal. Ribs (3 mm tubes, a few mm clear of the spine, as joints are)
leave the thoracic bodies and run round the body wall, going down. Slices are rendered from thin
sub-slices (<= 0.8 mm) averaged over the slice thickness (partial volume along z), then white
noise is added. Pixels coarser than 1 mm are area-sampled (sub-pixels <= 0.8 mm) about the spine,
so a cortex thinner than a pixel shows as partial volume, not as nothing; edges are otherwise sharp
unless `psf_fwhm_mm` blurs them.

Options: 11/12/13 rib pairs (the lowest rib-bearing vertebra is T11/T12/L1), habitus (fat
thickness, abdomen width; an obese body may overflow the field), a scoliotic C curve with axial
rotation of the vertebrae (about a point behind the body, rib necks turning with them), IV contrast
(aorta, IVC), a field of view cutting L1, a collapsed sclerotic L1, a metal bead in L1, flips of
any axis (the array comes back flipped, with `affine` and `z_increases_superior` to match).
Iliac wings and sacral alae sit at the bottom. `PhantomTruth` records per-level trabecular HU,
slice ranges, a label volume of the bodies, the rib count and whether L1 should be measurable,
with the reason.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

THORACIC = tuple(f"T{i}" for i in range(1, 13))
LUMBAR = tuple(f"L{i}" for i in range(1, 6))
# Label codes of the level label volume: T1..T12 = 1..12, L1..L5 = 13..17, sacrum = 18.
LEVEL_CODES = {name: i + 1 for i, name in enumerate(THORACIC + LUMBAR)} | {"S": 18}

# Spine levels the phantom builds, bottom-up above S1: (name, half-width, half-depth, height) mm,
# and the height of the disc under each of them.
_LEVELS = [
    ("L5", 25.0, 18.0, 26.0),
    ("L4", 24.0, 18.0, 27.0),
    ("L3", 23.0, 18.0, 27.0),
    ("L2", 22.0, 17.5, 26.0),
    ("L1", 21.0, 17.0, 25.0),
    ("T12", 20.0, 16.0, 23.0),
    ("T11", 18.0, 15.0, 22.0),
    ("T10", 17.0, 14.0, 21.0),
    ("T9", 16.0, 13.0, 20.0),
    ("T8", 15.0, 12.0, 19.0),
]
_DISC_BELOW = {
    "L5": 10.0,
    "L4": 11.0,
    "L3": 10.5,
    "L2": 10.0,
    "L1": 9.0,
    "T12": 7.5,
    "T11": 7.0,
    "T10": 6.5,
    "T9": 5.5,
    "T8": 5.0,
}
# How far round the body wall each rib runs (radians from the back), lower ribs being shorter.
_RIB_REACH = {"L1": 0.95, "T12": 1.2, "T11": 1.6, "T10": 2.0, "T9": 2.3, "T8": 2.4}

WALL_RX, WALL_RY = 132.0, 92.0  # the abdominal wall's half-axes (inside the fat), mm
SOFT_HU, FAT_HU, AIR_HU, DISC_HU, CSF_HU = 40.0, -100.0, -1000.0, 80.0, 10.0
RIB_HU, ARCH_HU, METAL_HU = 520.0, 620.0, 3000.0
RIB_R = 3.0  # rib radius, mm
SHELL = 1.5  # cortical shell thickness, mm
ENDPLATE = 1.2  # endplate thickness, mm


@dataclass
class PhantomSpec:
    """What to build. Defaults: a 12-rib-pair adult from mid-sacrum to the top of T10."""

    shape_yx: tuple[int, int] = (320, 320)
    pixel_mm: float = 1.0
    slice_spacing_mm: float = 2.0
    slice_thickness_mm: float | None = None  # None: equal to the spacing
    trabecular_hu: float | dict[str, float] = 150.0  # L1 value, others vary a little around it
    cortical_hu: float = 700.0
    noise_sd: float = 10.0
    psf_fwhm_mm: float = 0.0  # in-plane blur (scanner PSF) before noise; 0: sharp edges
    rib_pairs: int = 12  # 11, 12 or 13: the lowest rib-bearing vertebra is T11, T12 or L1
    contrast_hu: float = 0.0  # IV contrast: added to the aorta (and 60 % of it to the IVC)
    fat_mm: float = 18.0  # habitus: subcutaneous fat (10 lean .. 60 obese; may leave the field)
    width_scale: float = 1.0  # habitus: the abdomen's (and rib cage's) width, 0.9 .. 1.2
    scoliosis_mm: float = 0.0  # a lateral C curve: the spine shifted sideways up to this much
    rotation_deg: float = 0.0  # axial rotation of the vertebrae along the same curve, at its apex
    fov: str = "full"  # "full", "cut_l1_top" (field ends in L1), "cut_l1_bottom" (starts in L1),
    # "ends_in:L4" (field starts mid-L4: above the sacrum), "ends_in:L5-S1" (in that disc), ...
    fov_mm: tuple[float, float] | None = None  # explicit (bottom, top) on the anatomical axis
    fracture_l1: bool = False  # L1 collapsed to 55 % height, sclerotic
    # a graded compression fracture: (level, "wedge" | "biconcave" | "crush", Genant grade 1-3)
    fracture: tuple[str, str, int] | None = None
    fracture_loss: float | None = None  # fraction of height lost (default: the grade's middle)
    sclerotic: bool = False  # a dense band under the sunken endplate
    metal_l1: bool = False  # a 3 mm radius metal bead in the L1 body
    flip_z: bool = False
    flip_y: bool = False
    flip_x: bool = False
    seed: int = 0


@dataclass
class PhantomTruth:
    """Ground truth of a phantom, in the returned (possibly flipped) array's indices."""

    spacing: tuple[float, float, float]
    affine: np.ndarray
    z_increases_superior: bool
    trabecular_hu: dict[str, float]  # per level present in the field
    z_slices: dict[str, tuple[int, int]]  # per level: slice index range [start, stop)
    cut_by_fov: dict[str, bool]
    labels: np.ndarray  # int16, LEVEL_CODES of vertebral bodies (sacrum: S1 body), 0 elsewhere
    rib_pairs: int
    lowest_rib_level: str
    sacrum_in_field: bool
    l1_measurable: bool
    l1_reason: str  # "" when measurable
    l1_hu: float
    fractured: list[str] = field(default_factory=list)
    metal: list[str] = field(default_factory=list)
    family: str = "A"  # which generator: A (this module) or B (harness.phantoms_b)
    fractures: dict[str, tuple[str, int, bool]] = field(default_factory=dict)  # kind, grade, band
    field_above_sacrum: bool = False  # the field's lowest slice cuts a lumbar body or disc
    l1_by_ribs_only: bool = False  # L1 right when named from the lowest ribs alone


FRACTURE_GRADES = {1: (0.20, 0.25), 2: (0.25, 0.40), 3: (0.40, 0.60)}  # Genant: height lost


@dataclass
class _Level:
    name: str
    rx: float
    ry: float
    bottom: float
    top: float
    cy: float  # body centre, y mm (posterior positive)
    hu: float
    ribs: bool
    lumbar: bool
    kind: str = ""  # graded fracture: wedge, biconcave or crush; "" when sound
    loss: float = 0.0  # its fraction of height lost (of the sound height)
    band: bool = False  # with a sclerotic band
    sound_h: float = 0.0

    @property
    def height(self) -> float:
        return self.top - self.bottom

    @property
    def canal_y(self) -> float:
        return self.cy + self.ry + 9.0


def fracture_grade(loss: float) -> int:
    """Genant grade of a fraction of height lost: 0 (< 20 %), 1, 2 (25-40 %), 3 (> 40 %)."""
    return 0 if loss < 0.20 else 1 if loss < 0.25 else 2 if loss <= 0.40 else 3


def _levels(spec: PhantomSpec, rng: np.random.Generator) -> list[_Level]:
    hus = spec.trabecular_hu  # one L1 value, or one per level
    rib_levels = {11: THORACIC[:11], 12: THORACIC, 13: THORACIC + ("L1",)}[spec.rib_pairs]
    out, s = [], 0.0
    for i, (name, rx, ry, h) in enumerate(_LEVELS):
        s += _DISC_BELOW[name]
        if spec.fracture_l1 and name == "L1":
            h *= 0.55
        kind, loss, sound_h = "", 0.0, h
        if spec.fracture is not None and spec.fracture[0] == name:
            kind, grade = spec.fracture[1], spec.fracture[2]
            if kind not in ("wedge", "biconcave", "crush") or grade not in FRACTURE_GRADES:
                raise ValueError("fracture: (level, wedge|biconcave|crush, grade 1-3)")
            lo_g, hi_g = FRACTURE_GRADES[grade]
            loss = spec.fracture_loss if spec.fracture_loss is not None else (lo_g + hi_g) / 2
            if kind == "crush":  # the body shortens; the spine above comes down
                h *= 1.0 - loss
        if isinstance(hus, dict):
            hu = float(hus[name])
        else:
            base = float(hus)
            # thoracic a bit denser than lumbar, with a little per-level scatter; L1 exact
            hu = base if name == "L1" else base + 2.0 * (i - 4) + float(rng.uniform(-6, 6))
        if spec.fracture_l1 and name == "L1":
            hu += 70.0
        lordosis = -7.0 * math.exp(-(((s + h / 2 - 65.0) / 55.0) ** 2))
        lv = _Level(name, rx, ry, s, s + h, 40.0 + lordosis, hu, name in rib_levels, name[0] == "L")
        lv.kind, lv.loss, lv.band, lv.sound_h = kind, loss, spec.sclerotic and bool(kind), sound_h
        out.append(lv)
        s += h
    return out


class _Plane:
    """Coordinates (mm) of a box of one slice's grid, body centre at 0, y posterior, x left."""

    def __init__(
        self,
        ny: int,
        nx: int,
        px: float,
        ys: slice = slice(None),
        xs: slice = slice(None),
        sub: int = 1,
    ):
        # sub x sub points per pixel, centred on it (sub odd: the middle one is the centre)
        off = (np.arange(sub) + 0.5) / sub - 0.5
        iy = (np.arange(ny)[ys][:, None] + off).ravel()
        ix = (np.arange(nx)[xs][:, None] + off).ravel()
        self.y = ((iy - (ny - 1) / 2) * px).astype(np.float32)[:, None]
        self.x = ((ix - (nx - 1) / 2) * px).astype(np.float32)[None, :]
        self.px = px / sub

    def shifted(self, dx: float) -> _Plane:
        """The same points, with x measured from `dx` (what is drawn at 0 lands at dx)."""
        out = copy.copy(self)
        out.x = self.x - np.float32(dx)
        return out

    def rotated(self, theta: float, cy: float) -> _Plane:
        """The same points, what is drawn turned by `theta` radians about (0, cy)."""
        out = copy.copy(self)
        c, s, dy = np.float32(math.cos(theta)), np.float32(math.sin(theta)), self.y - np.float32(cy)
        out.x = c * self.x + s * dy  # full (y, x) grids from here on
        out.y = np.float32(cy) - s * self.x + c * dy
        return out

    def ellipse(self, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        return ((self.x - cx) / rx) ** 2 + ((self.y - cy) / ry) ** 2 <= 1.0

    def box(self, x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
        return (self.x >= x0) & (self.x <= x1) & (self.y >= y0) & (self.y <= y1)


def _rib_path(lv: _Level, side: int, width_scale: float = 1.0) -> np.ndarray:
    """Points (x, y, s) every 0.5 mm along one rib, from the head beside the body outward, and
    how much each turns with its vertebra (1 at the neck, 0 beyond 80 mm along the rib)."""
    head = np.array([side * (lv.rx + 6.0), lv.cy + 0.4 * lv.ry, lv.top - 0.15 * lv.height])
    tub = np.array([side * 38.0, lv.canal_y, head[2] - 4.0])
    ax, ay = WALL_RX * width_scale, WALL_RY
    phi0 = math.asin(min(1.0, 62.0 / ax))
    phis = np.linspace(phi0, _RIB_REACH[lv.name], 400)
    arc = np.stack([side * ax * np.sin(phis), ay * np.cos(phis)], axis=1)
    pts2 = np.asarray([head[:2], tub[:2]] + list(arc))
    seg = np.linalg.norm(np.diff(pts2, axis=0), axis=1)
    length = np.concatenate([[0.0], np.cumsum(seg)])
    t = np.arange(0.0, length[-1], 0.5)
    x = np.interp(t, length, pts2[:, 0])
    y = np.interp(t, length, pts2[:, 1])
    s = head[2] - 0.12 * np.minimum(t, 20.0) - 0.28 * np.maximum(t - 20.0, 0.0)
    return np.stack([x, y, s, np.clip(1.0 - (t - 20.0) / 60.0, 0.0, 1.0)], axis=1)


def _spine_plane(
    pl: _Plane,
    levels: list[_Level],
    s: float,
    spec: PhantomSpec,
    img: np.ndarray,
    lab: np.ndarray | None,
) -> None:
    """Paint the spine, sacrum and pelvis at anatomical height s into img (HU) and lab (codes)."""
    cort = spec.cortical_hu
    for k, lv in enumerate(levels):
        below = levels[k - 1] if k > 0 else None
        disc_lo = below.top if below else 0.0
        if disc_lo <= s < lv.bottom:  # disc under this level
            rx = (lv.rx + (below.rx if below else 26.0)) / 2
            ry = (lv.ry + (below.ry if below else 19.0)) / 2
            cy = (lv.cy + (below.cy if below else 40.0)) / 2
            img[pl.ellipse(0, cy, rx, ry)] = DISC_HU
            img[
                pl.ellipse(0, (lv.canal_y + (below.canal_y if below else lv.canal_y)) / 2, 8, 8)
            ] = CSF_HU
            break
        if not lv.bottom <= s < lv.top:
            continue
        h, rel = lv.height, (s - lv.bottom) / lv.height
        outer = pl.ellipse(0, lv.cy, lv.rx, lv.ry)
        # posterior elements first, the body over them
        if 0.2 <= rel <= 0.95:
            img[pl.ellipse(0, lv.canal_y, 12.5, 12.0)] = ARCH_HU
        img[pl.box(-3.0, 3.0, lv.canal_y, lv.canal_y + 30.0)] = ARCH_HU
        if lv.lumbar and not lv.ribs and 0.3 <= rel <= 0.7:
            img[pl.box(-44.0, 44.0, lv.canal_y - 4.0, lv.canal_y + 4.0)] = ARCH_HU
        img[pl.ellipse(0, lv.canal_y, 8.0, 8.0)] = CSF_HU
        if lv.kind:
            _fractured_body(pl, lv, s, cort, img, lab)
        elif min(s - lv.bottom, lv.top - s) < ENDPLATE or (
            spec.fracture_l1 and lv.name == "L1" and min(rel, 1 - rel) < 0.12
        ):
            img[outer] = cort
        else:
            img[outer] = cort
            img[pl.ellipse(0, lv.cy, lv.rx - SHELL, lv.ry - SHELL)] = lv.hu
            if 0.2 <= rel <= 0.8:
                img[pl.ellipse(0, lv.cy + 0.55 * lv.ry, 3.5, 2.5)] = lv.hu - 70.0
        if lab is not None and not lv.kind:
            lab[outer] = LEVEL_CODES[lv.name]
        if spec.metal_l1 and lv.name == "L1" and abs(rel - 0.5) * h < 3.0:
            r = math.sqrt(max(9.0 - (rel - 0.5) ** 2 * h * h, 0.0))
            img[pl.ellipse(-0.45 * lv.rx, lv.cy, r, r)] = METAL_HU
        break
    if s < 0.0:  # sacrum: S1 body and alae, sloping backward; iliac wings and SI bars
        cy = 40.0 - 0.35 * s
        region = pl.ellipse(0, cy, 26.0, 19.0) | pl.ellipse(0, cy + 3.0, 56.0, 13.0)
        inner = pl.ellipse(0, cy, 26.0 - SHELL, 19.0 - SHELL) | pl.ellipse(
            0, cy + 3.0, 56.0 - SHELL, 13.0 - SHELL
        )
        img[region] = cort
        img[inner] = 190.0
        if lab is not None:
            lab[pl.ellipse(0, cy, 26.0, 19.0)] = LEVEL_CODES["S"]
        img[pl.ellipse(0, cy + 28.0, 7.0, 6.0)] = CSF_HU
        if -70.0 < s < -3.0:  # the sacroiliac joints, up to just below S1's top
            img[pl.box(50.0, 78.0, cy - 2, cy + 14) | pl.box(-78.0, -50.0, cy - 2, cy + 14)] = cort
    if -150.0 < s < 25.0:
        for side in (-1, 1):
            ring = pl.ellipse(side * 95.0, 30.0, 24.0, 34.0) & ~pl.ellipse(
                side * 95.0, 30.0, 18.0, 28.0
            )
            img[ring & (pl.y > 10.0)] = cort


def _fractured_body(
    pl: _Plane, lv: _Level, s: float, cort: float, img: np.ndarray, lab: np.ndarray | None
) -> None:
    """A graded fracture at height s: a wedge's upper endplate sunk in front, a biconcave body's
    two endplates dished in the middle, a crushed body (already shortened) as it is; the disc
    fills where the body sank; a sclerotic band under the sunken endplate."""
    h = lv.height
    outer = pl.ellipse(0, lv.cy, lv.rx, lv.ry)
    r2 = (pl.x / lv.rx) ** 2 + ((pl.y - lv.cy) / lv.ry) ** 2
    lo = np.full(np.broadcast(pl.x, pl.y).shape, lv.bottom, np.float32)
    hi = np.full_like(lo, lv.top)
    if lv.kind == "wedge":  # the anterior wall loses `loss` of the sound height
        hi -= lv.loss * lv.sound_h * np.clip((lv.cy + lv.ry - pl.y) / (2 * lv.ry), 0.0, 1.0)
    elif lv.kind == "biconcave":  # the middle loses it, half from each endplate
        dish = 0.5 * lv.loss * lv.sound_h * np.clip(1.0 - r2, 0.0, 1.0)
        lo, hi = (lo + dish).astype(np.float32), (hi - dish).astype(np.float32)
    body = outer & (s >= lo) & (s < hi)
    img[outer & ~body] = DISC_HU
    img[body] = cort
    inner = body & pl.ellipse(0, lv.cy, lv.rx - SHELL, lv.ry - SHELL)
    inner &= np.minimum(s - lo, hi - s) >= ENDPLATE
    img[inner] = lv.hu
    rel = (s - lv.bottom) / h
    if 0.2 <= rel <= 0.8:
        img[inner & pl.ellipse(0, lv.cy + 0.55 * lv.ry, 3.5, 2.5)] = lv.hu - 70.0
    if lv.band:
        img[inner & (hi - s < ENDPLATE + 4.0)] = lv.hu + 300.0
    if lab is not None:
        lab[body] = LEVEL_CODES[lv.name]


def _background(pl: _Plane, spec: PhantomSpec, vessels: bool = True) -> np.ndarray:
    """Air, the body's fat and soft tissue, and (unless drawn per slice) aorta and IVC."""
    out = np.full((pl.y.shape[0], pl.x.shape[1]), AIR_HU, np.float32)
    wall_rx = WALL_RX * spec.width_scale
    out[pl.ellipse(0, 0, wall_rx + spec.fat_mm, WALL_RY + spec.fat_mm)] = FAT_HU
    out[pl.ellipse(0, 0, wall_rx, WALL_RY)] = SOFT_HU
    if vessels:
        _vessels(pl, spec, out)
    return out


def _vessels(pl: _Plane, spec: PhantomSpec, img: np.ndarray) -> None:
    """Aorta (left, in front of the bodies) and IVC (right), with any IV contrast."""
    aorta_y = 40.0 - 17.0 - 13.0
    img[pl.ellipse(18.0, aorta_y, 11.0, 11.0)] = SOFT_HU + spec.contrast_hu
    img[pl.ellipse(-24.0, aorta_y - 2.0, 12.0, 10.0)] = SOFT_HU + 0.6 * spec.contrast_hu


def _ends_in(levels: list[_Level], where: str) -> float:
    """Height of the middle of a body ("L4") or of the disc under it ("L4-L5", "L5-S1")."""
    by = {lv.name: lv for lv in levels}
    if "-" not in where:
        return (by[where].bottom + by[where].top) / 2
    upper = by[where.split("-")[0]]
    k = levels.index(upper)
    return (upper.bottom + (levels[k - 1].top if k else 0.0)) / 2


def make_phantom(spec: PhantomSpec | None = None, /, **kw: Any) -> tuple[np.ndarray, PhantomTruth]:
    """Build a phantom: (int16 HU volume (z, y, x), ground truth). Keywords override `spec`."""
    spec = spec or PhantomSpec()
    if kw:
        spec = PhantomSpec(**{**spec.__dict__, **kw})
    rng = np.random.default_rng(spec.seed)
    levels = _levels(spec, rng)
    by_name = {lv.name: lv for lv in levels}
    l1 = by_name["L1"]
    sz, px = spec.slice_spacing_mm, spec.pixel_mm
    thick = spec.slice_thickness_mm or sz
    if spec.fov_mm is not None:
        lo, hi = spec.fov_mm
    elif spec.fov == "cut_l1_top":
        lo, hi = -25.0, (l1.bottom + l1.top) / 2
    elif spec.fov == "cut_l1_bottom":
        lo, hi = (l1.bottom + l1.top) / 2, by_name["T10"].top + 3.0
    elif spec.fov.startswith("ends_in:"):  # the field starts in a lumbar body or disc
        lo, hi = _ends_in(levels, spec.fov[8:]), by_name["T10"].top + 3.0
    else:
        lo, hi = -25.0, by_name["T10"].top + 3.0
    nz = int(math.floor((hi - lo) / sz))
    centres = lo + (np.arange(nz) + 0.5) * sz
    ny, nx = spec.shape_yx
    base = _background(_Plane(ny, nx, px), spec)
    # the spine, sacrum and pelvis are drawn in a box only; ribs are stamped on the full plane
    ys = slice(*np.clip(np.round(np.array([-8.0, 125.0]) / px + (ny - 1) / 2).astype(int), 0, ny))
    xs = slice(*np.clip(np.round(np.array([-132.0, 132.0]) / px + (nx - 1) / 2).astype(int), 0, nx))
    # pixels coarser than 1 mm are area-sampled there: point samples 2 mm apart can miss the
    # 1.5 mm cortical shell altogether, which a scanner's partial volume never does
    sub = 1 if px <= 1.0 else math.ceil(px / 0.8) | 1
    pl = _Plane(ny, nx, px, ys, xs, sub)
    moving = bool(spec.scoliosis_mm)  # the great vessels follow the curved spine, per slice
    turning = bool(spec.rotation_deg)
    base_box = _background(pl, spec, vessels=not moving)
    hy, hx = base[ys, xs].shape
    base[ys, xs] = base_box.reshape(hy, sub, hx, sub).mean((1, 3))
    lab_box = np.zeros_like(base_box, np.int16)

    ribs = [_rib_path(lv, side, spec.width_scale) for lv in levels if lv.ribs for side in (-1, 1)]
    rib_pts = np.concatenate(ribs) if ribs else np.zeros((0, 4))
    s_lo, s_hi = min(lv.bottom for lv in levels), max(lv.top for lv in levels)

    def bend(at: np.ndarray | float) -> np.ndarray:  # 0 at the ends of the spine, 1 at the apex
        return np.sin(np.pi * np.clip((np.asarray(at) - s_lo) / (s_hi - s_lo), 0.0, 1.0))

    # the vertebrae turn about a point just behind the bodies (the front of the canal)
    pivot_y = 58.0
    turn = np.radians(spec.rotation_deg) * bend(rib_pts[:, 2]) * rib_pts[:, 3]
    dy = rib_pts[:, 1] - pivot_y
    rib_pts[:, 0], rib_pts[:, 1] = (
        np.cos(turn) * rib_pts[:, 0] - np.sin(turn) * dy,
        pivot_y + np.sin(turn) * rib_pts[:, 0] + np.cos(turn) * dy,
    )
    rib_pts[:, 0] += spec.scoliosis_mm * bend(rib_pts[:, 2])
    rib_pts = rib_pts[np.argsort(rib_pts[:, 2])]
    stamp_r = int(math.ceil(RIB_R / px))
    oy, ox = np.mgrid[-stamp_r : stamp_r + 1, -stamp_r : stamp_r + 1] * px
    rr = np.hypot(oy, ox)
    rib_iy = np.rint(rib_pts[:, 1] / px + (ny - 1) / 2).astype(int) - stamp_r
    rib_ix = np.rint(rib_pts[:, 0] / px + (nx - 1) / 2).astype(int) - stamp_r
    fits = (rib_iy >= 0) & (rib_ix >= 0) & (rib_iy + 2 * stamp_r < ny) & (rib_ix + 2 * stamp_r < nx)

    n_sub = int(math.ceil(thick / 0.8)) | 1  # odd: the middle sub-slice is the slice centre
    offsets = ((np.arange(n_sub) + 0.5) / n_sub - 0.5) * thick
    vol = np.empty((nz, ny, nx), np.int16)
    labels = np.zeros((nz, ny, nx), np.int16)
    img = np.empty_like(base_box)
    acc = np.empty((ny, nx), np.float32)
    rib = np.zeros((ny, nx), bool)
    for k, zc in enumerate(centres):
        np.multiply(base, n_sub, out=acc)
        for j, off in enumerate(offsets):
            s = float(zc + off)
            img[:] = base_box
            mid = j == n_sub // 2
            if mid:
                lab_box[:] = 0
            plane = pl
            if moving:
                plane = pl.shifted(float(spec.scoliosis_mm * bend(s)))
                _vessels(plane, spec, img)
            if turning:
                plane = plane.rotated(math.radians(spec.rotation_deg) * float(bend(s)), pivot_y)
            _spine_plane(plane, levels, s, spec, img, lab_box if mid else None)
            if mid:  # labels point-sampled at pixel centres
                labels[k, ys, xs] = lab_box[sub // 2 :: sub, sub // 2 :: sub]
            acc[ys, xs] += (img - base_box).reshape(hy, sub, hx, sub).mean((1, 3))
            lo_i = np.searchsorted(rib_pts[:, 2], s - RIB_R)
            hi_i = np.searchsorted(rib_pts[:, 2], s + RIB_R)
            if hi_i > lo_i:
                rib[:] = False
                for i in range(lo_i, hi_i):
                    if fits[i]:
                        r2 = RIB_R**2 - (rib_pts[i, 2] - s) ** 2
                        y0, x0 = rib_iy[i], rib_ix[i]
                        rib[y0 : y0 + 2 * stamp_r + 1, x0 : x0 + 2 * stamp_r + 1] |= rr * rr <= r2
                acc[rib] += RIB_HU - base[rib]
        acc /= n_sub
        if spec.psf_fwhm_mm > 0:
            acc[:] = ndimage.gaussian_filter(acc, spec.psf_fwhm_mm / 2.355 / px, mode="nearest")
        acc += rng.standard_normal((ny, nx), dtype=np.float32) * np.float32(spec.noise_sd)
        vol[k] = np.clip(np.rint(acc), -1024, 3071)

    # ground truth, before flips (slice k covers centres[k])
    z_slices, cut, hus = {}, {}, {}
    for lv in levels:
        inside = np.nonzero((centres >= lv.bottom) & (centres < lv.top))[0]
        if inside.size:
            z_slices[lv.name] = (int(inside[0]), int(inside[-1]) + 1)
            cut[lv.name] = bool(lv.bottom < lo or lv.top > hi)
            hus[lv.name] = float(lv.hu)
    sacrum_in = lo < -18.0  # the sacrum with 15 mm of its joints to the ilia
    fractures = {lv.name: (lv.kind, fracture_grade(lv.loss), lv.band) for lv in levels if lv.kind}
    if spec.fracture_l1:
        fractures["L1"] = ("crush", 3, True)
    lowest_rib = [lv.name for lv in levels if lv.ribs][0]
    reason = ""
    if spec.rib_pairs != 12:
        reason = f"{spec.rib_pairs} rib pairs: transitional anatomy, level count ambiguous"
    elif "L1" not in z_slices or cut["L1"]:
        reason = "L1 cut by the field of view"
    elif not sacrum_in:
        reason = "sacrum not in the field: rib count cannot be cross-checked"
    elif "T12" not in z_slices:
        reason = "lowest ribs not in the field"
    elif spec.fracture_l1:
        reason = "L1 fractured (collapsed)"
    elif fractures.get("L1", ("", 0))[1] >= 2:
        reason = f"L1 fractured (Genant grade {fractures['L1'][1]})"
    elif spec.metal_l1:
        reason = "metal in L1"

    vol, labels, affine, z_slices = placed(
        vol, labels, z_slices, px, sz, float(centres[0]) if nz else lo, spec
    )
    truth = PhantomTruth(
        spacing=(sz, px, px),
        affine=affine,
        z_increases_superior=not spec.flip_z,
        trabecular_hu=hus,
        z_slices=z_slices,
        cut_by_fov=cut,
        labels=np.ascontiguousarray(labels),
        rib_pairs=spec.rib_pairs,
        lowest_rib_level=lowest_rib,
        sacrum_in_field=sacrum_in,
        l1_measurable=reason == "",
        l1_reason=reason,
        l1_hu=float(l1.hu),
        fractured=sorted(fractures),
        metal=["L1"] if spec.metal_l1 else [],
        family="A",
        fractures=fractures,
        field_above_sacrum=lo > 0.0,
        l1_by_ribs_only=lo > 0.0
        and spec.rib_pairs == 12
        and "L1" in z_slices
        and not cut["L1"]
        and "T12" in z_slices
        and fractures.get("L1", ("", 0))[1] < 2
        and not spec.metal_l1,
    )
    return np.ascontiguousarray(vol), truth


def placed(
    vol: np.ndarray,
    labels: np.ndarray,
    z_slices: dict[str, tuple[int, int]],
    px: float,
    sz: float,
    z0: float,
    spec: Any,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, tuple[int, int]]]:
    """A phantom's affine (LPS mm; first slice at z0, the field centred in plane) and the flips
    its spec asks for (`flip_z`, `flip_y`, `flip_x`), applied to the volume, its labels, the
    affine and the truth's slice ranges alike (one step for both phantom families)."""
    nz, ny, nx = vol.shape
    affine = np.zeros((4, 4))
    affine[0, 2], affine[1, 1], affine[2, 0], affine[3, 3] = px, px, sz, 1.0
    affine[:3, 3] = [-(nx - 1) / 2 * px, -(ny - 1) / 2 * px, z0]
    for axis, flip in enumerate((spec.flip_z, spec.flip_y, spec.flip_x)):
        if not flip:
            continue
        vol, labels = np.flip(vol, axis), np.flip(labels, axis)
        affine[:3, 3] += affine[:3, axis] * (vol.shape[axis] - 1)
        affine[:3, axis] *= -1
        if axis == 0:
            z_slices = {k: (nz - b, nz - a) for k, (a, b) in z_slices.items()}
    return vol, labels, affine, z_slices
