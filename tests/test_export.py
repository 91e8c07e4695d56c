"""Exports (`sphere export`, the web's button) and zip over DICOMweb, against real peers: the
server under uvicorn, a local store and SeaweedFS as S3. What a zip holds is what WADO-RS
serves (DICOM), what the loader gives (NIfTI), what is stored (Zarr); a link stops working
after its time; no planted identifier is in any export (decoded scan, with its control)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import time
import zipfile
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from typer.testing import CliRunner

from core import Core, ProjectError, Settings, SphereError, access, projects, users
from core.settings import S3Options
from dicom.json_model import first
from gateway import jobs, links
from gateway.cli import app as cli_app
from gateway.purge import opt_out, purge_project
from harness.leaks import scan_bytes
from harness.synthetic import generate
from processing import export
from processing.loader import load_series
from storage.commit import commit_series
from storage.objectstore import local_path, open_store, run
from storage.series import SeriesReader, SeriesWriter, series_key
from tests.test_pull import pacs, scp_port  # noqa: F401 - Orthanc, seeded with `corpus`
from tests.web_server import fetch, serving

pytestmark = pytest.mark.peers
TODAY = date.today()


def store_series(core: Core, project: str, datasets: list, spool: Path) -> str:
    """Commit datasets as one series of `project`, complete and indexed (as a pull leaves it)."""
    ds0 = datasets[0]
    key = series_key(project, ds0.StudyInstanceUID, ds0.SeriesInstanceUID)
    writer = SeriesWriter(spool / ds0.SeriesInstanceUID, fsync=False)
    for ds in datasets:
        writer.add(ds)
    commit_series(
        core.store, core.catalog, writer, key, project_id=core.project(project).id,
        series_uid=ds0.SeriesInstanceUID, values={"study_uid": ds0.StudyInstanceUID,
        "modality": ds0.Modality, "patient_pseudonym": str(ds0.PatientID)},
    )  # fmt: skip
    return key


@dataclass(frozen=True)
class Site:
    settings: Settings
    tokens: dict[str, str]


def make_site(root: Path, corpus, storage_url: str | None = None, s3=None) -> Site:
    """A home with project `ex` (the corpus, de-identified, and a result), `raw` (the corpus
    NOT de-identified: the leak scan's control), an investigator and a viewer."""
    settings = Settings(home=root / "home", fsync=False, storage_url=storage_url, s3=s3 or {})
    with Core(settings, create=True) as c:
        users.first_admin(c)
        for name in ("ex", "raw"):
            projects.create(c, name)
            projects.approve(
                c, name, committee_ref="C", approved_on=TODAY, expires_on=TODAY + timedelta(30)
            )
        tokens = {n: users.add(c, n) for n in ("ivy", "val")}
        users.grant(c, "ex", "ivy", access.INVESTIGATOR)
        users.grant(c, "ex", "val", access.VIEWER)
        by_series: dict[str, list] = {}
        for f in corpus.files:
            ds = pydicom.dcmread(f)
            by_series.setdefault(ds.SeriesInstanceUID, []).append(ds)
        deid = c.deidentifier("ex")
        for i, dss in enumerate(by_series.values()):
            key = store_series(c, "ex", [deid.apply(d) for d in dss], root / "spool")
            if i == 0:
                reader = SeriesReader(c.store, key)
                h = reader.header(0)
                c.catalog.upsert_result(
                    c.project("ex").id, first(h, "0020000E"), "bone-density",
                    study_uid=first(h, "0020000D"), version="1", status="ok",
                    values={"l1_hu": 151.5},
                )  # fmt: skip
        raw = next(iter(by_series.values()))
        store_series(c, "raw", [pydicom.dcmread(d.filename) for d in raw], root / "spool-raw")
    return Site(settings, tokens)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return generate(
        tmp_path_factory.mktemp("corpus"), n_patients=1, series_per_study=2, slices=6, size=32
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory, corpus) -> Site:
    return make_site(tmp_path_factory.mktemp("export"), corpus)


def zip_of(core: Core, row) -> zipfile.ZipFile:
    from zarr.core.buffer import default_buffer_prototype

    data = run(core.store.get(row.key, default_buffer_prototype())).to_bytes()
    return zipfile.ZipFile(io.BytesIO(data))


def decoded_leaks(where: str, z: zipfile.ZipFile, needles: list[str]) -> list:
    """Planted identifiers in every file of a zip, each decoded: DICOM read back (every element
    as text), NIfTI and JSON as they are, gzip unpacked, Zarr header arrays decompressed."""
    found = []
    for name in z.namelist():
        data = z.read(name)
        found += scan_bytes(f"{where}:{name}", data, needles) + scan_bytes(
            where, name.encode(), needles
        )
        if name.endswith(".dcm"):
            found += scan_bytes(
                f"{where}:{name} (dicom)", str(pydicom.dcmread(io.BytesIO(data))).encode(), needles
            )
        elif name.endswith(".gz"):
            found += scan_bytes(f"{where}:{name} (gunzip)", gzip.decompress(data), needles)
        elif name.endswith(".json"):
            text = json.dumps(json.loads(data), ensure_ascii=False)
            found += scan_bytes(f"{where}:{name} (json)", text.encode(), needles)
    if any(n.startswith("zarr/") for n in z.namelist()):
        import tempfile

        from harness.leaks import scan_store

        with tempfile.TemporaryDirectory() as tmp:
            z.extractall(tmp)
            found += scan_store(open_store(str(Path(tmp) / "zarr")), needles)
    return found


# -- DICOM, and the zip over DICOMweb -----------------------------------------------------------


def test_dicom_export_and_zip_over_dicomweb_hold_what_wado_rs_serves(site, corpus):
    with Core(site.settings) as c:
        row = export.export(c, "ex", "dicom")
        assert row.state == "done" and row.n_series == 2
        z = zip_of(c, row)
        manifest = json.loads(z.read("manifest.json"))
        rows = c.catalog.export_series(c.project("ex").id)
    token = site.tokens["ivy"]
    with serving(Core(site.settings, research=True)) as url:
        root = f"{url}/projects/ex/dicom-web"
        for se, st in rows:
            served = fetch(f"{root}/studies/{se.study_uid}/series/{se.series_uid}", token)
            assert served.status == 200 and len(served.parts) == se.n_instances
            folder = f"dicom/{st.patient_id}/{se.study_uid}/{se.series_uid}/"
            exported = {n: z.read(n) for n in z.namelist() if n.startswith(folder)}
            assert sorted(exported.values()) == sorted(body for _, body in served.parts)
            # the same series as a zip over DICOMweb (Supplement 211): plain HTTP ...
            zipped = fetch(
                f"{root}/studies/{se.study_uid}/series/{se.series_uid}",
                token,
                headers={"Accept": "application/zip"},
            )
            assert zipped.status == 200
            assert zipped.headers["content-type"] == "application/zip"
            got = zipfile.ZipFile(io.BytesIO(zipped.body))
            assert sorted(got.read(n) for n in got.namelist()) == sorted(exported.values())
        study = rows[0][0].study_uid
        # ... and dicomweb-client's session (its retrieve_* only speak multipart)
        client = DICOMwebClient(root, headers={"Authorization": f"Bearer {token}"})
        r = client._session.get(f"{root}/studies/{study}", headers={"Accept": "application/zip"})
        whole = zipfile.ZipFile(io.BytesIO(r.content))
        assert len(whole.namelist()) == sum(se.n_instances for se, _ in rows)
        # a viewer of the project may read it; no one else reads a byte
        assert (
            fetch(
                f"{root}/studies/{study}", site.tokens["val"], headers={"Accept": "application/zip"}
            ).status
            == 200
        )
        other = f"{url}/projects/raw/dicom-web/studies/{study}"
        assert fetch(other, token, headers={"Accept": "application/zip"}).status == 404
        assert fetch(f"{root}/studies/{study}", headers={"Accept": "application/zip"}).status == 401
    # the manifest: every file with its size and sha256, shifted dates, codes, results
    import hashlib

    listed = {f["name"]: f for f in manifest["files"]}
    assert set(listed) == set(z.namelist()) - {"manifest.json"}
    for name, f in listed.items():
        data = z.read(name)
        assert f["size"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()
    assert {c["code"] for c in manifest["deidentification"]["method_codes"]} >= {"113100"}
    (patient,) = manifest["patients"]
    series = patient["studies"][0]["series"]
    assert all(s["deidentification_method_codes"] for s in series)
    assert patient["studies"][0]["study_date"] not in (None, corpus.studies[0].study_date)
    assert [r["values"] for r in manifest["results"]] == [{"l1_hu": 151.5}]
    with Core(site.settings) as c:
        trail = [r.action for r in c.catalog.audit_trail("ex", 200)]
    assert "export" in trail


def test_nifti_export_equals_the_loader(site, tmp_path):
    with Core(site.settings) as c:
        row = export.export(c, "ex", "nifti", modality="CT")
        z = zip_of(c, row)
        rows = c.catalog.export_series(c.project("ex").id)
        for se, st in rows:
            stem = f"nifti/{st.patient_id}/{se.study_uid}/{se.series_uid}"
            path = tmp_path / f"{se.series_uid}.nii.gz"
            path.write_bytes(z.read(f"{stem}.nii.gz"))
            img = nib.load(path)
            loaded = load_series(c.store, se.storage_key, channel_first=False)
            np.testing.assert_array_equal(img.get_fdata(dtype=np.float32), loaded.numpy())
            np.testing.assert_allclose(img.affine, loaded.affine.numpy(), atol=1e-4)
            side = json.loads(z.read(f"{stem}.json"))
            assert side["series_uid"] == se.series_uid and side["modality"] == "CT"
            assert side["orientation"] == "".join(nib.aff2axcodes(img.affine))


def test_zarr_export_is_the_series_as_stored(site, tmp_path):
    with Core(site.settings) as c:
        row = export.export(c, "ex", "zarr")
        zip_of(c, row).extractall(tmp_path)
        for se, _ in c.catalog.export_series(c.project("ex").id):
            mine = SeriesReader(
                open_store(str(tmp_path / "zarr")), f"{se.study_uid}/{se.series_uid}"
            )
            theirs = SeriesReader(c.store, se.storage_key)
            np.testing.assert_array_equal(mine.volume[:], theirs.volume[:])
            assert mine.header_texts() == theirs.header_texts()


def test_no_planted_identifier_in_any_export(site, corpus):
    with Core(site.settings) as c:
        for fmt in export.FORMATS:
            row = export.export(c, "ex", fmt)
            assert decoded_leaks(fmt, zip_of(c, row), corpus.phi) == []
        # Control: a project whose series was stored without de-identification is caught, in
        # the decoded DICOM, the NIfTI sidecar (its patient) and the Zarr header arrays.
        for fmt in export.FORMATS:
            found = decoded_leaks(fmt, zip_of(c, export.export(c, "raw", fmt)), corpus.phi)
            assert corpus.studies[0].patient_id in {leak.needle for leak in found}, fmt


def test_the_scan_reads_a_nifti_header(site, corpus, monkeypatch):
    """Control for the NIfTI header itself (not its path or sidecar): a name planted in its
    `descrip` field is found, in the gunzipped file only."""
    from processing import nifti

    plain = nifti.header
    name = corpus.studies[0].patient_name

    def planted(reader):
        head = bytearray(plain(reader))
        head[148 : 148 + len(name)] = name.encode()  # descrip, char[80] at byte 148
        return bytes(head)

    monkeypatch.setattr(nifti, "header", planted)
    with Core(site.settings) as c:
        found = decoded_leaks("nifti", zip_of(c, export.export(c, "ex", "nifti")), [name])
    assert found and all(leak.where.endswith(".nii.gz (gunzip)") for leak in found)


# -- refusals, links, retention -----------------------------------------------------------------


def test_an_export_is_refused_to_a_viewer_and_for_a_closed_project(site, tmp_path):
    with Core(site.settings) as c:
        val = c.catalog.user("val")
        with pytest.raises(access.NotAllowed):
            export.export(c, "ex", "dicom", user=val)
        with pytest.raises(Exception, match="not stored"):
            export.export(c, "ex", "dicom", studies=["2.25.1"])
    closed = make_site(
        tmp_path, generate(tmp_path / "c", n_patients=1, series_per_study=1, slices=2, size=16)
    )
    with Core(closed.settings) as c:
        projects.revoke(c, "ex")
        with pytest.raises(ProjectError, match="revoked"):
            export.export(c, "ex", "dicom")


def test_a_local_link_works_until_its_time_and_each_download_is_audited(site):
    with Core(site.settings) as c:
        row = export.export(c, "ex", "zarr")
        stored = local_path(c.store, row.key).read_bytes()
    with serving(Core(site.settings, research=True)) as url:
        with Core(site.settings) as c:
            good, _ = links.link(c, row.id, 1, base_url=url)
            short, _ = links.link(c, row.id, 1 / 3600, base_url=url)
        r = requests.get(good, timeout=30)
        assert r.status_code == 200 and r.content == stored
        assert requests.get(good.replace("sig=", "sig=0"), timeout=30).status_code == 403
        assert requests.get(good.replace(row.id, "0" * 16), timeout=30).status_code == 403
        time.sleep(1.2)
        assert requests.get(short, timeout=30).status_code == 403  # its time is over
    with Core(site.settings) as c:
        trail = c.catalog.audit_trail("ex", 500)
        downloads = [(r.outcome, r.actor) for r in trail if r.action == "export.download"]
        made = [r for r in trail if r.action == "export.link"]
    assert ("ok", "link:" + row.actor) in downloads
    assert ("refused", "link") in downloads  # a bad signature, a link whose time is over
    assert len(made) >= 2


def test_the_command_line(site):
    env = {"SPHERE_HOME": str(site.settings.home), "SPHERE_FSYNC": "false", "COLUMNS": "200"}
    made = CliRunner().invoke(cli_app, ["export", "ex", "--format", "zarr"], env=env)
    assert made.exit_code == 0, made.output
    export_id = made.output.split()[1].rstrip(":")
    listed = CliRunner().invoke(cli_app, ["export", "list", "ex"], env=env)
    assert export_id in listed.output and "done" in listed.output
    link = CliRunner().invoke(cli_app, ["export", "link", export_id, "--hours", "2"], env=env)
    assert link.exit_code == 0 and f"/exports/{export_id}/download?expires=" in link.output
    with Core(site.settings) as c:
        (se, _), *_ = c.catalog.export_series(c.project("ex").id)
    args = ["export", "ex", "--format", "nifti", "--study", se.study_uid, "--modality", "CT"]
    chosen = CliRunner().invoke(cli_app, args, env=env)
    assert chosen.exit_code == 0, chosen.output
    with Core(site.settings) as c:
        row = c.catalog.export(chosen.output.split()[1].rstrip(":"))
        assert row.selection == {"studies": [se.study_uid], "modality": "CT"}
        assert len([n for n in zip_of(c, row).namelist() if n.endswith(".nii.gz")]) == 2
    args[-1] = "MR"  # control: the selection is applied (no MR series in the study)
    assert CliRunner().invoke(cli_app, args, env=env).exit_code == 2
    bad = CliRunner().invoke(cli_app, ["export", "ex", "--format", "tiff"], env=env)
    assert bad.exit_code == 2 and "--format is one of" in bad.output


def test_an_investigator_exports_from_the_web(site, corpus):
    token = site.tokens["ivy"]
    with serving(Core(site.settings, research=True)) as url:
        page = f"{url}/projects/ex/exports"
        r = requests.post(
            page, data={"format": "nifti", "modality": "CT"}, timeout=60,
            headers={"Authorization": f"Bearer {token}"}, allow_redirects=False,
        )  # fmt: skip
        assert r.status_code == 303
        with Core(site.settings) as c:
            (job,) = [j for j in c.catalog.jobs("ex") if j.kind == "export"]
            assert c.catalog.exports("ex")[0].state == "running"  # recorded, queued
        jobs.Node(site.settings, name="node-1").run(once=True)  # what `sphere serve` runs
        with Core(site.settings) as c:
            row = c.catalog.exports("ex")[0]
            assert [j.state for j in c.catalog.jobs("ex") if j.id == job.id] == ["done"]
        assert row.state == "done" and row.actor == "ivy" and row.format == "nifti"
        listed = requests.get(page, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert row.id in listed.text and "Download link" in listed.text
        shown = requests.post(
            f"{page}/{row.id}/link", data={"hours": "2"}, timeout=30,
            headers={"Authorization": f"Bearer {token}"},
        )  # fmt: skip
        link = shown.text.split('href="')[1].split('"')[0].replace("&amp;", "&")
        for where, body in (("exports page", listed.content), ("link page", shown.content)):
            assert scan_bytes(where, body, corpus.phi) == []
        assert requests.get(link, timeout=30).status_code == 200
        viewer = {"Authorization": f"Bearer {site.tokens['val']}"}
        assert (
            requests.post(page, data={"format": "dicom"}, headers=viewer, timeout=30).status_code
            == 403
        )


def test_exports_go_when_the_project_is_purged(tmp_path, corpus):
    with Core(make_site(tmp_path, corpus).settings) as c:
        row = export.export(c, "ex", "dicom")
        path = local_path(c.store, row.key)
        assert path.exists()
        purge_project(c, "ex", now=True, reason="test")
        assert not path.exists() and c.catalog.export(row.id).state == "deleted"
        with pytest.raises(ProjectError):
            links.link(c, row.id, 1)


def test_an_opted_out_patients_exports_are_deleted(tmp_path, corpus):
    with Core(make_site(tmp_path, corpus).settings) as c:
        theirs = export.export(c, "ex", "zarr")
        path = local_path(c.store, theirs.key)
        opt_out(c, [corpus.studies[0].patient_id])
        assert not path.exists() and c.catalog.export(theirs.id).state == "deleted"
        with pytest.raises(SphereError, match="deleted"):
            links.link(c, theirs.id, 1)


def test_s3_export_and_a_link_through_sphere_to_a_short_presigned_get(
    tmp_path, corpus, s3_server, monkeypatch
):
    """On S3 the link is sphere's: each download audited (one row), then a 307 to a presigned
    GET of at most 5 minutes that gives the zip's bytes. A link whose time is over, or with a
    tampered signature, is refused (403, no redirect) and audited. Control: the route with its
    audit taken out still redirects, and the row count shows the missing row."""
    bucket = s3_server.new_bucket()
    s3 = S3Options(
        endpoint=s3_server.endpoint, access_key=s3_server.access_key,
        secret_key=s3_server.secret_key, region=s3_server.region, allow_http=True,
    )  # fmt: skip
    site = make_site(tmp_path, corpus, f"s3://{bucket}/sphere", s3)
    with Core(site.settings) as c:
        row = export.export(c, "ex", "dicom")  # a multipart upload, as a stream
        z = zip_of(c, row)
        n = sum(se.n_instances for se, _ in c.catalog.export_series(c.project("ex").id))
        assert len([n for n in z.namelist() if n.endswith(".dcm")]) == n
        stored = hashlib.sha256(
            run(
                c.store.get(row.key, __import__("zarr").core.buffer.default_buffer_prototype())
            ).to_bytes()
        ).hexdigest()

    def downloads(outcome: str) -> int:
        with Core(site.settings) as c:
            trail = c.catalog.audit_trail("ex", 500)
        return sum(r.action == "export.download" and r.outcome == outcome for r in trail)

    def through(link: str) -> requests.Response:
        r = requests.get(link, timeout=30, allow_redirects=False)
        assert r.status_code == 307, r.text
        there = r.headers["location"]
        assert there.startswith(s3_server.endpoint) and "X-Amz-Expires=300" in there
        assert scan_bytes("redirect", there.encode(), corpus.phi) == []
        return requests.get(there, timeout=30)

    with serving(Core(site.settings, research=True)) as url:
        with Core(site.settings) as c:
            good, _ = links.link(c, row.id, 1, base_url=url)
            short, _ = links.link(c, row.id, 1 / 3600, base_url=url)
        assert good.startswith(f"{url}/exports/{row.id}/download?")
        assert scan_bytes("link", good.encode(), corpus.phi) == []
        for _ in range(2):
            r = through(good)
            assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == stored
            assert len(r.content) == row.nbytes
        bad = requests.get(good.replace("sig=", "sig=0"), timeout=30, allow_redirects=False)
        assert bad.status_code == 403 and "location" not in bad.headers
        time.sleep(2.2)
        over = requests.get(short, timeout=30, allow_redirects=False)
        assert over.status_code == 403 and "location" not in over.headers  # its time is over
    assert downloads("ok") == 2 and downloads("refused") == 2

    from gateway.web.routes import exports as route

    monkeypatch.setattr(route, "audit", lambda *a, **k: None)  # the fault: no download audit
    with serving(Core(site.settings, research=True)) as url:
        with Core(site.settings) as c:
            again, _ = links.link(c, row.id, 1, base_url=url)
        assert through(again).status_code == 200
    assert downloads("ok") == 2  # the check that would fail: 3 downloads, 2 rows


def test_nifti_of_a_per_slice_rescale_is_float_hu_equal_to_the_loader(site, tmp_path):
    from tests.processing_data import ct_series

    hu = np.random.default_rng(3).integers(-1000, 1500, (5, 16, 12)).astype(np.float64)
    dss = ct_series(hu, spacing=(2.0, 0.7, 0.6))
    for ds in dss:  # a different intercept on each slice, the stored values moved to match
        k = int(ds.InstanceNumber)
        stored = np.frombuffer(ds.PixelData, "<i2").astype(np.int32) - k
        ds.PixelData, ds.RescaleIntercept = stored.astype("<i2").tobytes(), -1024 + k
    with Core(site.settings) as c:
        projects.create(c, "slices")
        projects.approve(c, "slices", committee_ref="C", approved_on=TODAY,
                         expires_on=TODAY + timedelta(30))  # fmt: skip
        key = store_series(c, "slices", dss, tmp_path / "spool")
        assert isinstance(SeriesReader(c.store, key).attrs["rescale_intercept"], list)
        z = zip_of(c, export.export(c, "slices", "nifti"))
        (name,) = [n for n in z.namelist() if n.endswith(".nii.gz")]
        (tmp_path / "s.nii.gz").write_bytes(z.read(name))
        img = nib.load(tmp_path / "s.nii.gz")
        loaded = load_series(c.store, key, channel_first=False)
        assert img.get_data_dtype() == np.float32
        np.testing.assert_array_equal(img.get_fdata(dtype=np.float32), loaded.numpy())
        np.testing.assert_allclose(img.affine, loaded.affine.numpy(), atol=1e-4)


def test_an_export_job_whose_node_was_lost_is_written_by_another(site):
    with Core(site.settings) as c:
        row = export.start(c, "ex", "zarr")
        job = jobs.submit(c, "export", "ex", export=row.id)
        taken = c.catalog.lease_job("node-gone", "t", 0.01)  # leased, then its node died
        assert taken is not None and taken.id == job.id
        part = local_path(c.store, row.key).with_name(f"{row.id}.zip.part")
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_bytes(b"half an upload")  # what the lost node had written
    time.sleep(0.05)
    jobs.Node(site.settings, name="node-2").run(once=True)
    with Core(site.settings) as c:
        assert c.catalog.export(row.id).state == "done"
        assert [j.state for j in c.catalog.jobs("ex") if j.id == job.id] == ["done"]
        assert zip_of(c, c.catalog.export(row.id)).testzip() is None  # whole, every CRC right
        with pytest.raises(SphereError, match="export job"):
            jobs.submit(c, "export", "ex", export="no-such-export")


def test_a_browser_downloads_a_study_zip_and_an_export(site, tmp_path):
    """Headless Chromium, signed in as the investigator, follows a link to a study with
    `?accept=application/zip` (what a page can link to: a browser's own Accept asks for HTML)
    and an export's download link; each lands in its download folder, whole."""
    from harness.browser import Browser, chromium_path

    if chromium_path() is None:
        pytest.skip("chromium is not installed (run scripts/setup.sh)")
    with Core(site.settings) as c:
        (se, _), *_ = c.catalog.export_series(c.project("ex").id)
        n_study = sum(s.n_instances for s, _ in c.catalog.export_series(c.project("ex").id))
        row = export.export(c, "ex", "zarr")
        stored = local_path(c.store, row.key).read_bytes()
    folder = tmp_path / "downloads"
    folder.mkdir()

    def download(page: Browser, url: str, before: set[str], wait: float = 30) -> Path | None:
        page.send("Page.navigate", url=url)  # a download is no page: no load event
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            new = [p for p in folder.iterdir() if p.name not in before]
            done = [p for p in new if not p.name.endswith(".crdownload")]
            if done and not [p for p in new if p.name.endswith(".crdownload")]:
                return done[0]
            time.sleep(0.1)
        return None

    with serving(Core(site.settings, research=True)) as url, Browser(timeout_s=40) as page:
        page.send("Page.setDownloadBehavior", behavior="allow", downloadPath=str(folder))
        page.goto(f"{url}/signin")
        page.fill("input[name=token]", site.tokens["ivy"])
        page.submit("form[action='/signin']")
        root = f"{url}/projects/ex/dicom-web/studies/{se.study_uid}"
        got = download(page, f"{root}?accept=application/zip", set())
        assert got is not None and got.name.endswith(".zip")
        names = zipfile.ZipFile(got).namelist()
        assert len(names) == n_study and all(n.endswith(".dcm") for n in names)
        with Core(site.settings) as c:
            link, _ = links.link(c, row.id, 1, base_url=url)
        again = download(page, link, {got.name})
        assert again is not None and again.read_bytes() == stored
        # Control: a study of a project the investigator is not in downloads nothing.
        other = f"{url}/projects/raw/dicom-web/studies/{se.study_uid}?accept=application/zip"
        assert download(page, other, {got.name, again.name}, wait=3) is None


def test_an_s3_export_is_written_as_a_stream(tmp_path, s3_server, monkeypatch):
    """The zip is never whole in this process' memory: the export's Python heap peaks at what
    one study takes, whether the zip holds one study or three (control: the same export
    through a writer that keeps the stream whole peaks above the zip's size)."""
    import tracemalloc

    from storage import backends

    monkeypatch.setattr(backends, "UPLOAD_CONCURRENCY", 1)

    big = generate(tmp_path / "big", n_patients=3, series_per_study=2, slices=40, size=256)
    s3 = S3Options(
        endpoint=s3_server.endpoint, access_key=s3_server.access_key,
        secret_key=s3_server.secret_key, region=s3_server.region, allow_http=True,
    )  # fmt: skip
    site = make_site(tmp_path, big, f"s3://{s3_server.new_bucket()}/sphere", s3)

    def peak(c: Core, studies: list[str]) -> tuple[int, int]:
        tracemalloc.start()
        try:
            row = export.export(c, "ex", "dicom", studies=studies)
            return tracemalloc.get_traced_memory()[1], row.nbytes
        finally:
            tracemalloc.stop()

    with Core(site.settings) as c:
        uids = sorted({se.study_uid for se, _ in c.catalog.export_series(c.project("ex").id)})
        one, one_bytes = peak(c, uids[:1])
        three, nbytes = peak(c, uids)
        assert nbytes > 2.5 * one_bytes and three < one + one_bytes / 3, (one, three, nbytes)
        monkeypatch.setattr(
            backends.ObjectBucket, "writer", lambda self, key: backends._Buffered(self, key)
        )
        whole, nbytes = peak(c, uids)
        assert whole > nbytes > three, (whole, nbytes, three)


def test_an_export_of_a_project_pulled_from_orthanc_names_no_one(
    tmp_path,
    pacs,  # noqa: F811
    scp_port,  # noqa: F811
    corpus,
):
    """Orthanc as the PACS: the study pulled (de-identified on the way), then each format
    exported and each link made; no planted identifier (dates also as YYYY-MM-DD) in a zip,
    decoded, in its manifest, in a link or in what the link serves."""
    from harness.leaks import date_forms
    from tests.test_pull import approved, make_gateway

    gw = make_gateway(tmp_path / "home", pacs, scp_port)
    users.first_admin(gw.core)  # who runs `sphere export`
    approved(gw, "pulled", [st.accession for st in corpus.studies])
    assert [s.status for s in gw.pull("pulled").series] == ["complete"] * 2
    needles = date_forms(corpus.phi)
    c = gw.core
    made = [export.export(c, "pulled", fmt) for fmt in export.FORMATS]
    with serving(Core(gw.settings, research=True)) as url:
        for row in made:
            z = zip_of(c, row)
            assert decoded_leaks(row.format, z, needles) == []
            link, _ = links.link(c, row.id, 1, base_url=url)
            assert scan_bytes("link", link.encode(), needles) == []
            served = requests.get(link, timeout=30)
            assert served.status_code == 200
            served_zip = zipfile.ZipFile(io.BytesIO(served.content))
            assert decoded_leaks(f"{row.format} link", served_zip, needles) == []
            manifest = json.loads(z.read("manifest.json"))
            assert manifest["deidentification"]["profile"] == c.project("pulled").deid_profile
    # Control: the same scan of a zip of what Orthanc holds finds the patient.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as raw:
        raw.writestr("x.dcm", Path(corpus.files[0]).read_bytes())
    found = decoded_leaks("orthanc", zipfile.ZipFile(buf), needles)
    assert corpus.studies[0].patient_id in {leak.needle for leak in found}
