"""The web edge as an attacker meets it, against a running server: hostile searches, sessions
that end, sign-in guessing, malformed input, large and slow requests, forwarded headers from
anyone, and the security headers on every answer. The index is written directly (no PACS)."""

from __future__ import annotations

import socket
import threading
import time
from datetime import date, timedelta

import pytest
import requests

from core import Settings, users
from core.settings import WebOptions
from dicom.json_model import first
from gateway.api import Gateway
from gateway.web import sessions
from tests.web_server import fetch, serving

TODAY = date.today()
HOSTILE = "*?" * 40 + "Z"  # once a backtracking regex per row: 13 s of a frozen server
COMMENTS = "00204000"


def instance(i: int, comment: str) -> dict:
    return {
        "0020000D": {"vr": "UI", "Value": ["2.25.1"]},
        "0020000E": {"vr": "UI", "Value": ["2.25.2"]},
        "00080018": {"vr": "UI", "Value": [f"2.25.3{i:04d}"]},
        "00200013": {"vr": "IS", "Value": [i]},
        COMMENTS: {"vr": "LT", "Value": [comment]},
    }


class Edge:
    def __init__(self, gw, url, token):
        self.gw, self.url, self.token = gw, url, token
        self.root = f"{url}/projects/edge/dicom-web"
        self.host, self.port = url.removeprefix("http://").split(":")


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    web = WebOptions(max_body_kb=64, header_timeout_s=2, body_timeout_s=2, max_failures=10**6)
    gw = Gateway(Settings(home=tmp_path_factory.mktemp("edge"), actor="tester", web=web))
    gw.create_project("edge")
    gw.approve(
        "edge",
        committee_ref="X",
        approved_on=TODAY - timedelta(days=1),
        expires_on=TODAY + timedelta(days=30),
    )
    headers = [instance(i, "a" * 200) for i in range(300)]
    headers.append(instance(300, "a" * 199 + "Z"))
    gw.catalog.index_series(gw.core.project("edge").id, "projects/edge/x", headers, 0)
    token = users.add(gw.core, "ann")
    users.grant(gw.core, "edge", "ann", "viewer")
    with serving(gw.core) as url:
        yield Edge(gw, url, token)
    gw.core.close()


def raw(e: Edge, data: bytes, *, read: bool = True, timeout: float = 10) -> bytes:
    """Send bytes on a fresh connection; what comes back until the server closes."""
    with socket.create_connection((e.host, int(e.port)), timeout=timeout) as s:
        s.sendall(data)
        if not read:
            return b""
        return read_all(s)


def read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


# -- searches ----------------------------------------------------------------------------------


def test_a_hostile_wildcard_is_answered_and_the_server_goes_on(edge):
    found = fetch(f"{edge.root}/instances?{COMMENTS}={HOSTILE}", edge.token)
    assert found.status == 200
    assert [x["00200013"]["Value"] for x in found.json()] == [[300]]  # the one ending in Z
    # While a search runs (each row's check made slow here), other requests are answered.
    from dicom import query as qido  # the reference matcher the index checks rows with

    real = qido.matches
    done: dict[str, float] = {}

    def slow(query, ds):
        time.sleep(0.01)
        return real(query, ds)

    def search():
        fetch(f"{edge.root}/instances?{COMMENTS}={HOSTILE}", edge.token)
        done["search"] = time.monotonic()

    qido.matches = slow
    try:
        worker = threading.Thread(target=search)
        worker.start()
        time.sleep(0.3)
        assert fetch(f"{edge.url}/healthz").status == 200
        done["healthz"] = time.monotonic()
        worker.join(60)
    finally:
        qido.matches = real
    assert done["healthz"] < done["search"]


def test_a_search_that_examines_too_much_is_a_clear_413(edge, monkeypatch):
    web = edge.gw.core.settings.web
    monkeypatch.setattr(web, "search_max_rows", 100)  # 301 rows to check in Python
    r = fetch(f"{edge.root}/instances?{COMMENTS}=*Z", edge.token)
    assert r.status == 413 and "narrow it" in r.json()["detail"]
    # A search the catalog answers in SQL examines nothing in Python: not bounded so.
    assert fetch(f"{edge.root}/instances?limit=5", edge.token).status == 200
    monkeypatch.setattr(web, "search_max_rows", 1000)  # the control: within the bound
    assert fetch(f"{edge.root}/instances?{COMMENTS}=*Z", edge.token).status == 200
    monkeypatch.setattr(web, "search_timeout_s", 0)  # out of time at once
    assert fetch(f"{edge.root}/instances?{COMMENTS}=*Z", edge.token).status == 413


