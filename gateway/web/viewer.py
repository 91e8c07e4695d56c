"""The OHIF viewer, served at /viewer/ on the gateway's own origin.

Same origin means the viewer's DICOMweb requests carry the session cookie by themselves: no CORS,
no token in the page. OHIF's prebuilt dist (npm `@ohif/app`, fetched by scripts/setup.sh) is built
for the site root: index.html sets `window.PUBLIC_URL="/"`, links `/assets/...`, its webpack
runtimes hard-code `__webpack_require__.p = "/"` (where chunks, workers and wasm load from) and the
CSS loads fonts from `url(/...)`. Those few strings are rewritten as they are served, so the dist
stays as npm ships it. `app-config.js` is generated: one DICOMweb data source for the project the
link names (`?project=`), remembered per tab in sessionStorage because OHIF drops unknown query
parameters when it navigates.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import mimetypes
import re
import threading
from collections.abc import Callable
from html import escape
from pathlib import Path
from urllib.parse import urlencode

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from gateway.web.audit import skip_audit
from gateway.web.deps import audit

BASE = "/viewer"
PROJECT_KEY = "sphere.project"
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"
# Webpack's content hashes: `app.bundle.0f6159c501addfe9.js`, `34b1e6b1deb5828e.wasm`.
_HASHED = re.compile(r"(^|\.)[0-9a-f]{16}\.[a-z0-9]+$")
_COMPRESSIBLE = {".js", ".css", ".html", ".json", ".svg", ".wasm", ".map", ".txt"}
_TEXT_REWRITES: dict[str, list[tuple[bytes, bytes]]] = {
    ".html": [
        (b'window.PUBLIC_URL="/"', f'window.PUBLIC_URL="{BASE}/"'.encode()),
        (b'href="/', f'href="{BASE}/'.encode()),
        (b'src="/', f'src="{BASE}/'.encode()),
    ],
    ".js": [(b'__webpack_require__.p = "/";', f'__webpack_require__.p = "{BASE}/";'.encode())],
    ".css": [(b"url(/", f"url({BASE}/".encode())],
    ".json": [(b'"src": "/', f'"src": "{BASE}/'.encode())],  # manifest.json icons
}
# What OHIF needs and no more: its scripts, workers and wasm codecs from here (eval for the
# codecs and some bundles), images as data:/blob:, and index.html's two inline scripts by hash.
CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-eval' 'wasm-unsafe-eval' blob: {hashes}; "
    "worker-src 'self' blob:; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    "font-src 'self' data:; connect-src 'self' data: blob:; media-src 'self' data: blob:; "
    "object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)
_INLINE_SCRIPT = re.compile(rb"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", re.S)
# Not needed for viewing and large (the onnxruntime models of OHIF's AI tools).
_WITHHELD = ("ort/",)

MISSING_PAGE = """<!doctype html><html><head><title>Viewer not installed</title></head>
<body style="font-family: sans-serif; max-width: 40em; margin: 4em auto">
<h1>The viewer is not installed</h1>
<p>sphere serves the OHIF viewer from its prebuilt files, which are not on this machine
(looked in <code>{dist}</code>).</p>
<p>Run the set-up, <code>bash scripts/setup.sh</code> (or <code>make setup</code>), which fetches
them with npm, or point <code>SPHERE_VIEWER_DIST</code> at an OHIF <code>dist/</code> folder.</p>
</body></html>
"""


def app_config_js() -> str:
    """OHIF's `window.config`: one DICOMweb source at this origin for the tab's project."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "sphere",
        "configuration": {
            "friendlyName": "sphere",
            "name": "sphere",
            "qidoRoot": "@ROOT@",
            "wadoRoot": "@ROOT@",
            "wadoUriRoot": "@ROOT@",
            "qidoSupportsIncludeField": True,
            "imageRendering": "wadors",
            # Thumbnails rendered here (`/thumbnail`, MONOCHROME1 inverted, a cine's first
            # frame): OHIF's own ('wadors') draws MONOCHROME1 uninverted.
            "thumbnailRendering": "thumbnail",
            "thumbnailRequestStrategy": "fetch",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "staticWado": False,
            "singlepart": "bulkdata,video",
            "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
            "omitQuotationForMultipartRequest": True,
        },
    }
    config = {
        "routerBasename": BASE,
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 3,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "maxNumRequests": {"interaction": 100, "thumbnail": 5, "prefetch": 25},
        "showErrorDetails": "always",
        "defaultDataSourceName": "sphere",
        "dataSources": [source],
    }
    body = json.dumps(config, indent=2).replace('"@ROOT@"', "root")
    return f"""// Generated by sphere (gateway/web/viewer.py): served per request, never cached.
(function () {{
  var key = {json.dumps(PROJECT_KEY)};
  var named = new URLSearchParams(window.location.search).get("project");
  if (named) {{
    window.sessionStorage.setItem(key, named);
  }}
  var project = named || window.sessionStorage.getItem(key);
  if (!project) {{
    // Without a project there is nothing to show: back to the gateway's list of studies.
    window.location.replace("/");
    return;
  }}
  var root = window.location.origin + "/projects/" + encodeURIComponent(project) + "/dicom-web";
  window.config = {body};
}})();
"""


