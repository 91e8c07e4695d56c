"""The viewer's files as served at /viewer/: rewritten root paths, SPA fallback, cache headers,
the generated config, and a clear 503 when the dist is not installed. A small dist is written
to a temporary folder with the same strings OHIF's build has."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from gateway.web.viewer import IMMUTABLE, mount_viewer

INDEX = (
    '<!doctype html><html><head><script>window.PUBLIC_URL="/"</script>'
    '<link rel="manifest" href="/manifest.json"><script src="/app-config.js"></script>'
    '<script defer src="/app.bundle.0123456789abcdef.js"></script>'
    '<link href="/app.bundle.css" rel="stylesheet"></head><body><div id="root"></div></body></html>'
)
BUNDLE = '(() => {\n__webpack_require__.p = "/";\n})();\nconsole.log("app");\n'


@pytest.fixture()
def dist(tmp_path: Path) -> Path:
    d = tmp_path / "dist"
    (d / "assets").mkdir(parents=True)
    (d / "ort").mkdir()
    (d / "index.html").write_text(INDEX)
    (d / "app.bundle.0123456789abcdef.js").write_text(BUNDLE)
    (d / "app.bundle.css").write_text("@font-face{src:url(/fedcba9876543210.woff2)}")
    (d / "fedcba9876543210.woff2").write_bytes(b"wOF2\x00font")
    (d / "assets" / "favicon.ico").write_bytes(b"\x00\x00\x01\x00")
    (d / "ort" / "model.onnx").write_bytes(b"big")
    (d / "app-config.js").write_text("window.config = {dataSources: ['the public demo']};")
    (tmp_path / "secret.txt").write_text("outside dist")
    return d


def client(dist: Path | None, signed_in: Callable[[Request], bool] | None = None) -> TestClient:
    app = FastAPI()
    mount_viewer(app, dist, signed_in)
    return TestClient(app)


def test_index_and_bundles_point_under_viewer(dist: Path) -> None:
    c = client(dist)
    r = c.get("/viewer/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'window.PUBLIC_URL="/viewer/"' in r.text
    assert 'src="/viewer/app.bundle.0123456789abcdef.js"' in r.text
    assert 'href="/viewer/app.bundle.css"' in r.text and 'href="/' + "manifest" not in r.text
    assert r.headers["cache-control"] == "no-cache"
    js = c.get("/viewer/app.bundle.0123456789abcdef.js")
    assert '__webpack_require__.p = "/viewer/";' in js.text
    assert js.headers["cache-control"] == IMMUTABLE
    assert "url(/viewer/fedcba9876543210.woff2)" in c.get("/viewer/app.bundle.css").text
    font = c.get("/viewer/fedcba9876543210.woff2")
    assert font.content == b"wOF2\x00font" and font.headers["cache-control"] == IMMUTABLE


def test_gzip_and_revalidation(dist: Path) -> None:
    c = client(dist)
    r = c.get("/viewer/app.bundle.css", headers={"Accept-Encoding": "gzip"})
    assert r.headers["content-encoding"] == "gzip" and "url(/viewer/" in r.text  # httpx inflates
    again = c.get(
        "/viewer/app.bundle.css",
        headers={"Accept-Encoding": "gzip", "If-None-Match": r.headers["etag"]},
    )
    assert again.status_code == 304 and again.content == b""
    raw = c.get("/viewer/app.bundle.css", headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in raw.headers and raw.headers["etag"] != r.headers["etag"]
    assert gzip.decompress(gzip.compress(raw.content)) == raw.content


def test_config_is_generated_for_the_tabs_project(dist: Path) -> None:
    r = client(dist).get("/viewer/app-config.js")
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    js = r.text
    assert "the public demo" not in js
    assert 'get("project")' in js and "sessionStorage" in js
    assert '"/projects/" + encodeURIComponent(project) + "/dicom-web"' in js
    for setting in (
        '"routerBasename": "/viewer"',
        '"qidoRoot": root',
        '"wadoRoot": root',
        '"wadoUriRoot": root',
        '"imageRendering": "wadors"',
        '"thumbnailRendering": "thumbnail"',
        '"thumbnailRequestStrategy": "fetch"',
        '"enableStudyLazyLoad": true',
        '"supportsFuzzyMatching": false',
        '"supportsWildcard": true',
        '"relativeResolution": "studies"',
        '"omitQuotationForMultipartRequest": true',
    ):
        assert setting in js


def test_spa_fallback_and_missing_assets(dist: Path) -> None:
    c = client(dist)
    for route in ("/viewer/viewer", "/viewer/viewer/sphere", "/viewer/segmentation"):
        r = c.get(route, params={"StudyInstanceUIDs": "1.2.3"})
        assert r.status_code == 200 and 'window.PUBLIC_URL="/viewer/"' in r.text
    assert c.get("/viewer/nope.bundle.js").status_code == 404
    assert c.get("/viewer/assets/nope.png").status_code == 404
    assert c.get("/viewer/ort/model.onnx").status_code == 404  # withheld
    assert c.get("/viewer/../secret.txt").status_code == 404
    assert c.get("/viewer/%2e%2e/secret.txt").status_code == 404


def test_links_naming_a_study_open_the_viewer_route(dist: Path) -> None:
    c = client(dist)
    r = c.get("/viewer/?StudyInstanceUIDs=1.2.3&project=p1", follow_redirects=False)
    assert r.status_code == 302
    assert r.headers["location"] == "/viewer/viewer?StudyInstanceUIDs=1.2.3&project=p1"
    bare = c.get("/viewer?project=p1", follow_redirects=False)
    assert bare.status_code == 308 and bare.headers["location"] == "/viewer/?project=p1"


def test_pages_send_visitors_without_a_session_to_sign_in(dist: Path) -> None:
    c = client(dist, signed_in=lambda request: "sphere_session" in request.cookies)
    r = c.get("/viewer/?StudyInstanceUIDs=1.2.3&project=p1", follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"] == (
        "/signin?next=%2Fviewer%2F%3FStudyInstanceUIDs%3D1.2.3%26project%3Dp1"
    )
    assert c.get("/viewer/viewer", follow_redirects=False).status_code == 303
    # The files themselves are public: nothing in them is about a patient.
    assert c.get("/viewer/app.bundle.0123456789abcdef.js").status_code == 200
    assert c.get("/viewer/app-config.js").status_code == 200
    c.cookies.set("sphere_session", "x")
    assert c.get("/viewer/viewer").status_code == 200


@pytest.mark.parametrize("where", ["missing", "unset"])
def test_missing_dist_says_how_to_install(tmp_path: Path, where: str) -> None:
    c = client(tmp_path / "nothing" if where == "missing" else None)
    r = c.get("/viewer/")
    assert r.status_code == 503 and "scripts/setup.sh" in r.text
    assert c.get("/viewer/viewer?StudyInstanceUIDs=1").status_code == 503


def test_pages_are_audited_and_the_viewers_own_files_are_not(dist: Path) -> None:
    from gateway.web.audit import AuditBuffer, AuditMiddleware

    class Trail:
        rows: list[dict] = []

        def add(self, row: dict) -> None:
            self.rows.append(row)

    trail = Trail()
    app = FastAPI()
    mount_viewer(app, dist)
    app.add_middleware(AuditMiddleware, buffer=cast(AuditBuffer, trail))  # it only calls add
    c = TestClient(app)
    assert c.get("/viewer/app.bundle.0123456789abcdef.js").status_code == 200
    assert c.get("/viewer/assets/favicon.ico").status_code == 200
    assert trail.rows == []  # the same files for everyone: no rows
    assert c.get("/viewer/assets/nothing.png").status_code == 404
    assert c.get("/viewer/?StudyInstanceUIDs=1.2.3&project=p1", follow_redirects=True)
    actions = [(r["action"], r["outcome"]) for r in trail.rows]
    assert actions == [("web", "refused"), ("web", "ok"), ("viewer.page", "ok")]
