"""OHIF in a real browser shows de-identified images pulled from a real PACS, with the right
pixels on screen.

Orthanc (the stand-in PACS) holds a CT, a JPEG-Lossless CT and a JPEG 2000 DX, compressed as
received → `sphere pull` → the gateway's web app on loopback, as `sphere serve` runs it →
headless Chromium signs in with a viewer's token on the sign-in form, follows the home page's
link into /viewer/ and must get every DICOMweb request answered and the image drawn. For each
kind of object the image the viewer decoded (cornerstone's cache) must equal the source's pixels,
and the screen at each pixel's centre must show that pixel through the viewer's window (and
inversion, for MONOCHROME1). The same checks on a study that does not exist, on a study whose
frames are withheld, against another slice and against the wrong inversion must fail: that is
what makes "the image is drawn" mean something. One Orthanc, one server and one browser serve
every case.
"""

from __future__ import annotations

import copy
import io
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.pixels import apply_modality_lut
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, JPEGLosslessSV1, generate_uid

from core import users
from core.settings import DEFAULT_VIEWER_DIST, PacsPeer, Settings
from gateway.api import Gateway
from harness.browser import Browser, Request, chromium_path
from harness.localpacs import LocalOrthanc, free_port
from harness.multiframe import write_samples
from harness.phantom_dicom import write_phantom_study
from harness.phantoms import make_phantom
from harness.synthetic import generate
from processing.bone_density import BoneDensity
from processing.outputs import OHIF_FREEHAND, derived_uid, store_derived
from processing.worker import SeriesTask, process_series
from storage.series import SeriesReader, series_key
from tests.compressed import BY_NAME, reference, transcode
from tests.web_server import serving

pytestmark = pytest.mark.peers
PROJECT = "viewer-test"
# How long a page may take to show what it should: waits end as soon as it does, so this
# only matters on a loaded machine (a full run in three processes took over 40 s once).
PATIENCE_S = 120
SHOTS = Path(__file__).resolve().parents[1] / "var" / "test-shots"  # looked at when it fails

if not (DEFAULT_VIEWER_DIST / "index.html").is_file():
    pytest.skip(
        f"the OHIF viewer is not installed in {DEFAULT_VIEWER_DIST} (run scripts/setup.sh)",
        allow_module_level=True,
    )
if chromium_path() is None:
    pytest.skip("chromium is not installed (run scripts/setup.sh)", allow_module_level=True)


@dataclass
class Case:
    """One kind of object in a study of its own, held by the PACS in `syntax`; `frames`: the
    source's modality values (colour: RGB) by original SOP Instance UID, (frames, rows,
    cols[, 3])."""

    name: str
    accession: str
    study_uid: str
    syntax: str
    frames: dict[str, np.ndarray] = field(default_factory=dict)
    monochrome1: bool = False


@dataclass
class Served:
    url: str
    token: str
    study_uid: str  # the CT of the sign-in test, pseudonymous
    cases: dict[str, Case]
    studies: dict[str, str]  # case name -> pseudonymous study UID
    frames: dict[str, np.ndarray]  # pseudonymous SOP UID -> the source's values
    sops: dict[str, list[str]]  # case name -> its pseudonymous SOP UIDs
    syntaxes: dict[str, str]  # case name -> the transfer syntax its series came in
    bone_study: str = ""  # a spine phantom's study, pseudonymous, with its bone-density SR
    l1_hu: float = 0.0  # its L1 mean, as the results table has it
    untagged_study: str = ""  # another spine phantom's, its SR without OHIF's tool tag
    untagged_l1_hu: float = 0.0


