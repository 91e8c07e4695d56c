"""Random bone-density cases drawn alike from both phantom families, scored against their truth.

A case is a family ("A": harness.phantoms, "B": harness.phantoms_b), a scenario and the options
drawn for it; the same draw gives the same case. Scenarios: sound spines (12 rib pairs, the whole
lumbar spine and the sacrum in the field), transitional anatomy (11 or 13 rib pairs), fields
ending above the sacrum, a field cutting L1, graded fractures (Genant; at L1, T12 or L2), metal.
`score` says what the pipeline did with a case: measured right, refused (and why), or mislabelled.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from harness.phantoms import PhantomTruth, make_phantom
from harness.phantoms_b import make_phantom_b
from processing.bone.phantoms import FRACTURE_GRADES

SCENARIOS = (  # name, weight
    ("sound", 0.45),
    ("transitional", 0.10),
    ("abdomen", 0.15),
    ("cut L1", 0.05),
    ("fracture", 0.20),
    ("metal", 0.05),
)
GRIDS = ((256, 1.25), (200, 1.6), (160, 2.0))  # (pixels across, mm): a 320 mm field
ENDS_IN = ("L3", "L4", "L5", "L3-L4", "L4-L5", "L5-S1")


@dataclass(frozen=True)
class Case:
    family: str
    scenario: str
    options: tuple[tuple[str, Any], ...]  # keyword options of the family's generator

    def make(self) -> tuple[np.ndarray, PhantomTruth]:
        maker = make_phantom if self.family == "A" else make_phantom_b
        return maker(**dict(self.options))


def draw(family: str, index: int, scenario: str | None = None) -> Case:
    """Case `index` of a family (the same index: the same scenario and draw in both families,
    each rendered its own way)."""
    rng = np.random.default_rng([index, 18])
    names = [s for s, _ in SCENARIOS]
    p = np.array([w for _, w in SCENARIOS])
    scen = scenario or str(rng.choice(names, p=p / p.sum()))
    n, px = GRIDS[int(rng.integers(len(GRIDS)))]
    o: dict[str, Any] = {
        "shape_yx": (n, n),
        "pixel_mm": px,
        "slice_spacing_mm": float(rng.choice([1.25, 2.5, 2.5, 3.0, 5.0])),
        "trabecular_hu": float(rng.uniform(50, 250)),
        "noise_sd": float(rng.uniform(8, 25)),
        "contrast_hu": float(rng.choice([0.0, 0.0, 200.0, 400.0])),
        "fat_mm": float(rng.uniform(10, 50)),
        "width_scale": float(rng.uniform(0.9, 1.1)),
        "scoliosis_mm": float(rng.uniform(-25, 25)),
        "seed": index,
    }
    if family == "A":
        o["cortical_hu"] = float(rng.uniform(550, 900))
        o["psf_fwhm_mm"] = float(rng.uniform(0.0, 1.2))
        o["rotation_deg"] = float(rng.uniform(-20, 20))
    else:
        o["cortical_hu"] = float(rng.uniform(520, 800))
        o["psf_mm"] = float(rng.uniform(0.8, 1.4))
        o["sacrum_hu"] = float(rng.uniform(40, 220))
        o["ilium_hu"] = float(rng.uniform(80, 260))
    if scen == "transitional":
        o["rib_pairs"] = int(rng.choice([11, 13]))
    elif scen == "abdomen":
        o["fov"] = "ends_in:" + str(rng.choice(ENDS_IN))
    elif scen == "cut L1":
        o["fov"] = str(rng.choice(["cut_l1_top", "cut_l1_bottom"]))
    elif scen == "fracture":
        level = str(rng.choice(["L1", "L1", "T12", "L2"]))
        kind = str(rng.choice(["wedge", "biconcave", "crush"]))
        o["fracture"] = (level, kind, int(rng.integers(1, 4)))
        o["sclerotic"] = bool(rng.random() < 0.5)
        o["slice_spacing_mm"] = float(rng.choice([1.25, 2.5]))  # grades need thin slices
    elif scen == "metal":
        o["metal_l1"] = True
    return Case(family, scen, tuple(sorted(o.items())))


def at_l1(case: Case, grade: int) -> Case:
    """A fracture draw with its fracture moved to L1 at Genant `grade` (its kind and band kept,
    the loss drawn within the grade, 0.5 % clear of its lines), or with none (`grade` 0): many
    L1 grades from few draws, to count how each is read."""
    o = dict(case.options)
    if grade == 0:
        o.pop("fracture", None)
        o["sclerotic"] = False
    else:
        lo, hi = FRACTURE_GRADES[grade]
        rng = np.random.default_rng([int(o["seed"]), 18, grade])
        o["fracture"] = ("L1", o["fracture"][1], grade)
        o["fracture_loss"] = float(rng.uniform(lo + 0.005, hi - 0.005))
    return Case(case.family, case.scenario, tuple(sorted(o.items())))


REASONS = (  # what a refusal said, by words in it
    ("transitional", "transitional anatomy"),
    ("sacrum not in the field", "sacrum not in the field"),
    ("field of view", "field cuts L1"),
    ("fracture", "fractured"),
    ("collapsed", "fractured"),
    ("metal", "metal"),
    ("ribs", "ribs"),
    ("rib", "ribs"),
)


def reason_class(reason: str) -> str:
    """A refusal's reason, in a few words."""
    for words, label in REASONS:
        if words in reason:
            return label
    return "other: " + reason[:40]


