"""OHIF in a real browser shows a de-identified CT pulled from a real PACS.

Orthanc (the stand-in PACS) → `sphere pull` → the gateway's web app on loopback, as
`sphere serve` runs it → headless Chromium signs in with a viewer's token on the sign-in form,
follows the home page's link into /viewer/ and must get every DICOMweb request answered and the
CT drawn in the viewport. The same check on a study that does not exist must fail: that is what
makes "the CT is drawn" mean something.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core import users
from core.settings import DEFAULT_VIEWER_DIST, PacsPeer, Settings
from gateway.api import Gateway
from harness.browser import Browser, Request, chromium_path
from harness.localpacs import LocalOrthanc, free_port
from harness.synthetic import generate
from tests.web_server import serving

pytestmark = pytest.mark.peers
PROJECT = "viewer-test"
SHOTS = Path(__file__).resolve().parents[1] / "var" / "test-shots"  # looked at when it fails

if not (DEFAULT_VIEWER_DIST / "index.html").is_file():
    pytest.skip(
        f"the OHIF viewer is not installed in {DEFAULT_VIEWER_DIST} (run scripts/setup.sh)",
        allow_module_level=True,
    )
if chromium_path() is None:
    pytest.skip("chromium is not installed (run scripts/setup.sh)", allow_module_level=True)


@dataclass
class Served:
    url: str
    token: str
    study_uid: str  # pseudonymous


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One study (two CT series) pulled into a fresh home and served; a viewer's token."""
    tmp = tmp_path_factory.mktemp("viewer")
    corpus = generate(tmp / "corpus", n_patients=1, slices=16, size=256, seed=11)
    scp_port = free_port()
    modalities = {"SPHERE": ("SPHERE", "127.0.0.1", scp_port)}
    with LocalOrthanc(tmp / "orthanc", modalities=modalities) as pacs:
        assert pacs.upload(corpus.files) == len(corpus.files)
        settings = Settings(
            home=tmp / "home",
            port=scp_port,
            pacs=PacsPeer(ae_title=pacs.aet, port=pacs.dicom_port),
            fsync=False,
            backoff_s=0.1,
        )
        gw = Gateway(settings)
        gw.create_project(PROJECT, title="viewer test")
        gw.approve(
            PROJECT,
            committee_ref="CSE-T-9",
            approved_on=date.today() - timedelta(days=1),
            expires_on=date.today() + timedelta(days=30),
        )
        gw.add_cohort(PROJECT, "accession", [corpus.studies[0].accession])
        gw.pull(PROJECT)
    core = gw.core
    (study_uid,) = {s.study_uid for s in core.catalog.series(core.project(PROJECT).id)}
    token = users.add(core, "reader")
    users.grant(core, PROJECT, "reader", "viewer")
    with serving(core) as url:
        yield Served(url, token, study_uid)
    core.close()


def dicomweb(requests: list[Request]) -> list[Request]:
    return [r for r in requests if f"/projects/{PROJECT}/dicom-web/" in r.url]


