"""The batch runner on a real Dask LocalCluster (2 worker processes): every series of a project
gets a result, a failing series is reported with its reason while the others complete, a
re-run skips what is done, `force` replaces, and a model is loaded once per worker. With real
peers: a project pulled from Orthanc goes through the pipeline, and no identifier leaks, neither
in the store and catalog nor in what an investigator reads over HTTP (the results page, each PNG
report, the CSV and Parquet tables), each decoded."""

from __future__ import annotations

import hashlib
import io
from collections import Counter

import numpy as np
import pytest
import typer
from PIL import Image, PngImagePlugin
from typer.testing import CliRunner

from core import users
from core.core import Core
from core.settings import Settings
from gateway import run_cmd
from harness.leaks import date_forms, scan_database, scan_store
from processing import outputs
from processing.body_hu import BodyHu
from processing.pipeline import FAILED, Finding
from processing.runner import local_cluster, run_pipeline
from tests.processing_data import (
    GpuBodyHu,
    ScaledHu,
    body_volume,
    ct_series,
    new_project,
    save_scale_model,
    store_series,
)
from tests.test_pull import approved, corpus, make_gateway, pacs, scp_port  # noqa: F401
from tests.web_server import Fetched, fetch, leaks, serving


@pytest.fixture(scope="module")
def cluster():
    c = local_cluster(workers=2)
    yield c
    c.close()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Settings:
    base = tmp_path_factory.mktemp("runner")
    settings = Settings(home=base, fsync=False)
    new_project(settings, "batch")
    for seed in range(3):
        vol = body_volume(seed=seed)
        store_series(settings, "batch", ct_series(vol, seed=seed), base / "spool")
    store_series(settings, "batch", ct_series(body_volume(), seed=7, modality="MR"), base / "sp")
    bad = store_series(settings, "batch", ct_series(body_volume(seed=8), seed=8), base / "sp")
    shard = next((base / "store" / bad / "volume").rglob("c/*/*/*"))
    data = bytearray(shard.read_bytes())
    data[-20:-10] = b"\xff" * 10  # a corrupt shard index: reading the volume fails
    shard.unlink()
    shard.write_bytes(bytes(data))
    return settings


def statuses(settings: Settings, pipeline: str) -> Counter:
    with Core(settings) as core:
        return Counter(r.status for r in core.catalog.results(core.project("batch").id, pipeline))


def test_a_batch_completes_reports_failures_and_restarts(cluster, project):
    address = cluster.scheduler_address
    report = run_pipeline(project, "batch", BodyHu(), scheduler=address, progress=False)
    assert report.counts() == {"ok": 3, "ineligible": 1, "failed": 1}
    (failed,) = [o for o in report.outcomes if o.status == "failed"]
    assert "checksum" in failed.reason
    assert statuses(project, "body-hu") == {"ok": 3, "ineligible": 1, "failed": 1}

    # Restart: done series (same version) are skipped; the failed one is tried again.
    again = run_pipeline(project, "batch", BodyHu(), scheduler=address, progress=False)
    assert again.already_done == 4 and again.counts() == {"failed": 1}

    # Forced: everything runs again and replaces, one row per series, no new derived series.
    with Core(project) as core:
        before = core.catalog.series_counts(core.project("batch").id)
    forced = run_pipeline(project, "batch", BodyHu(), scheduler=address, force=True, progress=False)
    assert forced.already_done == 0 and len(forced.outcomes) == 5
    assert statuses(project, "body-hu") == {"ok": 3, "ineligible": 1, "failed": 1}
    with Core(project) as core:
        assert core.catalog.series_counts(core.project("batch").id) == before
    assert before["complete"] == 5 + 2 * 3  # the inputs, a SEG and an SR per ok series


def test_the_model_is_loaded_once_per_worker(cluster, project, tmp_path):
    model = save_scale_model(tmp_path / "scale.pt", 1.0)
    log = tmp_path / "loads.log"
    pipeline = ScaledHu(model_path=str(model), load_log=str(log))
    report = run_pipeline(
        project, "batch", pipeline, scheduler=cluster.scheduler_address, progress=False
    )
    assert report.counts()["ok"] == 3
    loads = Counter(log.read_text().split())
    assert 1 <= len(loads) <= 2 and set(loads.values()) == {1}  # once in each worker used
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    with Core(project) as core:
        p = core.project("batch")
        scaled = {r.series_uid: r for r in core.catalog.results(p.id, "scaled-hu")}
        plain = {r.series_uid: r for r in core.catalog.results(p.id, "body-hu")}
    for uid, r in scaled.items():
        if r.status == "ok":
            assert r.provenance["model_checksum"] == digest
            assert r.values["body_mean_hu"] == pytest.approx(
                plain[uid].values["body_mean_hu"], abs=1e-3
            )


def test_gpu_tasks_need_gpu_workers_and_fall_back_to_the_cpu(cluster, project):
    """The embedded cluster with one GPU worker (resource GPU=1); no CUDA here: the CPU."""
    run_pipeline(project, "batch", BodyHu(), scheduler=cluster.scheduler_address, progress=False)
    report = run_pipeline(project, "batch", GpuBodyHu(), gpus=1, progress=False)
    assert report.counts() == {"ok": 3, "ineligible": 1, "failed": 1}
    with Core(project) as core:
        p = core.project("batch")
        gpu = {r.series_uid: r for r in core.catalog.results(p.id, "gpu-body-hu")}
        cpu = {r.series_uid: r for r in core.catalog.results(p.id, "body-hu")}
    for uid, r in gpu.items():
        assert r.provenance["device"] in ("cpu", "cuda")
        for k, v in r.values.items():
            assert v == pytest.approx(cpu[uid].values[k], rel=1e-5)