@dataclass
class Outcome:
    case: Case
    expect: bool  # the truth: L1 should be measured (under the rule used)
    measured: bool
    mislabel: bool  # measured, but not the true L1
    error_hu: float | None
    class_right: bool | None
    reason: str
    ribs_only: bool
    flags: list[str]

    @property
    def l1_fracture(self) -> tuple[float, int] | None:
        """The true L1 fracture of a graded-fracture case: (slice spacing, Genant grade)."""
        o = dict(self.case.options)
        frac = o.get("fracture")
        if not frac or frac[0] != "L1":
            return None
        return float(o["slice_spacing_mm"]), int(frac[2])

    @property
    def _l1_flags(self) -> list[str]:
        return [f for f in self.flags if f.startswith("L1 ")]

    @property
    def l1_loss(self) -> tuple[float, float, float] | None:
        """A graded L1 fracture's height loss: (true, as read, its SD), None unread."""
        o = dict(self.case.options)
        frac = o.get("fracture")
        text = self.reason if not self.measured else " ".join(self._l1_flags)
        m = re.search(r", (\d+)% ± (\d+)% of height lost", text)
        if not frac or frac[0] != "L1" or m is None:
            return None
        lo, hi = FRACTURE_GRADES[int(frac[2])]
        true = o.get("fracture_loss") or (lo + hi) / 2
        return float(true), int(m.group(1)) / 100, int(m.group(2)) / 100

    @property
    def l1_read(self) -> str:
        """How the pipeline read L1's fracture: "refused 2", "refused 3", "refused 1-2" or
        "refused 0-2" (grade 2 not ruled out), "grade 1", "possible 0-1", "sound" (measured,
        no flag) or "refused: other"."""
        text = self.reason if not self.measured else " ".join(self._l1_flags)
        m = re.search(r"Genant grade (\d(?:-\d)?)", text)
        if not self.measured:
            return f"refused {m.group(1)}" if m and "fractured" in text else "refused: other"
        if m is None:
            return "sound"
        return ("possible " if "possible" in text else "grade ") + m.group(1)


def same_body(got: tuple[int, int], want: tuple[int, int]) -> bool:
    """Whether the slices named L1 [start, stop) are the true L1's: most of them lie in its
    slices. A body's wall signal may end short of its endplates (a wedge loses its front
    height), but a neighbour's slices overlap L1's by a disc's width at most."""
    overlap = min(got[1], want[1]) - max(got[0], want[0])
    return overlap > 0.5 * (got[1] - got[0])


def score(case: Case, truth: PhantomTruth, rep: Any, rule: str = "both") -> Outcome:
    """What the pipeline's report `rep` (processing.bone.BoneReport) made of a case."""
    from processing.bone import classify

    expect = truth.l1_measurable or (rule != "both" and truth.l1_by_ribs_only)
    mislabel = False
    err = None
    right = None
    if rep.measurable:
        got, want = rep.levels["L1"].slices, truth.z_slices.get("L1")
        mislabel = want is None or not same_body(got, want)
        err = float(rep.l1_hu - truth.l1_hu)
        right = rep.bone_class == classify(truth.l1_hu)
    return Outcome(
        case,
        expect,
        bool(rep.measurable),
        mislabel,
        err,
        right,
        rep.reason,
        bool(rep.level_from_ribs_only),
        list(rep.flags),
    )


def run(case: Case, rule: str = "both") -> Outcome:
    """Make the case and measure it on the CPU."""
    from processing.bone import measure_bone_density

    vol, truth = case.make()
    rep = measure_bone_density(
        vol, truth.spacing, affine=truth.affine, level_rule=rule, masks=False
    )
    return score(case, truth, rep, rule)


def _loss_errors(reads: list[tuple[float, float, float]]) -> str | None:
    """L1 losses as read against the truth: the median error, and how many lie within 2 SD."""
    if not reads:
        return None
    near = sum(abs(r - t) <= 2 * sd for t, r, sd in reads)
    return f"{np.median([r - t for t, r, _ in reads]):+.1%}, {near}/{len(reads)} in 2 SD"


def summary(outs: list[Outcome]) -> dict[str, Any]:
    """Counts and errors of a set of outcomes (one family, one rule)."""
    measured = [o for o in outs if o.measured and not o.mislabel]
    errs = np.abs([o.error_hu or 0.0 for o in measured]) if measured else np.zeros(0)
    lost = Counter(reason_class(o.reason) for o in outs if o.expect and not o.measured)
    refused = Counter(reason_class(o.reason) for o in outs if not o.measured)
    return {
        "cases": len(outs),
        "should measure": sum(o.expect for o in outs),
        "measured": sum(o.measured for o in outs),
        "measured, should": sum(o.measured and o.expect for o in outs),
        "ribs only": sum(o.ribs_only for o in outs if o.measured),
        "within 4 HU": int((errs <= 4.0).sum()),
        "within 10 HU": int((errs <= 10.0).sum()),
        "max error HU": round(float(errs.max()), 1) if errs.size else None,
        "class right": sum(bool(o.class_right) for o in measured),
        "mislabels": sum(o.mislabel for o in outs),
        "fracture flagged": sum(  # measured with a fracture named (L1 grade 1, T12, L2)
            any("fracture" in f for f in o.flags)
            for o in outs
            if o.measured and o.case.scenario == "fracture"
        ),
        "lost": dict(lost),
        "l1 grades": Counter((f, o.l1_read) for o in outs if (f := o.l1_fracture)),
        "l1 loss read - true": _loss_errors([x for o in outs if (x := o.l1_loss)]),
        "refused": dict(refused),
    }
