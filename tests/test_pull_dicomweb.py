"""Pulls from several PACS at once, one over DICOMweb (Orthanc's plugin, authentication on), one
over DIMSE: a study held by both is pulled once, from the one that holds it whole; a cut WADO-RS
stream is resumed; wrong credentials are one clear error."""

from __future__ import annotations

import http.client
import logging
import threading
from datetime import date, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import cast

import numpy as np
import pydicom
import pytest

from core.settings import Settings, Source
from gateway.api import Gateway
from gateway.pull import PullRefused  # noqa: F401 - the public names stay importable
from harness.leaks import scan_database, scan_folder, scan_store, scan_text
from harness.localpacs import LocalOrthanc, free_port
from harness.synthetic import generate
from harness.tcpproxy import CountingProxy
from storage.series import SeriesReader, series_key

pytestmark = pytest.mark.peers
USERS = {"sphere": "s3cret-pw"}
TODAY = date.today()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("corpus"), n_patients=3, slices=6, size=32, seed=11)


def files_of(corpus, study):
    uids = {se.series_uid for se in study.series}
    return [
        f
        for f in corpus.files
        if pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID in uids
    ]


@pytest.fixture(scope="module")
def scp_port():
    return free_port()


@pytest.fixture(scope="module")
def pacs_web(tmp_path_factory, corpus):
    """Site A, DICOMweb only (with a password): studies 0 and 1, study 1 missing an instance."""
    with LocalOrthanc(tmp_path_factory.mktemp("site-a"), users=USERS) as orthanc:
        s0, s1 = (files_of(corpus, st) for st in corpus.studies[:2])
        orthanc.upload(s0 + s1[:-1])
        yield orthanc


@pytest.fixture(scope="module")
def pacs_dimse(tmp_path_factory, corpus, scp_port):
    """Site B, DIMSE: studies 1 (whole) and 2."""
    modalities = {"SPHERE": ("SPHERE", "127.0.0.1", scp_port)}
    with LocalOrthanc(tmp_path_factory.mktemp("site-b"), modalities=modalities) as orthanc:
        orthanc.upload([f for st in corpus.studies[1:] for f in files_of(corpus, st)])
        yield orthanc


def web_source(pacs: LocalOrthanc, *, url: str | None = None, password: str = "s3cret-pw"):
    return Source(
        name="site-a",
        protocol="dicomweb",
        url=url or f"{pacs.url}/dicom-web",
        username="sphere",
        password=password,
    )


def gateway(tmp_path, scp_port, *sources: Source) -> Gateway:
    settings = Settings(
        home=tmp_path,
        port=scp_port,
        sources=list(sources),
        fsync=False,
        backoff_s=0.05,
        timeout_s=10,
    )
    return Gateway(settings)


def approve(gw: Gateway, name: str, accessions: list[str]) -> None:
    gw.create_project(name)
    gw.approve(name, committee_ref="C", approved_on=TODAY, expires_on=TODAY + timedelta(days=9))
    gw.add_cohort(name, "accession", accessions)


def source_volume(corpus, series_uid: str) -> np.ndarray:
    dss = [pydicom.dcmread(f) for f in corpus.files]
    dss = sorted((d for d in dss if d.SeriesInstanceUID == series_uid),
                 key=lambda d: float(d.ImagePositionPatient[2]))  # fmt: skip
    return np.stack([d.pixel_array for d in dss])


def test_a_cohort_across_two_pacs_dicomweb_and_dimse(
    tmp_path, corpus, pacs_web, pacs_dimse, scp_port, caplog, capfd
):
    caplog.set_level(logging.INFO, logger="gateway")
    dimse = Source(name="site-b", protocol="move", ae_title=pacs_dimse.aet,
                   port=pacs_dimse.dicom_port)  # fmt: skip
    gw = gateway(tmp_path, scp_port, web_source(pacs_web), dimse)
    approve(gw, "multi", [st.accession for st in corpus.studies])

    report = gw.pull("multi")

    assert report.ok, [s.error for s in report.series if s.error]
    assert report.studies == 3 and report.instances == corpus.n_instances
    keys = gw.keys("multi")
    rows = {r.series_uid: r for r in gw.catalog.series(gw.core.project("multi").id)}
    want = {0: "site-a", 1: "site-b", 2: "site-b"}  # study 1 is whole on site B only
    for i, st in enumerate(corpus.studies):
        for se in st.series:
            row = rows[keys.uid(se.series_uid)]
            assert row.status == "complete" and row.source == want[i]
            reader = SeriesReader(
                gw.store, series_key("multi", keys.uid(st.study_uid), row.series_uid)
            )
            np.testing.assert_array_equal(reader.volume[:], source_volume(corpus, se.series_uid))
            assert reader.instance(0).PatientID == keys.pseudonym(st.patient_id)
    # Nothing identifying anywhere, the credentials included.
    out, err = capfd.readouterr()
    needles = [*corpus.phi, USERS["sphere"]]
    leaks = scan_store(gw.store, needles) + scan_folder(tmp_path / "spool", needles)
    leaks += scan_database(gw.settings.resolved_catalog_url(), needles)
    leaks += scan_text("logs", caplog.text + out + err, needles)
    assert leaks == []
    # A re-run skips everything, on both sources.
    again = gw.pull("multi")
    assert again.ok and again.count("skipped") == len(rows)


