"""Sidecar processes for the tests, forked from one interpreter that has imported the sidecar.

Every `run_sidecar` used to start ``python -m sidecar run`` afresh, and a
start costs about 0.85 s of CPU, 0.6 s of it imports (pydantic and the config
models, redis-py through pybreaker, the sidecar's own modules); after them,
the sidecar is ready in about 0.04 s. The integration tests start two
sidecars a test on average, so imports were most of the suite's CPU.

The zygote is a process started once per test session (`Zygote`, run as
``python -m tests.support.zygote``, with the environment a sidecar would
get): it imports what ``sidecar run`` imports and then waits on a Unix
socket. For each request (argument vector, environment, working directory,
open-file limit, and the output file as a passed descriptor) it forks. The
child takes the request's environment, directory and output, closes every
other descriptor, and runs the same entry point as ``python -m sidecar``
(`sidecar.cli.main`); its exit status is the command's. The zygote sends
back the child's PID, reaps it, and sends its exit status on the same
connection. `ForkedProcess` is the test's handle: the subset of
`subprocess.Popen` the tests use (``pid``, ``poll``, ``wait``,
``returncode``, ``send_signal``, ``kill``, ``terminate``).

What a forked sidecar shares with the zygote and a fresh one would not: the
modules were imported under the zygote's environment (only ``SIDECAR_*``
and the process's own settings differ between tests, and the sidecar reads
those when it runs, not at import), and the hash seed. `run_sidecar` starts
a real ``python -m sidecar`` when a test asks for a command prefix or an
environment variable Python reads at start-up (``PYTHON*``). tests/test_cli.py
(but for its bad configs, which it forks: 80 runs that exit at once) and the image
test run the command as users do.

The zygote is single-threaded when it forks: a child of a threaded process
could inherit a lock some other thread held. It learns of exits through
SIGCHLD, with `signal.set_wakeup_fd` waking its `select`. Its children
get SIGTERM when it dies (``PR_SET_PDEATHSIG``): it ends with the test
session, and a zygote killed outright leaves no sidecar behind.
"""

from __future__ import annotations

import array
import atexit
import contextlib
import ctypes
import json
import os
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

# What ``sidecar run`` imports before it serves (its command module, the app and
# the admin server); `main` imports them before it forks.
PRELOAD = ("sidecar.cli", "sidecar.cli.serving", "sidecar.app", "sidecar.admin")
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_LENGTH = struct.Struct(">I")
_STATUS = struct.Struct(">i")


def _send_frame(sock: socket.socket, data: bytes, fds: list[int] | None = None) -> None:
    frame = _LENGTH.pack(len(data)) + data
    if fds:
        sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendall(frame)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("the zygote's connection closed")
        data += chunk
    return data


