"""Retention and patient opposition end to end: a real Orthanc, real pulls, a real pipeline's
outputs, then a project purged (local folder and SeaweedFS S3) and a patient opted out."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from datetime import timedelta

import pydicom
import pytest
from zarr.core.buffer import default_buffer_prototype

from core import users
from core.errors import ProjectError
from core.retention import retention_end
from core.settings import Settings
from deid.vault import TRUSTED_THIRD_PARTY, cohort_table
from dicom.query import Level, Query
from gateway.api import Gateway
from gateway.dimse.scp import StorageSCP
from gateway.pull import PullRefused
from gateway.pull.layout import SpoolLayout
from gateway.pull.preview import pull_plan
from gateway.pull.receiver import Receiver, ReceiverConfig
from gateway.purge import opt_out, purge_project, store_prefixes
from harness.leaks import scan_database, scan_store
from processing import export
from processing.body_hu import BodyHu
from processing.worker import SeriesTask, process_series
from storage.objectstore import leftovers, run
from storage.series import SeriesReader
from tests.test_pull import (  # noqa: F401 - corpus, pacs, scp_port: fixtures
    TODAY,
    approved,
    corpus,
    make_gateway,
    pacs,
    s3_gateway,
    scp_port,
)
from tests.web_server import fetch, serving

pytestmark = pytest.mark.peers


def pulled_with_results(gw: Gateway, name: str, studies) -> None:
    """Approve, pull, and run a real pipeline (body-hu: results, SR, SEG, PNG report) over
    every pulled series, in this process."""
    approved(gw, name, [st.accession for st in studies])
    report = gw.pull(name)
    assert report.ok, [s.error for s in report.series]
    p = gw.core.project(name)
    settings = gw.settings.model_dump_json()
    for r in gw.catalog.series(p.id, status="complete"):
        assert r.storage_key is not None  # a complete series has one
        task = SeriesTask(name, r.series_uid, r.study_uid, r.patient_pseudonym, r.storage_key)
        process_series(settings, task, BodyHu(), False)
    results = gw.catalog.results(p.id)
    assert results and all(r.report_key for r in results if r.status == "ok")


def index_rows(gw: Gateway, name: str) -> int:
    pid = gw.core.project(name).id
    return len(gw.catalog.search(pid, Query(Level.STUDY))) + len(
        gw.catalog.search(pid, Query(Level.SERIES))
    )


@pytest.mark.parametrize("where", ["local", "s3"])
def test_purge_leaves_nothing_of_the_project(tmp_path, pacs, scp_port, corpus, where, request):  # noqa: F811
    bucket = None
    if where == "s3":
        gw, bucket = s3_gateway(tmp_path, pacs, scp_port, request.getfixturevalue("s3_server"))
    else:
        gw = make_gateway(tmp_path, pacs, scp_port)
    pulled_with_results(gw, "gone", corpus.studies[:1])
    approved(gw, "kept", [corpus.studies[1].accession])
    assert gw.pull("kept").ok
    gone = gw.core.project("gone")
    spool = SpoolLayout(gw.settings.spool_dir.resolve(), "gone").root
    spool.mkdir(parents=True, exist_ok=True)
    (spool / "left-behind").write_bytes(b"x")
    users.first_admin(gw.core)  # the one exporting
    exported = export.export(gw.core, "gone", "zarr")
    # series, reports and exports
    assert all(leftovers(gw.store, p) for p in store_prefixes("gone"))
    assert index_rows(gw, "gone") > 0
    token = users.add(gw.core, "vic")
    users.grant(gw.core, "gone", "vic", "viewer")
    qido = "/projects/gone/dicom-web/studies"
    with serving(gw.core) as url:  # positive control: the viewer finds the study before
        assert len(fetch(url + qido, token).json()) == 1
    before = len(gw.catalog.audit_trail("gone", limit=10_000))

    # Approved and in date: refused (and audited), nothing removed.
    with pytest.raises(ProjectError, match="retention end"):
        purge_project(gw.core, "gone")
    assert leftovers(gw.store, "projects/gone")
    end = retention_end(gw.core, gone)
    assert end == gone.expires_on + timedelta(days=90)

    out = purge_project(gw.core, "gone", today=end + timedelta(days=1))

    assert out.objects > 0 and out.nbytes > 0 and out.series > 0 and out.rows > 0
    for prefix in store_prefixes("gone"):
        assert leftovers(gw.store, prefix) == []
    if bucket:  # the bucket itself, listed by another client
        objects = s3_server_of(request).read_all(bucket)
        assert objects and not [k for k in objects if "/gone/" in k]
    else:
        assert not (tmp_path / "store" / "projects" / "gone").exists()
    assert not spool.exists()
    pid = gone.id
    assert gw.catalog.series(pid) == [] and gw.catalog.results(pid) == []
    assert gw.catalog.export(exported.id).state == "deleted"  # the record stays, its zip went
    assert index_rows(gw, "gone") == 0
    assert gw.catalog.cohort(pid) == []
    with gw.vault.engine.connect() as c:
        assert c.execute(cohort_table.select().where(cohort_table.c.project == "gone")).all() == []
    with serving(gw.core) as url:  # QIDO-RS for the project finds nothing
        r = fetch(url + qido, token)
        assert r.status in (403, 404) or r.json() == [], r.status
    trail = gw.catalog.audit_trail("gone", limit=10_000)
    assert {"pull.start", "series.stored", "project.purge"} <= {e.action for e in trail}
    assert len(trail) >= before + 2  # the refusal and the purge added; nothing deleted
    assert gw.catalog.verify_audit().problem is None  # the chain is whole: no row went
    assert [e.outcome for e in trail if e.action == "project.purge"] == ["ok", "refused"]
    (record,) = gw.catalog.purge_records("gone")
    assert (record.objects, record.nbytes, record.actor) == (out.objects, out.nbytes, gw.core.actor)
    assert gw.core.project("gone").status == "purged"
    with pytest.raises(PullRefused, match="purged"):
        gw.pull("gone")
    with pytest.raises(ProjectError, match="purged"):
        gw.approve("gone", committee_ref="again", approved_on=TODAY, expires_on=TODAY)
    # The other project is untouched.
    kept = gw.catalog.series(gw.core.project("kept").id)
    assert kept and all(SeriesReader(gw.store, r.storage_key).complete for r in kept)

    # Positive control: the checker sees an object planted under the purged prefix, and a
    # re-run of the purge (which finishes an interrupted one) removes it.
    planted = "projects/gone/2.25.1/2.25.2/zarr.json"
    run(gw.store.set(planted, default_buffer_prototype().buffer.from_bytes(b"{}")))
    assert leftovers(gw.store, "projects/gone") == [planted]
    purge_project(gw.core, "gone")
    assert leftovers(gw.store, "projects/gone") == []


def s3_server_of(request):
    return request.getfixturevalue("s3_server")


def test_opt_out_removes_a_patient_everywhere_and_for_good(tmp_path, pacs, scp_port, corpus):  # noqa: F811
    gw = make_gateway(tmp_path, pacs, scp_port)
    out_st, other_st = corpus.studies[0], corpus.studies[1]
    pulled_with_results(gw, "pa", [out_st, other_st])
    approved(gw, "pb", [out_st.accession])
    assert gw.pull("pb").ok

    def needles(st) -> list[str]:  # what the store holds of a patient: pseudonyms, UIDs
        return [
            v
            for name in ("pa", "pb")
            for v in (gw.keys(name).pseudonym(st.patient_id), gw.keys(name).uid(st.study_uid))
        ]

    # Positive controls: the scans find both patients before.
    assert {leak.needle for leak in scan_store(gw.store, needles(out_st))} == set(needles(out_st))
    # (The vault is sealed: its trusted lookup, not a scan, finds the patient there.)
    pseudonym = gw.keys("pa").pseudonym(out_st.patient_id)
    assert gw.vault.lookup("pa", pseudonym, role=TRUSTED_THIRD_PARTY, actor="ttp") == (
        out_st.patient_id
    )
    pa = gw.core.project("pa")
    reports_before = {r.series_uid: r.report_key for r in gw.catalog.results(pa.id)}

    done = opt_out(gw.core, [out_st.patient_id])

    assert sorted(p.project for p in done) == ["pa", "pb"]
    assert all(p.series > 0 and p.objects > 0 for p in done)
    assert scan_store(gw.store, needles(out_st)) == []  # decoded and scanned: nothing of theirs
    theirs = {gw.keys("pa").uid(se.series_uid) for se in out_st.series}
    for name, st in (("pa", out_st), ("pb", out_st)):
        pid = gw.core.project(name).id
        assert gw.catalog.patient_studies(pid, gw.keys(name).pseudonym(st.patient_id)) == set()
    assert not theirs & {r.series_uid for r in gw.catalog.results(pa.id)}
    for uid in theirs:
        key = reports_before.get(uid)
        assert key is None or not run(gw.store.exists(key))
    # The other patient is intact: series, index, results, reports.
    left = gw.catalog.series(pa.id)
    assert {r.study_uid for r in left} == {gw.keys("pa").uid(other_st.study_uid)}
    assert all(SeriesReader(gw.store, r.storage_key).complete for r in left)
    assert len(gw.catalog.search(pa.id, Query(Level.STUDY))) == 1
    assert {leak.needle for leak in scan_store(gw.store, needles(other_st))} >= {
        gw.keys("pa").pseudonym(other_st.patient_id)
    }
    assert gw.catalog.results(pa.id)
    # The register holds digests: the catalog has no Patient ID (the vault does, above, sealed).
    assert scan_database(gw.settings.resolved_catalog_url(), [out_st.patient_id]) == []
    control = tmp_path / "control.db"  # positive control: the scan finds an ID kept in clear
    with sqlite3.connect(control) as c:
        c.execute("create table t (v text)")
        c.execute("insert into t values (?)", (out_st.patient_id,))
    assert scan_database(f"sqlite:///{control}", [out_st.patient_id])
    audit = [e for e in gw.catalog.audit_trail(limit=10_000) if e.action.startswith("optout")]
    assert {e.action for e in audit} == {"optout.add", "optout.purge"}
    assert all(out_st.patient_id not in e.detail for e in audit)
    assert len(gw.catalog.purge_records()) == 2

    # Never again: a new pull naming them (accession and patient ID) plans nothing of theirs.
    gw.add_cohort("pa", "patient_id", [out_st.patient_id])
    (source,) = pull_plan(gw.core, "pa").sources  # `sphere pull --plan` leaves them out too
    assert (len(source.studies), source.series, source.stored) == (0, 0, len(other_st.series))
    report = gw.pull("pa")
    assert report.ok and report.studies == 1 and report.instances == 0  # the other, complete
    left = {r.study_uid for r in gw.catalog.series(pa.id)}
    assert left == {gw.keys("pa").uid(other_st.study_uid)}
    refused = [e for e in gw.catalog.audit_trail("pa") if e.action == "pull.optout"]
    assert {"cohort_items", "studies"} <= {k for e in refused for k in eval_detail(e)}
    assert scan_store(gw.store, needles(out_st)) == []


def eval_detail(event) -> dict:
    return json.loads(event.detail)


def test_receiver_refuses_an_opted_out_patient_while_the_pull_waits(tmp_path, corpus):  # noqa: F811
    """An instance of a patient who opted out, sent straight to the Storage SCP for a series
    the pull waits for, is refused before de-identification; another patient's is taken."""
    gw = Gateway(Settings(home=tmp_path, fsync=False))
    gw.create_project("wait")
    keys = gw.keys("wait")
    out_st, other_st = corpus.studies[0], corpus.studies[1]
    layout = SpoolLayout(gw.settings.spool_dir.resolve(), "wait")
    for st in (out_st, other_st):  # what the pull does before each retrieve
        se = st.series[0]
        layout.expect(
            keys.uid(se.series_uid), keys.uid(st.study_uid), keys.pseudonym(st.patient_id)
        )
    opt_out(gw.core, [out_st.patient_id])
    receiver = Receiver(ReceiverConfig.of(gw.core, "wait"))

    def send(st) -> str:
        se = st.series[0]
        files = [
            f
            for f in corpus.files
            if pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID == se.series_uid
        ]
        with StorageSCP(
            ae_title="SPHERE", host="127.0.0.1", port=0, on_store=receiver.on_store
        ) as scp:
            out = subprocess.run(
                [
                    "storescu",
                    "-nh",
                    "-v",
                    "-aet",
                    "ORTHANC",
                    "-aec",
                    "SPHERE",
                    "127.0.0.1",
                    str(scp.port),
                ]
                + [str(f) for f in files],
                capture_output=True,
                text=True,
                timeout=60,
            )
        receiver.on_release()
        return out.stderr

    refused = send(out_st)
    n = out_st.series[0].n_instances
    assert refused.count("Status: 0x124") == n, refused
    assert not layout.data(keys.uid(out_st.series[0].series_uid)).exists()
    (row,) = [e for e in gw.catalog.audit_trail("wait") if e.action == "store.refused_optout"]
    assert eval_detail(row) == {"instances": n} and out_st.patient_id not in row.detail
    # Positive control: the same way, another patient's series is spooled.
    taken = send(other_st)
    assert "Status: 0x124" not in taken
    assert layout.data(keys.uid(other_st.series[0].series_uid)).exists()
    receiver.close()
