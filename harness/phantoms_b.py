"""A second, independent family of spine phantoms ("family B"), for checking what family A
(harness.phantoms) was tuned on.

Written apart from family A: no shape code is shared, only the ground-truth record
(`PhantomTruth`) and its label codes, so a result can be scored the same way on both.

How B differs from A
--------------------
- Rendering: every structure is a signed distance in plane and an extent in z; a voxel's value
  is painted with the fraction of it the structure covers (in plane from the distance, in z
  from the overlap with the slab). Partial volume at coarse pixels and thick slices comes out
  of that, not from supersampling. Then a scanner blur (always on), then textured noise
  (white noise smoothed, so it is correlated over a pixel or two, as CT noise is).
- Bodies: bean-shaped (a squarish super-ellipse with a notch at the back), waisted at
  mid-height, concave endplates, a thinner cortex (1.1 mm) at a lower HU (620 by default),
  a trabecular texture, a basivertebral vein behind. Level sizes and disc heights are B's own.
- Posterior elements: pedicles, lamina, a spinous process sloping down, transverse processes
  (the lumbar ones longest at L3), a continuous CSF canal.
- Ribs: hollow tubes (cortex rim, marrow) whose heads touch the body and whose necks touch the
  transverse process (joints closed at CT resolution), running back, out and round a rib cage
  wider than the abdomen, descending more steeply; the 12th is short, a 13th shorter still.
- Sacrum: tilted ~37 degrees (its body runs backward going down), alae at a lower HU than the
  lumbar bodies, a thin cortex; sacroiliac joints (a 2.5 mm gap) to iliac wings drawn as thick
  curved plates (cortex and marrow) rising to a crest beside L5.
- Body: a flat-backed super-ellipse, a muscle wall, liver, spleen, kidneys, psoas and
  paraspinal muscles, bowel with air, aorta dividing into the iliac arteries at L4, IVC, renal
  arteries (bright in an arterial phase, running out sideways like ribs), and a curved table
  under the back.
- Fractures: wedge (anterior height lost), biconcave (the middle of both endplates sunk) or
  crush (the whole body), by Genant grade (1: 20-25 %, 2: 25-40 %, 3: > 40 % height lost),
  with or without a sclerotic band under the sunken endplate, at any level.

Conventions are family A's: int16 HU (z, y, x), unflipped LPS order (z superior, y posterior,
x left), the same affine and flips, the same `PhantomTruth`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from harness.phantoms import LEVEL_CODES, PhantomTruth, fracture_grade, placed

# name, half-width, half-depth, height, disc under it (mm), bottom-up from S1
_TABLE = [
    ("L5", 26.5, 17.0, 27.5, 12.0),
    ("L4", 25.5, 17.5, 28.5, 12.5),
    ("L3", 24.0, 17.0, 28.0, 11.5),
    ("L2", 23.0, 16.5, 27.5, 10.5),
    ("L1", 22.0, 16.0, 26.5, 9.5),
    ("T12", 20.5, 15.5, 25.0, 8.0),
    ("T11", 19.0, 14.5, 23.5, 7.0),
    ("T10", 17.5, 13.5, 22.0, 6.0),
    ("T9", 16.5, 13.0, 21.0, 5.5),
    ("T8", 15.5, 12.5, 20.0, 5.0),
]
_TP_REACH = {"L5": 36.0, "L4": 41.0, "L3": 46.0, "L2": 40.0, "L1": 31.0}  # transverse processes
_RIB_LEN = {"T8": 280.0, "T9": 270.0, "T10": 240.0, "T11": 175.0, "T12": 100.0, "L1": 48.0}
GRADES = {1: (0.20, 0.25), 2: (0.25, 0.40), 3: (0.40, 0.55)}  # Genant, fraction of height lost
KINDS = ("wedge", "biconcave", "crush")

SHELL, ENDPLATE, CONCAVITY = 1.1, 1.0, 1.3  # cortex, endplate thickness, endplate dip (mm)
FAT, MUSCLE, ORGAN, DISC, NUCLEUS, CSF, AIR = -95.0, 48.0, 38.0, 95.0, 72.0, 12.0, -1000.0
WALL_A, WALL_B = 140.0, 95.0  # the muscle wall's half-width (x width_scale) and half-depth, mm
CAGE_CY = -10.0  # the rib cage's centre, y


@dataclass
class SpecB:
    """What to build. Defaults: a 12-rib-pair adult from below the SI joints to the top of T10."""

    shape_yx: tuple[int, int] = (320, 320)
    pixel_mm: float = 1.0
    slice_spacing_mm: float = 2.0
    slice_thickness_mm: float | None = None  # None: equal to the spacing
    trabecular_hu: float = 140.0  # L1; other levels follow a trend with scatter
    cortical_hu: float = 620.0
    sacrum_hu: float = 115.0  # the sacrum's trabecular bone, apart from the lumbar bodies
    ilium_hu: float = 175.0  # iliac marrow
    pelvic_cortex_hu: float = 540.0
    noise_sd: float = 12.0
    psf_mm: float = 1.1  # scanner blur, FWHM
    rib_pairs: int = 12
    contrast_hu: float = 0.0  # arterial enhancement (veins, kidneys and liver take a share)
    fat_mm: float = 20.0
    width_scale: float = 1.0
    scoliosis_mm: float = 0.0  # lateral shift of the column at the apex of a C curve
    fov: str = "full"  # "full", "abdomen" (ends in L4), "cut_l1_top", "cut_l1_bottom",
    # "ends_in:L4" (field starts mid-L4), "ends_in:L5-S1" (in that disc), ...
    fov_mm: tuple[float, float] | None = None  # explicit (bottom, top), mm above S1
    fracture: tuple[str, str, int] | None = None  # (level, kind, Genant grade)
    fracture_loss: float | None = None  # exact fraction of height lost (default: mid-grade)
    sclerotic: bool = False  # a dense band under the sunken endplate
    metal_l1: bool = False
    table: bool = True
    flip_z: bool = False
    flip_y: bool = False
    flip_x: bool = False
    seed: int = 0


@dataclass
class _Vert:
    name: str
    a: float  # half-width
    b: float  # half-depth
    bot: float
    top: float
    cy: float
    hu: float
    rib: bool
    kind: str = ""  # fracture kind, "" when sound
    loss: float = 0.0
    band: bool = False

    @property
    def h(self) -> float:
        return self.top - self.bot

    @property
    def canal_y(self) -> float:
        return self.cy + self.b + 10.0


def _verts(spec: SpecB, rng: np.random.Generator) -> list[_Vert]:
    rib_from = {11: "T11", 12: "T12", 13: "L1"}[spec.rib_pairs]
    names = [t[0] for t in _TABLE]
    ribbed = set(names[names.index(rib_from) :])
    out, s = [], 0.0
    for i, (name, a, b, h, disc) in enumerate(_TABLE):
        s += disc
        kind, loss = "", 0.0
        if spec.fracture and spec.fracture[0] == name:
            kind, grade = spec.fracture[1], spec.fracture[2]
            if kind not in KINDS or grade not in GRADES:
                raise ValueError(f"fracture kind in {KINDS}, grade 1..3")
            lo, hi = GRADES[grade]
            loss = spec.fracture_loss if spec.fracture_loss is not None else (lo + hi) / 2
        # thoracic bodies sit further back (kyphosis), lumbar ones forward (lordosis)
        cy = 27.0 + 9.0 * math.tanh((s - 150.0) / 60.0)
        hu = spec.trabecular_hu + (0.0 if name == "L1" else 3.5 * (i - 4) + rng.normal(0, 4))
        top = s + h * (1 - loss) if kind == "crush" else s + h
        out.append(_Vert(name, a, b, s, top, cy, hu, name in ribbed, kind, loss, spec.sclerotic))
        s = top
    return out


# --- geometry: signed distances (negative inside), coverages ---------------------------------


def _sdf_ell(x, y, cx, cy, a, b, p=2.0):
    """Approximate signed distance (mm) to a super-ellipse |dx/a|^p + |dy/b|^p = 1."""
    u, v = np.abs(x - cx) / a, np.abs(y - cy) / b
    q = (u**p + v**p) ** (1.0 / p)
    qs = np.maximum(q, 1e-6)
    g = np.hypot(qs ** (1 - p) * u ** (p - 1) / a, qs ** (1 - p) * v ** (p - 1) / b)
    return (q - 1.0) / np.maximum(g, 1e-6)


def _sdf_box(x, y, x0, x1, y0, y1):
    dx = np.maximum(x0 - x, x - x1)
    dy = np.maximum(y0 - y, y - y1)
    out = np.hypot(np.maximum(dx, 0), np.maximum(dy, 0))
    return out + np.minimum(np.maximum(dx, dy), 0)


def _sdf_polyline(x, y, pts, r):
    """Distance to a thick polyline (a tube of radius r) through pts (n, 2)."""
    best = np.full(np.broadcast(x, y).shape, np.inf, np.float32)
    for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:], strict=False):
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((x - x0) * dx + (y - y0) * dy) / max(dx * dx + dy * dy, 1e-9), 0, 1)
        np.minimum(best, np.hypot(x - x0 - t * dx, y - y0 - t * dy), out=best)
    return best - r


def _cov(sdf, px):
    """Fraction of a pixel of width px inside the region sdf < 0."""
    return np.clip(0.5 - sdf / px, 0.0, 1.0)


def _zcov(lo, hi, z0, z1):
    """Fraction of the slab [z0, z1] inside [lo, hi]."""
    return np.clip((np.minimum(hi, z1) - np.maximum(lo, z0)) / (z1 - z0), 0.0, 1.0)


def _paint(img, c, hu):
    img += c * (hu - img)


def _window(x, y, x_lo, x_hi, y_lo, y_hi, px):
    """The rows and columns of the grid (y a column, x a row of mm) within [x_lo, x_hi] x
    [y_lo, y_hi] and 3 pixels: a structure drawn there covers nothing outside it, so it is
    drawn on that window only (the same values, far fewer pixels)."""
    m = 3.0 * px
    xs, ys = x[0], y[:, 0]
    c0, c1 = np.searchsorted(xs, x_lo - m), np.searchsorted(xs, x_hi + m, "right")
    r0, r1 = np.searchsorted(ys, y_lo - m), np.searchsorted(ys, y_hi + m, "right")
    return slice(int(r0), int(r1)), slice(int(c0), int(c1))


def _paint_ell(img, x, y, px, cx, cy, a, b, hu):
    """Paint an ellipse (`_sdf_ell`), on its window."""
    r, c = _window(x, y, cx - a, cx + a, cy - b, cy + b, px)
    _paint(img[r, c], _cov(_sdf_ell(x[:, c], y[r], cx, cy, a, b), px), hu)


# --- the spine -------------------------------------------------------------------------------


def _body_shape(v: _Vert, x, y, cx, waist):
    a, b = v.a * waist, v.b * waist
    notch = np.hypot(x - cx, y - (v.cy + b + 0.35 * a)) - 0.5 * a
    outer = np.maximum(_sdf_ell(x, y, cx, v.cy, a, b, 2.4), -notch)
    rho2 = np.clip(((x - cx) / a) ** 2 + ((y - v.cy) / b) ** 2, 0.0, 1.0)
    return outer, rho2


def _ends(v: _Vert, x, y, rho2, cx):
    """z of the body's lower and upper surface at each (x, y): concave endplates, fractures."""
    dip = CONCAVITY * (1.0 - rho2)
    lo, hi = v.bot + dip, v.top - dip
    if v.kind == "wedge":  # the front loses `loss` of the height, the back nothing
        front = np.clip((v.cy + v.b - y) / (2 * v.b), 0.0, 1.0)
        hi = hi - v.loss * v.h * front
    elif v.kind == "biconcave":  # both endplates sink in the middle
        sink = 0.5 * v.loss * v.h * (1.0 - rho2) / 0.9
        lo, hi = lo + sink, hi - sink
    return lo, hi