def _recv_request(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One request and the descriptors passed with it."""
    fds = array.array("i")
    head, ancillary, _, _ = sock.recvmsg(_LENGTH.size, socket.CMSG_SPACE(4 * fds.itemsize))
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    if len(head) < _LENGTH.size:
        head += _recv_exact(sock, _LENGTH.size - len(head))
    (size,) = _LENGTH.unpack(head)
    return json.loads(_recv_exact(sock, size)), list(fds)


# The zygote


def _run_child(request: dict[str, Any], output: int, errors: int) -> None:
    """In the forked child: become the requested ``sidecar`` command, then exit."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        # Ended with the zygote, whatever ends it (a SIGKILL leaves it no time to).
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != request["zygote"]:
            os._exit(1)  # it died before the line above
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(output, 1)
        os.dup2(errors, 2)
        os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        limit = request.get("open_files")
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = [str(Path(sys.modules["sidecar"].__file__ or "sidecar").parent / "__main__.py")]
        sys.argv += request["args"]
        from sidecar.cli import main

        try:
            main(request["args"], prog_name="sidecar")
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        # What the interpreter does on its way out, then out without unwinding the
        # zygote's frames: its non-daemon threads joined, its atexit functions run
        # (those of modules imported in the zygote too, as a fresh process has them).
        try:
            threading._shutdown()  # type: ignore[attr-defined]
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main(path: str) -> None:
    """Serve fork requests on the Unix socket ``path`` until stdin closes."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    # Forking a process with other threads could hand a child a lock one of them held.
    if threading.active_count() != 1:
        raise RuntimeError(f"threads started by the imports: {threading.enumerate()}")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: dict[int, socket.socket] = {}  # pid -> the connection that asked for it
    print("ready", flush=True)
    try:
        while True:
            readable, _, _ = select.select([listener, wake_r, sys.stdin], [], [])
            if sys.stdin in readable and not sys.stdin.buffer.read1(1):
                return  # the test session ended
            if wake_r in readable:
                os.read(wake_r, 512)
            while children:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                conn = children.pop(pid, None)
                if conn is not None:
                    code = os.waitstatus_to_exitcode(status)
                    with contextlib.suppress(OSError):
                        conn.sendall(_STATUS.pack(code))
                    conn.close()
            if listener in readable:
                conn, _ = listener.accept()
                request, fds = _recv_request(conn)
                request["zygote"] = os.getpid()
                pid = os.fork()
                if pid == 0:
                    _run_child(request, fds[0], fds[-1])
                for fd in fds:
                    os.close(fd)
                conn.sendall(_STATUS.pack(pid))
                children[pid] = conn
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# The tests' side


class ForkedProcess:
    """A sidecar forked by the zygote, handled like the `subprocess.Popen` it replaces."""

    def __init__(self, pid: int, conn: socket.socket, args: list[str]) -> None:
        self.pid = pid
        self.args = args
        self.returncode: int | None = None
        self._conn = conn
        self._status = b""

    def _read_status(self, timeout: float | None) -> bool:
        """Read the exit status if it arrives within ``timeout`` (None: wait)."""
        if self.returncode is not None:
            return True
        readable, _, _ = select.select([self._conn], [], [], timeout)
        while readable:
            chunk = self._conn.recv(_STATUS.size - len(self._status))
            if not chunk:
                raise RuntimeError(f"the zygote lost sidecar {self.pid}")
            self._status += chunk
            if len(self._status) == _STATUS.size:
                (self.returncode,) = _STATUS.unpack(self._status)
                self._conn.close()
                return True
            readable, _, _ = select.select([self._conn], [], [], timeout)
        return False

    def poll(self) -> int | None:
        self._read_status(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._read_status(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """The session's zygote process, started on first use with ``env``."""

    def __init__(self, env: dict[str, str]) -> None:
        self._dir = tempfile.mkdtemp(prefix="sidecar-zygote-")
        self.path = os.path.join(self._dir, "fork.sock")
        self.env = dict(env)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.zygote", self.path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=self.env,
            text=True,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the sidecar zygote did not start (exit {self._proc.poll()})")
        self._lock = threading.Lock()

    def fork(
        self,
        args: list[str],
        env: dict[str, str],
        cwd: Path,
        output: int,
        open_files: int | None = None,
        errors: int | None = None,
    ) -> ForkedProcess:
        """``sidecar ARGS`` in a child of the zygote, its standard output to the descriptor
        ``output``, its standard error to ``errors`` (None: ``output`` too)."""
        request = {"args": args, "env": env, "cwd": str(cwd), "open_files": open_files}
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with self._lock:
            conn.connect(self.path)
            fds = [output] if errors is None else [output, errors]
            _send_frame(conn, json.dumps(request).encode(), fds)
            (pid,) = _STATUS.unpack(_recv_exact(conn, _STATUS.size))
        return ForkedProcess(pid, conn, ["sidecar", *args])

    @property
    def pid(self) -> int:
        return self._proc.pid

    def close(self) -> None:
        """End the zygote (it kills sidecars still running) and remove its socket."""
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        for leftover in (self.path, self._dir):
            with contextlib.suppress(OSError):
                (os.unlink if leftover == self.path else os.rmdir)(leftover)


if __name__ == "__main__":
    main(sys.argv[1])