def wado_series(request: bytes) -> bool:
    """A WADO-RS series retrieval (not its metadata), by its request line."""
    line = request.split(b"\r\n")[0]
    return b"/series/" in line and b"metadata" not in line


def test_a_cut_wado_stream_is_resumed_and_wrong_credentials_are_one_clear_error(
    tmp_path, corpus, pacs_web, scp_port
):
    proxy = CountingProxy(pacs_web.http_port)
    proxy.cut_response(6000, when=wado_series)  # the two series are fetched at once: one cut
    try:
        gw = gateway(
            tmp_path / "a",
            scp_port,
            web_source(pacs_web, url=f"http://127.0.0.1:{proxy.port}/dicom-web"),
        )
        approve(gw, "cut", [corpus.studies[0].accession])
        report = gw.pull("cut")
    finally:
        proxy.close()
    assert proxy.cuts == 1  # the stream was cut once...
    assert report.ok and report.instances == corpus.studies[0].n_instances  # ...and resumed
    trail = [e.detail for e in gw.catalog.audit_trail("cut")]
    assert not any("store.refused" in d for d in trail)

    from core import Unavailable

    wrong = gateway(tmp_path / "b", scp_port, web_source(pacs_web, password="nope"))
    approve(wrong, "denied", [corpus.studies[0].accession])
    with pytest.raises(Unavailable, match="refused our credentials") as e:
        wrong.pull("denied")
    assert "nope" not in str(e.value) and corpus.studies[0].accession not in str(e.value)


def test_a_plan_across_two_pacs_counts_and_sizes_each(tmp_path, corpus, pacs_web, pacs_dimse,
                                                       scp_port):  # fmt: skip
    """`sphere pull --plan`'s counts per source: a study on both is planned from the one that
    holds it whole; sizes as each source describes an instance (QIDO and C-FIND)."""
    from gateway.pull.preview import pull_plan

    dimse = Source(name="site-b", protocol="move", ae_title=pacs_dimse.aet,
                   port=pacs_dimse.dicom_port)  # fmt: skip
    gw = gateway(tmp_path, scp_port, web_source(pacs_web), dimse)
    approve(gw, "planned", [st.accession for st in corpus.studies] + ["UNKNOWN-9"])
    plan = pull_plan(gw.core, "planned", actor="tester")
    got = {s.name: (len(s.studies), s.series, s.instances, s.nbytes, s.typical)
           for s in plan.sources}  # fmt: skip

    def counted(studies):
        series = [se for st in studies for se in st.series]
        n = sum(se.n_instances for se in series)
        return len(studies), len(series), n, n * 32 * 32 * 2, 0

    assert got == {
        "site-a": counted(corpus.studies[:1]),
        "site-b": counted(corpus.studies[1:]),  # study 1 is whole on site-b only
    }
    assert (plan.items, plan.unresolved) == (len(corpus.studies) + 1, 1)
    assert gw.catalog.series(gw.catalog.project("planned").id) == []  # nothing retrieved


# -- transfer syntaxes: `*` first, Explicit VR Little Endian when a source refuses it ----------

IMPLICIT, EXPLICIT = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"