def _vertebra(img, lab, v: _Vert, x, y, px, z0, z1, zc, cx, tex, spec: SpecB) -> None:
    # everything below lies within the transverse processes' reach and from the body's front
    # to the spinous process's tip
    half = max(v.a, 0.62 * v.a + 4.5, 14.5, _TP_REACH.get(v.name, 27.0))
    r, c = _window(x, y, cx - half, cx + half, v.cy - v.b, v.canal_y + 42.0, px)
    img, x, y, tex = img[r, c], x[:, c], y[r], tex[r, c]
    lab = lab[r, c] if lab is not None else None
    rel = np.clip((zc - v.bot) / v.h, 0.0, 1.0)
    outer, rho2 = _body_shape(v, x, y, cx, 1.0 - 0.06 * math.sin(math.pi * rel))
    lo, hi = _ends(v, x, y, rho2, cx)
    cort = spec.cortical_hu
    arch = 0.9 * cort + 150.0  # laminae and processes: thick cortex, denser than a body's shell
    # posterior elements first; the body over them
    canal = v.canal_y
    zc_el = _zcov(v.bot + 0.12 * v.h, v.top - 0.2 * v.h, z0, z1)
    for side in (-1, 1):
        _paint(img, _cov(_sdf_ell(x, y, cx + side * 0.62 * v.a, v.cy + v.b + 4, 4.5, 6.5), px)
               * zc_el, arch)  # fmt: skip
    ring = np.maximum(np.hypot(x - cx, y - canal) - 14.5, 11.0 - np.hypot(x - cx, y - canal))
    ring = np.maximum(ring, canal - y)
    _paint(img, _cov(ring, px) * zc_el, arch)
    slope = 0.3 * np.clip(y - canal - 12.0, 0.0, None)  # the spinous process slopes down
    sp = _sdf_box(x, y, cx - 3.0, cx + 3.0, canal + 12.0, canal + 42.0)
    _paint(img, _cov(sp, px) * _zcov(v.bot + 0.15 * v.h - slope, v.top - 0.3 * v.h - slope, z0, z1),
           arch)  # fmt: skip
    reach = _TP_REACH.get(v.name, 27.0)
    tp_y = canal - 4.0 if v.name[0] == "L" else canal + 2.0
    tp = np.minimum(
        _sdf_box(x, y, cx + 8.0, cx + reach, tp_y - 3.5, tp_y + 3.5),
        _sdf_box(x, y, cx - reach, cx - 8.0, tp_y - 3.5, tp_y + 3.5),
    )
    _paint(img, _cov(tp, px) * _zcov(v.bot + 0.35 * v.h, v.top - 0.25 * v.h, z0, z1), arch)
    # the body: cortex, then the trabecular interior, vein, band
    _paint(img, _cov(outer, px) * _zcov(lo, hi, z0, z1), cort)
    inner = _cov(outer + SHELL, px) * _zcov(lo + ENDPLATE, hi - ENDPLATE, z0, z1)
    _paint(img, inner, v.hu + tex)
    vein = _cov(_sdf_ell(x, y, cx, v.cy + 0.62 * v.b, 3.2, 2.4), px)
    _paint(img, vein * _zcov(v.bot + 0.3 * v.h, v.top - 0.3 * v.h, z0, z1), v.hu - 90.0)
    if v.band and v.kind:  # condensed trabeculae under the sunken upper endplate
        _paint(img, _cov(outer + SHELL, px) * _zcov(hi - ENDPLATE - 3.5, hi - ENDPLATE, z0, z1),
               v.hu + 230.0)  # fmt: skip
    if spec.metal_l1 and v.name == "L1":
        bead = np.hypot(x - cx + 0.4 * v.a, y - v.cy) - 3.0
        _paint(img, _cov(bead, px) * _zcov(v.bot + v.h / 2 - 3, v.bot + v.h / 2 + 3, z0, z1), 3000)
    _paint(img, _cov(np.hypot(x - cx, y - canal) - 8.5, px), CSF)
    if lab is not None:
        lab[(outer < 0) & (lo <= zc) & (zc < hi)] = LEVEL_CODES[v.name]