class ViewerFiles:
    """OHIF's dist folder, with the root-relative strings moved under /viewer/ (kept in memory,
    gzipped once when the client takes gzip)."""

    def __init__(self, dist: Path | None) -> None:
        self.dist = Path(dist).resolve() if dist else None
        self._cache: dict[tuple[str, bool], tuple[bytes, str]] = {}
        self._lock = threading.Lock()
        self._csp: str | None = None

    def csp(self) -> str:
        """The Content-Security-Policy of the viewer's files (hashes of index.html's inline
        scripts as served)."""
        if self._csp is None:
            html = b""
            if self.dist is not None and self.installed:
                html = self._body(self.dist / "index.html", False)[0]
            self._csp = CSP.format(
                hashes=" ".join(
                    f"'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode()}'"
                    for script in _INLINE_SCRIPT.findall(html)
                )
            )
        return self._csp

    @property
    def installed(self) -> bool:
        return self.dist is not None and (self.dist / "index.html").is_file()

    def find(self, path: str) -> Path | None:
        """The file under dist for a URL path, None when absent or outside dist."""
        assert self.dist is not None
        if not path or path.startswith(_WITHHELD):
            return None
        candidate = (self.dist / path).resolve()
        if not candidate.is_relative_to(self.dist) or not candidate.is_file():
            return None
        return candidate

    def response(self, file: Path, request: Request) -> Response:
        """The file as served: rewritten or compressed from memory, else straight from disk."""
        suffix = file.suffix
        cache = IMMUTABLE if _HASHED.search(file.name) else REVALIDATE
        media = _media_type(file)
        gz = suffix in _COMPRESSIBLE and "gzip" in request.headers.get("accept-encoding", "")
        policy = {"Content-Security-Policy": self.csp()}  # workers' files are ruled by theirs
        if not gz and suffix not in _TEXT_REWRITES:
            return FileResponse(file, media_type=media, headers={"Cache-Control": cache, **policy})
        body, etag = self._body(file, gz)
        headers = {"Cache-Control": cache, "ETag": etag, "Vary": "Accept-Encoding", **policy}
        if gz:
            headers["Content-Encoding"] = "gzip"
        if etag in _etags(request.headers.get("if-none-match", "")):
            return Response(status_code=304, headers=headers)
        return Response(body, media_type=media, headers=headers)

    def _body(self, file: Path, gz: bool) -> tuple[bytes, str]:
        key = (str(file), gz)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        data = file.read_bytes()
        for old, new in _TEXT_REWRITES.get(file.suffix, []):
            data = data.replace(old, new)
        digest = hashlib.blake2b(data, digest_size=12).hexdigest()
        if gz:
            data = gzip.compress(data, compresslevel=6, mtime=0)
        entry = (data, f'"{digest}{"-gz" if gz else ""}"')
        with self._lock:
            self._cache[key] = entry
        return entry


def _media_type(file: Path) -> str:
    if file.suffix == ".wasm":
        return "application/wasm"  # streaming compilation insists on it
    if file.suffix == ".js":
        return "text/javascript; charset=utf-8"
    return mimetypes.guess_type(file.name)[0] or "application/octet-stream"


def _etags(header: str) -> set[str]:
    return {t.strip().removeprefix("W/") for t in header.split(",") if t.strip()}


def _looks_like_asset(path: str) -> bool:
    """A path naming a file (`x.js`, `assets/y.png`): answered 404 when absent, not the app."""
    last = path.rsplit("/", 1)[-1]
    return "." in last


def viewer_router(
    dist: Path | None, signed_in: Callable[[Request], bool] | None = None
) -> APIRouter:
    """Routes under /viewer/: the generated config, dist files, the SPA fallback to index.html,
    and a 503 page saying how to install the viewer when its files are missing. With
    `signed_in`, the viewer's pages (not its files) send a visitor without a session to /signin
    and back: a shared link then works, where OHIF alone would show a failed search."""
    files = ViewerFiles(dist)
    router = APIRouter(include_in_schema=False)

    def missing() -> HTMLResponse:
        where = escape(str(files.dist or "(not configured)"))
        return HTMLResponse(MISSING_PAGE.format(dist=where), 503)

    def page(request: Request, response: Callable[[], Response]) -> Response:
        if signed_in is not None and not signed_in(request):
            here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/signin?{urlencode({'next': here})}", status_code=303)
        return response()

    def index(request: Request) -> Response:
        assert files.dist is not None
        index = files.dist / "index.html"
        audit(request, "viewer.page")
        return page(request, lambda: files.response(index, request))

    @router.get(BASE)
    def viewer_bare(request: Request) -> Response:
        query = f"?{request.url.query}" if request.url.query else ""
        return RedirectResponse(f"{BASE}/{query}", status_code=308)

    @router.get(f"{BASE}/app-config.js")
    def viewer_config() -> Response:
        return Response(
            app_config_js(),
            media_type="text/javascript; charset=utf-8",
            headers={"Cache-Control": "no-store"},
        )

    @router.get(BASE + "/{path:path}")
    def viewer_file(path: str, request: Request) -> Response:
        if not files.installed:
            return missing()
        if not path and "StudyInstanceUIDs" in request.query_params:
            # OHIF's root is its study list; a link naming a study means its viewer route.
            target = f"{BASE}/viewer?{request.url.query}"
            return page(request, lambda: RedirectResponse(target, status_code=302))
        file = files.find(path)
        if file is not None:
            skip_audit(request)
            return files.response(file, request)
        if _looks_like_asset(path):
            return Response("not found", status_code=404, media_type="text/plain")
        return index(request)

    return router


def mount_viewer(
    app: FastAPI, dist: Path | None, signed_in: Callable[[Request], bool] | None = None
) -> None:
    """Serve OHIF from `dist` at /viewer/ in `app` (see `viewer_router`)."""
    app.include_router(viewer_router(dist, signed_in))
