"""End to end: a real Orthanc PACS, the gateway's pull, Zarr in a local folder and in real S3."""

from __future__ import annotations

import logging
import subprocess
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from core.settings import PacsPeer, S3Options, Settings
from dicom import IMPLEMENTATION_CLASS_UID
from dicom.json_model import first
from gateway.api import Gateway
from gateway.pull import PullRefused
from harness.leaks import scan_database, scan_folder, scan_store, scan_text
from harness.localpacs import LocalOrthanc, free_port
from harness.synthetic import generate
from storage.catalog import SeriesRecord
from storage.series import SeriesReader, series_key
from tests.orthanc_fixture import seeded_orthanc

pytestmark = pytest.mark.peers
TODAY = date.today()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("corpus"), n_patients=3, slices=12, size=64, seed=7)


@pytest.fixture(scope="module")
def scp_port():
    return free_port()


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, corpus, scp_port):
    with seeded_orthanc(tmp_path_factory.mktemp("orthanc"), corpus.files, scp_port) as orthanc:
        yield orthanc


def make_gateway(home: Path, pacs: LocalOrthanc, port: int, **kw) -> Gateway:
    settings = Settings(
        home=home,
        port=port,
        pacs=PacsPeer(ae_title=pacs.aet, port=pacs.dicom_port, retrieve=kw.pop("retrieve", "move")),
        fsync=False,
        backoff_s=0.1,
        **kw,
    )
    return Gateway(settings)


def approved(gw: Gateway, name: str, accessions: list[str]) -> None:
    gw.create_project(name, title="test")
    gw.approve(
        name,
        committee_ref="CSE-T-1",
        approved_on=TODAY - timedelta(days=1),
        expires_on=TODAY + timedelta(days=30),
    )
    gw.add_cohort(name, "accession", accessions)


def source_volume(files: list[Path], series_uid: str) -> np.ndarray:
    dss = [pydicom.dcmread(f) for f in files]
    dss = [d for d in dss if d.SeriesInstanceUID == series_uid]
    dss.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    return np.stack([d.pixel_array for d in dss])


@pytest.fixture
def logs(caplog, capfd):
    """Everything the pull logs at INFO, in this process and its SCP workers (stderr)."""
    caplog.set_level(logging.INFO, logger="gateway")

    def text() -> str:
        out, err = capfd.readouterr()
        return caplog.text + out + err

    return text


def assert_no_leaks(gw: Gateway, needles: list[str], log_text: str) -> None:
    """Not one planted identifier in the store (decoded), the catalog, the spool, the logs."""
    s = gw.settings
    leaks = scan_store(gw.store, needles)
    leaks += scan_database(s.resolved_catalog_url(), needles)
    if s.spool_dir.exists():
        leaks += scan_folder(s.spool_dir, needles)
    leaks += scan_text("logs", log_text, needles)
    assert leaks == []


def test_pull_refused_when_not_approved_or_expired(tmp_path, pacs, scp_port, corpus):
    gw = make_gateway(tmp_path, pacs, scp_port)
    gw.create_project("unapproved", title="t")
    gw.add_cohort("unapproved", "accession", [corpus.studies[0].accession])
    with pytest.raises(PullRefused, match="not approved"):
        gw.pull("unapproved")
    approved(gw, "expired", [corpus.studies[0].accession])
    with pytest.raises(PullRefused, match="expired"):
        gw.pull("expired", today=TODAY + timedelta(days=31))
    refusals = [e for e in gw.catalog.audit_trail() if e.outcome == "refused"]
    assert {e.project for e in refusals} == {"unapproved", "expired"}
    with gw.catalog.session() as s:
        assert s.scalars(select(SeriesRecord)).all() == []
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*.json"))