def viewport_region(page: Browser) -> tuple[int, int, int, int]:
    """The largest canvas on the page (the viewport), else the middle of the window."""
    box = page.evaluate(
        """(() => {
          const cs = [...document.querySelectorAll('canvas')].map(c => c.getBoundingClientRect())
            .filter(r => r.width > 100 && r.height > 100)
            .sort((a, b) => b.width * b.height - a.width * a.height);
          return cs.length ? [cs[0].left, cs[0].top, cs[0].right, cs[0].bottom] : null;
        })()"""
    )
    if not box:
        return (page.width // 4, page.height // 8, page.width * 15 // 16, page.height * 15 // 16)
    left, top, right, bottom = (round(v) for v in box)
    return max(left, 0), max(top, 0), min(right, page.width), min(bottom, page.height)


def shows_an_image(png: bytes, region: tuple[int, int, int, int]) -> tuple[bool, str]:
    """Whether the region holds an image rather than a blank or error render: a good part of
    it mid-grey (tissue between air and bone) and clearly varied. Overlay text alone covers a
    few per cent at most; an empty viewport is black."""
    gray = np.asarray(Image.open(io.BytesIO(png)).convert("L").crop(region), dtype=np.float32)
    tissue = float(((gray > 40) & (gray < 230)).mean())
    spread = float(gray.std())
    why = f"tissue-grey {tissue:.1%} of {gray.shape[1]}x{gray.shape[0]}, std {spread:.1f}"
    return tissue > 0.15 and spread > 20, why


def open_study(page: Browser, url: str, settle_s: float = 8.0) -> tuple[bool, str, bytes]:
    """Open a viewer link; wait for the viewer to settle; the image check and the screenshot.
    The check is repeated for up to `settle_s` (the last frame may be drawn late on a busy
    machine); the controls go through the same wait, so they fail for the right reason."""
    page.goto(url)
    page.wait_for("document.querySelector('canvas') || document.body.innerText.length > 50")
    page.wait_idle(quiet_s=1.5, timeout_s=40)
    deadline = time.monotonic() + settle_s
    while True:
        time.sleep(0.5)
        png = page.screenshot()
        ok, why = shows_an_image(png, viewport_region(page))
        if ok or time.monotonic() > deadline:
            return ok, why, png


def test_ohif_shows_the_pulled_ct(served: Served) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    with Browser(timeout_s=40) as page:
        # A shared viewer link, not signed in: the sign-in form, the token, back to the viewer.
        shared = f"{served.url}/viewer/?StudyInstanceUIDs={served.study_uid}&project={PROJECT}"
        page.goto(shared)
        assert page.evaluate("location.pathname") == "/signin"
        # A returning user: OHIF's first-visit tour dims the viewport at a moment of its own.
        page.evaluate("localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))")
        page.fill("input[name=token]", served.token)
        page.submit("form[action='/signin']")
        assert any(c["name"] == "sphere_session" for c in page.cookies())
        assert page.evaluate("location.pathname + location.search") == (
            f"/viewer/viewer?StudyInstanceUIDs={served.study_uid}&project={PROJECT}"
        )
        # The home page lists the study with its link into the viewer.
        page.goto(f"{served.url}/")
        link = page.evaluate(
            f"""[...document.querySelectorAll('a')].map(a => a.href)
                  .find(h => h.includes('/viewer/') && h.includes({served.study_uid!r}))"""
        )
        assert link, "the home page has no viewer link for the pulled study"
        assert f"project={PROJECT}" in link

        page.forget_requests()  # from here on, the viewer's requests only
        shown, why, png = open_study(page, link)
        (SHOTS / "viewer.png").write_bytes(png)
        requests = list(page.requests)
        calls = dicomweb(requests)
        failed = [(r.status, r.error, r.url) for r in calls if not _succeeded(r)]
        assert not failed, f"DICOMweb requests failed: {failed[:5]}"
        paths = " ".join(r.url for r in calls)
        for needed in ("/studies?", "/series", "/metadata", "/frames/1"):
            assert needed in paths, f"the viewer never asked for {needed}"
        foreign = [r.url for r in requests if not r.url.startswith((served.url, "data:", "blob:"))]
        assert not foreign, f"the viewer reached outside the gateway: {foreign[:5]}"
        broken = [(r.status, r.url) for r in requests if (r.status or 0) >= 400]
        assert not broken, f"viewer requests failed: {broken[:5]}"
        assert shown, f"no CT in the viewport ({why}); see {SHOTS / 'viewer.png'}"

        # Controls: the same check must fail on a study that does not exist (OHIF's error
        # page) and on the study with its frames withheld (a blank viewport, overlays drawn).
        missing = link.replace(served.study_uid, "2.25.1234567890123456789")
        shown, why, png = open_study(page, missing)
        (SHOTS / "viewer-missing-study.png").write_bytes(png)
        assert not shown, f"the image check passes on a study that does not exist ({why})"
        page.block("*/frames/*")
        page.forget_requests()
        shown, why, png = open_study(page, link)
        (SHOTS / "viewer-no-frames.png").write_bytes(png)
        assert any("/frames/" in r.url and r.error for r in page.requests)
        assert not shown, f"the image check passes on a viewport without frames ({why})"

        # OHIF's own navigation drops ?project=; the tab remembers it (its study list).
        page.block()
        page.forget_requests()
        page.goto(f"{served.url}/viewer/")
        page.wait_idle(quiet_s=1.0)
        listed = [r for r in dicomweb(page.requests) if "/studies?" in r.url]
        assert listed and all(_succeeded(r) for r in listed)
        assert page.evaluate("document.body.innerText.includes('CT')")


def _succeeded(r: Request) -> bool:
    return r.error is None and r.status is not None and (200 <= r.status < 300 or r.status == 304)