def _disc(img, lower: _Vert | None, upper: _Vert, x, y, px, z0, z1, cx) -> None:
    """The disc between two bodies (or S1 and L5): from one's upper surface to the other's lower."""
    if lower is None:
        a, b, cy = 26.0, 18.0, upper.cy + 3.0
    else:
        a, b, cy = (lower.a + upper.a) / 2, (lower.b + upper.b) / 2, (lower.cy + upper.cy) / 2
    r, c = _window(x, y, cx - 1.03 * a, cx + 1.03 * a, cy - 1.03 * b, cy + 1.03 * b, px)
    img, x, y = img[r, c], x[:, c], y[r]
    _, rho_u = _body_shape(upper, x, y, cx, 1.0)
    top_of_disc, _ = _ends(upper, x, y, rho_u, cx)
    if lower is None:  # S1's endplate slopes: the L5-S1 disc is higher in front
        bottom_of_disc = -0.35 * (upper.cy - y)
    else:
        _, rho_l = _body_shape(lower, x, y, cx, 1.0)
        _, bottom_of_disc = _ends(lower, x, y, rho_l, cx)
    zc = _zcov(bottom_of_disc, top_of_disc, z0, z1)
    _paint(img, _cov(_sdf_ell(x, y, cx, cy, a * 1.03, b * 1.03, 2.2), px) * zc, DISC)
    _paint(img, _cov(_sdf_ell(x, y, cx, cy - 2.0, 0.55 * a, 0.5 * b), px) * zc, NUCLEUS)


