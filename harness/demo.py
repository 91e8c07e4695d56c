"""The demo: a local Orthanc as hospital PACS, synthetic abdominal CT and spine phantoms, one
project, one pull, bone density over what was pulled, then the DICOMweb server for a viewer."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import threading
import time
import urllib.request
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console

from core import Core, users
from core.settings import PacsPeer, Settings
from gateway.api import Gateway
from gateway.views import report_lines
from harness.localpacs import LocalOrthanc, free_port
from harness.phantom_dicom import PhantomStudy, write_phantom_study
from harness.phantoms import make_phantom
from harness.synthetic import generate

console = Console()
PROJECT = "demo-bone-density"
VIEWER = "demo-viewer"
# Spine phantoms with ground truth: one measurable, two the pipeline must refuse, with why.
PHANTOMS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("measurable, L1 135 HU", dict(trabecular_hu=135.0, seed=1), dict()),
    ("13 rib pairs", dict(rib_pairs=13, seed=2), dict(kvp=100.0)),
    ("fractured L1", dict(fracture_l1=True, seed=3), dict(unsigned=True)),
]


def run_demo(workdir: Path, *, patients: int = 4, slices: int = 120, size: int = 512) -> int:
    """Seed a local PACS, approve a project for all patients but one, pull it, measure bone
    density, serve it over DICOMweb; 0 if all is well."""
    workdir = workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    console.rule("sphere demo")
    console.print(f"generating {patients} synthetic abdominal CT studies ({size}x{size}) ...")
    corpus = generate(workdir / "synthetic", n_patients=patients, slices=slices, size=size)
    phantoms = write_phantoms(workdir / "phantoms", large=size >= 256)
    port = free_port()
    with LocalOrthanc(
        workdir / "orthanc", modalities={"SPHERE": ("SPHERE", "127.0.0.1", port)}
    ) as pacs:
        n = pacs.upload(corpus.files + [f for st in phantoms for f in st.files])
        console.print(f"local Orthanc PACS on port {pacs.dicom_port} holds {n} instances")
        settings = Settings(
            home=workdir / "gateway",
            ae_title="SPHERE",
            port=port,
            pacs=PacsPeer(ae_title=pacs.aet, host="127.0.0.1", port=pacs.dicom_port),
        )
        gw = Gateway(settings, actor="demo")
        made = users.first_admin(gw.core)  # as `sphere init` does: the CLI then knows you
        if made is not None:
            console.print(f"first admin of the demo's home: {made[0]} (your OS account)")
        gw.create_project(PROJECT, title="Opportunistic bone density from abdominal CT")
        gw.approve(
            PROJECT,
            committee_ref="CSE-DEMO-001",
            approved_on=date.today(),
            expires_on=date.today() + timedelta(days=365),
        )
        # One patient stays out of the cohort: the gateway must never fetch their study.
        cohort = [st.accession for st in corpus.studies[:-1]] + [st.accession for st in phantoms]
        gw.add_cohort(PROJECT, "accession", cohort)
        console.print(
            f"project {PROJECT} approved; cohort: {len(cohort)} of "
            f"{len(corpus.studies) + len(phantoms)} studies (by accession number)"
        )
        report = gw.pull(PROJECT)
    for line in report_lines(report):
        console.print(line, highlight=False)
    expected = sum(st.n_instances for st in corpus.studies[:-1])
    expected += sum(st.n_instances for st in phantoms)
    console.print(f"catalog: {settings.resolved_catalog_url()}")
    console.print(f"re-identification vault (kept apart): {settings.resolved_vault_url()}")
    if not (report.ok and report.instances == expected):
        console.print(f"[red]demo FAILED[/red]: {report.instances} of {expected} instances stored")
        return 1
    console.print(
        f"[green]pull OK[/green]: {report.instances} of {expected} cohort "
        "instances stored, de-identified, as Zarr v3"
    )
    if not bone_density(settings):
        console.print("[red]demo FAILED[/red]: a series failed in the bone-density pipeline")
        return 1
    if not serve(settings, n_studies=len(cohort)):
        console.print("[red]demo FAILED[/red]: the DICOMweb server check did not pass")
        return 1
    console.print("[green]demo OK[/green]")
    return 0


def write_phantoms(out: Path, *, large: bool) -> list[PhantomStudy]:
    """The phantoms as CT series: 256x256 at 1.25 mm with 2.5 mm slices beside a full-size
    corpus, else (a quick demo) 160x160 at 2 mm with 5 mm slices."""
    shape, pixel, sz = ((256, 256), 1.25, 2.5) if large else ((160, 160), 2.0, 5.0)
    studies = []
    for i, (label, spec, how) in enumerate(PHANTOMS):
        vol, truth = make_phantom(shape_yx=shape, pixel_mm=pixel, slice_spacing_mm=sz, **spec)
        studies.append(write_phantom_study(vol, truth, out / str(i), index=i, **how))
        console.print(
            f"spine phantom {i + 1} ({label}): {vol.shape[0]} slices of {shape[0]}x{shape[1]}"
        )
    return studies


def bone_density(settings: Settings) -> bool:
    """`sphere run bone-density` on the project (embedded Dask cluster) and its results table;
    False if a series failed."""
    from gateway.run_cmd import table_lines
    from processing.bone_density import BoneDensity
    from processing.results import result_rows
    from processing.runner import run_pipeline

    console.rule("bone density (L1 trabecular HU)")
    import distributed  # noqa: F401 - its import sets its loggers' levels: set ours after

    logging.getLogger("distributed").setLevel(logging.ERROR)  # the cluster's chatter, not ours
    run = run_pipeline(settings, PROJECT, BoneDensity(), progress=console.is_terminal)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(run.counts().items()))
    console.print(f"{run.pipeline} {run.version}: {counts}", highlight=False)
    with Core(settings) as core:
        rows = result_rows(core, PROJECT, run.pipeline)
    for line in table_lines(rows):
        console.print(line, highlight=False, soft_wrap=True)
    return "failed" not in run.counts()


def serve(settings: Settings, *, n_studies: int) -> bool:
    """A viewer user with a token, then the web server: until Ctrl-C at a terminal, else
    (CI, scripts) only long enough to check /healthz and a QIDO-RS search with the token."""
    import uvicorn

    from gateway.web.app import create_app

    console.rule("DICOMweb and viewer")
    with Core(settings) as core:
        token = users.add(core, VIEWER)
        users.grant(core, PROJECT, VIEWER, "viewer")
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        console.print(f"user {VIEWER} is viewer of {PROJECT}", highlight=False)
        console.print(f"token for {VIEWER}: {token}", highlight=False, soft_wrap=True)
        console.print(f"viewer: {base}/ (sign in with the token)", highlight=False)
        config = uvicorn.Config(
            create_app(Core(settings, research=True)),  # as `sphere serve`: no vault
            host="127.0.0.1",
            port=port,
            log_level="warning",
            access_log=False,
        )
        server = uvicorn.Server(config)
        if sys.stdin.isatty():
            console.print("serving; Ctrl-C stops", highlight=False)
            with contextlib.suppress(KeyboardInterrupt):
                server.run()  # uvicorn stops gracefully, then raises the Ctrl-C again
            console.print("server stopped", highlight=False)
            return True
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 30
            while not server.started:
                if not thread.is_alive() or time.monotonic() > deadline:
                    return False
                time.sleep(0.05)
            return _check(base, token, n_studies)
        except OSError as e:  # refused, timed out, or an HTTP error status
            console.print(f"server check FAILED: {e}", highlight=False)
            return False
        finally:
            server.should_exit = True
            thread.join(30)


def _check(base: str, token: str, n_studies: int) -> bool:
    """/healthz answers, and the token's QIDO-RS study search finds the demo's studies."""
    with urllib.request.urlopen(f"{base}/healthz", timeout=10) as r:
        healthy = r.status == 200 and json.load(r).get("status") == "ok"
    console.print(f"server check: /healthz {'ok' if healthy else 'FAILED'}", highlight=False)
    url = f"{base}/projects/{PROJECT}/dicom-web/studies"
    req = urllib.request.Request(
        url, headers={"Authorization": f"Bearer {token}", "Accept": "application/dicom+json"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        found = len(json.load(r)) if r.status == 200 else 0
    console.print(
        f"server check: QIDO-RS found {found} of {n_studies} studies with the token",
        highlight=False,
    )
    console.print("server stopped (not a terminal: checked, not kept serving)", highlight=False)
    return healthy and found == n_studies