def test_names_a_client_types_are_bounded(edge):
    unknown = ",".join(f"Nope{i}" for i in range(1500))
    r = fetch(f"{edge.root}/studies?includefield={unknown}", edge.token)
    assert r.status == 400 and "includefield" in r.json()["detail"]
    many = "&".join(f"Nope{i}=1" for i in range(100))
    assert fetch(f"{edge.root}/studies?{many}", edge.token).status == 400
    few = fetch(f"{edge.root}/studies?includefield=Nope1,Nope2", edge.token)
    assert few.status == 200 and few.headers["Warning"].count("299 sphere") == 2  # control
    # A name in a warning header is ASCII, whatever was typed.
    odd = fetch(f"{edge.root}/studies?includefield=%C3%A9%FF", edge.token)
    assert odd.status == 200 and odd.headers["Warning"].isascii()


# -- malformed input ---------------------------------------------------------------------------


def test_malformed_input_is_400_not_500(edge):
    assert requests.get(f"{edge.url}/viewer/%00").status_code == 400
    assert requests.get(f"{edge.root}/studies/%01/series").status_code == 400
    assert fetch(f"{edge.root}/studies?%FF=1", edge.token).status == 400
    assert fetch(f"{edge.root}/studies?%C3%A9=1", edge.token).status == 400
    assert fetch(f"{edge.root}/studies?PatientName=%C3%A9", edge.token).status == 200  # a value
    for cookie in (b"ses_\xc3\xa9", b"1.2.3.\xff", b'"\\x', b"ses_" + b"a" * 5000):
        answer = raw(
            edge,
            b"GET /projects/edge/dicom-web/studies HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Cookie: " + sessions.COOKIE.encode() + b"=" + cookie + b"\r\n\r\n",
        )
        assert answer.split(b" ")[1] in (b"400", b"401"), (cookie, answer[:100])
    assert raw(edge, b"GET /studies HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n")[9:12] in (
        b"400",
    )


# -- sessions and sign-in ----------------------------------------------------------------------


def signed_in(e: Edge, token: str) -> str:
    r = requests.post(f"{e.url}/signin", data={"token": token}, allow_redirects=False)
    assert r.status_code == 303
    return r.cookies[sessions.COOKIE]


def test_sign_out_revocation_and_a_new_token_end_sessions_on_the_server(edge):
    studies = f"{edge.root}/studies"
    kept = signed_in(edge, edge.token)
    other = signed_in(edge, edge.token)
    assert requests.get(studies, cookies={sessions.COOKIE: kept}).status_code == 200  # control
    out = requests.post(f"{edge.url}/signout", cookies={sessions.COOKIE: kept})
    assert out.status_code == 200  # followed to the sign-in page
    # The cookie kept from before sign-out is worth nothing; the other session goes on.
    assert requests.get(studies, cookies={sessions.COOKIE: kept}).status_code == 401
    assert requests.get(studies, cookies={sessions.COOKIE: other}).status_code == 200
    core = edge.gw.core
    token = users.add(core, "gus")
    users.grant(core, "edge", "gus", "viewer")
    gus = signed_in(edge, token)
    assert requests.get(studies, cookies={sessions.COOKIE: gus}).status_code == 200
    users.revoke(core, "gus")
    assert requests.get(studies, cookies={sessions.COOKIE: gus}).status_code == 401
    assert requests.get(studies, cookies={sessions.COOKIE: other}).status_code == 200


def test_sign_in_and_out_from_another_origin_are_refused(edge):
    form = {"token": edge.token}
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        r = requests.post(f"{edge.url}/signin", data=form, headers=headers, allow_redirects=False)
        assert r.status_code == 403 and "Set-Cookie" not in r.headers
        assert requests.post(f"{edge.url}/signout", headers=headers).status_code == 403
    same = {"Origin": edge.url, "Sec-Fetch-Site": "same-origin"}  # the control: our own form
    r = requests.post(f"{edge.url}/signin", data=form, headers=same, allow_redirects=False)
    assert r.status_code == 303 and sessions.COOKIE in r.cookies