# --- ribs --------------------------------------------------------------------------------------


def _rib_points(v: _Vert, side: int, spec: SpecB, rng: np.random.Generator) -> np.ndarray:
    """(x, y, z) every 0.7 mm along one rib: head on the body, neck on the transverse process,
    back and out to the rib angle, then round the cage, descending."""
    head = (side * (v.a + 2.2), v.cy + 0.45 * v.b)
    tub = (side * 27.0, v.canal_y + 3.0)
    ca, cb = 145.0 * spec.width_scale, 90.0
    t0 = math.asin(min(0.99, 62.0 / ca))
    length = _RIB_LEN[v.name] * float(rng.uniform(0.92, 1.08))
    ts = np.linspace(t0, t0 + length / 90.0, 200)
    cage = np.stack([side * ca * np.sin(ts), CAGE_CY + cb * np.cos(ts)], 1)
    pts = np.vstack([head, tub, cage])
    d = np.r_[0.0, np.cumsum(np.hypot(*np.diff(pts, axis=0).T))]
    t = np.arange(0.0, min(d[-1], length + 40.0), 0.7)
    x, y = np.interp(t, d, pts[:, 0]), np.interp(t, d, pts[:, 1])
    z = v.top - 0.25 * v.h - 0.12 * np.minimum(t, 30.0) - 0.42 * np.maximum(t - 30.0, 0.0)
    return np.stack([x, y, z], 1)


