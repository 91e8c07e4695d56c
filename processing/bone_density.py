"""The bone-density pipeline: L1 trabecular attenuation (processing.bone) as a `Pipeline`.

The science takes the HU volume once, on the run's device, in canonical (S, P, L) order (one
MONAI `Orientation` of the loaded image: a view of the loaded values for the usual stored order),
and its ROIs go back to the stored order by that transform's inverse; this wraps it: header facts
in, per-level ROIs out as SEG segments and SR measurements.
With `model_path` (a bundle folder from `sphere train bone-density`) a learned segmenter finds
the vertebral bodies; L1 is still named only when ribs and sacrum agree, unless the project
chose `level_rule="ribs-if-no-sacrum"`: then a field established to end above the sacrum has L1
named from the lowest ribs alone, flagged `level from ribs only` (values, SR, CSV).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from monai.data import MetaTensor
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from processing.bone import ScanFacts, Thresholds, measure_bone_density
from processing.bone.levels import CODES, RIBS_ONLY, RULES
from processing.bone.measure import MEASURED
from processing.bone.orient import canonical_spacing, orient_image, stored_runs_up, to_stored
from processing.pipeline import OK, UNMEASURABLE, Finding, Pipeline, Segment, SeriesFacts

SITES = {
    "T12": codes.SCT.T12Vertebra,
    "L1": codes.SCT.L1Vertebra,
    "L2": codes.SCT.L2Vertebra,
    "L3": codes.SCT.L3Vertebra,
    "L4": codes.SCT.L4Vertebra,
}
# how L1 was named, when only the ribs named it (a local code: no standard one says this)
LEVEL_METHOD = Code("LEVELMETHOD", "99SPHERE", "Vertebral level identification")
RIBS_ONLY_CODE = Code("RIBSONLY", "99SPHERE", "Level from ribs only")


@dataclass(frozen=True)
class BoneDensity(Pipeline):
    name: ClassVar[str] = "bone-density"
    version: ClassVar[str] = "0.1"
    wants_gpu: ClassVar[bool] = True

    min_slices: int = 20
    max_thickness_mm: float | None = 5.0
    bone_hu: float = 300.0
    metal_hu: float = 2000.0
    roi_area_mm2: float = 200.0
    osteoporosis_hu: float = 110.0
    osteopenia_hu: float = 160.0
    level_rule: str = "both"  # or "ribs-if-no-sacrum" (levels.RULES)

    def __post_init__(self) -> None:
        if self.level_rule not in RULES:
            raise ValueError(f"level_rule is one of {', '.join(RULES)}")

    def load_model(self, device: torch.device) -> Any:
        """The learned body segmenter of the bundle at `model_path`; None: classical bodies."""
        if not self.model_path:
            return None
        from processing.bone.learned import load_bundle

        return load_bundle(self.model_path, device)

    def model_checksum(self) -> str | None:
        """sha256 over the bundle's files (`model_path` is a bundle folder, not one file)."""
        if not self.model_path:
            return None
        from processing.bone.learned import bundle_checksum

        return bundle_checksum(self.model_path)

    def run(
        self, image: MetaTensor, facts: SeriesFacts, *, model: Any, device: torch.device
    ) -> Finding:
        # moved only when not loaded on `device` (a MetaTensor stays one)
        can = orient_image(cast(MetaTensor, image.to(device)))
        report = measure_bone_density(
            can.as_tensor()[0],
            canonical_spacing(can),
            facts=ScanFacts(facts.slice_thickness, facts.kvp, facts.contrast, facts.lossy),
            thresholds=Thresholds(self.osteoporosis_hu, self.osteopenia_hu),
            device=device,
            bone_hu=self.bone_hu,
            metal_hu=self.metal_hu,
            roi_area_mm2=self.roi_area_mm2,
            segmenter=model,
            level_rule=self.level_rule,
        )
        values: dict[str, Any] = {
            "l1_hu": report.l1_hu,
            "class": report.bone_class,
            "lowest_rib_level": report.lowest_rib_level,
            "sacrum_found": report.sacrum_found,
            "level_from_ribs_only": report.level_from_ribs_only,
            "flags": "; ".join(report.flags),
        }
        roi = to_stored(report.roi, can) if report.roi is not None else None
        segments = []
        for name in ("L1", *(n for n in MEASURED if n != "L1")):  # L1 first: it is classed
            lv = report.levels.get(name)
            values[f"{name.lower()}_hu"] = lv.mean_hu if lv else None
            if lv is None or lv.mean_hu is None or roi is None:
                continue
            segments.append(
                Segment(
                    f"{name} trabecular ROI",
                    SITES[name],
                    roi == CODES[name],
                    lv.mean_hu,
                    lv.median_hu,
                    lv.sd_hu,
                    lv.n_voxels,
                )
            )
        nz = can.shape[1]  # canonical slices (from the feet) -> the stored head-foot axis
        up = stored_runs_up(image)
        levels = {}
        for n, lv in report.levels.items():
            a, b = lv.slices
            levels[n] = (a, b) if up else (nz - b, nz - a)
        if report.measurable:
            summary = f"L1 {report.l1_hu:.0f} HU: {report.bone_class}"
            notes = [(LEVEL_METHOD, RIBS_ONLY_CODE)] if report.level_from_ribs_only else []
            if report.level_from_ribs_only:
                summary += f" ({RIBS_ONLY})"
            return Finding(OK, values, "", segments, levels, report.bone_class, summary, notes)
        return Finding(UNMEASURABLE, values, report.reason, segments, levels, None, report.reason)