def test_pull_stores_exactly_the_cohort_deidentified(tmp_path, pacs, scp_port, corpus, logs):
    gw = make_gateway(tmp_path, pacs, scp_port)
    cohort, outsider = corpus.studies[:2], corpus.studies[2]
    approved(gw, "bone", [st.accession for st in cohort])

    report = gw.pull("bone")

    assert report.ok, [s.error for s in report.series]
    assert report.studies == 2
    assert report.instances == sum(st.n_instances for st in cohort)
    keys = gw.keys("bone")
    with gw.catalog.session() as s:
        rows = {r.series_uid: r for r in s.scalars(select(SeriesRecord))}
    expected = {keys.uid(se.series_uid): se for st in cohort for se in st.series}
    assert set(rows) == set(expected)  # nothing outside the cohort was fetched
    assert all(r.status == "complete" and r.stored == r.expected for r in rows.values())
    for se in outsider.series:
        assert keys.uid(se.series_uid) not in rows

    for st in cohort:
        for se in st.series:
            reader = SeriesReader(
                gw.store, series_key("bone", keys.uid(st.study_uid), keys.uid(se.series_uid))
            )
            assert reader.complete
            vol = reader.volume[:]
            np.testing.assert_array_equal(vol, source_volume(corpus.files, se.series_uid))
            assert vol.dtype == np.int16
            z = [h["00200032"]["Value"][2] for h in reader.headers()]
            assert z == sorted(z)  # slices ordered along the normal
            attrs = reader.attrs
            assert attrs["spacing"][0] == pytest.approx(2.5 if se.n_instances == 12 else 5.0)
            assert attrs["direction"][:3] == pytest.approx([1, 0, 0])
            ds = reader.instance(0)
            assert ds.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID  # ours
            assert ds.PatientIdentityRemoved == "YES"
            assert ds.PatientID == keys.pseudonym(st.patient_id)
            assert ds.StudyInstanceUID == keys.uid(st.study_uid)
            assert ds.DeidentificationMethod

    assert_no_leaks(gw, corpus.phi, logs())
    actions = [e.action for e in gw.catalog.audit_trail("bone")]
    assert {"project.create", "project.approve", "cohort.add", "pull.start", "pull.end"} <= set(
        actions
    )


def test_repull_fetches_only_what_is_missing(tmp_path, pacs, scp_port, corpus):
    gw = make_gateway(tmp_path, pacs, scp_port)
    approved(gw, "resume", [corpus.studies[0].accession])
    first = gw.pull("resume")
    assert first.ok and first.count("complete") == 2

    again = gw.pull("resume")
    assert again.ok and again.count("skipped") == 2 and again.nbytes == 0

    # Lose one series (as a crash before commit would): only that one is pulled again.
    keys = gw.keys("resume")
    lost = keys.uid(corpus.studies[0].series[1].series_uid)
    with gw.catalog.session() as s:
        s.scalar(select(SeriesRecord).where(SeriesRecord.series_uid == lost)).status = "pending"
    third = gw.pull("resume")
    assert third.ok
    assert [s.pseudo_series for s in third.series if s.status == "complete"] == [lost]
    assert third.count("skipped") == 1


def test_pull_with_cget(tmp_path, pacs, scp_port, corpus, logs):
    gw = make_gateway(tmp_path, pacs, scp_port, retrieve="get")
    approved(gw, "cget", [corpus.studies[1].accession])
    report = gw.pull("cget")
    assert report.ok
    assert report.instances == corpus.studies[1].n_instances
    assert_no_leaks(gw, corpus.phi, logs())


def s3_gateway(home: Path, pacs: LocalOrthanc, port: int, s3_server) -> tuple[Gateway, str]:
    """`make_gateway` storing into a new bucket of `s3_server`; the gateway and the bucket."""
    bucket = s3_server.new_bucket()
    gw = make_gateway(
        home,
        pacs,
        port,
        storage_url=f"s3://{bucket}/research",
        s3=S3Options(
            endpoint=s3_server.endpoint,
            access_key=s3_server.access_key,
            secret_key=s3_server.secret_key,
        ),
    )
    return gw, bucket


def test_pull_into_s3(tmp_path, pacs, scp_port, corpus, s3_server, logs):
    gw, bucket = s3_gateway(tmp_path, pacs, scp_port, s3_server)
    approved(gw, "s3proj", [corpus.studies[2].accession])
    report = gw.pull("s3proj")
    assert report.ok
    assert report.instances == corpus.studies[2].n_instances
    objects = s3_server.read_all(bucket)
    assert any(k.endswith("zarr.json") for k in objects)
    assert_no_leaks(gw, corpus.phi, logs())
    st = corpus.studies[2]
    keys = gw.keys("s3proj")
    se = st.series[0]
    reader = SeriesReader(
        gw.store, series_key("s3proj", keys.uid(st.study_uid), keys.uid(se.series_uid))
    )
    np.testing.assert_array_equal(reader.volume[:], source_volume(corpus.files, se.series_uid))