def _ribs(img, rib_pts, spine_dx, px, z0, z1, nx_ny, spec: SpecB) -> None:
    """Ribs as hollow tubes (rim of cortex, marrow): coverage stamped point by point."""
    ny, nx = nx_ny
    rz, rr = 4.0, 2.6  # half-height, half-width of the rib in an axial slice
    near = rib_pts[(rib_pts[:, 2] > z0 - rz) & (rib_pts[:, 2] < z1 + rz)]
    if not len(near):
        return
    k = int(math.ceil((rr + px) / px))
    oy, ox = np.mgrid[-k : k + 1, -k : k + 1].astype(np.float32) * px
    outer = np.zeros((ny, nx), np.float32)
    inner = np.zeros((ny, nx), np.float32)
    for x, y, z in near:
        x = x + spine_dx(z)
        iy, ix = round(y / px + (ny - 1) / 2), round(x / px + (nx - 1) / 2)
        if not (k <= iy < ny - k and k <= ix < nx - k):
            continue
        fy, fx = iy - (y / px + (ny - 1) / 2), ix - (x / px + (nx - 1) / 2)
        d = np.hypot(oy + fy * px, ox + fx * px)
        win = (slice(iy - k, iy + k + 1), slice(ix - k, ix + k + 1))
        np.maximum(outer[win], _cov(d - rr, px) * _zcov(z - rz, z + rz, z0, z1), out=outer[win])
        np.maximum(inner[win], _cov(d - rr + 1.0, px) * _zcov(z - rz + 1, z + rz - 1, z0, z1),
                   out=inner[win])  # fmt: skip
    _paint(img, outer, 0.95 * spec.cortical_hu)
    _paint(img, inner, 230.0)


# --- sacrum and pelvis -------------------------------------------------------------------------


CREST = 40.0  # the iliac crest, mm above S1 (beside L5)


