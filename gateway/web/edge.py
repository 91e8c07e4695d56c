"""What every request meets before a route: two pure ASGI middlewares.

`Edge` (outermost): the client's address and scheme from a proxy's `Forwarded` or
`X-Forwarded-*` headers, only when the peer is one of `trusted_proxies` (else those headers
are ignored everywhere: `deps.base_url`, the cookie's Secure flag); and security headers on
every response (a CSP unless the route set its own, nosniff, no referrer to other sites
(`no-referrer` would make browsers post our own forms with `Origin: null`), no framing).

`Guard` (inside the audit, so what it refuses is audited): 400 for a path with control
characters or a query parameter name that is not ASCII; 403 for a sign-in or sign-out posted
from another origin (login CSRF); a request body limited to `max_body` bytes (413), and on
every route that needs a user the credential checked before a byte of the body is read.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

from fastapi import HTTPException, Request
from starlette.concurrency import run_in_threadpool

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# API answers and the small HTML pages: nothing but inline styles, forms posting here.
DEFAULT_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
)
OPEN_POSTS = ("/signin", "/signout")  # bodies taken without a user (small, limited all the same)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def networks(values: Iterable[str]) -> list[Network]:
    """Addresses or networks ("10.0.0.5", "10.1.0.0/16", "::1") as networks."""
    return [ipaddress.ip_network(v.strip(), strict=False) for v in values]


def _trusted(address: str | None, trusted: list[Network]) -> bool:
    if not address or not trusted:
        return False
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return False
    return any(ip in n for n in trusted)


def _headers(scope: dict[str, Any]) -> dict[str, str]:
    """The request's headers, the first of each name (latin-1, as HTTP has them)."""
    out: dict[str, str] = {}
    for name, value in scope.get("headers", []):
        out.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return out


def _forwarded_clients(headers: dict[str, str]) -> list[str]:
    """The addresses a request passed through, nearest last (RFC 7239 `for=`, else
    X-Forwarded-For)."""
    if "forwarded" in headers:
        found = []
        for element in headers["forwarded"].split(","):
            for pair in element.split(";"):
                name, _, value = pair.strip().partition("=")
                if name.lower() == "for":
                    value = value.strip().strip('"')
                    if value.startswith("["):  # "[2001:db8::1]:4711"
                        value = value[1:].partition("]")[0]
                    elif value.count(":") == 1:  # "192.0.2.60:8080"
                        value = value.partition(":")[0]
                    found.append(value)
        return found
    return [v.strip() for v in headers.get("x-forwarded-for", "").split(",") if v.strip()]


class Edge:
    def __init__(self, app: Any, *, trusted_proxies: Iterable[str] = ()) -> None:
        self.app = app
        self.trusted = networks(trusted_proxies)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        peer = (scope.get("client") or (None,))[0]
        if _trusted(peer, self.trusted):
            scope.setdefault("state", {})["trusted_proxy"] = True
            # The client is the nearest address that is not one of our proxies.
            for address in reversed(_forwarded_clients(_headers(scope))):
                if not _trusted(address, self.trusted):
                    scope["client"] = (address, 0)
                    break

        async def secured(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                if b"content-security-policy" not in names:
                    headers.append((b"content-security-policy", DEFAULT_CSP.encode()))
                headers += [h for h in SECURITY_HEADERS if h[0] not in names]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, secured)


def trusted_proxy(request: Request) -> bool:
    """Whether this request came through a configured proxy (its forwarded headers count)."""
    return bool(request.scope.get("state", {}).get("trusted_proxy"))


class Guard:
    """`current_user(request)` raises the refusal (401, 429) of a request without a user;
    `origin(request)` is this server's origin as the client sees it."""

    def __init__(
        self,
        app: Any,
        *,
        max_body: int,
        current_user: Callable[[Request], Any],
        origin: Callable[[Request], str],
    ) -> None:
        self.app = app
        self.max_body = max_body
        self.current_user = current_user
        self.origin = origin

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        problem = _bad_input(scope)
        if problem:
            await _answer(send, 400, problem)
            return
        headers = _headers(scope)
        path = scope["path"]
        if scope["method"] == "POST" and path in OPEN_POSTS and not self._same_origin(scope):
            await _answer(send, 403, "cross-origin sign-in refused")
            return
        length = headers.get("content-length")
        if length is not None and not length.strip().isdigit():
            await _answer(send, 400, "malformed Content-Length")
            return
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        if not chunked and not int(length or 0):
            await self.app(scope, receive, send)
            return
        if path not in OPEN_POSTS:  # who asks is known before a byte of the body is read
            try:
                await run_in_threadpool(self.current_user, Request(scope))
            except HTTPException as e:
                await _answer(send, e.status_code, str(e.detail), e.headers)
                return
        if length is not None and int(length) > self.max_body:
            await _answer(send, 413, f"a request body may be {self.max_body} bytes at most")
            return
        await self.app(scope, _limited(receive, self.max_body), send)

    def _same_origin(self, scope: dict[str, Any]) -> bool:
        """Whether a browser form came from this site: its Origin names this server (a
        client that sends no Origin, no browser, is let through) and Sec-Fetch-Site agrees."""
        headers = _headers(scope)
        if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return False
        origin = headers.get("origin")
        if origin is None:
            return True
        ours, theirs = urlsplit(self.origin(Request(scope))), urlsplit(origin)
        return (theirs.scheme, theirs.netloc) == (ours.scheme, ours.netloc)


def _limited(receive: Any, most: int) -> Any:
    """`receive`, refusing a (chunked) body that grows past `most` bytes: 413."""
    seen = 0

    async def limited() -> dict[str, Any]:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > most:
                raise HTTPException(413, f"a request body may be {most} bytes at most")
        return message

    return limited


def _bad_input(scope: dict[str, Any]) -> str | None:
    """Why a request's path or query cannot be taken (a 400), or None."""
    if _CONTROL.search(scope["path"]):
        return "the path holds control characters"
    query = scope.get("query_string", b"")
    for pair in query.split(b"&"):
        name = unquote_to_bytes(pair.partition(b"=")[0].replace(b"+", b" "))
        if not name.isascii() or _CONTROL.search(name.decode("ascii")):
            return "query parameter names must be printable ASCII"
    return None


async def _answer(
    send: Any, status: int, detail: str, headers: Mapping[str, str] | None = None
) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),  # a body left unread is not taken for the next request
    ]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