def test_unsolicited_push_is_refused_and_audited(tmp_path, corpus):
    """A third-party peer (dcmtk storescu) pushing to the gateway gets a failure status."""
    from gateway.dimse.scp import StorageSCP
    from gateway.pull.receiver import Receiver, ReceiverConfig

    gw = Gateway(Settings(home=tmp_path))
    gw.create_project("quiet")
    receiver = Receiver(ReceiverConfig.of(gw.core, "quiet"))
    with StorageSCP(ae_title="SPHERE", host="127.0.0.1", port=0, on_store=receiver.on_store) as scp:
        out = subprocess.run(
            [
                "storescu",
                "-v",
                "-nh",
                "-aet",
                "INTRUDER",
                "-aec",
                "SPHERE",
                "127.0.0.1",
                str(scp.port),
            ]
            + [str(f) for f in corpus.files[:3]],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.stderr.count("Status: 0x124") == 3, out.stderr  # each store refused
    assert receiver.refused == 3
    refusals = [e for e in gw.catalog.audit_trail("quiet") if e.action == "store.refused"]
    assert len(refusals) == 3 and all("INTRUDER" in e.detail for e in refusals)
    assert not (tmp_path / "store").exists()
    assert not (tmp_path / "spool" / "quiet" / "series").exists()


PULL_SCRIPT = """
import sys
from pathlib import Path
from gateway.api import Gateway
from core.settings import PacsPeer, Settings
home, aet, port, scp = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
gw = Gateway(Settings(home=Path(home), port=scp, max_associations=1,
                      pacs=PacsPeer(ae_title=aet, port=port)))
gw.pull("crash")
"""


def test_crash_mid_pull_resumes_without_loss_or_duplicates(tmp_path, pacs, scp_port, corpus, logs):
    import os
    import signal
    import sys
    import time

    gw = make_gateway(tmp_path, pacs, scp_port)
    approved(gw, "crash", [st.accession for st in corpus.studies])
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            PULL_SCRIPT,
            str(tmp_path),
            pacs.aet,
            str(pacs.dicom_port),
            str(scp_port),
        ],
        start_new_session=True,
    )
    spool = tmp_path / "spool" / "crash" / "series"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if spool.exists() and any(p.is_file() for p in spool.rglob("*")):
            break
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the gateway and its SCP workers die at once
    proc.wait(30)

    report = gw.pull("crash")
    assert report.ok, [s.error for s in report.series if s.error]
    keys = gw.keys("crash")
    total = 0
    for st in corpus.studies:
        for se in st.series:
            key = series_key("crash", keys.uid(st.study_uid), keys.uid(se.series_uid))
            reader = SeriesReader(gw.store, key)
            assert reader.complete and len(reader.headers()) == se.n_instances  # no duplicates
            total += se.n_instances
    assert report.instances + sum(s.stored for s in report.series if s.status == "skipped") == total
    assert not any(p.is_file() for p in spool.rglob("*"))  # committed spools are removed
    assert_no_leaks(gw, corpus.phi, logs())


def test_pull_with_catalog_and_vault_on_postgresql(
    tmp_path, pacs, scp_port, corpus, pg_server, logs
):
    """Deployment settings: the catalog and the vault each in its own PostgreSQL database."""
    gw = make_gateway(
        tmp_path,
        pacs,
        scp_port,
        catalog_url=pg_server.create_database("catalog"),
        vault_url=pg_server.create_database("vault"),
    )
    st = corpus.studies[0]
    approved(gw, "pgproj", [st.accession])
    report = gw.pull("pgproj")
    assert report.ok and report.instances == st.n_instances
    again = gw.pull("pgproj")
    assert again.count("skipped") == len(st.series)
    with gw.catalog.session() as s:
        rows = s.scalars(select(SeriesRecord)).all()
    assert {r.status for r in rows} == {"complete"} and len(rows) == len(st.series)
    # The vault (its own database) maps the pseudonym back, for the trusted third party.
    pseudonym = gw.keys("pgproj").pseudonym(st.patient_id)
    assert gw.vault.lookup("pgproj", pseudonym, role="trusted-third-party", actor="ttp") == (
        st.patient_id
    )
    assert not (tmp_path / "catalog.db").exists() and not (tmp_path / "vault.db").exists()
    assert_no_leaks(gw, [st.patient_id, st.accession, st.study_uid, *corpus.phi], logs())


