"""De-identification throughput: sphere's engine against dicognito and pydicom's deid (PyPI).

All three read the same synthetic CT corpus (512x512 by default), de-identify every instance and
write it back to disk, each in its own subprocess, in the same run, timed inside the subprocess
(imports and start-up excluded). dicognito and deid live in `benchmarks/.venv-peers/` (created
here with venv + pip when absent: deid's top-level module would clash with ours). Prints, for each,
instances/s of the de-identification itself (datasets in memory) and file to file (pydicom's read
and write included, the same code for all three), and sphere's ratios to the others.

    .venv/bin/python benchmarks/bench_deid.py [--patients 2 --slices 60 --size 512 --rounds 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

from harness.synthetic import generate

HERE = Path(__file__).resolve().parent
PEERS = HERE / ".venv-peers"
PEER_PACKAGES = ["deid==0.4.13", "dicognito==0.19.0"]

# Each worker reads every file of IN (untimed), de-identifies them all in memory (timed: the
# de-identification itself), then writes them to OUT (timed apart: pydicom's writer, the same for
# all). It prints both times as JSON.
COMMON = """
import json, sys, time
from pathlib import Path
import pydicom
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
files = sorted(src.glob("*.dcm"))
t0 = time.perf_counter()
datasets = [pydicom.dcmread(f) for f in files]
read = time.perf_counter() - t0
"""
WRITE = """
t0 = time.perf_counter()
for i, ds in enumerate(datasets):
    ds.save_as(dst / f"{i:06d}.dcm")
write = time.perf_counter() - t0
print(json.dumps({"n": len(files), "deid": deid, "read": read, "write": write}))
"""
SPHERE = (
    COMMON
    + """
from deid.engine import Deidentifier
from deid.keys import ProjectKeys
from deid.profile import Profile
d = Deidentifier(Profile(), ProjectKeys(b"benchmark-secret-0123456789abcdef"))
t0 = time.perf_counter()
for ds in datasets:
    d.apply(ds)
deid = time.perf_counter() - t0
"""
    + WRITE
)
DICOGNITO = (
    COMMON
    + """
from dicognito.anonymizer import Anonymizer
a = Anonymizer()
t0 = time.perf_counter()
for ds in datasets:
    a.anonymize(ds)
deid = time.perf_counter() - t0
"""
    + WRITE
)
PYDICOM_DEID = (
    COMMON
    + """
from deid.config import DeidRecipe
from deid.dicom import replace_identifiers
t0 = time.perf_counter()
datasets = replace_identifiers(dicom_files=datasets, deid=DeidRecipe(), save=False,
                               remove_private=True)
deid = time.perf_counter() - t0
"""
    + WRITE
)


def peers_python() -> Path:
    """The peers' venv interpreter, created with the pinned packages when missing."""
    py = PEERS / "bin" / "python"
    if not py.exists():
        print(f"creating {PEERS} with {' '.join(PEER_PACKAGES)} ...", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(PEERS)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    return py


def run_worker(python: str, code: str, src: Path, dst: Path, cwd: Path) -> dict:
    """One timed pass in a fresh isolated interpreter (-I: our `deid` stays out of the peers')."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    out = subprocess.run(
        [python, "-I", "-c", code, str(src), str(dst)],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    written = len(list(dst.glob("*.dcm")))
    if written != result["n"]:
        raise RuntimeError(f"{written} files written for {result['n']} read")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=2)
    ap.add_argument("--slices", type=int, default=60, help="slices of each thin series")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    peer = str(peers_python())
    with tempfile.TemporaryDirectory(prefix="bench-deid-") as tmp:
        root = Path(tmp)
        corpus = generate(
            root / "in", n_patients=args.patients, slices=args.slices, size=args.size, seed=3
        )
        n = len(corpus.files)
        print(f"corpus: {n} CT instances of {args.size}x{args.size}, {args.rounds} rounds")
        tools = {
            "sphere": (sys.executable, SPHERE),
            "dicognito": (peer, DICOGNITO),
            "pydicom-deid": (peer, PYDICOM_DEID),
        }
        deid: dict[str, list[float]] = {k: [] for k in tools}
        whole: dict[str, list[float]] = {k: [] for k in tools}
        for _ in range(args.rounds):  # interleaved, so load drifts hit all alike
            for name, (python, code) in tools.items():
                r = run_worker(python, code, root / "in", root / name, root)
                if name == "sphere":  # the figures only count if nothing identifying is left
                    leaks = [p for f in (root / name).glob("*.dcm") for p in corpus.phi
                             if p.encode() in f.read_bytes()]  # fmt: skip
                    if leaks:
                        raise SystemExit(f"sphere output still holds {len(leaks)} planted strings")
                deid[name].append(r["n"] / r["deid"])
                whole[name].append(r["n"] / (r["read"] + r["deid"] + r["write"]))
    d = {k: statistics.median(v) for k, v in deid.items()}
    w = {k: statistics.median(v) for k, v in whole.items()}
    print(f"{'':<14}{'de-identification':>20}{'read+de-id+write':>20}   (instances/s, median)")
    for k in tools:
        print(
            f"{k:<14}{d[k]:>20.1f}{w[k]:>20.1f}   rounds: {', '.join(f'{x:.0f}' for x in deid[k])}"
        )
    print(f"sphere: {1e6 / d['sphere']:.0f} us per instance to de-identify")
    for peer in ("dicognito", "pydicom-deid"):
        print(
            f"ratio sphere / {peer}: {d['sphere'] / d[peer]:.1f}x de-identification, "
            f"{w['sphere'] / w[peer]:.1f}x file to file"
        )
    print("target: de-identification >= 5x dicognito")


if __name__ == "__main__":
    main()
