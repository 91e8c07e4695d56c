"""A real sphere web server for tests: uvicorn in a thread on a free loopback port, and a
way to read responses as a client sees them, decoded (gzip, multipart parts, DICOM)."""

from __future__ import annotations

import gzip
import html
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

import pydicom
import requests
import uvicorn

from core import Core
from gateway.web.app import create_app
from gateway.web.multipart import parse_multipart
from gateway.web.server import uvicorn_options
from harness.leaks import Leak, scan_bytes, scan_png, scan_text
from harness.localpacs import free_port


@contextmanager
def serving(core: Core) -> Iterator[str]:
    """Start the app on 127.0.0.1; yields its base URL; stops it (flushing the audit)."""
    port = free_port()
    config = uvicorn.Config(
        create_app(core),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        **uvicorn_options(core.settings.web),
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)


def wait_healthy(base: str, proc: subprocess.Popen[Any], timeout_s: float = 90) -> None:
    """Until `base`/healthz answers ok (a `sphere serve` just started as `proc`); fails at once
    if the process ends (with its stderr's tail) or answers not ok, else past the deadline
    (generous: a loaded machine starts `serve --workers 2` slowly)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            assert requests.get(f"{base}/healthz", timeout=5).ok
            return
        except requests.RequestException:  # not listening yet, or slow to answer at start
            if proc.poll() is not None:
                tail = proc.stderr.read()[-2000:] if proc.stderr else ""
                raise AssertionError(f"the server ended, exit {proc.returncode}:\n{tail}") from None
            assert time.monotonic() < deadline, f"no /healthz answer in {timeout_s:.0f} s"
            time.sleep(0.1)


@dataclass
class Fetched:
    status: int
    headers: requests.structures.CaseInsensitiveDict
    raw: bytes  # as sent (compressed, if it was)
    body: bytes  # gunzipped
    parts: list[tuple[str, bytes]] = field(default_factory=list)  # (content type, content)
    locations: list[str | None] = field(default_factory=list)  # each part's Content-Location

    def json(self):
        return json.loads(self.body)


def fetch(url: str, token: str | None = None, method: str = "GET", **kw) -> Fetched:
    """One request; the body read raw, then gunzipped and split into multipart parts."""
    headers = dict(kw.pop("headers", {}) or {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    r = requests.request(method, url, headers=headers, stream=True, timeout=30, **kw)
    raw = r.raw.read(decode_content=False)
    body = gzip.decompress(raw) if r.headers.get("content-encoding") == "gzip" else raw
    parsed = []
    ctype = r.headers.get("content-type", "")
    if ctype.startswith("multipart/"):
        parsed = parse_multipart(body, content_type=ctype)
    parts = [(p.content_type or "", p.content) for p in parsed]
    locations = [p.content_location for p in parsed]
    return Fetched(r.status_code, r.headers, raw, body, parts, locations)


def leaks(where: str, f: Fetched, needles: list[str]) -> list[Leak]:
    """Planted identifiers in a response, every layer decoded: headers, body, JSON (non-ASCII
    unescaped), HTML (entities unescaped), Parquet (read back to its values), PNG (its text
    chunks and the text drawn in its pixels), each multipart part and each DICOM part read back
    (its elements as text)."""
    found = scan_bytes(f"{where} headers", json.dumps(dict(f.headers)).encode(), needles)
    found += scan_bytes(where, f.body, needles)
    ctype = f.headers.get("content-type", "")
    if ctype.startswith(("application/dicom+json", "application/json")):
        text = json.dumps(json.loads(f.body), ensure_ascii=False)
        found += scan_bytes(f"{where} (json)", text.encode(), needles)
    elif ctype.startswith("text/html"):
        found += scan_text(f"{where} (html)", html.unescape(f.body.decode("utf-8")), needles)
    elif ctype.startswith("application/vnd.apache.parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(BytesIO(f.body))
        meta = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in (table.schema.metadata or {}).items()
        }
        values = [table.schema.names, table.to_pylist(), meta]
        text = json.dumps(values, default=str, ensure_ascii=False)
        found += scan_text(f"{where} (parquet)", text, needles)
    elif ctype.startswith("image/png"):
        found += scan_png(where, f.body, needles)
    for i, (ctype, content) in enumerate(f.parts):
        found += scan_bytes(f"{where} part {i}", content, needles)
        if ctype.startswith("application/dicom"):
            ds = pydicom.dcmread(BytesIO(content))
            found += scan_bytes(f"{where} part {i} (dicom)", str(ds).encode(), needles)
    return found
