"""/metrics for Prometheus, every request counted and timed by route template, and /readyz.

Who may scrape: a client sending `SPHERE_WEB__METRICS_TOKEN` as a bearer token, or one at an
address of `SPHERE_WEB__METRICS_FROM` (default: this host) that came straight, not through a
proxy (a proxy on this host would otherwise make every client local). Nobody else: the answer
is 403, in the audit trail like every refusal.

/readyz (open, like /healthz): 200 when the catalog answers a trivial query, the store a cheap
request and, on a node that pulls (its spool folder exists), the spool's disk has
`SPHERE_WEB__READY_SPOOL_FREE_MB` free; else 503 naming which did not (no address, no secret).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import shutil
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily

from core import Core, metrics
from gateway.web.audit import RouteNames, skip_audit
from gateway.web.edge import networks
from storage.objectstore import check_store

router = APIRouter()
_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"}


@router.get("/metrics")
def scrape(request: Request) -> Response:
    core: Core = request.app.state.core
    if not may_scrape(request, core):
        raise HTTPException(403, "metrics are for the configured scraper only")
    skip_audit(request)  # a scrape every few seconds would drown the trail; refusals stay
    return Response(exposition(core), media_type=CONTENT_TYPE_LATEST)


@router.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    checks = readiness(request.app.state.core)
    ready = all(v == "ok" for v in checks.values())
    if ready:
        skip_audit(request)  # polled every few seconds; a 503 stays in the trail
    body = {"status": "ready" if ready else "not ready", "checks": checks}
    return JSONResponse(body, 200 if ready else 503, headers={"Cache-Control": "no-store"})


def readiness(core: Core) -> dict[str, str]:
    """Each part this node needs, "ok" or what is wrong with it (a kind of error, never its
    message: it could hold an address with credentials)."""
    checks: dict[str, str] = {}
    try:
        core.catalog.ping()
        checks["catalog"] = "ok"
    except Exception as e:
        checks["catalog"] = f"unreachable ({type(e).__name__})"
    try:
        check_store(core.store)  # a folder: there and readable too
        checks["store"] = "ok"
    except Exception as e:
        checks["store"] = f"unreachable ({type(e).__name__})"
    spool, least = core.settings.spool_dir, core.settings.web.ready_spool_free_mb
    if least > 0 and spool.is_dir():
        free = shutil.disk_usage(spool).free >> 20
        checks["spool"] = "ok" if free >= least else f"{free} MB free, below {least} MB"
    return checks


def may_scrape(request: Request, core: Core) -> bool:
    """A bearer token equal to the metrics token, or a direct client from an allowed address."""
    web = core.settings.web
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if web.metrics_token is not None and scheme.lower() == "bearer":
        want = web.metrics_token.get_secret_value().encode()
        return bool(want) and hmac.compare_digest(given.strip().encode(), want)
    proxied = "forwarded" in request.headers or "x-forwarded-for" in request.headers
    if proxied and not request.scope.get("state", {}).get("trusted_proxy"):
        return False  # through a proxy we do not know: its client is not who we see
    host = request.client.host if request.client else ""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return any(ip in n for n in networks(web.metrics_from))


def exposition(core: Core) -> bytes:
    """This node's metrics as Prometheus text: every process's counters (their files, when
    several count), then what the catalog says now."""
    folder = os.environ.get(metrics.ENV)
    if folder:
        for pid in metrics.ended_pids(Path(folder)):
            multiprocess.mark_process_dead(pid, folder)  # their gauges no longer count
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=folder)
    else:
        registry = metrics.get().registry
    now = CollectorRegistry()
    now.register(CatalogGauges(core))
    return generate_latest(registry) + generate_latest(now)


class CatalogGauges:
    """Gauges read from the catalog at scrape time (true across every node sharing it)."""

    def __init__(self, core: Core) -> None:
        self.core = core

    def collect(self) -> Any:
        locks = GaugeMetricFamily(
            "sphere_pull_locks_held", "Projects whose pull lock is held now.", labels=["project"]
        )
        for project in self.core.catalog.held_pull_locks():
            locks.add_metric([project], 1)
        yield locks
        jobs = GaugeMetricFamily(
            "sphere_jobs", "Jobs in the catalog by kind and state.", labels=["kind", "state"]
        )
        for (kind, state), n in sorted(self.core.catalog.job_counts().items()):
            jobs.add_metric([kind, state], n)
        yield jobs


class HttpMetrics:
    """Pure ASGI: counts and times each request by method, route template and status class."""

    def __init__(self, app: Any, templates: dict[Any, str] | None = None) -> None:
        self.app = app
        self.route = RouteNames(templates)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def seen(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, seen)
        finally:
            m = metrics.get()
            method = scope["method"] if scope["method"] in _METHODS else "other"
            route = self.route(scope)
            m.http_requests.labels(method, route, f"{status // 100}xx").inc()
            m.http_seconds.labels(method, route).observe(time.perf_counter() - t0)
