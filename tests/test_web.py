"""The DICOMweb server end to end: a real pull from a test Orthanc, `create_app` under uvicorn on
loopback, dicomweb-client and plain HTTP as the clients. What is served is the stored,
de-identified series (pixels equal, valid DICOM), to members only, and never an identifier."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from datetime import date, timedelta
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image

from core import users
from core.settings import S3Options
from dicom import xml_model
from dicom.json_model import first
from dicom.query import Level, Query
from gateway.web import sessions
from gateway.web.multipart import parse_multipart
from gateway.web.routes import pages
from harness.leaks import scan_bytes
from harness.seaweed import SeaweedS3
from storage.catalog import utcnow
from storage.series import SeriesReader, series_key
from tests.test_pull import approved, corpus, make_gateway, pacs, scp_port  # noqa: F401
from tests.web_server import fetch, leaks, serving

pytestmark = pytest.mark.peers
TODAY = date.today()
DCIODVFY = shutil.which("dciodvfy") or str(Path(sys.executable).parent / "dciodvfy")
OHIF_METADATA_ACCEPT = (
    "application/dicom+json, multipart/related; type=application/octet-stream; transfer-syntax=*"
)


class Site:
    """The gateway, its server and who may do what."""

    def __init__(self, gw, url, tokens, synthetic):
        self.gw, self.url, self.tokens, self.corpus = gw, url, tokens, synthetic
        self.keys = gw.keys("web")
        self.root = f"{url}/projects/web/dicom-web"

    def client(self, user="alice", project="web"):
        return DICOMwebClient(
            f"{self.url}/projects/{project}/dicom-web",
            headers={"Authorization": f"Bearer {self.tokens[user]}"},
        )

    def uids(self, i=0, series=0):
        """Pseudonymous (study, series) of the corpus' study i, series `series`."""
        st = self.corpus.studies[i]
        return self.keys.uid(st.study_uid), self.keys.uid(st.series[series].series_uid)

    def reader(self, i=0, series=0) -> SeriesReader:
        return SeriesReader(self.gw.store, series_key("web", *self.uids(i, series)))


@pytest.fixture(scope="module")
def site(tmp_path_factory, pacs, scp_port, corpus):  # noqa: F811
    gw = make_gateway(tmp_path_factory.mktemp("web"), pacs, scp_port)
    approved(gw, "web", [st.accession for st in corpus.studies[:2]])
    approved(gw, "other", [corpus.studies[2].accession])
    assert gw.pull("web").ok and gw.pull("other").ok
    approved(gw, "closed", [])
    gw.revoke("closed")
    gw.create_project("expired")
    gw.approve(
        "expired",
        committee_ref="X",
        approved_on=TODAY - timedelta(days=60),
        expires_on=TODAY - timedelta(days=1),
    )
    c = gw.core
    tokens = {n: users.add(c, n) for n in ("alice", "bob", "carol", "mallory", "dave")}
    users.grant(c, "web", "alice", "investigator")
    users.grant(c, "web", "bob", "viewer")
    users.grant(c, "other", "carol", "investigator")
    users.grant(c, "closed", "alice", "investigator")
    users.grant(c, "expired", "alice", "viewer")
    c.settings.web.max_failures = 10**6  # bad tokens are sent on purpose (test_web_edge: limit)
    with serving(c) as url:
        yield Site(gw, url, tokens, corpus)


# -- QIDO-RS ----------------------------------------------------------------------------------


def test_qido_at_every_level(site):
    client = site.client()
    studies = client.search_for_studies()
    expected = {site.keys.uid(st.study_uid): st for st in site.corpus.studies[:2]}
    assert {first(s, "0020000D") for s in studies} == set(expected)  # only this project's
    for s in studies:
        st = expected[first(s, "0020000D")]
        assert first(s, "00100020") == site.keys.pseudonym(st.patient_id)
        assert first(s, "00201206") == len(st.series)
        assert first(s, "00201208") == st.n_instances
        assert first(s, "00080061") == "CT"
        # dicomweb-client sends `Host` without the port: the URL follows the Host header.
        assert first(s, "00081190").startswith("http://127.0.0.1/projects/web/dicom-web/studies/")
    study, series = site.uids(0)
    found = client.search_for_series(study)
    assert len(found) == len(site.corpus.studies[0].series)
    instances = client.search_for_instances(study, series)
    assert len(instances) == site.corpus.studies[0].series[0].n_instances
    assert all(first(i, "00280010") == 64 and first(i, "00280100") == 16 for i in instances)
    assert all("00280008" not in i or not i["00280008"].get("Value") for i in instances)
    assert len(client.search_for_series()) == sum(len(st.series) for st in expected.values())
    assert len(client.search_for_instances()) == sum(st.n_instances for st in expected.values())
    # OHIF's query for a patient's other studies stays in the project.
    pid = site.gw.keys("other").pseudonym(site.corpus.studies[2].patient_id)
    assert client.search_for_studies(search_filters={"PatientID": pid}) == []
    assert site.client("carol", "other").search_for_studies(search_filters={"PatientID": pid})


