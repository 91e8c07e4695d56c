"""A TCP proxy on loopback for the tests: counts the connections open at once through it (the
most ever seen), and can stop answering (`drop`: open connections cut, new ones closed at once,
counted) until told to pass again."""

from __future__ import annotations

import contextlib
import socket
import threading


class CountingProxy:
    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.open = self.most = self.total = self.dropped = 0
        self.dropping = False
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
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
        try:
            up = socket.create_connection(("127.0.0.1", self.upstream))
        except OSError:
            client.close()
            return
        with self._lock:
            self.open += 1
            self.total += 1
            self.most = max(self.most, self.open)
            self._conns.update((client, up))
        done = threading.Event()

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            done.set()

        other = threading.Thread(target=pump, args=(up, client), daemon=True)
        other.start()
        pump(client, up)
        other.join()
        for s in (client, up):
            s.close()
        with self._lock:
            self.open -= 1
            self._conns.difference_update((client, up))

    def drop(self) -> None:
        """Stop answering: cut what is open, close every new connection at once."""
        self.dropping = True
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def pass_again(self) -> None:
        self.dropping = False

    def close(self) -> None:
        self.sock.close()