def test_failed_sign_ins_and_bad_tokens_are_limited_per_address_and_audited(edge, monkeypatch):
    monkeypatch.setattr(edge.gw.core.settings.web, "max_failures", 3)
    with serving(edge.gw.core) as url:  # a server of its own: its own count
        root = f"{url}/projects/edge/dicom-web"
        bad = {"token": "sph_guess"}
        assert requests.post(f"{url}/signin", data=bad).status_code == 401
        assert fetch(f"{root}/studies", "sph_guess2").status == 401
        assert fetch(f"{root}/studies", edge.token).status == 200  # the control: not yet
        assert requests.post(f"{url}/signin", data=bad).status_code == 401
        limited = requests.post(f"{url}/signin", data={"token": edge.token})
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) > 0
        assert fetch(f"{root}/studies", edge.token).status == 429  # not even tried
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        trail = edge.gw.catalog.audit_trail(None, limit=200)
        failed = [e for e in trail if '"failure": "bad token"' in e.detail]
        if len(failed) >= 3:
            break
        time.sleep(0.2)
    assert len(failed) >= 3 and all('"client": "127.0.0.1"' in e.detail for e in failed)
    signins = [e for e in failed if e.action == "signin" and e.outcome == "refused"]
    assert signins and all('"route": "/signin"' in e.detail for e in signins)


# -- bodies and slow clients --------------------------------------------------------------------