def test_the_command_line_runs_bone_density_on_a_scheduler(cluster, project):
    app = typer.Typer()

    @app.callback()
    def main(ctx: typer.Context) -> None:
        ctx.obj = {"settings": project}

    run_cmd.register(app)
    runner = CliRunner()
    args = ["run", "bone-density", "batch", "--scheduler", cluster.scheduler_address]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    # 12-slice test series: too few for the spine (the corrupt one too: qualifying reads
    # no pixels), and the MR series.
    assert "bone-density 0.1: 5 ineligible; 0 already done" in res.output
    assert max(len(ln) for ln in res.output.splitlines()) <= 80
    # It ends by saying where the outputs are: the web page and the store's keys.
    assert "/projects/batch/results" in res.output
    assert "reports/batch/bone-density/" in res.output and str(project.home) in res.output
    res = runner.invoke(app, ["results", "batch", "--pipeline", "bone-density"])
    assert res.exit_code == 0 and "fewer than 20" in res.output


@pytest.mark.peers
def test_a_pulled_project_goes_through_the_pipeline_without_leaks(
    cluster,
    tmp_path,
    pacs,  # noqa: F811
    scp_port,  # noqa: F811
    corpus,  # noqa: F811
):
    gw = make_gateway(tmp_path, pacs, scp_port)
    approved(gw, "pulled", [st.accession for st in corpus.studies[:2]])
    pulled = gw.pull("pulled")
    n = sum(1 for s in pulled.series if s.status == "complete")
    assert n == 4
    report = run_pipeline(
        gw.settings, "pulled", BodyHu(), scheduler=cluster.scheduler_address, progress=False
    )
    assert report.counts() == {"ok": n}
    with Core(gw.settings) as core:
        p = core.project("pulled")
        rows = core.catalog.results(p.id)
        assert all(r.sr_series_uid and r.seg_series_uid for r in rows)
        assert core.catalog.series_counts(p.id) == {"complete": 3 * n}
        assert scan_store(core.store, corpus.phi) == []
    assert scan_database(gw.settings.resolved_catalog_url(), corpus.phi) == []

    # What an investigator reads over HTTP, every layer decoded; dates also as the page writes them.
    core, needles = gw.core, date_forms(corpus.phi)
    token = users.add(core, "ivy")
    users.grant(core, "pulled", "ivy", "investigator")
    with serving(core) as url:
        got = results_responses(url, "pulled", token)
        assert len(got) == 3 + n and all(f.status == 200 for _, f in got)
        assert sum(f.headers["content-type"] == "image/png" for _, f in got) == n
        assert [leak for where, f in got for leak in leaks(where, f, needles)] == []

        # Control: a result whose reason and values carry identifiers (one needing HTML
        # unescaping), and a report with one drawn in its pixels and one in a text chunk.
        st = corpus.studies[0]
        surname, quoted = st.patient_name.split("^")[0], "D'ARTAGNAN"
        row = core.catalog.results(core.project("pulled").id)[0]
        key = outputs.report_key("pulled", "leaky", row.series_uid)
        outputs.put_bytes(core.store, key, planted_png(f"leaky 1: {st.accession}", st.patient_id))
        core.catalog.upsert_result(
            core.project("pulled").id, row.series_uid, "leaky", study_uid=row.study_uid,
            version="1", status=FAILED, reason=f"{surname} {quoted}",
            values={"note": st.patient_id}, report_key=key,
        )  # fmt: skip
        got = results_responses(url, "pulled", token)
        found = {
            (leak.where, leak.needle) for w, f in got for leak in leaks(w, f, [*needles, quoted])
        }
    png = f"{row.series_uid}/leaky.png"
    assert {("page (html)", surname), ("page (html)", quoted)} <= found
    assert ("page", surname) in found and ("page", quoted) not in found  # escaped: &#x27;
    assert {("results.csv", surname), ("results.csv", st.patient_id)} <= found
    assert {
        ("results.parquet (parquet)", surname),
        ("results.parquet (parquet)", st.patient_id),
    } <= found
    assert {
        (f"{png} (png pixels)", st.accession),
        (f"{png} (png metadata)", st.patient_id),
    } <= found
    # ... and only there: the pipeline's own reports stay clean.
    assert {w.split(" ")[0] for w, _ in found if ".png" in w} == {png}


def results_responses(url: str, project: str, token: str) -> list[tuple[str, Fetched]]:
    """The results page, each PNG report it shows, the CSV and the Parquet table, as fetched;
    named page, <series>/<pipeline>.png, results.csv, results.parquet."""
    page = fetch(f"{url}/projects/{project}/results", token)
    got = [("page", page)]
    for src in [s.split('"')[0] for s in page.body.decode().split('<img src="')[1:]]:
        got.append((src.split("/results/")[1], fetch(url + src.replace("&amp;", "&"), token)))
    for fmt in ("csv", "parquet"):
        got.append((f"results.{fmt}", fetch(f"{url}/api/projects/{project}/results.{fmt}", token)))
    return got


def planted_png(title: str, chunk: str) -> bytes:
    """A report as the worker draws it, `title` burned in, and `chunk` in a PNG text chunk."""
    vol = np.random.default_rng(0).normal(0, 300, (24, 32, 32)).astype(np.float32)
    finding = Finding(FAILED, {}, levels={"body": (2, 20)})
    png = outputs.report_png(vol, np.diag([-0.7, -0.7, 2.5, 1.0]), finding, title)
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", chunk)
    out = io.BytesIO()
    Image.open(io.BytesIO(png)).save(out, format="PNG", pnginfo=info)
    return out.getvalue()
