"""Bone density on pulled CT: phantoms with ground truth written as DICOM (int16 and uint16,
intercepts -1024 and 0, contrast), uploaded to a real Orthanc, pulled by the real pull,
then the BoneDensity pipeline on an embedded Dask cluster. The measurable phantom's L1 comes
within 10 HU of the truth, in the right class; 13 rib pairs and a fractured L1 are refused
with their reason; SR and SEG are stored; no planted identifier reaches the store or catalog."""

from __future__ import annotations

from typing import Any

import pytest

from core.core import Core
from deid.vault import TRUSTED_THIRD_PARTY
from harness.leaks import scan_database, scan_store
from harness.localpacs import free_port
from harness.phantom_dicom import PhantomStudy, write_phantom_study
from harness.phantoms import make_phantom
from processing.bone import classify
from processing.bone_density import BoneDensity
from processing.runner import run_pipeline
from tests.orthanc_fixture import seeded_orthanc
from tests.test_pull import approved, make_gateway

pytestmark = pytest.mark.peers
SMALL = dict(shape_yx=(160, 160), pixel_mm=2.0)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> list[tuple[PhantomStudy, str]]:
    """(study, what the pipeline must say): a measurable one, 13 rib pairs, a fractured L1."""
    out = tmp_path_factory.mktemp("phantoms")
    cases: list[tuple[dict[str, Any], str]] = [
        (dict(slice_spacing_mm=2.5, trabecular_hu=135.0, contrast_hu=150.0, seed=1), ""),
        (dict(slice_spacing_mm=2.0, rib_pairs=13, seed=2), "transitional"),
        # graded (Genant 3) on slices of 3 mm or less; "collapsed" is the rule on thicker ones
        (dict(slice_spacing_mm=2.5, fracture_l1=True, seed=3), "fractured"),
    ]
    writers: list[dict[str, Any]] = [
        dict(unsigned=True, contrast=True),  # uint16, intercept -1024
        dict(kvp=100.0),  # int16, intercept -1024
        dict(intercept=0.0),  # int16 holding HU
    ]
    studies = []
    for i, ((kw, expect), how) in enumerate(zip(cases, writers, strict=True)):
        vol, truth = make_phantom(**SMALL, **kw)
        studies.append((write_phantom_study(vol, truth, out / str(i), index=i, **how), expect))
    return studies


@pytest.fixture(scope="module")
def scp_port():
    return free_port()


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, phantoms, scp_port):
    files = [f for st, _ in phantoms for f in st.files]
    with seeded_orthanc(tmp_path_factory.mktemp("orthanc"), files, scp_port) as orthanc:
        yield orthanc


def test_pulled_phantoms_are_measured_or_refused_with_their_reason(
    tmp_path, pacs, scp_port, phantoms
):
    gw = make_gateway(tmp_path, pacs, scp_port)
    approved(gw, "bones", [st.accession for st, _ in phantoms])
    pulled = gw.pull("bones")
    assert pulled.ok and pulled.instances == sum(st.n_instances for st, _ in phantoms)

    report = run_pipeline(gw.settings, "bones", BoneDensity(), workers=2, progress=False)
    assert report.counts() == {"ok": 1, "unmeasurable": 2}, report.outcomes
    with Core(gw.settings) as core:
        p = core.project("bones")
        rows = core.catalog.results(p.id, "bone-density")
        by_study = {
            core.vault.lookup("bones", r.study_uid, role=TRUSTED_THIRD_PARTY, actor="tester"): r
            for r in rows
        }
        for st, expect in phantoms:
            r = by_study[st.study_uid]
            if expect:
                assert r.status == "unmeasurable" and expect in r.reason
            else:
                truth = st.truth
                assert r.status == "ok" and truth.l1_measurable
                assert r.sr_series_uid and r.seg_series_uid
                assert r.values["l1_hu"] == pytest.approx(truth.l1_hu, abs=10.0)
                assert r.values["class"] == classify(truth.l1_hu)
                assert "contrast" in r.values["flags"]
        # the inputs, and an SR and a SEG for each series with an ROI
        derived = sum(2 for r in rows if r.seg_series_uid and r.sr_series_uid)
        assert core.catalog.series_counts(p.id) == {"complete": len(phantoms) + derived}
        needles = sorted({n for st, _ in phantoms for n in st.phi}, key=len, reverse=True)
        assert scan_store(core.store, needles) == []
    assert scan_database(gw.settings.resolved_catalog_url(), needles) == []