class RefusingProxy(ThreadingHTTPServer):
    """A real HTTP proxy to Orthanc. It records the Accept header of each WADO-RS retrieval and,
    when `refuse`, answers 406 to one asking for `transfer-syntax=*` (as some PACS do); every
    other request is forwarded as it came."""

    daemon_threads = True

    def __init__(self, upstream: int, refuse: bool) -> None:
        super().__init__(("127.0.0.1", 0), _Forward)
        self.upstream, self.refuse = upstream, refuse
        self.asked: list[str] = []
        self.refused = 0
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        proxy = cast(RefusingProxy, self.server)  # the server this handler was made for
        accept = self.headers.get("Accept", "")
        if 'type="application/dicom"' in accept:
            proxy.asked.append(accept)
            if proxy.refuse and "transfer-syntax=*" in accept:
                proxy.refused += 1
                self.send_response(406)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        up = http.client.HTTPConnection("127.0.0.1", proxy.upstream, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
        up.request("GET", self.path, headers=headers)
        resp = up.getresponse()
        body = resp.read()
        self.send_response(resp.status)
        self.send_header("Content-Type", resp.getheader("Content-Type") or "")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        up.close()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def pacs_implicit(tmp_path_factory, corpus):
    """A PACS holding study 0 as Implicit VR Little Endian: sent so for `*`, transcoded to
    Explicit VR Little Endian when asked for that."""
    folder = tmp_path_factory.mktemp("implicit")
    files = []
    for f in files_of(corpus, corpus.studies[0]):
        ds = pydicom.dcmread(f)
        ds.file_meta.TransferSyntaxUID = IMPLICIT
        files.append(folder / f.name)
        ds.save_as(files[-1], enforce_file_format=True)
    with LocalOrthanc(tmp_path_factory.mktemp("site-c")) as orthanc:
        orthanc.upload(files)
        yield orthanc


@pytest.mark.parametrize("refuse", [False, True], ids=["accepts-any", "refuses-any"])
def test_any_syntax_first_explicit_le_when_refused_and_what_came_is_recorded(
    tmp_path, corpus, pacs_implicit, scp_port, refuse
):
    proxy = RefusingProxy(pacs_implicit.http_port, refuse)
    source = Source(
        name="site-c",
        protocol="dicomweb",
        url=f"http://127.0.0.1:{proxy.port}/dicom-web",
        max_concurrent=1,  # one series at a time: the refusal is remembered for the next
    )
    try:
        gw = gateway(tmp_path, scp_port, source)
        approve(gw, "syntax", [corpus.studies[0].accession])
        report = gw.pull("syntax")
    finally:
        proxy.close()
    study = corpus.studies[0]
    assert report.ok and report.instances == study.n_instances
    any_ = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    explicit = f'multipart/related; type="application/dicom"; transfer-syntax={EXPLICIT}'
    n = len(study.series)
    if refuse:  # refused once, then asked for Explicit VR LE only, series after series
        assert proxy.refused == 1 and proxy.asked == [any_] + [explicit] * n
    else:
        assert proxy.refused == 0 and proxy.asked == [any_] * n
    came = EXPLICIT if refuse else IMPLICIT  # the original, unless the source refused `*`
    rows = gw.catalog.series(gw.core.project("syntax").id)
    assert len(rows) == n and all(r.transfer_syntax == came for r in rows)
    keys = gw.keys("syntax")
    for se in study.series:  # stored the same either way
        row = next(r for r in rows if r.series_uid == keys.uid(se.series_uid))
        reader = SeriesReader(gw.store, series_key("syntax", row.study_uid, row.series_uid))
        np.testing.assert_array_equal(reader.volume[:], source_volume(corpus, se.series_uid))
    from gateway.views import status_lines

    text = "\n".join(status_lines(rows, details=True))
    name = "Explicit VR Little Endian" if refuse else "Implicit VR Little Endian"
    assert f"came as {name} ({came})" in text


@pytest.mark.parametrize("status", [429, 503])
def test_a_busy_source_is_asked_again_after_its_retry_after(
    tmp_path, corpus, pacs_web, scp_port, monkeypatch, status
):
    """HTTP 429 or 503 with Retry-After: the client waits what the source asked (seen here by
    what urllib3 was told to sleep, not by a clock) and asks again; the pull completes."""
    from urllib3.util.retry import Retry

    slept: list[float | None] = []
    real = Retry.sleep_for_retry

    def sleep_for_retry(self, response=None):  # noqa: ANN001, ANN202 - urllib3's signature
        slept.append(self.get_retry_after(response) if response is not None else None)
        return real(self, response)

    monkeypatch.setattr(Retry, "sleep_for_retry", sleep_for_retry)
    proxy = CountingProxy(pacs_web.http_port)
    busy = (
        f"HTTP/1.1 {status} Busy\r\nRetry-After: 2\r\n"
        "Content-Length: 0\r\nConnection: close\r\n\r\n"
    ).encode()
    proxy.answer_once(busy, when=wado_series)
    try:
        url = f"http://127.0.0.1:{proxy.port}/dicom-web"
        gw = gateway(tmp_path, scp_port, web_source(pacs_web, url=url))
        approve(gw, "busy", [corpus.studies[0].accession])
        report = gw.pull("busy")
    finally:
        proxy.close()
    assert proxy.answered == 1
    assert 2 in slept  # Retry-After honoured
    assert report.ok and report.instances == corpus.studies[0].n_instances