def test_qido_vectors(site):
    client = site.client()
    st = site.corpus.studies[0]
    pseudo = site.keys.pseudonym(st.patient_id)
    (one,) = client.search_for_studies(search_filters={"PatientID": pseudo})
    day = first(one, "00080020")
    assert day and day != st.study_date  # shifted
    assert len(client.search_for_studies(search_filters={"PatientID": pseudo[:4] + "*"})) >= 1
    assert client.search_for_studies(search_filters={"StudyDate": f"{day}-{day}"}) == [one]
    before = client.search_for_studies(search_filters={"StudyDate": f"-{day}"})
    after = client.search_for_studies(search_filters={"StudyDate": f"{day}-"})
    assert len(before) + len(after) == 3  # the two studies, this one in both
    both = ",".join(site.uids(i)[0] for i in (0, 1))
    assert len(client.search_for_studies(search_filters={"StudyInstanceUID": both})) == 2
    assert client.search_for_studies(search_filters={"ModalitiesInStudy": "MR"}) == []
    included = client.search_for_studies(fields=["00081030", "PatientAge"])
    assert all("00101010" in s for s in included)
    everything = client.search_for_studies(fields=["all"])
    assert all("00100040" in s for s in everything)
    study, _ = site.uids(0)
    all_instances = client.search_for_instances(study)
    pages = [client.search_for_instances(study, limit=5, offset=o) for o in range(0, 40, 5)]
    paged = [first(i, "00080018") for page in pages for i in page]
    assert paged == [first(i, "00080018") for i in all_instances]  # stable, disjoint pages
    r = fetch(f"{site.root}/studies?NotAnAttribute=1", site.tokens["alice"])
    assert r.status == 200 and r.headers["Warning"].startswith("299 ")
    assert fetch(f"{site.root}/studies?StudyDate=2020", site.tokens["alice"]).status == 400
    assert fetch(f"{site.root}/studies/1.2.3/series", site.tokens["alice"]).json() == []


# -- WADO-RS ----------------------------------------------------------------------------------


def dciodvfy_errors(path: Path) -> set[str]:
    out = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    assert "Assertion" not in text, text[-500:]
    return {re.sub(r"= <[^>]*>", "= <>", ln.strip()) for ln in text.splitlines() if "Error" in ln}


@pytest.mark.skipif(not Path(DCIODVFY).exists(), reason="dicom3tools not installed")
def test_retrieved_instances_equal_the_store_and_validate(site, tmp_path):
    client = site.client("bob")  # a viewer may read
    study, series = site.uids(0)
    reader = site.reader(0)
    volume = reader.volume[:]
    retrieved = client.retrieve_series(study, series)
    assert len(retrieved) == len(volume)
    by_sop = {ds.SOPInstanceUID: ds for ds in retrieved}
    sources = {}
    for f in site.corpus.files:
        src = pydicom.dcmread(f, stop_before_pixels=True)
        sources[site.keys.uid(src.SOPInstanceUID)] = f
    for i, header in enumerate(reader.headers()):
        ds = by_sop[first(header, "00080018")]
        np.testing.assert_array_equal(ds.pixel_array, volume[i])
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        assert "NumberOfFrames" not in ds
        out = tmp_path / f"{i}.dcm"
        ds.save_as(out, enforce_file_format=True)
        new = dciodvfy_errors(out) - dciodvfy_errors(sources[ds.SOPInstanceUID])
        assert not new, sorted(new)
    whole = client.retrieve_study(study)
    assert len(whole) == site.corpus.studies[0].n_instances
    sop = first(reader.header(3), "00080018")
    one = client.retrieve_instance(study, series, sop)
    np.testing.assert_array_equal(one.pixel_array, volume[3])


def test_metadata_for_ohif(site):
    client = site.client()
    study, series = site.uids(0)
    meta = client.retrieve_series_metadata(study, series)
    assert len(meta) == site.corpus.studies[0].series[0].n_instances
    needed = ["00280004", "00280010", "00280011", "00280103", "00280100", "00280101", "00280030"]
    needed += ["00281052", "00281053", "00281050", "00281051", "00200032", "00200037"]
    for m in meta:
        assert all(t in m for t in needed), [t for t in needed if t not in m]
        assert "00280008" not in m  # single-frame CT: no NumberOfFrames
        uri = m["7FE00010"]["BulkDataURI"]
        assert uri.startswith(f"http://127.0.0.1/projects/web/dicom-web/studies/{study}/series/")
    assert len(client.retrieve_study_metadata(study)) == site.corpus.studies[0].n_instances
    sop = first(meta[0], "00080018")
    assert first(client.retrieve_instance_metadata(study, series, sop), "00080018") == sop
    url = f"{site.root}/studies/{study}/series/{series}/metadata"
    tok = site.tokens["alice"]
    # OHIF's combined Accept gets JSON, gzipped when asked, with an ETag for a 304.
    r = fetch(url, tok, headers={"Accept": OHIF_METADATA_ACCEPT, "Accept-Encoding": "gzip"})
    assert r.status == 200 and r.headers["Content-Type"].startswith("application/dicom+json")
    assert r.headers["Content-Encoding"] == "gzip" and len(r.raw) < len(r.body)
    again = fetch(url, tok, headers={"If-None-Match": r.headers["ETag"]})
    assert again.status == 304 and again.body == b""
    assert fetch(url, tok, headers={"Accept": "image/png"}).status == 406
    # Forwarded headers from a client that is not a configured proxy are ignored.
    proxied = {"Forwarded": 'for=1.2.3.4;proto=https;host="pacs.example.org"'}
    fwd = fetch(url, tok, headers=proxied)
    assert fwd.json()[0]["7FE00010"]["BulkDataURI"].startswith(f"{site.url}/projects/web/")
    assert fwd.headers["ETag"] == r.headers["ETag"]