def test_quarantined_instance_is_reported_never_stored(tmp_path, pacs, scp_port, logs):
    """An image with burned-in text is held back (default policy), and the pull says so."""
    extra = generate(
        tmp_path / "extra", n_patients=1, series_per_study=1, slices=5, size=32, seed=99
    )
    marked = pydicom.dcmread(extra.files[0])
    marked.BurnedInAnnotation = "YES"
    marked.save_as(extra.files[0])
    assert pacs.upload(extra.files) == 5
    gw = make_gateway(tmp_path / "gw", pacs, scp_port)
    approved(gw, "burned", [extra.studies[0].accession])

    report = gw.pull("burned")

    assert report.ok and report.instances == 4 and report.quarantined == 1
    (series,) = report.series
    assert "burned-in" in series.error and series.quarantined == 1
    keys = gw.keys("burned")
    st = extra.studies[0]
    reader = SeriesReader(
        gw.store, series_key("burned", keys.uid(st.study_uid), keys.uid(st.series[0].series_uid))
    )
    stored_sops = {first(h, "00080018") for h in reader.headers()}
    assert keys.uid(marked.SOPInstanceUID) not in stored_sops and len(stored_sops) == 4
    with gw.catalog.session() as s:
        row = s.scalar(select(SeriesRecord).where(SeriesRecord.project_id.is_not(None)))
        assert "1 quarantined" in (row.error or "")
    assert_no_leaks(gw, extra.phi, logs())


def test_a_pull_completes_while_hostile_peers_hit_the_gateways_scp(
    tmp_path, pacs, scp_port, corpus
):
    """Silent, stalled and garbage connections, floods of associations, unknown calling AE
    titles and a wrong SOP class, all at our Storage SCP through a real pull (worker processes,
    C-MOVE from Orthanc, an allow-list of the PACS's AE title): each is answered or dropped, and
    every instance arrives."""
    import threading
    import time

    from gateway.dimse import ul
    from tests.test_dimse_hostile import VERIFY, associate, attack

    gw = make_gateway(tmp_path, pacs, scp_port, timeout_s=3, allowed_callers=[pacs.aet])
    approved(gw, "besieged", [st.accession for st in corpus.studies])
    answers: list[int] = []
    errors: list[str] = []
    stop = threading.Event()

    def impostors() -> None:
        find = [("1.2.840.10008.5.1.4.1.2.2.1", ["1.2.840.10008.1.2.1"])]  # not a storage class
        deadline = time.monotonic() + 300  # bounded; stopped with the pull
        while not stop.wait(0.05) and time.monotonic() < deadline:
            try:
                # a flood of three at once, an unknown AE, the PACS's own title on a wrong class
                socks = [associate(scp_port, VERIFY, "FLOOD", "SPHERE") for _ in range(3)]
                socks.append(associate(scp_port, find, pacs.aet, "SPHERE"))
            except (OSError, AssertionError) as e:  # not listening yet, or a drop
                errors.append(type(e).__name__)
                continue
            for sock, pdu_type, _ in socks:
                answers.append(pdu_type)
                sock.close()

    flood = threading.Thread(target=impostors, daemon=True)
    with attack(scp_port, seconds=300) as over:  # ends with the block: as long as the pull
        flood.start()
        report = gw.pull("besieged")
        assert not over.is_set(), "the attack ended before the pull did: it proved nothing"
        stop.set()
        flood.join(10)
    assert report.ok, [s.error for s in report.series if s.error]
    assert report.instances == corpus.n_instances
    assert ul.ASSOCIATE_RJ in answers, errors  # the unknown AE titles were turned away...
    refused = [e for e in gw.catalog.audit_trail("besieged") if e.action == "store.refused"]
    assert refused == []  # ...and garbage never got as far as a C-STORE


