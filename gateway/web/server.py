"""uvicorn as `sphere serve` (and the tests) run it.

uvicorn bounds an idle keep-alive connection but neither a request's headers nor its body: a
client sending a byte a second holds a connection for ever (slowloris). `TimedProtocol` is its
httptools protocol with two deadlines: the headers within `header_timeout_s` of the connection
(or of the previous answer), the body within `body_timeout_s` of the headers; past either the
connection is closed. Forwarded headers are left to `gateway.web.edge` (trusted proxies only):
uvicorn's own handling, which trusts 127.0.0.1 by default, is off.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from core.settings import WebOptions


class TimedProtocol(HttpToolsProtocol):
    header_timeout_s = 10.0
    body_timeout_s = 30.0
    _deadline: asyncio.TimerHandle | None = None

    # asyncio declares BaseTransport; uvicorn's override (and this) take the Transport it gets
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._arm(None)
        super().connection_lost(exc)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._arm(self.body_timeout_s)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._arm(None)  # the answer may take what it takes: the app bounds its own work

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The next request's headers, unless it is in already (pipelined: uvicorn has just
        # started it, and its answer may take what any answer takes).
        if not self.transport.is_closing() and self.cycle.response_complete:
            self._arm(self.header_timeout_s)

    def _arm(self, seconds: float | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = None if seconds is None else self.loop.call_later(seconds, self._cut)

    def _cut(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()


def protocol(web: WebOptions) -> type[TimedProtocol]:
    """`TimedProtocol` with the deadlines of these settings."""
    return type(
        "Timed",
        (TimedProtocol,),
        {"header_timeout_s": web.header_timeout_s, "body_timeout_s": web.body_timeout_s},
    )


def uvicorn_options(web: WebOptions, *, workers: int = 1) -> dict[str, Any]:
    """uvicorn's settings for this server (worker processes import the protocol by name)."""
    return {
        "http": "gateway.web.server:EnvironmentProtocol" if workers > 1 else protocol(web),
        "proxy_headers": False,
        "timeout_keep_alive": 5,
        "access_log": False,  # every request is in the audit trail already
        "log_config": None,  # its lines go to ours (gateway.logs): one format, one level
    }


def __getattr__(name: str) -> Any:
    if name == "EnvironmentProtocol":  # in a worker process: the deadlines from SPHERE_*
        from core.settings import Settings

        return protocol(Settings().web)
    raise AttributeError(name)