def test_forwarded_headers_only_from_trusted_proxies(site, monkeypatch):
    """Behind a configured proxy, bulk data URIs name the proxy; the same headers from anyone
    else (test_metadata_for_ohif) are ignored."""
    study, series = site.uids(0)
    tok = site.tokens["alice"]
    monkeypatch.setattr(site.gw.core.settings.web, "trusted_proxies", ["127.0.0.0/8"])
    with serving(site.gw.core) as url:
        meta = f"{url}/projects/web/dicom-web/studies/{study}/series/{series}/metadata"
        r = fetch(meta, tok)
        proxied = {"Forwarded": 'for=1.2.3.4;proto=https;host="pacs.example.org"'}
        fwd = fetch(meta, tok, headers=proxied)
        assert fwd.json()[0]["7FE00010"]["BulkDataURI"].startswith(
            "https://pacs.example.org/projects/web/dicom-web/studies/"
        )
        assert fwd.headers["ETag"] != r.headers["ETag"]
        xf = fetch(
            meta,
            tok,
            headers={
                "X-Forwarded-Proto": "https",
                "X-Forwarded-Host": "gw.example.org",
                "X-Forwarded-Prefix": "/sphere",
            },
        )
        assert xf.json()[0]["7FE00010"]["BulkDataURI"].startswith(
            "https://gw.example.org/sphere/projects/web/dicom-web/"
        )
        # The cookie is Secure when the trusted proxy says the client came over https.
        signed = requests.post(
            f"{url}/signin",
            data={"token": tok},
            headers={"X-Forwarded-Proto": "https"},
            allow_redirects=False,
        )
        assert signed.status_code == 303 and "Secure" in signed.headers["Set-Cookie"]
    signed = requests.post(
        f"{site.url}/signin",
        data={"token": tok},
        headers={"X-Forwarded-Proto": "https", "Forwarded": "proto=https"},
        allow_redirects=False,
    )
    assert signed.status_code == 303 and "Secure" not in signed.headers["Set-Cookie"]


