"""A TCP proxy on loopback between sphere and a peer (Orthanc, S3), for the fault tests and
`make chaos`: counts the connections open at once through it (the most ever seen), and plays
the faults of a network: `drop` (stop answering: open connections cut, new ones closed at once,
counted) until `pass_again`; `cut` (abort what is open, keep accepting); `throttle` (at most so
many bytes a second each way, a slow peer); and, once, to the first connection whose request
matches: `cut_response` (its answer cut after so many bytes) or `answer_once` (answered by the
proxy, e.g. an HTTP 429, and closed)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable

CHUNK = 65536


class CountingProxy:
    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.open = self.most = self.total = self.dropped = self.cuts = self.answered = 0
        self.dropping = False
        self.rate: float | None = None  # bytes a second each way, per connection; None: free
        self._conns: set[socket.socket] = set()
        self._live: set[socket.socket] = set()  # client sockets counted in `open`
        self._lock = threading.Lock()
        # (matches a request, cut its answer after so many bytes, or answer it so): once
        self._once: tuple[Callable[[bytes], bool], int | None, bytes | None] | None = None
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if self.dropping:  # a source that stops answering: closed at once
                with self._lock:
                    self.dropped += 1
                client.close()
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        first, limit = b"", None
        if self._once is not None:
            first = client.recv(CHUNK)  # the request, to match
            limit, reply = self._match(first)
            if reply is not None:
                with contextlib.suppress(OSError):
                    client.sendall(reply)
                client.close()
                return
        try:
            up = socket.create_connection(("127.0.0.1", self.upstream))
            if first:
                up.sendall(first)
        except OSError:
            client.close()
            return
        with self._lock:
            self._count_ended()
            self.open += 1
            self.total += 1
            self.most = max(self.most, self.open)
            self._conns.update((client, up))
            self._live.add(client)
        other = threading.Thread(target=self._pump, args=(up, client, limit), daemon=True)
        other.start()
        self._pump(client, up)
        other.join()
        for s in (client, up):
            s.close()
        with self._lock:
            if client in self._live:
                self._live.discard(client)
                self.open -= 1
            self._conns.difference_update((client, up))

    def _count_ended(self) -> None:
        """Uncount connections whose client has already closed. Their end is in the kernel before
        a new connection that came after it (on loopback a FIN is delivered when sent), though
        this proxy's threads may not have run yet: without this, a busy machine shows two
        connections at once where the client side never had two."""
        for c in list(self._live):
            try:
                ended = c.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
            except BlockingIOError:
                ended = False
            except OSError:
                ended = True
            if ended:
                self._live.discard(c)
                self.open -= 1

    def _match(self, first: bytes) -> tuple[int | None, bytes | None]:
        """The one-time rule for a request starting `first`, taken if it matches: (cut the
        answer after, answer with)."""
        with self._lock:
            if self._once is None or not self._once[0](first):
                return None, None
            _, after, reply = self._once
            self._once = None
            if reply is not None:
                self.answered += 1
        return after, reply

    def _pump(self, src: socket.socket, dst: socket.socket, limit: int | None = None) -> None:
        sent = 0
        try:
            while data := src.recv(CHUNK if self.rate is None else 4096):
                if self.rate is not None:  # a slow peer: each chunk paid for in time
                    time.sleep(len(data) / self.rate)
                if limit is not None and sent + len(data) > limit:  # cut mid-way
                    dst.sendall(data[: limit - sent])
                    with self._lock:
                        self.cuts += 1
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _cut_open(self) -> int:
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        return len(conns) // 2

    def drop(self) -> None:
        """Stop answering: cut what is open, close every new connection at once."""
        self.dropping = True
        self._cut_open()

    def pass_again(self) -> None:
        self.dropping = False

    def cut(self) -> int:
        """Abort the connections open now (an association aborted mid-way); new ones pass.
        Returns how many were cut."""
        n = self._cut_open()
        with self._lock:
            self.cuts += n
        return n

    def cut_response(self, after: int, when: Callable[[bytes], bool]) -> None:
        """Cut the answer to the first request that `when` matches (its first bytes from the
        client) after `after` bytes, as a stream broken mid-way; counted in `cuts`."""
        self._once = (when, after, None)

    def answer_once(self, reply: bytes, when: Callable[[bytes], bool]) -> None:
        """Answer the first request that `when` matches with `reply` and close it, without
        passing it on (a busy peer); counted in `answered`."""
        self._once = (when, None, reply)

    def throttle(self, bytes_per_s: float | None) -> None:
        """At most `bytes_per_s` each way on each connection (None: at full speed again)."""
        self.rate = bytes_per_s

    def close(self) -> None:
        self.sock.close()
        self._cut_open()

    def __enter__(self) -> CountingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