def _cases(tmp: Path) -> list[tuple[Case, list[Path]]]:
    """The objects the viewer must show, each as the PACS holds it: (case, files to upload)."""
    out = []
    jls = generate(tmp / "jls", n_patients=1, series_per_study=1, slices=6, size=128, seed=21)
    case = Case(
        "ct-jpeg-lossless", jls.studies[0].accession, jls.studies[0].study_uid, JPEGLosslessSV1
    )
    files = []
    for f in jls.files:
        ref, enc = reference(pydicom.dcmread(f), BY_NAME["jpeg-lossless-sv1"], tmp / "jls-enc")
        ds = pydicom.dcmread(ref)
        case.frames[str(ds.SOPInstanceUID)] = apply_modality_lut(ds.pixel_array, ds)[None]
        files.append(enc)
    out.append((case, files))
    volume, truth = make_phantom(shape_yx=(64, 64), pixel_mm=5.0, slice_spacing_mm=5.0)
    mf = write_samples(volume, truth, tmp / "mf", index=1, only=("dx",))
    dx = mf.samples["dx"]
    enc = transcode(dx.path, tmp / "dx-j2k.dcm", BY_NAME["j2k-lossless"])
    values = apply_modality_lut(dx.pixels, pydicom.dcmread(dx.path, stop_before_pixels=True))
    case = Case("dx", mf.accession, mf.study_uid, JPEG2000Lossless, {dx.sop_uid: values}, True)
    out.append((case, [enc]))
    mf = write_samples(volume, truth, tmp / "ect", index=2, only=("enhanced_ct",))
    ect = mf.samples["enhanced_ct"]
    values = _per_frame_values(pydicom.dcmread(ect.path, stop_before_pixels=True), ect.pixels)
    case = Case(
        "enhanced-ct", mf.accession, mf.study_uid, ect.transfer_syntax, {ect.sop_uid: values}
    )
    out.append((case, [ect.path]))
    mf = write_samples(volume, truth, tmp / "us", index=3, only=("us_cine_ybr422",))
    us = mf.samples["us_cine_ybr422"]  # YBR_FULL_422 in JPEG Baseline, as scanners send it
    case = Case(
        "us-cine-colour", mf.accession, mf.study_uid, JPEGBaseline8Bit, {us.sop_uid: us.pixels}
    )
    out.append((case, [us.path]))
    return out


def _per_frame_values(ds: pydicom.Dataset, frames: np.ndarray) -> np.ndarray:
    """HU of an Enhanced CT's frames: each by its rescale (per-frame group, else shared)."""
    shared = ds.SharedFunctionalGroupsSequence[0]
    out = np.empty(frames.shape, dtype=np.float64)
    for k, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        group = item if "PixelValueTransformationSequence" in item else shared
        rescale = group.PixelValueTransformationSequence[0]
        out[k] = frames[k] * float(rescale.RescaleSlope) + float(rescale.RescaleIntercept)
    return out


UNTAGGED = "bone-density untagged"  # the series description of the SR's untagged copy


