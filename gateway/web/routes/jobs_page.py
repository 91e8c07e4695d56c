"""A project's jobs as a page (`/projects/{project}/jobs`): the table as it is when asked, then
kept current without a reload by a small script reading `GET /api/projects/{project}/jobs`
every few seconds (routes.jobs). Who may see it: the role table's jobs.read, as the API."""

from __future__ import annotations

import base64
import hashlib
from html import escape
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from core import Core
from gateway.progress import line
from gateway.web.deps import audit, member_access
from gateway.web.routes.jobs import job_json
from gateway.web.routes.pages import STYLE

router = APIRouter()
EVERY_S = 5  # each refresh is a request in the audit trail: not more often than this

# Builds rows with textContent only: nothing from the answer is ever read as HTML.
SCRIPT = """
const body = document.getElementById("jobs"), api = document.body.dataset.api;
const mb = (n) => (n / 1e6).toFixed(1) + " MB";
function progress(p) {
  if (!p || p.total === undefined) return "no progress yet";
  return `${p.instances || 0}/${p.total || 0} instances, ${p.series || 0}/${p.series_total || 0}`
    + ` series, ${mb(p.bytes || 0)}, ${Math.round(p.rate || 0)} instances/s`;
}
async function refresh() {
  try {
    const r = await fetch(api, {credentials: "same-origin", headers: {Accept: "application/json"}});
    if (r.ok) {
      const rows = (await r.json()).map((j) => {
        const tr = document.createElement("tr");
        const kind = j.kind + (j.params && j.params.pipeline ? ":" + j.params.pipeline : "");
        for (const v of [j.id, kind, j.state, progress(j.progress), j.node || "-",
                         j.started_at || "-", j.finished_at || "-", j.outcome || ""]) {
          const td = document.createElement("td");
          td.textContent = String(v);
          tr.appendChild(td);
        }
        return tr;
      });
      body.replaceChildren(...rows);
      document.getElementById("updated").textContent = new Date().toLocaleTimeString();
    }
  } finally {
    setTimeout(refresh, EVERY_MS);
  }
}
setTimeout(refresh, EVERY_MS);
""".replace("EVERY_MS", str(EVERY_S * 1000))
_HASH = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
CSP = (
    f"default-src 'none'; script-src 'sha256-{_HASH}'; connect-src 'self'; "
    "style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HEADER = ("id", "kind", "state", "progress", "node", "started", "finished", "outcome")


@router.get("/projects/{project}/jobs")
def jobs_page(project: str, request: Request) -> HTMLResponse:
    audit(request, "jobs.page")
    member_access(project, request, "jobs.read")
    core: Core = request.app.state.core
    rows = []
    for j in map(job_json, core.catalog.jobs(project)):
        kind = j["kind"] + (f":{j['params']['pipeline']}" if j["params"].get("pipeline") else "")
        cells = [j["id"], kind, j["state"], line(j["progress"]), j["node"] or "-"]
        cells += [j["started_at"] or "-", j["finished_at"] or "-", j["outcome"] or ""]
        rows.append("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in cells) + "</tr>")
    api = f"/api/projects/{quote(project)}/jobs"
    html = (
        f"<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{escape(project)}: jobs</title><style>{STYLE}</style></head>"
        f'<body data-api="{escape(api)}"><p><a href="/">&lsaquo; sphere</a></p>'
        f"<h1>{escape(project)}: jobs</h1>"
        f"<p>Updated every {EVERY_S} s (last: <span id=updated>now</span>).</p>"
        "<table><thead><tr>"
        + "".join(f"<th>{h}</th>" for h in HEADER)
        + "</tr></thead><tbody id=jobs>"
        + "".join(rows)
        + f"</tbody></table><script>{SCRIPT}</script></body></html>"
    )
    headers = {"Cache-Control": "no-store", "Content-Security-Policy": CSP}
    return HTMLResponse(html, headers=headers)