@pytest.mark.parametrize(
    ("retrieve", "workers", "seed"),
    [("move", 0, 11), ("move", 2, 13), ("get", 0, 17)],
    ids=["move", "move-workers", "get"],
)
def test_every_transfer_syntax_pulled_over_dimse(
    tmp_path, pacs, scp_port, monkeypatch, logs, retrieve, workers, seed
):
    """One series per syntax, made from the same CT slices by real encoders, held by Orthanc as
    received and sent over C-MOVE or C-GET as held: each stored decoded and read back equal to
    its uncompressed reference (lossless), or close and marked lossy, and the syntax it came in
    recorded for its series. In the pull's process (C-MOVE with 0 workers, C-GET), where what
    reaches the decoders is seen, and in SCP worker processes (2)."""
    from storage import pixels
    from tests.compressed import SYNTAXES, reference

    src = generate(tmp_path / "src", n_patients=1, series_per_study=1, slices=2, size=64, seed=seed)
    study = src.studies[0]
    refs: dict[str, list[Path]] = {}
    sent: list[Path] = []
    # Debian's Orthanc (DCMTK 3.6.7) predates HTJ2K: it cannot send it over DIMSE at all.
    syntaxes = [s for s in SYNTAXES if not s.name.startswith("htj2k")]
    for k, syntax in enumerate(syntaxes):
        for f in src.files:
            ds = pydicom.dcmread(f)
            ds.SeriesInstanceUID = f"{ds.SeriesInstanceUID}.{k}"
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{ds.SOPInstanceUID}.{k}"
            ds.SeriesNumber = k + 1
            ref, enc = reference(ds, syntax, tmp_path / "files" / syntax.name)
            refs.setdefault(ds.SeriesInstanceUID, []).append(ref)
            sent.append(enc)
    assert pacs.upload(sent) == len(sent)
    held = {
        pacs.get(f"/instances/{i}/header?simplify")["TransferSyntaxUID"]
        for i in pacs.get("/instances")
    }
    assert {s.uid for s in syntaxes} <= held  # Orthanc keeps each as received

    decoded: list[str] = []  # the syntaxes our decoders saw: what came over the wire
    real = pixels._decoded
    monkeypatch.setattr(
        pixels, "_decoded", lambda ds, *a: decoded.append(str(a[-1])) or real(ds, *a)
    )
    gw = make_gateway(tmp_path / "home", pacs, scp_port, receive_workers=workers, retrieve=retrieve)
    approved(gw, "syntaxes", [study.accession])
    report = gw.pull("syntaxes")
    assert report.ok, [s.error for s in report.series]
    assert report.instances == len(sent)
    compressed = {s.uid for s in syntaxes if s.uid.startswith("1.2.840.10008.1.2.4.")}
    compressed.add("1.2.840.10008.1.2.5")
    if not workers:
        # Each compressed instance sent as held, never transcoded to uncompressed.
        assert sorted(decoded) == sorted(
            s.uid for s in syntaxes for _ in range(2) if s.uid in compressed
        )

    keys = gw.keys("syntaxes")
    came = {
        r.series_uid: r.transfer_syntax for r in gw.catalog.series(gw.core.project("syntaxes").id)
    }
    for k, syntax in enumerate(syntaxes):
        series_uid = f"{study.series[0].series_uid}.{k}"
        assert came[keys.uid(series_uid)] == syntax.uid, syntax.name  # as held, not transcoded
        key = series_key("syntaxes", keys.uid(study.study_uid), keys.uid(series_uid))
        reader = SeriesReader(gw.store, key)
        want = source_volume(refs[series_uid], series_uid)
        got = reader.volume[:]
        marks = {str(h.get("00282110", {}).get("Value")) for h in reader.headers()}
        if syntax.lossy:
            assert marks == {"['01']"}, syntax.name
            assert got.shape == want.shape and not np.array_equal(got, want)
        else:
            np.testing.assert_array_equal(got, want, err_msg=syntax.name)
            assert marks == {"None"}, syntax.name
    assert_no_leaks(gw, src.phi, logs())


def test_cget_offers_the_studys_classes_in_every_syntax(tmp_path, pacs):
    """C-GET gets a JPEG-LS series as Orthanc holds it only because the study's SOP classes
    (asked with C-FIND) are offered in every syntax, one context each; offered for other
    classes only (the control), Orthanc transcodes it to Explicit VR Little Endian."""
    from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless
    from pynetdicom.sop_class import BasicTextSRStorage, CTImageStorage

    from gateway.dimse.scu import Peer, Scu, get_contexts
    from tests.compressed import BY_NAME, reference

    contexts = get_contexts()
    assert len(contexts) <= 128
    assert (CTImageStorage, [JPEGLSLossless]) in contexts  # when the PACS does not say
    assert not any(
        c == BasicTextSRStorage and s != [ExplicitVRLittleEndian, "1.2.840.10008.1.2"]
        for c, s in get_contexts([BasicTextSRStorage])
    )

    src = generate(tmp_path / "src", n_patients=1, series_per_study=1, slices=2, size=64, seed=23)
    files = [
        reference(pydicom.dcmread(f), BY_NAME["jpeg-ls"], tmp_path / "enc")[1] for f in src.files
    ]
    assert pacs.upload(files) == len(files)
    study = src.studies[0]
    scu, peer = Scu("SPHERE", 10), Peer(pacs.aet, "127.0.0.1", pacs.dicom_port)
    classes = scu.find_sop_classes(peer, study.study_uid)
    assert classes == [CTImageStorage]

    def came(sop_classes: list[str]) -> set[str]:
        got: set[str] = set()

        def keep(inst: Any) -> int:
            got.add(str(inst.transfer_syntax))
            return 0

        result = scu.get_series(
            peer,
            study.study_uid,
            study.series[0].series_uid,
            keep,
            sop_classes=sop_classes,
        )
        assert result.ok and result.completed == len(files)
        return got

    assert came(classes) == {JPEGLSLossless}
    assert came([BasicTextSRStorage]) == {ExplicitVRLittleEndian}  # control: transcoded