def untagged_copy(sr: pydicom.Dataset) -> pydicom.Dataset:
    """The bone-density SR with its tracking identifiers stripped of OHIF's tool tag
    (everything else as written, the series too: it replaces the SR): what OHIF gets
    without the tag."""
    ds = copy.deepcopy(sr)

    def strip(items: Any) -> None:
        for item in items:
            if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "112039":
                item.TextValue = item.TextValue.removeprefix(f"{OHIF_FREEHAND}:")
            strip(item.get("ContentSequence", []))

    strip(ds.ContentSequence)
    ds.SOPInstanceUID, ds.SeriesDescription = generate_uid(), UNTAGGED
    return ds


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A CT study (two series) and one study per case pulled into a fresh home and served; a
    viewer's token."""
    tmp = tmp_path_factory.mktemp("viewer")
    corpus = generate(tmp / "corpus", n_patients=1, slices=16, size=256, seed=11)
    cases = _cases(tmp)
    vol, truth = make_phantom(shape_yx=(160, 160), pixel_mm=2.0, slice_spacing_mm=2.5, seed=1)
    spine = write_phantom_study(vol, truth, tmp / "spine", index=5)
    # Its own study: a second SR beside the first made OHIF draw the first one only at times.
    spine2 = write_phantom_study(vol, truth, tmp / "spine2", index=6)
    scp_port = free_port()
    modalities = {"SPHERE": ("SPHERE", "127.0.0.1", scp_port)}
    with LocalOrthanc(tmp / "orthanc", modalities=modalities) as pacs:
        files = [*corpus.files, *(f for _, fs in cases for f in fs), *spine.files, *spine2.files]
        assert pacs.upload(files) == len(files)
        held = {
            pacs.get(f"/instances/{i}/header?simplify")["TransferSyntaxUID"]
            for i in pacs.get("/instances")
        }
        assert {c.syntax for c, _ in cases} <= held  # the PACS holds them compressed
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
        accessions = [corpus.studies[0].accession, *(c.accession for c, _ in cases)]
        accessions += [spine.accession, spine2.accession]
        gw.add_cohort(PROJECT, "accession", accessions)
        report = gw.pull(PROJECT)
        assert report.ok, [s.error for s in report.series if s.error]
    core = gw.core
    keys = gw.keys(PROJECT)
    rows = core.catalog.series(core.project(PROJECT).id)
    by_study = {r.study_uid: r for r in rows}
    studies = {c.name: keys.uid(c.study_uid) for c, _ in cases}
    bone, bone2 = (by_study[keys.uid(x.study_uid)] for x in (spine, spine2))
    measured, measured2 = (_bone_density(settings, row) for row in (bone, bone2))
    sr_key = series_key(
        PROJECT, bone2.study_uid, derived_uid(bone2.series_uid, "bone-density", "sr")
    )
    untagged = untagged_copy(SeriesReader(core.store, sr_key).instance(0))
    store_derived(core, PROJECT, bone2.study_uid, bone2.patient_pseudonym, [untagged], tmp / "sp")
    token = users.add(core, "reader")
    users.grant(core, PROJECT, "reader", "viewer")
    with serving(core) as url:
        yield Served(
            url,
            token,
            keys.uid(corpus.studies[0].study_uid),
            {c.name: c for c, _ in cases},
            studies,
            {keys.uid(sop): px for c, _ in cases for sop, px in c.frames.items()},
            {c.name: [keys.uid(sop) for sop in c.frames] for c, _ in cases},
            {name: by_study[uid].transfer_syntax or "" for name, uid in studies.items()},
            bone.study_uid,
            measured.values["l1_hu"],
            bone2.study_uid,
            measured2.values["l1_hu"],
        )
    core.close()


