"""The demo: a local Orthanc as hospital PACS, synthetic abdominal CT, one project, one pull."""

from __future__ import annotations

import shutil
from datetime import date, timedelta
from pathlib import Path

from rich.console import Console

from core.settings import PacsPeer, Settings
from gateway.api import Gateway
from gateway.views import report_lines
from harness.localpacs import LocalOrthanc, free_port
from harness.synthetic import generate

console = Console()


def run_demo(workdir: Path, *, patients: int = 4, slices: int = 120, size: int = 512) -> int:
    """Seed a local PACS, approve a project for all patients but one, pull it; 0 if all is well."""
    workdir = workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    console.rule("sphere demo")
    console.print(f"generating {patients} synthetic abdominal CT studies ({size}x{size}) ...")
    corpus = generate(workdir / "synthetic", n_patients=patients, slices=slices, size=size)
    port = free_port()
    with LocalOrthanc(
        workdir / "orthanc", modalities={"SPHERE": ("SPHERE", "127.0.0.1", port)}
    ) as pacs:
        n = pacs.upload(corpus.files)
        console.print(f"local Orthanc PACS on port {pacs.dicom_port} holds {n} instances")
        settings = Settings(
            home=workdir / "gateway",
            ae_title="SPHERE",
            port=port,
            pacs=PacsPeer(ae_title=pacs.aet, host="127.0.0.1", port=pacs.dicom_port),
            actor="demo",
        )
        gw = Gateway(settings)
        name = "demo-bone-density"
        gw.create_project(name, title="Opportunistic bone density from abdominal CT")
        gw.approve(
            name,
            committee_ref="CSE-DEMO-001",
            approved_on=date.today(),
            expires_on=date.today() + timedelta(days=365),
        )
        # One patient stays out of the cohort: the gateway must never fetch their study.
        cohort = [st.accession for st in corpus.studies[:-1]]
        gw.add_cohort(name, "accession", cohort)
        console.print(
            f"project {name} approved; cohort: {len(cohort)} of {len(corpus.studies)} "
            "studies (by accession number)"
        )
        report = gw.pull(name)
    for line in report_lines(report):
        console.print(line, highlight=False)
    expected = sum(st.n_instances for st in corpus.studies[:-1])
    console.print(f"catalog: {settings.resolved_catalog_url()}")
    console.print(f"re-identification vault (kept apart): {settings.resolved_vault_url()}")
    if report.ok and report.instances == expected:
        console.print(
            f"[green]demo OK[/green]: {report.instances} of {expected} cohort "
            "instances stored, de-identified, as Zarr v3"
        )
        return 0
    console.print(f"[red]demo FAILED[/red]: {report.instances} of {expected} instances stored")
    return 1