def _pelvis(img, lab, x, y, px, z, spec: SpecB, cy1: float, w: float) -> None:
    """One thin sub-slice at height z (< CREST): sacrum with alae, SI joints, iliac wings.
    Painted at full weight `w` fraction (the caller averages sub-slices)."""
    if z < 0.0:
        yc = cy1 + 0.75 * (-z)  # the sacrum runs backward going down
        taper = 1.0 + z / 220.0
        body = _sdf_ell(x, y, 0.0, yc, 25.0 * taper, 21.0 * taper, 2.2)
        ala_w = (52.0 if z > -70.0 else 52.0 + (z + 70.0)) * taper
        # alae with a blunt lateral face: the auricular surface of the joint, ~2 cm front to back
        ala = _sdf_ell(x, y, 0.0, yc + 5.0, ala_w, 11.0, 6.0) if z < -2.0 else body
        sac = np.minimum(body, ala)
        _paint(img, _cov(sac, px) * w, spec.pelvic_cortex_hu)
        _paint(img, _cov(sac + 0.9, px) * w, spec.sacrum_hu)
        _paint(img, _cov(np.hypot(x, y - yc - 19.0) - 6.0, px) * w, CSF)
        if lab is not None and z > -30.0:
            lab[body < 0] = LEVEL_CODES["S"]
        joint_x = ala_w + 2.5
    else:
        yc, joint_x = cy1 + 3.0, 54.5 + 0.9 * z  # above the joint the wing stands apart
    ws = spec.width_scale
    if -78.0 < z < CREST:
        for side in (-1, 1):
            pts = np.array(
                [
                    (side * (joint_x + 3.5), yc - 3.0),  # the iliac side of the joint
                    (side * (joint_x + 3.5), yc + 12.0),
                    (side * (joint_x + 18.0), yc + 22.0),
                    (side * 112.0 * ws, 20.0),
                    (side * 128.0 * ws, -25.0),
                ]
            )
            if z > CREST - 25.0:  # the wing narrows to its crest
                pts = pts[1:]
            (x_lo, y_lo), (x_hi, y_hi) = pts.min(0) - 3.5, pts.max(0) + 3.5
            r, c = _window(x, y, x_lo, x_hi, y_lo, y_hi, px)
            wing = _sdf_polyline(x[:, c], y[r], pts, 3.5)
            _paint(img[r, c], _cov(wing, px) * w, spec.pelvic_cortex_hu)
            _paint(img[r, c], _cov(wing + 1.4, px) * w, spec.ilium_hu)


# --- soft tissue -------------------------------------------------------------------------------


def _walls(x, y, px, spec: SpecB) -> np.ndarray:
    """Air, fat, the muscle wall and the abdomen inside it: the same in every slice."""
    ws = spec.width_scale
    img = np.full(np.broadcast(x, y).shape, AIR, np.float32)
    wall_a, wall_b = WALL_A * ws, WALL_B
    p = np.where(y > -8.0, 3.6, 2.3)  # a flat back, a rounder belly
    _paint(
        img, _cov(_sdf_ell(x, y, 0, -8.0, wall_a + spec.fat_mm, wall_b + spec.fat_mm, p), px), FAT
    )
    _paint(img, _cov(_sdf_ell(x, y, 0, -8.0, wall_a, wall_b, p), px), MUSCLE)
    _paint(img, _cov(_sdf_ell(x, y, 0, -8.0, wall_a - 10, wall_b - 10, p), px), ORGAN - 60.0)
    return img