def _bone_density(settings: Settings, row: Any) -> Any:
    """Bone density run on a pulled series (its catalog row): its SEG, SR and result."""
    assert row.storage_key is not None  # a complete series has one
    task = SeriesTask(PROJECT, row.series_uid, row.study_uid, row.patient_pseudonym,
                      row.storage_key)  # fmt: skip
    measured = process_series(settings.model_dump_json(), task, BoneDensity(), False)
    assert measured.status == "ok", measured.reason
    return measured


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One browser for every case (a returning user: OHIF's first-visit tour dims the viewport
    at a moment of its own)."""
    with Browser(timeout_s=PATIENCE_S) as browser:
        yield browser


@pytest.fixture
def page(browser: Browser) -> Browser:
    """The browser as each test starts on it: nothing blocked, no requests or console lines of
    an earlier test (a test that failed with frames blocked made every later one fail with
    'Failed to fetch', and its console lines showed up in the next test's report)."""
    browser.block()
    browser.forget_requests()
    browser.console.clear()
    return browser


def signed_in(page: Browser, served: Served) -> None:
    """Sign in with the viewer's token unless this browser already holds a session."""
    if any(c["name"] == "sphere_session" for c in page.cookies()):
        return
    page.goto(f"{served.url}/signin")
    page.evaluate("localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))")
    page.fill("input[name=token]", served.token)
    page.submit("form[action='/signin']")


# What the viewport shows: its image as the viewer decoded it (cornerstone's cache, exposed by
# OHIF as window.cornerstone), its window and inversion, and where pixels (0,0), (cols-1,0) and
# (0,rows-1) land on the page. null when no image is displayed.
SHOWN_JS = """(() => {
  const e = window.cornerstone && cornerstone.getEnabledElements()[0];
  const vp = e && e.viewport;
  const id = vp && vp.getCurrentImageId && vp.getCurrentImageId();
  const img = id && cornerstone.cache.getImage(id);
  if (!img) return null;
  const d = vp.getImageData();
  const at = (i, j) => vp.worldToCanvas(d.imageData.indexToWorld([i, j, 0]));
  const r = vp.canvas.getBoundingClientRect();
  const p = vp.getProperties();
  return {
    imageId: id, rows: img.rows, columns: img.columns,
    components: img.numberOfComponents || (img.color ? 3 : 1),
    scaled: !!(img.preScale && img.preScale.scaled), slope: img.slope, intercept: img.intercept,
    pixels: Array.from(img.getPixelData()), voi: p.voiRange || null,
    origin: [r.left, r.top], c00: at(0, 0), c10: at(img.columns - 1, 0),
    c01: at(0, img.rows - 1),
  };
})()"""
_FRAME_URL = re.compile(r"/instances/([0-9.]+)/frames/(\d+)")


def displayed(page: Browser) -> dict[str, Any] | None:
    """The viewport's image as SHOWN_JS describes it, pixels as an array; None without one."""
    shown = page.evaluate(SHOWN_JS)
    if not shown:
        return None
    rows, cols, k = shown["rows"], shown["columns"], shown["components"]
    px = np.asarray(shown["pixels"], dtype=np.float64).reshape((rows, cols, k)[: 3 if k > 1 else 2])
    if k == 1 and not shown["scaled"]:  # the viewer rescales CT itself: compare modality values
        px = px * float(shown["slope"] or 1) + float(shown["intercept"] or 0)
    shown["pixels"] = px[..., :3] if k > 1 else px
    return shown


def decoded_right(shown: dict[str, Any], frames: dict[str, np.ndarray]) -> tuple[bool, str]:
    """Whether the viewer's decoded image equals the source frame its URL names."""
    m = _FRAME_URL.search(shown["imageId"])
    if m is None or m.group(1) not in frames:
        return False, f"an image of no known instance: {shown['imageId']}"
    want = frames[m.group(1)][int(m.group(2)) - 1]
    got = shown["pixels"]
    if got.shape != want.shape:
        return False, f"shape {got.shape}, the source's {want.shape}"
    diff = int(np.count_nonzero(got != want))
    return diff == 0, f"{diff} of {want.size} values differ from the source's frame"


def on_screen(shown: dict[str, Any], png: bytes, invert: bool) -> tuple[bool, str]:
    """Whether the screen, at each pixel's centre, shows that pixel: grey through the viewer's
    window (inverted for MONOCHROME1), colour as is; 90 % within 16 levels (overlay text and
    edges between pixels take the rest)."""
    shot = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)
    px = shown["pixels"]
    rows, cols = px.shape[:2]
    o = np.add(shown["origin"], shown["c00"])
    u = np.subtract(shown["c10"], shown["c00"]) / max(cols - 1, 1)
    v = np.subtract(shown["c01"], shown["c00"]) / max(rows - 1, 1)
    j, i = np.mgrid[0:rows, 0:cols]
    x = np.round(o[0] + i * u[0] + j * v[0]).astype(int)
    y = np.round(o[1] + i * u[1] + j * v[1]).astype(int)
    inside = (x >= 0) & (y >= 0) & (x < shot.shape[1]) & (y < shot.shape[0])
    if inside.mean() < 0.9:
        return False, f"only {inside.mean():.0%} of the image is on the page"
    seen = shot[y.clip(0, shot.shape[0] - 1), x.clip(0, shot.shape[1] - 1)]
    if px.ndim == 3:
        close = (np.abs(seen - px) <= 16).all(axis=2)
    else:
        lo, hi = shown["voi"]["lower"], shown["voi"]["upper"]
        want = np.clip((px - lo) / max(hi - lo, 1e-9), 0, 1) * 255
        close = np.abs(seen.mean(axis=2) - (255 - want if invert else want)) <= 16
    share = float(close[inside].mean())
    return share >= 0.9, f"{share:.1%} of {rows}x{cols} pixel centres show their value"


