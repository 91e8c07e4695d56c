"""The DICOMweb server: `create_app(core)` gives the FastAPI app `sphere serve` runs.

    /healthz, /signin, /signout, /                   pages (gateway.web.routes.pages)
    /metrics                                         Prometheus (gateway.web.metrics)
    /projects/{project}/dicom-web/...                QIDO-RS and WADO-RS, per project
    /viewer/...                                      OHIF (gateway.web.viewer), when installed

Every route but /healthz, /signin, the viewer's files and /metrics (its own rule) needs a
user (gateway.web.deps).
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from core import Core, Settings, home
from gateway import logs
from gateway.web import metrics
from gateway.web.accept import NotAcceptable
from gateway.web.audit import AuditBuffer, AuditMiddleware
from gateway.web.cache import CatalogCache
from gateway.web.deps import base_url, current_user, user_from_request
from gateway.web.edge import Edge, Guard
from gateway.web.qido import QidoError
from gateway.web.render import RenderError
from gateway.web.routes import (
    dataset,
    exports,
    jobs,
    jobs_page,
    pages,
    qido,
    requests,
    results_page,
    wado,
)
from gateway.web.throttle import Failures
from gateway.web.wado import Readers
from storage.index import SearchTooBroad
from storage.objectstore import StorageUnavailable
from storage.series import SeriesError

DICOMWEB = "/projects/{project}/dicom-web"


def create_app(core: Core) -> FastAPI:
    buffer = AuditBuffer(core.catalog)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> Any:
        yield
        buffer.close()

    app = FastAPI(
        title="sphere", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    app.state.core = core
    app.state.readers = Readers(core.store, read_ahead_bytes=core.settings.web.read_ahead_mb << 20)
    app.state.cache = CatalogCache(core)
    local_catalog = core.catalog.engine.dialect.name == "sqlite"
    # Pixels answered on the event loop: see routes.wado.
    app.state.pixels_on_loop = not app.state.readers.reads_are_requests and local_catalog
    web = core.settings.web
    app.state.failures = Failures(web.max_failures, web.failure_window_s)
    app.state.audit = buffer
    app.include_router(pages.router)
    app.include_router(jobs.router)
    app.include_router(jobs_page.router)
    app.include_router(results_page.router)
    app.include_router(dataset.router)
    app.include_router(exports.router)
    app.include_router(requests.router)
    app.include_router(metrics.router)
    app.include_router(qido.router, prefix=DICOMWEB)
    app.include_router(wado.router, prefix=DICOMWEB)
    app.router.routes[:0] = wado.pixel_routes(DICOMWEB)  # first: matched before the rest
    viewer_dist = getattr(core.settings, "viewer_dist", None)
    if viewer_dist is not None:
        from gateway.web.viewer import mount_viewer

        mount_viewer(app, viewer_dist, lambda r: user_from_request(r) is not None)

    for error, status in (
        (NotAcceptable, 406),
        (QidoError, 400),
        (RenderError, 400),
        (SeriesError, 404),
        (StorageUnavailable, 503),
        (SearchTooBroad, 413),
    ):
        app.add_exception_handler(error, _answer(status))
    app.add_middleware(  # inside the audit: what it refuses is kept
        Guard, max_body=web.max_body_kb << 10, current_user=current_user, origin=base_url
    )
    templates = {r.endpoint: DICOMWEB + r.path for m in (qido, wado) for r in m.router.routes}
    app.add_middleware(AuditMiddleware, buffer=buffer, templates=templates)
    app.add_middleware(metrics.HttpMetrics, templates=templates)  # refusals counted too
    origins = web.cors_origins
    if origins:  # outside the audit and the guard, so refusals carry CORS headers too
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Accept", "Content-Type", "If-None-Match"],
            expose_headers=["ETag", "Warning", "Content-Type", "Content-Length"],
            max_age=600,
        )
    app.add_middleware(Edge, trusted_proxies=web.trusted_proxies)  # outermost
    return app


_DETAILS = {
    503: "the object store is unavailable; try again",
    413: "this search would examine too many rows; narrow it (a UID, a date range, a patient)",
}


def _answer(status: int) -> Any:
    async def handler(_request: Request, exc: Exception) -> JSONResponse:
        detail = _DETAILS.get(status) or str(exc)
        return JSONResponse({"detail": detail}, status_code=status)

    return handler


def from_environment() -> FastAPI:
    """The app on a core from SPHERE_* settings (for uvicorn's worker processes): the research
    side, which never opens the vault."""
    home.owner_only()
    settings = Settings()
    logs.setup(os.environ.get(logs.VERBOSE) == "1", settings.log_format)
    return create_app(Core(settings, research=True))
