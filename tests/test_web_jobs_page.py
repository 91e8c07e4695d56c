"""A project's jobs page (issue 19, point 5): the jobs as they are, to whoever may jobs.read,
and their progress kept current without a reload (headless Chromium watches a job the catalog
moves on), under a Content-Security-Policy that lets only its own script run."""

from __future__ import annotations

import base64
import hashlib
import re
from datetime import date, timedelta

import pytest
from fastapi.testclient import TestClient

from core import Core, Settings, projects, users
from gateway.web import sessions
from gateway.web.app import create_app
from gateway.web.routes import jobs_page
from harness.browser import Browser, BrowserError, chromium_path
from tests.web_server import serving


@pytest.fixture
def core(tmp_path):
    c = Core(Settings(home=tmp_path, fsync=False), create=True)
    projects.create(c, "jp", title="jobs page")
    projects.approve(
        c,
        "jp",
        committee_ref="T-1",
        approved_on=date.today() - timedelta(days=1),
        expires_on=date.today() + timedelta(days=30),
    )
    yield c
    c.close()


def test_the_page_lists_the_jobs_to_those_who_may_read_them(core):
    ivy, eve = users.add(core, "ivy"), users.add(core, "eve")
    users.grant(core, "jp", "ivy", "viewer")
    job, _ = core.catalog.submit_job("pull", "jp", {}, "ivy")
    with TestClient(create_app(core)) as client:
        r = client.get("/projects/jp/jobs", headers={"Authorization": f"Bearer {ivy}"})
        assert r.status_code == 200
        assert f"<td>{job.id}</td><td>pull</td><td>queued</td>" in r.text
        assert 'data-api="/api/projects/jp/jobs"' in r.text
        # The only script that may run is the page's own, by its hash.
        (script,) = re.findall(r"<script>(.*?)</script>", r.text, re.S)
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        csp = r.headers["content-security-policy"]
        assert f"script-src 'sha256-{digest}'" in csp and "connect-src 'self'" in csp
        assert "innerHTML" not in script  # rows are built from text only
        home = client.get("/", headers={"Authorization": f"Bearer {ivy}"})
        assert 'href="/projects/jp/jobs"' in home.text
        assert client.get("/projects/jp/jobs").status_code == 401
        r = client.get("/projects/jp/jobs", headers={"Authorization": f"Bearer {eve}"})
        assert r.status_code == 404  # not a member: as if there were no such project


@pytest.mark.skipif(chromium_path() is None, reason="needs Chromium (scripts/setup.sh)")
@pytest.mark.parametrize("script_allowed", [True, False])
def test_progress_updates_without_a_reload(core, monkeypatch, script_allowed):
    """Control (script_allowed=False): with a policy naming another hash the page's script
    does not run, and the same wait fails."""
    if not script_allowed:
        monkeypatch.setattr(jobs_page, "CSP", jobs_page.CSP.replace("sha256-", "sha256-x"))
    users.add(core, "ivy")
    users.grant(core, "jp", "ivy", "viewer")
    ivy = core.catalog.user("ivy")
    job, _ = core.catalog.submit_job("pull", "jp", {}, "ivy")
    cookie = sessions.start(core.catalog, ivy, 3600)
    with serving(core) as url, Browser(timeout_s=30) as page:
        page.set_cookie(sessions.COOKIE, cookie, url)
        page.goto(f"{url}/projects/jp/jobs")
        assert "queued" in page.evaluate("document.getElementById('jobs').innerText")
        navigations = page.evaluate("performance.getEntriesByType('navigation').length")
        # A node takes the job and reports progress: the open page shows it.
        leased = core.catalog.lease_job("node-a", "tok", 60)
        assert leased is not None and leased.id == job.id
        progress = {"instances": 7, "total": 12, "series": 1, "series_total": 2, "bytes": 3e6}
        assert core.catalog.renew_job(job.id, "tok", 60, progress) is False
        shown = "document.getElementById('jobs').innerText.includes('7/12 instances')"
        if not script_allowed:
            with pytest.raises(BrowserError):
                page.wait_for(shown, timeout_s=12)
            return
        page.wait_for(shown, timeout_s=20)
        text = page.evaluate("document.getElementById('jobs').innerText")
        assert "running" in text and "node-a" in text
        assert page.evaluate("performance.getEntriesByType('navigation').length") == navigations
        assert page.evaluate("location.pathname") == "/projects/jp/jobs"  # never reloaded