def _soft(
    walls, x, y, px, zc, spec: SpecB, verts: dict[str, _Vert], bowel, dx: float
) -> np.ndarray:
    ws, c = spec.width_scale, spec.contrast_hu
    img = walls.copy()
    l1, l4, t12 = verts["L1"], verts["L4"], verts["T12"]
    for xs, yy, a, b in bowel:
        if xs[0] < zc < xs[1]:
            _paint_ell(img, x, y, px, a[0] * ws, yy, a[1], b, a[2])
    if zc > l1.bot:
        _paint_ell(img, x, y, px, -68.0 * ws, -12.0, 62.0 * ws, 62.0, 58.0 + 0.3 * c)
    if t12.bot - 20 < zc < l1.top:
        _paint_ell(img, x, y, px, 90.0 * ws, 30.0, 28.0, 40.0, 48.0 + 0.4 * c)
    kid_lo, kid_hi = verts["L3"].bot + 10.0, t12.top
    if kid_lo < zc < kid_hi:
        for side in (-1, 1):
            _paint_ell(img, x, y, px, dx + side * 82.0 * ws, 35.0, 22.0, 32.0, 32.0 + 0.6 * c)
            _paint_ell(img, x, y, px, dx + side * 68.0 * ws, 32.0, 6.0, 10.0, FAT)
    for side in (-1, 1):  # psoas, growing downward from L1; paraspinal muscles
        grow = np.clip((l1.top - zc) / (l1.top - verts["L5"].bot), 0.0, 1.0)
        if grow > 0:
            cxp = dx + side * (24.0 + 6.0 * grow)
            _paint_ell(img, x, y, px, cxp, 30.0, 6 + 16 * grow, 8 + 10 * grow, 50.0)
        _paint_ell(img, x, y, px, dx + side * 30.0, 72.0, 22.0, 17.0, 50.0)
    v = min(verts.values(), key=lambda v: abs(v.bot + v.h / 2 - zc))
    front = v.cy - v.b - 12.0
    if zc > l4.bot + l4.h / 2:
        _paint(img, _cov(np.hypot(x - dx - 17.0, y - front) - 11.0, px), 40.0 + c)
    else:  # the common iliac arteries part below L4
        spread = 5.0 + 0.5 * (l4.bot + l4.h / 2 - zc)
        for side in (-1, 1):
            _paint(img, _cov(np.hypot(x - dx - side * spread, y - front) - 7.0, px), 40.0 + c)
    _paint_ell(img, x, y, px, dx - 22.0, front + 1.0, 12.0, 9.0, 40.0 + 0.6 * c)
    mid = l1.bot + 0.55 * l1.h
    zr = float(_zcov(zc - 1.0, zc + 1.0, mid - 2.5, mid + 2.5))  # renal arteries, out sideways
    if zr > 0:
        for side in (-1, 1):
            pts = np.array([(dx + 17.0, front), (dx + side * 64.0 * ws, 32.0)])
            _paint(img, _cov(_sdf_polyline(x, y, pts, 2.4), px) * zr, 40.0 + c)
    if spec.table:
        back = -8.0 + WALL_B + spec.fat_mm + 10.0
        curve = back - 0.0008 * x**2  # a cradle, rising at the sides
        _paint(img, _cov(np.abs(y - curve - 1.5) - 1.5, px), 220.0)
        _paint(img, _cov(np.abs(y - curve - 14.0) - 11.0, px), -820.0)
        _paint(img, _cov(np.abs(y - curve - 26.5) - 1.5, px), 220.0)
    return img


# --- the phantom -------------------------------------------------------------------------------