# The study panel's thumbnail: rendered by the server (`/thumbnail`), shown as an <img> of a blob.
THUMBNAIL_JS = """[...document.querySelectorAll('img')]
  .filter(i => i.src.startsWith('blob:') && i.naturalWidth)
  .map(i => { const r = i.getBoundingClientRect();
              return [r.left, r.top, r.width, r.height, i.naturalWidth, i.naturalHeight]; })"""
_THUMBNAIL_URL = re.compile(r"/instances/([0-9.]+)/thumbnail")


def thumbnail_agrees(
    page: Browser, png: bytes, frames: dict[str, np.ndarray], invert: bool
) -> tuple[bool, str]:
    """Whether the thumbnail on screen is the first frame of the instance it was asked for:
    correlated with its values (RGB channel by channel; grey against them when MONOCHROME1,
    whatever the window)."""
    boxes = page.evaluate(THUMBNAIL_JS)
    asked = [m.group(1) for r in page.requests if (m := _THUMBNAIL_URL.search(r.url))]
    if len(boxes) != 1 or not asked or asked[-1] not in frames:
        return False, f"{len(boxes)} thumbnails shown, asked for {asked}"
    left, top, width, height, nat_w, nat_h = boxes[0]
    scale = min(width / nat_w, height / nat_h)  # object-fit: contain
    x0, y0 = left + (width - nat_w * scale) / 2, top + (height - nat_h * scale) / 2
    box = (
        round(x0) + 1,
        round(y0) + 1,
        round(x0 + nat_w * scale) - 1,
        round(y0 + nat_h * scale) - 1,
    )
    want = frames[asked[-1]][0]
    crop = Image.open(io.BytesIO(png)).convert("RGB").crop(box)
    seen = np.asarray(
        crop.resize((want.shape[1], want.shape[0]), Image.Resampling.BILINEAR), np.float64
    )
    if want.ndim == 2:
        seen = seen.mean(axis=2)
    corr = float(np.corrcoef(seen.ravel(), want.ravel())[0, 1]) * (-1 if invert else 1)
    return corr > 0.8, f"correlation {corr:.2f} with the source's frame"


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
    page.wait_idle(quiet_s=1.5, timeout_s=PATIENCE_S)
    deadline = time.monotonic() + settle_s
    while True:
        time.sleep(0.5)
        png = page.screenshot()
        ok, why = shows_an_image(png, viewport_region(page))
        if ok or time.monotonic() > deadline:
            return ok, why, png


def test_ohif_shows_the_pulled_ct(served: Served, page: Browser) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.send("Network.clearBrowserCookies")  # whatever ran before: signed out
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
    page.forget_requests()
    with page.blocked("*/frames/*"):
        shown, why, png = open_study(page, link)
        (SHOTS / "viewer-no-frames.png").write_bytes(png)
        assert any("/frames/" in r.url and r.error == "blocked (inspector)" for r in page.requests)
        assert not shown, f"the image check passes on a viewport without frames ({why})"
        assert displayed(page) is None  # nor is any image decoded

    # OHIF's own navigation drops ?project=; the tab remembers it (its study list).
    page.forget_requests()
    page.goto(f"{served.url}/viewer/")
    page.wait_idle(quiet_s=1.0)
    listed = [r for r in dicomweb(page.requests) if "/studies?" in r.url]
    assert listed and all(_succeeded(r) for r in listed)
    assert page.evaluate("document.body.innerText.includes('CT')")