def test_frames_bulkdata_rendered(site):
    client = site.client()
    study, series = site.uids(0)
    reader = site.reader(0)
    sop = first(reader.header(5), "00080018")
    expected = np.ascontiguousarray(reader.volume[5], dtype="<i2").tobytes()
    (frame,) = client.retrieve_instance_frames(study, series, sop, [1])
    assert frame == expected
    base = f"{site.root}/studies/{study}/series/{series}/instances/{sop}"
    tok = site.tokens["alice"]
    ohif = fetch(
        f"{base}/frames/1",
        tok,
        headers={"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"},
    )
    assert ohif.status == 200 and ohif.parts == [
        ("application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1", expected)
    ]
    single = fetch(f"{base}/frames/1", tok, headers={"Accept": "application/octet-stream"})
    assert single.body == expected
    jpeg_ls = (
        'multipart/related; type="application/octet-stream"; transfer-syntax=1.2.840.10008.1.2.4.80'
    )
    assert fetch(f"{base}/frames/1", tok, headers={"Accept": jpeg_ls}).status == 406
    assert fetch(f"{base}/frames/2", tok).status == 404
    assert fetch(f"{base}/frames/x", tok).status == 400
    bulk = client.retrieve_bulkdata(f"{base}/bulkdata/7FE00010")
    assert bulk == [expected]
    png = client.retrieve_instance_rendered(study, series, sop, media_types=("image/png",))
    assert Image.open(BytesIO(png)).size == (64, 64)
    jpeg = fetch(f"{base}/rendered?window=40,400,linear&viewport=32,32", tok)
    assert jpeg.headers["Content-Type"] == "image/jpeg"
    assert Image.open(BytesIO(jpeg.body)).size == (32, 32)
    for url in (
        f"{base}/thumbnail",
        f"{site.root}/studies/{study}/thumbnail",
        f"{site.root}/studies/{study}/series/{series}/thumbnail",
        f"{base}/frames/1/rendered",
    ):
        r = fetch(url, tok, headers={"Accept": "image/avif,image/webp,*/*;q=0.8"})
        assert r.status == 200 and r.headers["Content-Type"] == "image/jpeg", url
    assert fetch(f"{base}/rendered?window=bad", tok).status == 400
    # Output is bounded: a 16384-pixel viewport is refused, the largest allowed is drawn.
    huge = fetch(f"{base}/rendered?viewport=16384,16384", tok)
    assert huge.status == 400 and "1 to 2048" in huge.json()["detail"]
    big = fetch(f"{base}/rendered?viewport=2048,2048", tok, headers={"Accept": "image/png"})
    assert big.status == 200 and Image.open(BytesIO(big.body)).size[0] == 2048
    # A series or study rendered is one representative image (its middle slice), full size,
    # as dicomweb-client reads it; the thumbnail of the same is smaller.
    middle = site.reader(0)
    n = int(middle.attrs["n_slices"])
    mid_sop = first(middle.header(n // 2), "00080018")
    want = client.retrieve_instance_rendered(study, series, mid_sop, media_types=("image/png",))
    got = client.retrieve_series_rendered(study, series, media_types=("image/png",))
    assert got == want and Image.open(BytesIO(got)).size == (64, 64)
    whole = fetch(f"{site.root}/studies/{study}/rendered", tok, headers={"Accept": "image/png"})
    assert whole.headers["Content-Type"] == "image/png" and Image.open(BytesIO(whole.body)).size


def test_every_multipart_part_names_its_url(site, monkeypatch):
    """Content-Location on each part: a frame's .../frames/N, bulk data its BulkDataURI, an
    instance its WADO-RS URL; behind a trusted proxy, the proxy's URL."""
    study, series = site.uids(0)
    reader = site.reader(0)
    sop = first(reader.header(2), "00080018")
    tok = site.tokens["alice"]
    inst = f"{site.root}/studies/{study}/series/{series}/instances/{sop}"
    frames = fetch(f"{inst}/frames/1,1", tok)
    assert frames.locations == [f"{inst}/frames/1"] * 2
    meta = fetch(f"{inst}/metadata", tok).json()[0]
    bulk = fetch(meta["7FE00010"]["BulkDataURI"], tok)
    assert bulk.locations == [meta["7FE00010"]["BulkDataURI"]] == [f"{inst}/bulkdata/7FE00010"]
    whole = fetch(f"{site.root}/studies/{study}", tok)
    assert len(whole.locations) == site.corpus.studies[0].n_instances
    for (_, content), where in zip(whole.parts, whole.locations, strict=True):
        ds = pydicom.dcmread(BytesIO(content), stop_before_pixels=True)
        assert where == (
            f"{site.root}/studies/{study}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}"
        )
    assert fetch(inst, tok).locations == [inst]
    monkeypatch.setattr(site.gw.core.settings.web, "trusted_proxies", ["127.0.0.0/8"])
    with serving(site.gw.core) as url:
        path = f"/projects/web/dicom-web/studies/{study}/series/{series}/instances/{sop}"
        proxied = {"Forwarded": 'for=1.2.3.4;proto=https;host="pacs.example.org"'}
        r = fetch(f"{url}{path}/frames/1", tok, headers=proxied)
        assert r.locations == [f"https://pacs.example.org{path}/frames/1"]


XML_PARTS = 'multipart/related; type="application/dicom+xml"'
NS = {"n": xml_model.NAMESPACE}
# Attributes de-identification keeps as they are: Orthanc's XML and ours must agree on them.
KEPT = ["00080008", "00080016", "00080060", "00180050", "00200032", "00200037", "00280010",
        "00280011", "00280030", "00280100", "00281052", "00281053"]  # fmt: skip


def xml_parts(f) -> list[dict]:
    assert f.status == 200, f.status
    assert f.headers["Content-Type"].startswith(f"{XML_PARTS}; boundary=")
    assert all(ctype == "application/dicom+xml" for ctype, _ in f.parts)
    return [xml_model.from_xml(content) for _, content in f.parts]


def test_metadata_and_searches_as_dicom_xml(site, pacs):  # noqa: F811
    """PS3.19 XML, one multipart part a dataset, saying what the JSON says (the same model),
    each part named by its URL; the kept attributes as Orthanc's DICOMweb plugin writes them."""
    study, series = site.uids(0)
    tok = site.tokens["alice"]
    url = f"{site.root}/studies/{study}/series/{series}/metadata"
    as_json = fetch(url, tok).json()
    for accept in (
        XML_PARTS,
        "application/dicom+xml",
        "multipart/related; type=application/dicom+xml",
    ):
        got = fetch(url, tok, headers={"Accept": accept})
        assert xml_parts(got) == as_json, accept
    sops = [first(m, "00080018") for m in as_json]
    inst = f"{site.root}/studies/{study}/series/{series}/instances"
    assert got.locations == [f"{inst}/{sop}/metadata" for sop in sops]
    one = fetch(f"{inst}/{sops[0]}/metadata", tok, headers={"Accept": XML_PARTS})
    assert xml_parts(one) == as_json[:1]
    assert xml_parts(fetch(f"{site.root}/studies/{study}/metadata", tok,
                           headers={"Accept": XML_PARTS})) == fetch(
        f"{site.root}/studies/{study}/metadata", tok).json()  # fmt: skip
    root = ET.fromstring(got.parts[0][1])
    bulk = root.find("n:DicomAttribute[@tag='7FE00010']/n:BulkData", NS)
    assert bulk.get("uri") == as_json[0]["7FE00010"]["BulkDataURI"]
    # Searches: the same results, a part each, named by its RetrieveURL.
    for path in (
        "studies",
        f"studies/{study}/series",
        f"studies/{study}/series/{series}/instances",
    ):
        results = fetch(f"{site.root}/{path}", tok).json()
        found = fetch(f"{site.root}/{path}", tok, headers={"Accept": XML_PARTS})
        assert xml_parts(found) == results and results
        assert found.locations == [first(r, "00081190") for r in results]
    assert fetch(f"{site.root}/studies?PatientID=nobody", tok,
                 headers={"Accept": XML_PARTS}).parts == []  # fmt: skip
    # Orthanc's answer for the same instances (its originals): the kept attributes agree, as
    # the attributes' VR and keyword do wherever both name the same tag.
    original = site.corpus.studies[0]
    theirs = requests.get(
        f"{pacs.url}/dicom-web/studies/{original.study_uid}/series/"
        f"{original.series[0].series_uid}/metadata",
        headers={"Accept": XML_PARTS},
        timeout=30,
    )
    assert theirs.status_code == 200
    their_parts = parse_multipart(theirs.content, content_type=theirs.headers["Content-Type"])
    ours_by_sop = dict(zip(sops, got.parts, strict=True))
    assert len(their_parts) == len(ours_by_sop)
    for part in their_parts:
        their_model = xml_model.from_xml(part.content)
        mine = ours_by_sop[site.keys.uid(first(their_model, "00080018"))][1]
        my_model = xml_model.from_xml(mine)
        for tag in KEPT:
            assert my_model[tag] == their_model[tag], tag

        def named(doc):
            return {a.get("tag"): (a.get("vr"), a.get("keyword"))
                    for a in ET.fromstring(doc).findall("n:DicomAttribute", NS)}  # fmt: skip

        mine_named, their_named = named(mine), named(part.content)
        shared = mine_named.keys() & their_named.keys()
        assert len(shared) > 20
        assert {t: mine_named[t] for t in shared} == {t: their_named[t] for t in shared}


# -- access -----------------------------------------------------------------------------------


def routes(site, project="web"):
    study, series = site.uids(0)
    sop = first(site.reader(0).header(0), "00080018")
    root = f"{site.url}/projects/{project}/dicom-web"
    se = f"{root}/studies/{study}/series/{series}"
    inst = f"{se}/instances/{sop}"
    return [
        f"{root}/studies", f"{root}/series", f"{root}/instances",
        f"{root}/studies/{study}/series", f"{root}/studies/{study}/instances",
        f"{se}/instances", f"{root}/studies/{study}", se, inst,
        f"{root}/studies/{study}/metadata", f"{se}/metadata", f"{inst}/metadata",
        f"{inst}/frames/1", f"{inst}/bulkdata/7FE00010", f"{inst}/rendered",
        f"{inst}/thumbnail", f"{inst}/frames/1/rendered", f"{se}/thumbnail",
        f"{root}/studies/{study}/thumbnail", f"{se}/rendered", f"{root}/studies/{study}/rendered",
    ]  # fmt: skip


def test_access_table_route_by_route(site):
    t = site.tokens
    for url in routes(site):
        assert fetch(url, t["alice"]).status == 200, url  # positive control
        assert fetch(url, t["bob"]).status == 200, url
        assert fetch(url).status == 401, url
        assert fetch(url, "sph_not-a-token").status == 401, url
        assert fetch(url, headers={"Authorization": f"Basic {t['alice']}"}).status == 401
        assert fetch(url, t["mallory"]).status == 404, url  # a member of nothing
    # Carol's project is approved, but these UIDs are not in it: nothing says they exist.
    web_uids = [u.encode() for u in site.uids(0)]
    for url in routes(site, "other"):
        r = fetch(url, t["carol"])
        assert r.status in (200, 404), url
        assert r.status == 404 or not any(u in r.body for u in web_uids), url
    for url in routes(site, "nonexistent"):
        assert fetch(url, t["alice"]).status == 404
    for project in ("closed", "expired"):
        for url in routes(site, project):
            assert fetch(url, t["alice"]).status == 403, url  # a member: told why
            assert fetch(url, t["bob"]).status == 404, url  # not a member: not told
    grant = f"{site.url}/projects/web/members"
    assert fetch(grant, t["bob"], "POST", json={"user": "dave"}).status == 403  # a viewer
    assert fetch(grant, t["carol"], "POST", json={"user": "dave"}).status == 404
    assert (
        fetch(grant, t["alice"], "POST", json={"user": "dave", "role": "investigator"}).status
        == 403
    )
    assert fetch(f"{routes(site)[0]}", t["dave"]).status == 404
    assert fetch(grant, t["alice"], "POST", json={"user": "dave"}).status == 204
    assert fetch(f"{routes(site)[0]}", t["dave"]).status == 200


def test_role_changes_follow_the_role_table(site):
    """An investigator grants the viewer role only: never demotes a co-investigator nor itself;
    an unknown role is named; a name that is no user answers as a grant made (no probing)."""
    c, t = site.gw.core, site.tokens
    for name in ("ines", "vera"):
        users.add(c, name)
    users.grant(c, "web", "ines", "investigator")
    grant = f"{site.url}/projects/web/members"
    demote = fetch(grant, t["alice"], "POST", json={"user": "ines", "role": "viewer"})
    assert demote.status == 403 and "investigator's role" in demote.body.decode()
    assert fetch(grant, t["alice"], "POST", json={"user": "alice", "role": "viewer"}).status == 403
    assert c.catalog.role(c.project("web").id, c.catalog.user("ines").id) == "investigator"
    wrong = fetch(grant, t["alice"], "POST", json={"user": "vera", "role": "owner"})
    assert wrong.status == 400 and "unknown role 'owner'" in wrong.body.decode()
    assert "viewer" in wrong.body.decode() and "no such user" not in wrong.body.decode()
    known = fetch(grant, t["alice"], "POST", json={"user": "vera", "role": "viewer"})
    unknown = fetch(grant, t["alice"], "POST", json={"user": "no-such-one", "role": "viewer"})
    assert (known.status, known.body) == (unknown.status, unknown.body) == (204, b"")
    # Control: the grant to the user that exists was made; the refusals are in the trail.
    assert c.catalog.role(c.project("web").id, c.catalog.user("vera").id) == "viewer"
    refused = [e for e in c.catalog.audit_trail("web", 200) if e.outcome == "refused"]
    assert {"investigator's role" in e.detail for e in refused if e.actor == "alice"} >= {True}
    assert any("no such user" in e.detail for e in refused if e.actor == "alice")


def test_results_cut_at_the_maximum_say_so(site, monkeypatch):
    monkeypatch.setattr(site.gw.core.settings.web, "max_results", 1)  # the project has two
    tok = site.tokens["alice"]
    cut = fetch(f"{site.root}/studies", tok)
    assert len(cut.json()) == 1 and "Additional results can be requested" in cut.headers["Warning"]
    rest = fetch(f"{site.root}/studies?offset=1", tok)  # the last one: nothing more to say
    assert len(rest.json()) == 1 and "Warning" not in rest.headers
    asked = fetch(f"{site.root}/studies?limit=5", tok)  # more than the maximum: both warnings
    assert len(asked.json()) == 1 and asked.headers["Warning"].count("299 sphere") == 2
    own = fetch(f"{site.root}/studies?limit=1", tok)  # the client's own limit: nothing to say
    assert len(own.json()) == 1 and "Warning" not in own.headers


def test_home_shows_a_project_a_page_at_a_time(site, monkeypatch):
    monkeypatch.setattr(pages, "STUDIES_A_PAGE", 1)  # two studies: two pages
    tok = site.tokens["alice"]
    ordered = [
        h.study_uid for h in site.gw.catalog.indexed_studies(site.gw.catalog.project("web").id)[0]
    ]
    first = fetch(f"{site.url}/", tok).body.decode()
    assert "Studies 1-1 of 2." in first and "next &rsaquo;" in first and "previous" not in first
    assert ordered[0] in first and ordered[1] not in first
    second = fetch(f"{site.url}/?project=web&page=2", tok).body.decode()
    assert "Studies 2-2 of 2." in second and "previous" in second and "next" not in second
    assert ordered[1] in second and ordered[0] not in second
    assert (
        "No studies on this page (2 in all)."
        in fetch(f"{site.url}/?project=web&page=9", tok).body.decode()
    )
    assert ordered[0] in fetch(f"{site.url}/?project=web&page=x", tok).body.decode()  # page 1


def test_signin_session_cookie(site):
    s = requests.Session()
    r = s.post(
        f"{site.url}/signin",
        data={"token": site.tokens["bob"], "next": "//evil.org"},
        allow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["Location"] == "/"
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie.replace("Lax", "lax")
    assert "Max-Age=" in cookie
    assert s.get(f"{site.root}/studies").status_code == 200
    home = s.get(f"{site.url}/")
    study, _ = site.uids(0)
    assert f"/viewer/?StudyInstanceUIDs={study}&amp;project=web" in home.text
    forged = s.cookies[sessions.COOKIE][:-2] + "xx"
    assert (
        requests.get(f"{site.root}/studies", cookies={sessions.COOKIE: forged}).status_code == 401
    )
    assert requests.post(f"{site.url}/signin", data={"token": "nope"}).status_code == 401
    assert requests.get(f"{site.url}/", allow_redirects=False).status_code == 303
    # A new token ends the sessions of the old one.
    site.tokens["bob"] = users.reissue(site.gw.core, "bob")
    assert s.get(f"{site.root}/studies").status_code == 401


def test_revoked_user_is_refused(site):
    token = users.add(site.gw.core, "erin")
    users.grant(site.gw.core, "web", "erin", "viewer")
    assert fetch(f"{site.root}/studies", token).status == 200
    users.revoke(site.gw.core, "erin")
    assert fetch(f"{site.root}/studies", token).status == 401


def test_changes_reach_a_warm_cache_on_the_next_request(site, monkeypatch):
    """Access and locations are cached between requests (gateway.web.cache): a revoked
    project, an unindexed series and a new grant must still take effect at once."""
    core = site.gw.core
    study, series = site.uids(1)
    sop = first(site.reader(1).header(0), "00080018")
    frame = f"{site.root}/studies/{study}/series/{series}/instances/{sop}/frames/1"
    token = users.add(core, "frank")
    assert fetch(frame, token).status == 404  # not a member yet
    users.grant(core, "web", "frank", "viewer")
    for _ in range(2):  # warm
        assert fetch(frame, token).status == 200
    pid = core.project("web").id
    core.catalog.unindex_series(pid, series)
    assert fetch(frame, token).status == 404
    from core.index import reindex

    reindex(core, "web")
    assert fetch(frame, token).status == 200
    # The positive control: with the version check blinded, a stale answer is served.
    monkeypatch.setattr(type(core.catalog), "access_version", lambda self: -1)
    assert fetch(frame, token).status == 200  # the version becomes -1: cleared once, warm again
    core.catalog.update_project("web", status="revoked")
    try:
        assert fetch(frame, token).status == 200  # stale: what the check exists to prevent
        monkeypatch.undo()
        assert fetch(frame, token).status == 403
    finally:
        core.catalog.update_project("web", status="approved")
    assert fetch(frame, token).status == 200


def test_requests_are_audited(site):
    # users of this test only: rows left by other tests cannot answer for these requests
    reader, stranger = "audited-reader", "audited-stranger"
    tokens = {n: users.add(site.gw.core, n) for n in (reader, stranger)}
    users.grant(site.gw.core, "web", reader, "viewer")
    study, _ = site.uids(1)
    fetch(f"{site.root}/studies/{study}/metadata", tokens[reader])
    fetch(f"{site.root}/studies", tokens[stranger])
    deadline = time.monotonic() + 15  # the buffer writes each second; a busy CI box is slower
    while time.monotonic() < deadline:
        trail = site.gw.catalog.audit_trail("web", limit=500)
        mine = [e for e in trail if e.actor == reader and e.action == "wado.study.metadata"]
        refused = [e for e in trail if e.actor == stranger and e.outcome == "refused"]
        if mine and refused:
            break
        time.sleep(0.2)
    assert study in mine[0].detail and '"bytes": ' in mine[0].detail and mine[0].outcome == "ok"
    assert refused


def test_a_viewer_session_leaves_a_few_rows_with_route_and_client_refusals_included(site):
    """200 frames read leave a row per series (count and bytes), not 200; every row, the
    refused ones too, names the client's address and the route's template."""
    import json

    c = site.gw.core
    tok = users.add(c, "session-viewer")
    users.grant(c, "web", "session-viewer", "viewer")
    study, series = site.uids(0)
    sops = [first(h, "00080018") for h in site.reader(0).headers()]
    accept = {"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"}
    sent = 0
    with serving(c) as url:  # a server of its own: stopping it writes what it rolled up
        root = f"{url}/projects/web/dicom-web"
        base = f"{root}/studies/{study}/series/{series}/instances"
        assert fetch(f"{root}/studies/{study}/metadata", tok).status == 200
        for i in range(200):
            f = fetch(f"{base}/{sops[i % len(sops)]}/frames/1", tok, headers=accept)
            assert f.status == 200
            sent += len(f.raw)
        assert fetch(f"{root}/studies").status == 401  # no credential
        assert fetch(f"{url}/projects/other/dicom-web/studies", tok).status == 404
        assert fetch(f"{base}/{sops[0]}/frames/1", headers=accept).status == 401
        assert fetch(f"{url}/no/such/page", tok).status == 404
    trail = c.catalog.audit_trail(None, limit=5000, since=utcnow() - timedelta(minutes=10))
    mine = [e for e in trail if e.actor == "session-viewer"]
    frames = [e for e in mine if e.action == "wado.frames"]
    assert 1 <= len(frames) <= 2  # one series, one hour (a session across the hour: two)
    details = [json.loads(e.detail) for e in frames]
    assert sum(d["count"] for d in details) == sum(d["frames"] for d in details) == 200
    assert sum(d["bytes"] for d in details) == sent
    for d in details:
        assert d["series"] == series and d["clients"] == ["127.0.0.1"]
        assert d["route"].endswith("/instances/{sop}/frames/{frames}")
    assert len(mine) == 2 + len(frames)  # metadata, frames rolled up, the 404 (the unknown
    # page has no user: no route asks for one)
    refused = [e for e in trail if e.outcome == "refused" and e.at >= frames[0].at]
    routes = {json.loads(e.detail)["route"] for e in refused}
    assert {
        "/projects/{project}/dicom-web/studies",
        "/projects/{project}/dicom-web/studies/{study}/series/{series}/instances/{sop}"
        "/frames/{frames}",
        "(no route)",
    } <= routes
    for e in mine + refused:
        detail = json.loads(e.detail)
        assert detail.get("client") == "127.0.0.1" or detail.get("clients") == ["127.0.0.1"]
        assert detail["route"]


def test_identifiers_typed_by_a_user_stay_out_of_the_catalog(site):
    """Probing with original identifiers (a name, an original UID) finds nothing, and neither
    the audit trail nor the index keeps them."""
    from harness.leaks import scan_database

    st = site.corpus.studies[0]
    tok = users.add(site.gw.core, "prober")  # this test's rows are told apart by their actor
    users.grant(site.gw.core, "web", "prober", "viewer")
    surname = st.patient_name.split("^")[0]
    assert fetch(f"{site.root}/studies?PatientName={surname}", tok).json() == []
    assert fetch(f"{site.root}/studies/{st.study_uid}/series", tok).json() == []
    assert fetch(f"{site.root}/studies/{st.study_uid}/metadata", tok).status == 404
    assert fetch(f"{site.url}/projects/{st.patient_id}/dicom-web/studies", tok).status == 404
    deadline = time.monotonic() + 15  # the buffer writes each second; a busy CI box is slower
    while time.monotonic() < deadline:  # a row a request, whatever the project: four
        trail = site.gw.catalog.audit_trail(None, limit=200)
        if sum(e.actor == "prober" for e in trail) >= 4:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the probes' audit rows were not written within 15 s")
    url = site.gw.settings.resolved_catalog_url()
    assert scan_database(url, site.corpus.phi) == []
    # Positive control: the same scan sees an identifier once the catalog holds one.
    site.gw.catalog.audit("probe", "test", "web", note=surname)
    assert scan_database(url, [surname])


def test_cors_is_off_by_default_and_answers_preflights_when_set(site):
    pre = {
        "Origin": "https://viewer.example.org",
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization",
    }
    r = requests.options(f"{site.root}/studies", headers=pre)
    assert "access-control-allow-origin" not in r.headers
    core = site.gw.core
    core.settings.web.cors_origins = ["https://viewer.example.org"]
    try:
        with serving(core) as url:
            r = requests.options(f"{url}/projects/web/dicom-web/studies", headers=pre)
            assert r.status_code == 200
            assert r.headers["access-control-allow-origin"] == "https://viewer.example.org"
            assert "authorization" in r.headers["access-control-allow-headers"].lower()
            r = requests.get(
                f"{url}/projects/web/dicom-web/studies", headers={"Origin": pre["Origin"]}
            )
            assert r.status_code == 401 and r.headers["access-control-allow-origin"]
    finally:
        core.settings.web.cors_origins = []


# -- no identifier anywhere -------------------------------------------------------------------


def test_no_planted_identifier_in_any_response(site):
    tok = site.tokens["alice"]
    needles = site.corpus.phi
    urls = routes(site) + [f"{site.url}/", f"{site.url}/signin", f"{site.url}/healthz"]
    study, series = site.uids(1, 1)
    urls += [u.replace(site.uids(0)[0], study) for u in routes(site)[3:6]]
    urls += [
        f"{site.root}/studies?includefield=all",
        f"{site.root}/instances?includefield=all",
        f"{site.root}/studies/{study}/metadata",
        f"{site.root}/studies/{study}",
    ]
    found, checked = [], 0
    for url in urls:
        for accept in (None, OHIF_METADATA_ACCEPT, "image/png"):
            headers = {"Accept-Encoding": "gzip", **({"Accept": accept} if accept else {})}
            r = fetch(url, tok, headers=headers)
            found += leaks(url, r, needles)
            checked += len(r.body)
    for url in routes(site)[:3] + routes(site, "closed")[:3]:
        found += leaks(url, fetch(url), needles) + leaks(url, fetch(url, tok), needles)
    assert checked > 100_000
    assert found == []


def test_leak_scan_positive_control(site):
    """The same scan finds a planted identifier in a source file, in gzip, in a multipart part
    and in JSON that escapes non-ASCII."""
    import gzip
    import json

    from gateway.web.multipart import write_multipart
    from tests.web_server import Fetched

    needle = site.corpus.phi[0]
    assert scan_bytes("source", site.corpus.files[0].read_bytes(), site.corpus.phi)
    ctype, chunks = write_multipart(
        [("application/octet-stream", b"x" + needle.encode())], part_type="application/octet-stream"
    )
    body = b"".join(chunks)
    from gateway.web.multipart import parse_multipart

    f = Fetched(
        200,
        requests.structures.CaseInsensitiveDict({"content-type": ctype}),
        gzip.compress(body),
        body,
        [(p.content_type, p.content) for p in parse_multipart(body, content_type=ctype)],
    )
    assert leaks("control", f, [needle])
    accented = "JOSÉPHINE"
    as_json = json.dumps([{"00100010": {"vr": "PN", "Value": [{"Alphabetic": accented}]}}])
    f = Fetched(
        200,
        requests.structures.CaseInsensitiveDict({"content-type": "application/dicom+json"}),
        as_json.encode(),
        as_json.encode(),
    )
    assert accented.encode() not in f.body and leaks("control", f, [accented])


# -- S3 and throughput ------------------------------------------------------------------------


def test_frames_and_metadata_from_s3(tmp_path, pacs, scp_port, corpus, s3_server):  # noqa: F811
    bucket = s3_server.new_bucket()
    gw = make_gateway(
        tmp_path, pacs, scp_port, storage_url=f"s3://{bucket}/research",
        s3=S3Options(endpoint=s3_server.endpoint, access_key=s3_server.access_key,
                     secret_key=s3_server.secret_key),
    )  # fmt: skip
    st = corpus.studies[1]
    approved(gw, "s3web", [st.accession])
    assert gw.pull("s3web").ok
    token = users.add(gw.core, "sam")
    users.grant(gw.core, "s3web", "sam", "viewer")
    keys = gw.keys("s3web")
    study, series = keys.uid(st.study_uid), keys.uid(st.series[0].series_uid)
    reader = SeriesReader(gw.store, series_key("s3web", study, series))
    with serving(gw.core) as url:
        client = DICOMwebClient(
            f"{url}/projects/s3web/dicom-web", headers={"Authorization": f"Bearer {token}"}
        )
        meta = client.retrieve_series_metadata(study, series)
        assert [first(m, "00080018") for m in meta] == [
            first(h, "00080018") for h in reader.headers()
        ]
        for i in (0, len(meta) - 1):
            (frame,) = client.retrieve_instance_frames(
                study, series, first(meta[i], "00080018"), [1]
            )
            assert frame == np.ascontiguousarray(reader.volume[i], dtype="<i2").tobytes()
        assert len(client.retrieve_series(study, series)) == len(meta)


def test_a_store_that_is_down_is_a_clear_503_and_searches_go_on(
    tmp_path,
    pacs,  # noqa: F811
    scp_port,  # noqa: F811
    corpus,  # noqa: F811
):
    """The object store goes away after the pull: searches (the catalog) still answer, every
    read of pixels or headers is a 503 that says what is wrong and nothing internal, and the
    server stays up."""
    with SeaweedS3(tmp_path / "s3") as own:
        bucket = own.new_bucket()
        gw = make_gateway(
            tmp_path / "gw", pacs, scp_port, storage_url=f"s3://{bucket}/research",
            s3=S3Options(endpoint=own.endpoint, access_key=own.access_key,
                         secret_key=own.secret_key),
        )  # fmt: skip
        approved(gw, "downs3", [corpus.studies[0].accession])
        assert gw.pull("downs3").ok
        endpoint = own.endpoint
    token = users.add(gw.core, "dora")
    users.grant(gw.core, "downs3", "dora", "viewer")
    keys = gw.keys("downs3")
    st = corpus.studies[0]
    study, series = keys.uid(st.study_uid), keys.uid(st.series[0].series_uid)
    with serving(gw.core) as url:
        root = f"{url}/projects/downs3/dicom-web"
        found = fetch(f"{root}/studies/{study}/series/{series}/instances", token)
        assert found.status == 200  # the catalog does not need the store
        sop = first(found.json()[0], "00080018")
        inst = f"{root}/studies/{study}/series/{series}/instances/{sop}"
        for target in (f"{inst}/metadata", f"{inst}/frames/1", f"{inst}/rendered", inst):
            r = fetch(target, token)
            assert r.status == 503, (target, r.status)
            said = r.body.decode("utf-8", "replace")
            assert "object store is unavailable" in said
            assert bucket not in said and endpoint not in said and "Traceback" not in said
        assert fetch(f"{url}/healthz").status == 200


def test_frames_per_second(site):
    """Printed for the report, not asserted: frames of one series, 1 and 4 clients at once."""
    study, series = site.uids(0)
    reader = site.reader(0)
    sops = [first(h, "00080018") for h in reader.headers()]
    base = f"{site.root}/studies/{study}/series/{series}/instances"
    headers = {
        "Authorization": f"Bearer {site.tokens['alice']}",
        "Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*",
    }

    def client(n: int, out: list[int]) -> None:
        with requests.Session() as s:
            for i in range(n):
                r = s.get(f"{base}/{sops[i % len(sops)]}/frames/1", headers=headers)
                assert r.status_code == 200
            out.append(n)

    for clients in (1, 4):
        done: list[int] = []
        threads = [threading.Thread(target=client, args=(60, done)) for _ in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rate = sum(done) / (time.perf_counter() - t0)
        print(f"\nframes/s, {clients} client(s), 64x64 int16, local store: {rate:.0f}")


def test_reindex_rebuilds_the_index_from_the_store(site):
    from core.index import reindex

    core = site.gw.core
    pid = core.project("other").id
    client = site.client("carol", "other")
    before = client.search_for_instances()
    for hit in core.catalog.search(pid, Query(Level.SERIES)):
        core.catalog.unindex_series(pid, hit.series_uid)
    assert client.search_for_studies() == []  # a series not indexed is not served
    assert reindex(core, "other") == len(site.corpus.studies[2].series)
    reindex(core, "other")  # twice: nothing doubles
    after = client.search_for_instances()
    assert sorted(map(str, after)) == sorted(map(str, before))