def make_phantom_b(spec: SpecB | None = None, **kw) -> tuple[np.ndarray, PhantomTruth]:
    """Build a family-B phantom: (int16 HU volume (z, y, x), ground truth)."""
    spec = spec or SpecB()
    if kw:
        spec = SpecB(**{**spec.__dict__, **kw})
    rng = np.random.default_rng([spec.seed, 7])
    verts = _verts(spec, rng)
    by = {v.name: v for v in verts}
    l1 = by["L1"]
    sz, px = spec.slice_spacing_mm, spec.pixel_mm
    thick = spec.slice_thickness_mm or sz
    top_all = by["T10"].top + 3.0
    mid = {v.name: (v.bot + v.top) / 2 for v in verts}
    disc = {
        f"{w.name}-{v.name}": (v.top + w.bot) / 2 for v, w in zip(verts, verts[1:], strict=False)
    }
    disc["L5-S1"] = verts[0].bot / 2
    lo, hi = -40.0, top_all
    if spec.fov == "abdomen":
        lo = mid["L4"]
    elif spec.fov == "cut_l1_top":
        hi = mid["L1"]
    elif spec.fov == "cut_l1_bottom":
        lo = mid["L1"]
    elif spec.fov.startswith("ends_in:"):  # the field starts in a lumbar body or disc
        lo = {**mid, **disc}[spec.fov[8:]]
    elif spec.fov != "full":
        raise ValueError(f"fov {spec.fov!r}")
    if spec.fov_mm is not None:
        lo, hi = spec.fov_mm
    nz = int(math.floor((hi - lo) / sz))
    centres = lo + (np.arange(nz) + 0.5) * sz
    ny, nx = spec.shape_yx
    y = ((np.arange(ny) - (ny - 1) / 2) * px).astype(np.float32)[:, None]
    x = ((np.arange(nx) - (nx - 1) / 2) * px).astype(np.float32)[None, :]
    s_lo, s_hi = verts[0].bot, verts[-1].top

    def spine_dx(z: float) -> float:
        return spec.scoliosis_mm * math.sin(math.pi * min(max((z - s_lo) / (s_hi - s_lo), 0), 1))

    bowel = []
    for _ in range(7):
        z_a = float(rng.uniform(-40.0, 220.0))
        fill = AIR if rng.random() < 0.5 else float(rng.uniform(5, 35))
        a = (float(rng.uniform(-90, 90)), float(rng.uniform(10, 22)), fill)
        bowel.append(((z_a, z_a + float(rng.uniform(25, 70))), float(rng.uniform(-75, -20)),
                      a, float(rng.uniform(9, 18))))  # fmt: skip
    cy1 = by["L5"].cy + 3.0  # S1 under L5
    ribs = [_rib_points(v, side, spec, rng) for v in verts if v.rib for side in (-1, 1)]
    rib_pts = np.concatenate(ribs)
    walls = _walls(x, y, px, spec)
    vol = np.empty((nz, ny, nx), np.int16)
    labels = np.zeros((nz, ny, nx), np.int16)
    tex_sd = 9.0
    for k, zc in enumerate(centres):
        z0, z1 = zc - thick / 2, zc + thick / 2
        dx = spine_dx(zc)
        img = _soft(walls, x, y, px, zc, spec, by, bowel, dx)
        lab = np.zeros((ny, nx), np.int16)
        tex = ndimage.gaussian_filter(rng.standard_normal((ny, nx)).astype(np.float32), 0.9 / px)
        tex *= tex_sd / max(float(tex.std()), 1e-6)
        for i, v in enumerate(verts):
            below = verts[i - 1] if i else None
            d_lo = below.top - CONCAVITY if below else -12.0
            if z1 > d_lo - 2 and z0 < v.bot + CONCAVITY + v.loss * v.h + 2:
                _disc(img, below, v, x, y, px, z0, z1, dx)
            if z1 > v.bot - 1 and z0 < v.top + 1:
                _vertebra(img, lab, v, x, y, px, z0, z1, zc, dx, tex, spec)
        if z0 < CREST:
            n_sub = max(2, math.ceil(thick / 1.0))
            pel = img.copy()
            acc = np.zeros_like(img)
            for j in range(n_sub):
                zs = z0 + (j + 0.5) * thick / n_sub
                if zs >= CREST:
                    acc += img
                    continue
                sub = img.copy()
                _pelvis(sub, lab if j == n_sub // 2 else None, x, y, px, zs, spec, cy1, 1.0)
                acc += sub
            pel = acc / n_sub
            img = pel
        _ribs(img, rib_pts, spine_dx, px, z0, z1, (ny, nx), spec)
        img = ndimage.gaussian_filter(img, spec.psf_mm / 2.355 / px, mode="nearest")
        noise = ndimage.gaussian_filter(rng.standard_normal((ny, nx)).astype(np.float32), 0.7)
        img += noise * (spec.noise_sd / max(float(noise.std()), 1e-6))
        vol[k] = np.clip(np.rint(img), -1024, 3071)
        labels[k] = lab

    z_slices, cut, hus = {}, {}, {}
    for v in verts:
        inside = np.nonzero((centres >= v.bot) & (centres < v.top))[0]
        if inside.size:
            z_slices[v.name] = (int(inside[0]), int(inside[-1]) + 1)
            cut[v.name] = bool(v.bot < lo or v.top > hi)
            hus[v.name] = float(v.hu)
    sacrum_in = lo < -17.0  # the sacrum with 15 mm of its joints to the ilia
    above_sacrum = lo > 0.0
    lowest_rib = next(v.name for v in verts if v.rib)
    fractures = {v.name: (v.kind, fracture_grade(v.loss), v.band) for v in verts if v.kind}
    l1_grade = fractures.get("L1", ("", 0, False))[1]
    l1_whole = "L1" in z_slices and not cut["L1"]
    reason = ""
    if spec.rib_pairs != 12:
        reason = f"{spec.rib_pairs} rib pairs: transitional anatomy, level count ambiguous"
    elif not l1_whole:
        reason = "L1 cut by the field of view"
    elif not sacrum_in:
        reason = "sacrum not in the field: rib count cannot be cross-checked"
    elif "T12" not in z_slices:
        reason = "lowest ribs not in the field"
    elif l1_grade >= 2:
        reason = f"L1 fractured (Genant grade {l1_grade})"
    elif spec.metal_l1:
        reason = "metal in L1"
    ribs_only = (
        above_sacrum
        and spec.rib_pairs == 12
        and l1_whole
        and "T12" in z_slices
        and l1_grade < 2
        and not spec.metal_l1
    )

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
        family="B",
        fractures=fractures,
        field_above_sacrum=above_sacrum,
        l1_by_ribs_only=ribs_only,
    )
    return np.ascontiguousarray(vol), truth