def _succeeded(r: Request) -> bool:
    return r.error is None and r.status is not None and (200 <= r.status < 300 or r.status == 304)


@pytest.mark.parametrize("name", ["ct-jpeg-lossless", "dx", "enhanced-ct", "us-cine-colour"])
def test_ohif_shows_each_kind_with_its_pixels(served: Served, page: Browser, name: str) -> None:
    """Each kind of object, pulled as the PACS holds it (compressed), opens in the viewer: the
    image it decoded is the source's, and the screen shows it pixel for pixel. Controls: the
    same checks fail against another frame of the source and with the inversion wrong."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    case = served.cases[name]
    assert served.syntaxes[name] == case.syntax  # came as the PACS holds it
    signed_in(page, served)
    page.forget_requests()
    study = served.studies[name]
    link = f"{served.url}/viewer/viewer?StudyInstanceUIDs={study}&project={PROJECT}"
    page.goto(link)
    page.wait_for("document.querySelector('canvas') || document.body.innerText.length > 50")
    deadline = time.monotonic() + 30  # until the image is on screen, or given up
    while True:
        shown = displayed(page)
        png = page.screenshot()
        if shown is not None and on_screen(shown, png, case.monochrome1)[0]:
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.3)
    page.wait_idle(quiet_s=0.5, timeout_s=PATIENCE_S)  # every request answered, for the check below
    drawn, why = shows_an_image(png, viewport_region(page))
    (SHOTS / f"viewer-{name}.png").write_bytes(png)
    failed = [(r.status, r.error, r.url) for r in dicomweb(page.requests) if not _succeeded(r)]
    assert not failed, f"DICOMweb requests failed: {failed[:5]}"
    assert drawn, f"no image in the viewport ({why}); see {SHOTS / f'viewer-{name}.png'}"
    assert shown is not None, "the viewer displays no image"
    right, why = decoded_right(shown, served.frames)
    assert right, f"{name}: the viewer's image is not the source's ({why})"
    right, why = on_screen(shown, png, case.monochrome1)
    assert right, f"{name}: the screen does not show the image ({why})"
    right, why = thumbnail_agrees(page, png, served.frames, case.monochrome1)
    assert right, f"{name}: the thumbnail is not the image ({why})"

    # Controls: another frame of the source (the instance's next frame, else a neighbouring
    # slice, else the image shifted by a row), and the inversion wrong (grey) or the image
    # moved (colour), fail the same checks.
    m = _FRAME_URL.search(shown["imageId"])
    assert m is not None, shown["imageId"]
    sop, k = m.group(1), int(m.group(2)) - 1
    frames = served.frames[sop]
    neighbours = [s for s in served.sops[name] if s != sop]
    if len(frames) > 1:
        frame = np.roll(frames, -1, axis=0)
    elif neighbours:
        frame = served.frames[neighbours[0]]
    else:
        frame = np.roll(frames, 1, axis=1)
    assert not decoded_right(shown, {**served.frames, sop: frame})[0], k
    if shown["pixels"].ndim == 2:
        assert not thumbnail_agrees(page, png, served.frames, not case.monochrome1)[0]
    if shown["pixels"].ndim == 3:  # colour has no window to get wrong: moved by 2 columns
        assert not on_screen({**shown, "pixels": np.roll(shown["pixels"], 2, axis=1)}, png, False)[
            0
        ]
    else:
        assert not on_screen(shown, png, not case.monochrome1)[0]


# Every text on the page, the viewport's SVG annotations (cornerstone draws them) included.
TEXT_JS = """[document.body.innerText,
  ...[...document.querySelectorAll('svg text, svg tspan')].map(t => t.textContent)].join(' ')"""
# Double-click the study panel's tile of the SR described so (an SR has no image: OHIF's
# no-image tile).
OPEN_SR_JS = """(() => {
  const t = [...document.querySelectorAll('[data-cy="study-browser-thumbnail-no-image"]')]
    .find(e => e.innerText.includes('SR') && e.innerText.includes(%s));
  if (!t) return false;
  t.dispatchEvent(new MouseEvent('dblclick', {bubbles: true}));
  return true;
})()"""


def open_sr_js(description: str = "bone-density report") -> str:
    return OPEN_SR_JS % json.dumps(description)


def open_bone_sr(page: Browser, served: Served, study: str = "") -> None:
    """A spine phantom's study (the first by default) in the viewer, settled (its CT on
    screen)."""
    study = study or served.bone_study
    page.goto(f"{served.url}/viewer/viewer?StudyInstanceUIDs={study}&project={PROJECT}")
    page.wait_for("document.querySelector('canvas') || document.body.innerText.length > 50")
    page.wait_idle(quiet_s=1.0, timeout_s=PATIENCE_S)


# What the viewports show and which annotations OHIF's tools hold (their tool and image): said
# when the SR's label is not drawn, to tell an annotation never made from one not drawn.
ANNOTATIONS_JS = """(() => {
  const t = window.cornerstoneTools, cs = window.cornerstone;
  if (!t || !cs) return null;
  const shown = cs.getEnabledElements().map(e => e.viewport && e.viewport.getCurrentImageId
    && e.viewport.getCurrentImageId()).filter(Boolean);
  const sr = t.annotation.state.getAllAnnotations()
    .filter(a => a.metadata.toolName === 'DICOMSRDisplay');
  return {images_shown: shown.length, sr_annotations: sr.length,
          on_a_shown_image: sr.filter(a => shown.includes(a.metadata.referencedImageId)).length,
          hidden: sr.filter(a => a.isVisible === false).length};
})()"""

# The rows of OHIF's measurement panel, as the user reads them.
PANEL_ROWS_JS = """[...document.querySelectorAll('[data-cy^="measurement-table-row-"]')]
  .map(e => e.innerText)"""


def panel_lists(page: Browser, value: str) -> tuple[bool, str]:
    """Whether the measurement panel lists the L1 vertebra with `value` HU in its row."""
    rows = page.evaluate(PANEL_ROWS_JS) or []
    l1 = [r for r in rows if "L1 vertebra" in r]
    return any(f"{value} HU" in r for r in l1), f"rows: {rows}"


def show_panel(page: Browser) -> None:
    """Open the right-hand measurement panel by its tab, unless it is open."""
    if not page.evaluate("!!document.querySelector('[data-cy=trackedMeasurements-panel]')"):
        page.click("[data-cy=trackedMeasurements-btn]")
    page.wait_for("!!document.querySelector('[data-cy=trackedMeasurements-panel]')")


def test_ohif_shows_the_bone_density_sr_with_its_l1_value(served: Served, page: Browser) -> None:
    """The bone-density SR of a pulled spine phantom opens in OHIF (double-click on its tile):
    the L1 ROI's outline is drawn on its CT slice, labelled with its mean HU as the results
    table has it and its site. OHIF then offers to track its measurements; accepted, its
    measurement panel lists L1 with that mean. Controls: with the CT alone on screen the value
    is not there; declined, the panel does not list it; nor does it from the same SR without
    OHIF's tool tag in its tracking identifiers; another value is not found."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    signed_in(page, served)
    value = f"{served.l1_hu:.2f}"  # OHIF's label: the NUM to two decimals, then its unit
    # Once more when OHIF shows the SR's slice without its outline and label: seen once in a
    # full run under load, every request answered (its report's "Failed to fetch" lines were
    # the blocked-frames control's, left in the console); the cause is not known. A failed
    # request is not retried: it is reported.
    for _ in range(2):
        page.console.clear()
        open_bone_sr(page, served)
        (SHOTS / "viewer-bone-before-sr.png").write_bytes(page.screenshot())
        assert value not in page.evaluate(TEXT_JS)  # the control: not before the SR is open
        page.forget_requests()
        assert page.wait_for(open_sr_js()), "no SR thumbnail in the study panel"
        deadline = time.monotonic() + PATIENCE_S
        while value not in page.evaluate(TEXT_JS) and time.monotonic() < deadline:
            time.sleep(0.3)
        broken = [(r.status, r.error, r.url) for r in page.requests if not _succeeded(r)]
        if value in page.evaluate(TEXT_JS) or broken:
            break
    png = page.screenshot()
    (SHOTS / "viewer-bone-sr.png").write_bytes(png)
    text = page.evaluate(TEXT_JS)
    assert value in text, (
        f"L1 {value} HU not shown; see {SHOTS / 'viewer-bone-sr.png'}; "
        f"console: {page.console[-5:]}; "
        f"failed requests: {broken[:5]}; OHIF: {page.evaluate(ANNOTATIONS_JS)}"
    )
    assert "L1 vertebra" in text  # the label beside the L1 outline, drawn on its slice

    # Measurements OHIF can restore: it asks whether to track them. Declined, its measurement
    # panel lists nothing (the control: the panel check fails when the SR is not loaded).
    page.wait_for("!!document.querySelector('[data-cy=no-hydrate-btn]')")
    page.click("[data-cy=no-hydrate-btn]")
    show_panel(page)
    time.sleep(2)  # what the panel would list, it lists at once
    listed, why = panel_lists(page, value)
    (SHOTS / "viewer-bone-sr-declined.png").write_bytes(page.screenshot())
    assert not listed, f"the panel lists L1 though the SR was not loaded ({why})"

    # The same SR without OHIF's tool tag in its tracking identifiers (control: the tag is what
    # lets OHIF load it): drawn and labelled as before, but no L1 in the panel, whatever the
    # user answers.
    untagged = f"{served.untagged_l1_hu:.2f}"
    open_bone_sr(page, served, served.untagged_study)
    assert page.wait_for(open_sr_js(UNTAGGED)), "no tile for the untagged SR"
    deadline = time.monotonic() + PATIENCE_S
    while untagged not in page.evaluate(TEXT_JS) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert untagged in page.evaluate(TEXT_JS)  # the SR viewport draws it all the same
    time.sleep(3)  # when OHIF can load an SR, it asks at once
    if page.evaluate("!!document.querySelector('[data-cy=yes-hydrate-btn]')"):
        page.click("[data-cy=yes-hydrate-btn]")
    show_panel(page)
    time.sleep(2)
    listed, why = panel_lists(page, untagged)
    (SHOTS / "viewer-bone-sr-untagged.png").write_bytes(page.screenshot())
    assert not listed, f"the panel lists L1 from the untagged SR ({why})"

    # Accepted (a click on Yes, as a user does), the panel lists L1 with its mean HU: the
    # value the results table has, read from the SR by OHIF's own hydration.
    open_bone_sr(page, served)
    assert page.wait_for(open_sr_js()), "no SR thumbnail in the study panel"
    page.wait_for("!!document.querySelector('[data-cy=yes-hydrate-btn]')")
    page.click("[data-cy=yes-hydrate-btn]")
    show_panel(page)
    deadline = time.monotonic() + PATIENCE_S
    while not panel_lists(page, value)[0] and time.monotonic() < deadline:
        time.sleep(0.3)
    (SHOTS / "viewer-bone-sr-panel.png").write_bytes(page.screenshot())
    listed, why = panel_lists(page, value)
    assert listed, f"the panel does not list L1 {value} HU ({why}); see {SHOTS}"
    wrong = f"{served.l1_hu + 0.01:.2f}"
    assert not panel_lists(page, wrong)[0]  # the control: another value is not found
