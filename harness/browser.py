"""Headless Chromium driven over the DevTools protocol, for tests that need a real browser.

A small client instead of Playwright: Debian's `chromium` plus a websocket is all it takes, and no
browser download. What the viewer test needs: cookies, navigation, every network request with its
status (dedicated workers included: they are auto-attached), waiting until the network is quiet,
page script evaluation, console errors, and PNG screenshots.

    with Browser() as page:
        page.set_cookie("session", value, "http://127.0.0.1:8000/")
        page.goto("http://127.0.0.1:8000/viewer/?StudyInstanceUIDs=...")
        page.wait_idle()
        png = page.screenshot()
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

CHROMIUM = os.environ.get("SPHERE_CHROMIUM", "/usr/bin/chromium")
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--no-first-run",
    "--no-default-browser-check",
    "--mute-audio",
    "--hide-scrollbars",
]


class BrowserError(RuntimeError):
    """Chromium did not start, or a DevTools command failed."""


def chromium_path() -> str | None:
    """The Chromium binary, or None when it is not installed."""
    if Path(CHROMIUM).exists():
        return CHROMIUM
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class Request:
    """One network request as the page (or one of its workers) saw it."""

    url: str
    method: str
    resource_type: str = ""
    status: int | None = None  # None: no response (failed or still pending)
    error: str | None = None
    finished: bool = False
    mime_type: str = ""
    heard: float = field(default_factory=time.monotonic)  # the last event about it


@dataclass
class _Session:
    requests: dict[str, Request] = field(default_factory=dict)


class Browser:
    """One headless Chromium with one page; a context manager."""

    def __init__(
        self,
        *,
        width: int = 1280,
        height: int = 800,
        binary: str | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self.width, self.height = width, height
        self.binary = binary or chromium_path()
        self.timeout_s = timeout_s
        self.requests: list[Request] = []
        self.console: list[str] = []  # console errors, warnings and uncaught exceptions
        self._by_id: dict[str, Request] = {}
        self._ids = itertools.count(1)
        self._pending: dict[int, Future[dict[str, Any]]] = {}
        self._waiters: list[tuple[str, Future[dict[str, Any]]]] = []
        self._lock = threading.Lock()
        self._last_activity = time.monotonic()
        self._proc: subprocess.Popen[bytes] | None = None
        self._profile: tempfile.TemporaryDirectory[str] | None = None
        self._ws: ClientConnection | None = None
        self._reader: threading.Thread | None = None
        self._stack = ExitStack()

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> Browser:
        if self.binary is None:
            raise BrowserError("chromium is not installed (apt-get install chromium)")
        self._profile = tempfile.TemporaryDirectory(
            prefix="sphere-chromium-", ignore_cleanup_errors=True
        )
        profile = Path(self._profile.name)
        self._proc = subprocess.Popen(
            [
                self.binary,
                *FLAGS,
                f"--user-data-dir={profile}",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--window-size={self.width},{self.height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its helpers (renderer, GPU, zygote): one group, ended as one
        )
        try:
            self._attach(profile)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        if self._proc is not None:
            self._end_group(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self._proc.wait(5)
            self._end_group(signal.SIGKILL)  # helpers still writing to the profile
            self._proc.wait()
            self._proc = None  # reaped: its number is not ours to signal again
        if self._reader is not None:
            self._reader.join(5)
        if self._profile is not None:
            # a helper that was killed a moment ago may still have a file open: try a while
            for _ in range(25):
                try:
                    shutil.rmtree(self._profile.name)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.2)
            self._profile.cleanup()  # a leftover temporary folder must not fail a test
            self._profile = None

    def _end_group(self, sig: signal.Signals) -> None:
        assert self._proc is not None
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    def _attach(self, profile: Path) -> None:
        """Find the DevTools port Chromium chose, connect to its page, enable what we watch."""
        assert self._proc is not None
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout_s
        while not port_file.exists() or not port_file.read_text().strip():
            if self._proc.poll() is not None:
                raise BrowserError(f"chromium exited with status {self._proc.returncode}")
            if time.monotonic() > deadline:
                raise BrowserError("chromium did not open its DevTools port")
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        page_ws = _page_websocket(port, deadline)
        self._ws = self._stack.enter_context(
            connect(page_ws, max_size=None, open_timeout=self.timeout_s)
        )
        self._reader = threading.Thread(target=self._read, name="cdp-reader", daemon=True)
        self._reader.start()
        for method in ("Page.enable", "Network.enable", "Runtime.enable"):
            self.send(method)
        self.send(
            "Target.setAutoAttach",
            autoAttach=True,
            waitForDebuggerOnStart=False,  # pausing workers stalls OHIF's start now and then
            flatten=True,
        )
        self.send(
            "Emulation.setDeviceMetricsOverride",
            width=self.width,
            height=self.height,
            deviceScaleFactor=1,
            mobile=False,
        )

    # -- the protocol -------------------------------------------------------------------------

    def send(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        """Send a DevTools command and wait for its result."""
        future = self._post(method, session, params)
        try:
            return future.result(self.timeout_s)
        except TimeoutError:
            raise BrowserError(f"{method}: no answer in {self.timeout_s:g}s") from None

    def _post(self, method: str, session: str | None, params: dict[str, Any]) -> Future:
        assert self._ws is not None
        msg_id = next(self._ids)
        future: Future[dict[str, Any]] = Future()
        with self._lock:
            self._pending[msg_id] = future
        message: dict[str, Any] = {"id": msg_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        self._ws.send(json.dumps(message))
        return future

    def _read(self) -> None:
        assert self._ws is not None
        try:
            for raw in self._ws:
                self._dispatch(json.loads(raw))
        except ConnectionClosed:
            pass
        with self._lock:
            pending, self._pending = self._pending, {}
        for future in pending.values():
            future.set_exception(BrowserError("chromium closed the DevTools connection"))

    def _dispatch(self, msg: dict[str, Any]) -> None:
        if "id" in msg:
            with self._lock:
                future = self._pending.pop(msg["id"], None)
            if future is None:
                return
            if "error" in msg:
                future.set_exception(BrowserError(f"DevTools: {msg['error'].get('message')}"))
            else:
                future.set_result(msg.get("result", {}))
            return
        method, params = msg.get("method", ""), msg.get("params", {})
        self._on_event(method, params, msg.get("sessionId", ""))
        with self._lock:
            ready = [w for w in self._waiters if w[0] == method]
            self._waiters = [w for w in self._waiters if w[0] != method]
        for _, future in ready:
            future.set_result(params)

    def _on_event(self, method: str, params: dict[str, Any], session: str) -> None:
        if method.startswith("Network."):
            self._on_network(method, params, session)
        elif method == "Target.attachedToTarget":
            # A worker: watch its requests too (sent without waiting: we are the reader).
            sid = params["sessionId"]
            self._post("Network.enable", sid, {})
            self._post("Runtime.runIfWaitingForDebugger", sid, {})
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text", "")
            self.console.append(f"exception: {text}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning"):
            args = params.get("args", [])
            self.console.append(
                f"console.{params['type']}: "
                + " ".join(str(a.get("value", a.get("description", ""))) for a in args)
            )

    def _on_network(self, method: str, params: dict[str, Any], session: str) -> None:
        # Request ids are the browser's: a worker's script is announced by the page and
        # finished in the worker's session under the same id.
        key = params.get("requestId", "")
        with self._lock:
            self._last_activity = time.monotonic()
            if method == "Network.requestWillBeSent":
                previous = self._by_id.get(key)
                if previous is not None and "redirectResponse" not in params:
                    return  # the same request seen from a second session
                if previous is not None:
                    previous.status = params["redirectResponse"].get("status")
                    previous.finished = True
                made = Request(
                    url=params["request"]["url"],
                    method=params["request"]["method"],
                    resource_type=params.get("type", ""),
                )
                self._by_id[key] = made
                self.requests.append(made)
                return
            request = self._by_id.get(key)
            if request is None:
                return
            request.heard = self._last_activity
            if method == "Network.responseReceived":
                response = params["response"]
                request.status = response.get("status")
                request.mime_type = response.get("mimeType", "")
            elif method == "Network.loadingFinished":
                request.finished = True
            elif method == "Network.loadingFailed":
                request.finished = True
                request.error = _failure(params)

    def _expect(self, method: str) -> Future[dict[str, Any]]:
        future: Future[dict[str, Any]] = Future()
        with self._lock:
            self._waiters.append((method, future))
        return future

    # -- what a test does ---------------------------------------------------------------------

    def set_cookie(self, name: str, value: str, url: str) -> None:
        """Set a cookie for `url`'s origin, as if the site had set it."""
        result = self.send("Network.setCookie", name=name, value=value, url=url)
        if not result.get("success", True):
            raise BrowserError(f"cookie {name} refused for {url}")

    def cookies(self) -> list[dict[str, Any]]:
        return self.send("Network.getCookies")["cookies"]

    def block(self, *patterns: str) -> None:
        """Fail requests whose URL matches any pattern (`*` wildcards); none unblocks."""
        self.send("Network.setBlockedURLs", urls=list(patterns))

    @contextmanager
    def blocked(self, *patterns: str) -> Iterator[None]:
        """`block` within a `with`, lifted however it ends: a block left behind by a
        failed check fails every later request it matches, in every later test on this page."""
        self.block(*patterns)
        try:
            yield
        finally:
            self.block()

    def goto(self, url: str) -> None:
        """Navigate and wait for the load event."""
        loaded = self._expect("Page.loadEventFired")
        result = self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise BrowserError(f"{url}: {result['errorText']}")
        try:
            loaded.result(self.timeout_s)
        except TimeoutError:
            raise BrowserError(f"{url}: not loaded in {self.timeout_s:g}s") from None

    def evaluate(self, expression: str) -> Any:
        """Run JavaScript in the page (promises awaited) and return its JSON value."""
        result = self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"script failed: {result['exceptionDetails'].get('text')}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout_s: float | None = None) -> Any:
        """Poll a JavaScript expression until it is truthy (in JavaScript); its value (an
        element: True). Truthiness is JavaScript's: an element comes back by value as {}, which
        Python takes for false, so a wait on `querySelector(...) || ...` never ended once the
        element was there."""
        limit = timeout_s or self.timeout_s
        deadline = time.monotonic() + limit
        probe = (
            f"(async () => {{ const v = await ({expression});"
            " return [!!v, v instanceof Node || v]; })()"
        )
        while True:
            truthy, value = self.evaluate(probe)
            if truthy:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"still false after {limit:g}s: {expression}")
            time.sleep(0.1)

    def fill(self, selector: str, value: str) -> None:
        """Type `value` into the input matched by `selector` (React-safe: native setter, events)."""
        script = f"""(() => {{
          const el = document.querySelector({json.dumps(selector)});
          if (!el) return false;
          const proto = Object.getPrototypeOf(el);
          Object.getOwnPropertyDescriptor(proto, 'value').set.call(el, {json.dumps(value)});
          el.dispatchEvent(new Event('input', {{bubbles: true}}));
          el.dispatchEvent(new Event('change', {{bubbles: true}}));
          return true;
        }})()"""
        if not self.evaluate(script):
            raise BrowserError(f"no element matches {selector}")

    def click(self, selector: str) -> None:
        """Click the middle of the visible element matched by `selector` with the mouse, as a
        user does (press and release at that point: whatever is on top there gets it)."""
        box = self.evaluate(
            f"""(() => {{
              const el = document.querySelector({json.dumps(selector)});
              const r = el && el.getBoundingClientRect();
              return r && r.width && r.height ? [r.left + r.width / 2, r.top + r.height / 2] : null;
            }})()"""
        )
        if not box:
            raise BrowserError(f"no visible element matches {selector}")
        x, y = box
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def submit(self, selector: str) -> None:
        """Submit the form matched by `selector` and wait for the page it leads to."""
        loaded = self._expect("Page.loadEventFired")
        script = f"""(() => {{
          const form = document.querySelector({json.dumps(selector)});
          if (!form) return false;
          form.requestSubmit ? form.requestSubmit() : form.submit();
          return true;
        }})()"""
        if not self.evaluate(script):
            raise BrowserError(f"no form matches {selector}")
        try:
            loaded.result(self.timeout_s)
        except TimeoutError:
            raise BrowserError(f"{selector}: no page loaded after submitting") from None

    def forget_requests(self) -> None:
        """Start a fresh list of requests (those in flight are still tracked)."""
        with self._lock:
            self.requests = []

    def pending(self) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if not r.finished]

    def wait_idle(
        self, quiet_s: float = 1.0, timeout_s: float | None = None, stale_s: float = 10.0
    ) -> None:
        """Wait until no request is in flight and none started or ended for `quiet_s`.

        A request nothing was heard of for `stale_s` counts as settled: Chromium does not always
        report the end of a worker's script load to any session. Its status stays None, so a
        test asserting on statuses still sees it."""
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while time.monotonic() < deadline:
            with self._lock:
                now = time.monotonic()
                busy = any(not r.finished and now - r.heard < stale_s for r in self.requests)
                quiet_for = now - self._last_activity
            if not busy and quiet_for >= quiet_s:
                return
            time.sleep(0.05)
        urls = [r.url for r in self.pending()][:5]
        raise BrowserError(f"network still busy after {timeout_s or self.timeout_s:g}s: {urls}")

    def screenshot(self, path: Path | None = None) -> bytes:
        """The viewport as PNG bytes (also written to `path` when given)."""
        data = base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"])
        if path is not None:
            Path(path).write_bytes(data)
        return data


def _failure(params: dict[str, Any]) -> str:
    """Why a request failed, from `Network.loadingFailed`. Chromium leaves `errorText` empty
    for a URL the test blocked (`blockedReason` "inspector"): said so, it is not taken for a
    failed server."""
    if params.get("canceled"):
        return "canceled"
    if reason := params.get("blockedReason"):
        return f"blocked ({reason})"
    return params.get("errorText") or "failed"


def _page_websocket(port: int, deadline: float) -> str:
    """The DevTools websocket of Chromium's first page."""
    import urllib.request

    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                targets = json.load(r)
            pages = [t for t in targets if t.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BrowserError("chromium has no page to drive")
        time.sleep(0.05)
