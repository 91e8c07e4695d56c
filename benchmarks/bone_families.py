"""Bone density over both phantom families, side by side: measured, accuracy, refusals by
reason, mislabels. The same N draws (harness.bone_cases) are rendered by family A
(harness.phantoms) and family B (harness.phantoms_b) and run on the CPU.

    .venv/bin/python benchmarks/bone_families.py [--n 60] [--rule both|ribs-if-no-sacrum]
        [--start 0] [--scenario fracture] [--show]

Figures are printed, not asserted.
"""

from __future__ import annotations

import argparse
import time

from harness.bone_cases import draw, run, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=60, help="cases per family")
    ap.add_argument("--start", type=int, default=0, help="first case index")
    ap.add_argument("--rule", default="both", choices=["both", "ribs-if-no-sacrum"])
    ap.add_argument("--scenario", default=None, help="only this scenario (e.g. fracture)")
    ap.add_argument("--show", action="store_true", help="a line per case that went wrong")
    args = ap.parse_args()
    t0 = time.monotonic()
    sums = {}
    for fam in ("A", "B"):
        outs = []
        for i in range(args.start, args.start + args.n):
            case = draw(fam, i, args.scenario)
            o = run(case, args.rule)
            outs.append(o)
            bad = o.mislabel or (o.expect != o.measured) or (o.error_hu and abs(o.error_hu) > 4)
            if args.show and bad:
                print(f"  {fam} #{i} {case.scenario}: expect {o.expect} measured {o.measured} "
                      f"mislabel {o.mislabel} err {o.error_hu} reason {o.reason!r} "
                      f"{dict(case.options)}")  # fmt: skip
        sums[fam] = summary(outs)
    print(f"rule {args.rule!r}, {args.n} cases per family ({time.monotonic() - t0:.0f} s)")
    keys = [k for k in sums["A"] if k not in ("lost", "refused")]
    print(f"{'':24} {'family A':>12} {'family B':>12}")
    for k in keys:
        print(f"{k:24} {sums['A'][k]!s:>12} {sums['B'][k]!s:>12}")
    for part in ("refused", "lost"):
        reasons = sorted(set(sums["A"][part]) | set(sums["B"][part]))
        title = "refused, by reason" if part == "refused" else "measurable but refused"
        print(title)
        for r in reasons:
            print(f"  {r[:22]:22} {sums['A'][part].get(r, 0):>12} {sums['B'][part].get(r, 0):>12}")


if __name__ == "__main__":
    main()
