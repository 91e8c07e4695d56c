"""A fork server for the Storage SCP's worker processes: import the stack once, fork many.

A fresh interpreter spends ~0.3-1 s importing pydicom, numpy, sqlalchemy and the de-identification
tables before it can receive; every pull starting its workers that way waits for it. The fork
server is one such interpreter, started once per process (`ForkServer.shared`), which imports the
given modules and then forks a worker per request: milliseconds. It is single-threaded, so
forking it is safe (unlike forking the gateway's own, threaded, process), and it never runs our
caller's main module (unlike multiprocessing's fork server). It and its workers end when this
process does: they see their sockets close.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any, BinaryIO

_PID = struct.Struct("<q")
_MAX_MSG = 1 << 20  # a worker's boot message: settings and the pickled handler factory
_REPLY_S = 120.0  # how long a fork may wait for the server (its imports, the first time)
_BOOT = (
    "import io, pickle, sys; f = io.BytesIO(sys.stdin.buffer.read()); "
    "sys.path[:] = pickle.load(f); from gateway.dimse.forkserver import server_main; "
    "server_main(f)"
)


def server_main(boot: BinaryIO) -> None:
    """The fork server: import, then fork one worker per request until the channel closes."""
    ctl_fd, preload = pickle.load(boot)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the workers: no zombies
    for name in preload:
        with contextlib.suppress(Exception):  # a worker that needs it will say what is wrong
            importlib.import_module(name)
    # What was imported stays as it is: the collector need not scan it, nor so write to (and
    # copy) the pages every worker shares with this process.
    gc.freeze()
    ctl = socket.socket(fileno=ctl_fd)
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(ctl, _MAX_MSG, 3)
        except OSError:
            break
        if not msg:
            break  # the parent is gone
        if len(fds) != 3:
            for fd in fds:
                os.close(fd)
            ctl.send(_PID.pack(-1))
            continue
        pid = os.fork()
        if pid == 0:
            _child(ctl, msg, fds)
        for fd in fds:
            os.close(fd)
        ctl.send(_PID.pack(pid))
    os._exit(0)


def _child(ctl: socket.socket, msg: bytes, fds: list[int]) -> None:
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        ctl.close()
        chan_fd, counts_fd, err_fd = fds
        os.dup2(err_fd, 1)  # stdout and stderr: the requesting process's stderr
        os.dup2(err_fd, 2)
        os.close(err_fd)
        target, args = pickle.loads(msg)
        module, _, name = target.partition(":")
        getattr(importlib.import_module(module), name)(chan_fd, counts_fd, *args)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        os._exit(code)


class Forked:
    """A worker forked by the fork server (not our child): the few `subprocess.Popen` methods
    the worker pool uses. Its exit status is not ours to collect: `wait` returns None."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd: int | None = None
        self._gone = False
        try:
            self._fd = os.pidfd_open(pid)  # immune to pid reuse
        except ProcessLookupError:
            self._gone = True
        except (OSError, AttributeError):  # no pidfd (Linux < 5.3): poll the pid instead
            pass

    def wait(self, timeout: float | None = None) -> int | None:
        if self._fd is not None:
            ready, _, _ = select.select([self._fd], [], [], timeout)
            if not ready:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0.0)
            os.close(self._fd)
            self._fd = None
            self._gone = True
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._gone:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                self._gone = True
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0.0)
            time.sleep(0.01)
        return None

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if self._fd is not None:
                signal.pidfd_send_signal(self._fd, sig)
            elif not self._gone:
                os.kill(self.pid, sig)


class ForkServer:
    """One fork server process, importing `preload`; `fork()` asks it for a worker."""

    _shared: ForkServer | None = None
    _shared_lock = threading.Lock()

    def __init__(self, preload: list[str]) -> None:
        self.preload = list(preload)
        self.owner = os.getpid()  # a forked copy of this process must start its own
        self._lock = threading.Lock()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        child_fd = child.fileno()  # the same number in the server (pass_fds)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _BOOT],
                stdin=subprocess.PIPE,
                stdout=2,
                pass_fds=(child.fileno(),),
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        parent.settimeout(_REPLY_S)
        self._ctl = parent
        assert self.process.stdin is not None
        with contextlib.suppress(OSError):  # died at once: fork() will say so
            self.process.stdin.write(
                pickle.dumps(sys.path) + pickle.dumps((child_fd, self.preload))
            )
            self.process.stdin.close()

    @classmethod
    def shared(cls, preload: list[str]) -> ForkServer:
        """This process's fork server, started now (without waiting for its imports) if there
        is none or it died. The modules count when it starts only."""
        with cls._shared_lock:
            server = cls._shared
            if server is not None and server.owner != os.getpid():
                server = None  # inherited through a fork: not ours to use or stop
            if server is None or server.process.poll() is not None:
                if server is not None:
                    server.close()
                server = cls._shared = cls(preload)
            return server

    def fork(self, target: str, args: tuple[Any, ...], chan_fd: int, counts_fd: int) -> Forked:
        """A new process running `target(chan_fd, counts_fd, *args)`, `target` named as
        "module:function" (so this module needs to import no caller); waits for the server's
        imports the first time."""
        msg = pickle.dumps((target, args))
        with self._lock:
            socket.send_fds(self._ctl, [msg], [chan_fd, counts_fd, 2])
            reply = self._ctl.recv(_PID.size)
        if len(reply) != _PID.size or _PID.unpack(reply)[0] <= 0:
            raise OSError("the worker fork server failed")
        return Forked(_PID.unpack(reply)[0])

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop the server (its workers are not affected)."""
        with contextlib.suppress(OSError):
            self._ctl.shutdown(socket.SHUT_RDWR)
        self._ctl.close()
        deadline = time.monotonic() + timeout_s
        while self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