def post_head(path: str, length: int, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode()


def test_a_large_body_is_refused_before_it_is_read(edge):
    members = "/projects/edge/members"
    # 100 MB announced, not a byte sent: the answer comes all the same (so nothing was read).
    assert raw(edge, post_head(members, 100 << 20))[9:12] == b"401"  # who asks, first
    auth = f"Authorization: Bearer {edge.token}\r\n"
    assert raw(edge, post_head(members, 100 << 20, auth))[9:12] == b"413"
    assert raw(edge, post_head("/signin", 100 << 20))[9:12] == b"413"
    # A body without a length is counted as it comes: cut past the limit.
    with socket.create_connection((edge.host, int(edge.port)), timeout=10) as s:
        s.sendall(
            b"POST /signin HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n\r\n"
        )
        chunk = b"%x\r\n%s\r\n" % (16384, b"a" * 16384)
        try:
            for _ in range(64):  # 1 MB, 16 times the limit
                s.sendall(chunk)
        except OSError:
            pass  # closed on us: what is wanted
        assert read_all(s)[9:12] == b"413"
    # The control: a small body from a user is read and answered by the route (a viewer may
    # not grant: the role table's 403, not 401 or 413).
    body = b'{"user": "ann", "role": "viewer"}'
    answer = raw(edge, post_head(members, len(body), auth + "Connection: close\r\n") + body)
    assert answer[9:12] == b"403"


def test_slow_headers_and_bodies_are_cut(edge):
    """header_timeout_s and body_timeout_s are 2 s here: a byte a second is cut."""
    with socket.create_connection((edge.host, int(edge.port)), timeout=30) as s:
        sent = 0
        try:
            for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40:
                s.sendall(bytes([byte]))
                sent += 1
                time.sleep(0.25)
                s.setblocking(False)
                try:
                    if s.recv(1) == b"":
                        break
                except BlockingIOError:
                    pass
                finally:
                    s.setblocking(True)
        except OSError:
            pass
        assert sent < 60  # cut before the headers were all sent
    with socket.create_connection((edge.host, int(edge.port)), timeout=30) as s:
        s.sendall(post_head("/signin", 100).replace(b"json", b"x-www-form-urlencoded"))
        s.settimeout(30)
        assert s.recv(100) == b""  # no body comes: the connection is closed
    # The control: a prompt request on a connection of the same kind is answered.
    assert raw(edge, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")[9:12] == (
        b"200"
    )


def test_a_pipelined_request_is_not_cut_while_it_is_answered(edge, monkeypatch):
    """A request sent behind another on one connection (HTTP/1.1 pipelining) is answered in
    full though its answer takes longer than header_timeout_s (2 s here): the header deadline
    set when the first answer ends is for a request not yet received, not for this one. After
    an answer, a next request that is slow to come is still cut (the deadline is still set)."""
    from dicom import query as qido

    real = qido.matches

    def slow(query, ds):  # 301 rows: some 6 s, three header deadlines
        time.sleep(0.02)
        return real(query, ds)

    monkeypatch.setattr(qido, "matches", slow)
    first = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    second = (
        f"GET /projects/edge/dicom-web/instances?{COMMENTS}={HOSTILE} HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {edge.token}\r\nConnection: close\r\n\r\n"
    ).encode()
    answer = raw(edge, first + second, timeout=60)
    assert answer.count(b"HTTP/1.1 200 OK\r\n") == 2, answer[:300]
    assert answer.rstrip().endswith(b"]")  # the search's JSON, whole
    with socket.create_connection((edge.host, int(edge.port)), timeout=30) as s:
        s.sendall(first)
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        try:
            for byte in b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 40:
                s.sendall(bytes([byte]))
                time.sleep(0.25)
        except OSError:
            pass  # cut: what is wanted
        s.settimeout(30)
        assert s.recv(100) == b""  # closed before the headers were all sent


# -- headers -----------------------------------------------------------------------------------


def test_every_answer_carries_the_security_headers(edge):
    answers = [
        fetch(f"{edge.url}/healthz"),
        fetch(f"{edge.url}/signin"),
        fetch(f"{edge.root}/studies", edge.token),
        fetch(f"{edge.root}/studies"),  # 401
        fetch(f"{edge.url}/projects/nope/dicom-web/studies", edge.token),  # 404
        fetch(f"{edge.url}/viewer/%00"),  # the guard's 400
    ]
    for r in answers:
        assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"], r.status
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["Referrer-Policy"] == "same-origin"


def test_forwarded_headers_count_from_a_trusted_proxy_only(edge, monkeypatch):
    """The client's address (audit, sign-in limit) and the URLs given out follow a proxy's
    headers only when the proxy is configured: from anyone else they are ignored."""
    proxy = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Host": "evil.example"}

    def tried(url: str) -> str:
        requests.post(f"{url}/signin", data={"token": "sph_guess"}, headers=proxy)
        found = fetch(f"{url}/projects/edge/dicom-web/studies", edge.token, headers=proxy)
        return first(found.json()[0], "00081190")

    retrieve = tried(edge.url)
    assert retrieve.startswith(f"{edge.url}/projects/edge/")  # ignored: not a proxy of ours
    monkeypatch.setattr(edge.gw.core.settings.web, "trusted_proxies", ["127.0.0.1"])
    with serving(edge.gw.core) as url:
        retrieve = tried(url)
    assert retrieve.startswith("http://evil.example/projects/edge/")  # the control
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        rows = [
            e.detail
            for e in edge.gw.catalog.audit_trail(None, limit=500)
            if e.action == "signin" and '"failure"' in e.detail
        ]
        if any("203.0.113.7" in d for d in rows) and any("127.0.0.1" in d for d in rows):
            break
        time.sleep(0.2)
    assert any('"client": "203.0.113.7"' in d for d in rows)
    assert any('"client": "127.0.0.1"' in d for d in rows)


def test_smuggling_is_refused_and_traversal_contained(edge):
    """What the probe found holding stays held: a request whose length is said two ways (or
    twice) is 400 and what it hides is never answered; a path out of the viewer's files
    reaches nothing (the control: /etc/passwd is where the test looks for it)."""
    hidden = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    for head in (
        b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
        b"Content-Length: 4\r\nContent-Length: 40\r\n",
        b"Transfer-Encoding : chunked\r\n",
    ):
        answer = raw(
            edge, b"POST /signin HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n0\r\n\r\n" + hidden
        )
        assert answer.startswith(b"HTTP/1.1 400") and answer.count(b"HTTP/1.1 ") == 1, head
    with open("/etc/passwd", "rb") as f:
        assert b"root:" in f.read()
    cookie = signed_in(edge, edge.token)
    for path in (
        "/viewer/../../../../../../etc/passwd",
        "/viewer/..%2F..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/viewer/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/viewer/....//....//....//etc/passwd",
    ):
        answer = raw(
            edge,
            f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Cookie: {sessions.COOKIE}={cookie}\r\n\r\n".encode(),
        )
        assert b"root:" not in answer, path
