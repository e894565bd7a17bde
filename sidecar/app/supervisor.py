"""``workers: N``: the supervisor process that runs N workers on one port.

`supervise` is what ``sidecar run`` does when ``workers`` is more than 1:

1. it binds ``listen`` with SO_REUSEPORT (resolving port 0) and keeps that
   socket bound, not listening, so the port stays ours; every worker binds the
   same address with SO_REUSEPORT and listens, and the kernel spreads new
   connections over their listeners;
2. it creates the run directory: the breaker table every worker maps
   (`sidecar.workers.breaker_table`; not in fleet mode, where Redis shares
   breakers) and the fallback store's socket (`sidecar.fallback.shared`: the
   configured memory or SQLite store lives here, in the supervisor; the
   ``redis`` backend is reached by each worker itself);
3. it starts each worker as ``python -m sidecar worker`` with its
   `sidecar.app.worker.WorkerRole` in the environment, and waits for each to
   report its private admin and control addresses;
4. it serves ``metrics.listen`` and ``control.listen`` for all workers
   (`sidecar.admin.workers`);
5. SIGHUP is sent on to every worker (each reloads the file); SIGTERM or
   SIGINT to every worker, which drain as one sidecar does; the supervisor
   exits when they have, 0 when every drain was clean;
6. a worker that exits on its own is logged and started again, after a
   pause that doubles from `RESTART_PAUSE` up to `MAX_RESTART_PAUSE`.

Why one supervisor and these mechanisms: docs/workers.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sidecar import __version__
from sidecar.admin.workers import WorkersAdminServer, WorkersControlServer, WorkerView
from sidecar.app import build
from sidecar.app.lifecycle import signal_handlers
from sidecar.app.worker import BREAKER_TABLE, LABEL_TABLE, STORE_SOCKET, WORKER_ENV, WorkerRole
from sidecar.config import SidecarConfig, split_address
from sidecar.config.base import KeyPath
from sidecar.config.model import worker_count
from sidecar.fallback.shared_host import StoreHost
from sidecar.fallback.store import FallbackStore
from sidecar.proxy.bind import bind_address
from sidecar.workers.breaker_table import BreakerTable
from sidecar.workers.label_table import LabelTable

log = logging.getLogger("sidecar")

# Seconds a worker has to start listening and report.
START_TIMEOUT = 60.0
# Seconds, on top of drain_timeout, that workers have to exit after SIGTERM
# before they are killed.
EXIT_GRACE = 15.0
# Pause before a worker that exited is started again; doubles while it keeps
# exiting within `STABLE_FOR` of starting.
RESTART_PAUSE = 0.5
MAX_RESTART_PAUSE = 30.0
STABLE_FOR = 10.0


def reserve_port(listen: str) -> tuple[socket.socket, str]:
    """Bind ``listen`` with SO_REUSEPORT, not listening: the port (port 0 resolved) is
    then ours for the workers' listeners. Returns the socket and ``host:port``.

    Raises:
        OSError: the address cannot be bound (another program listens on it).
    """
    host, port = split_address(listen)
    try:
        sock = bind_address(host, port, reuse_port=True)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise OSError(
            exc.errno, f"cannot listen for Thrift clients on {listen} (listen): {reason}"
        ) from exc
    bound_port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return sock, f"{shown}:{bound_port}"


def run_dir_base() -> str | None:
    """Where the run directory goes: /dev/shm when usable (the breaker table is
    then memory alone), else the system's temporary directory."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None


def _address(reported: list[Any] | None) -> tuple[str, int] | None:
    """A ``[host, port]`` a worker reported, as an address."""
    return (str(reported[0]), int(reported[1])) if reported else None


class WorkerProcess:
    """One worker: its process, its view for the admin endpoint, its restarts."""

    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self.supervisor = supervisor
        self.view = WorkerView(index)
        self.process: asyncio.subprocess.Process | None = None
        self.started_at = 0.0
        self.pause = RESTART_PAUSE

    async def start(self) -> None:
        """Start the process and wait until it reports its addresses.

        Raises:
            RuntimeError: it exited first, or did not report within `START_TIMEOUT`.
        """
        sup = self.supervisor
        read_fd, write_fd = os.pipe()
        role = WorkerRole(
            index=self.view.index,
            count=sup.count,
            listen=sup.listen,
            run_dir=str(sup.run_dir),
            report_fd=write_fd,
            config_path=sup.config_path,
            overrides=tuple(sup.overrides.items()),
            shared_breakers=sup.table is not None,
            shared_store=sup.host is not None,
            supervisor_pid=os.getpid(),
        )
        env = {**os.environ, WORKER_ENV: role.to_env()}
        self.started_at = time.monotonic()  # a start that fails at once counts as a short life
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "sidecar",
                "worker",
                env=env,
                pass_fds=(write_fd,),
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            os.close(write_fd)
        self.view.pid = self.process.pid
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        pipe = os.fdopen(read_fd, "rb", buffering=0)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
        try:
            line = await asyncio.wait_for(reader.readline(), START_TIMEOUT)
        except TimeoutError:
            raise RuntimeError(
                f"worker {self.view.index} (pid {self.process.pid}) did not start "
                f"within {START_TIMEOUT:g}s"
            ) from None
        finally:
            transport.close()
        if not line:
            code = await self.process.wait()
            raise RuntimeError(f"worker {self.view.index} exited with status {code} on start-up")
        report: dict[str, Any] = json.loads(line)
        self.view.admin = _address(report["admin"])
        self.view.control = _address(report["control"])

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the worker if it runs."""
        process = self.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)

    async def watch(self) -> None:
        """Start the worker again whenever it exits while the supervisor is not stopping."""
        sup = self.supervisor
        while True:
            assert self.process is not None
            code = await self.process.wait()
            pid = self.view.pid
            self.view.pid = None
            self.view.admin = self.view.control = None
            if sup.stopping:
                return
            lived = time.monotonic() - self.started_at
            self.pause = (
                RESTART_PAUSE if lived >= STABLE_FOR else min(MAX_RESTART_PAUSE, self.pause * 2)
            )
            log.error(
                "worker %d (pid %s) exited with status %s; starting it again in %.1fs",
                self.view.index,
                pid,
                code,
                self.pause,
            )
            try:
                await asyncio.wait_for(sup.stop_requested.wait(), self.pause)
                return  # asked to stop meanwhile
            except TimeoutError:
                pass
            try:
                await self.start()
                self.view.restarts += 1
            except (RuntimeError, OSError) as exc:  # OSError: the process could not be made
                log.error("worker %d not started again: %s", self.view.index, exc)
                self.signal(signal.SIGKILL)  # one that started but did not report; tried again


class Supervisor:
    """The supervisor of one sidecar's workers (see the module docstring).

    Args:
        config: the checked config (``workers`` more than 1).
        config_path: the config file, for the workers to load.
        overrides: the flags' key paths and values, for the workers to load.
    """

    def __init__(
        self, config: SidecarConfig, config_path: str | None, overrides: dict[KeyPath, Any]
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.overrides = overrides
        self.count = worker_count(config.workers)
        self.listen = ""
        self.run_dir = Path()
        self.table: BreakerTable | None = None
        self.labels: LabelTable | None = None
        self.store: FallbackStore | None = None
        self.host: StoreHost | None = None
        self.workers = [WorkerProcess(self, i) for i in range(self.count)]
        self.watches: list[asyncio.Task[None]] = []
        self.admin: WorkersAdminServer | None = None
        self.control: WorkersControlServer | None = None
        self.stopping = False
        self.stop_requested = asyncio.Event()
        self._reserved: socket.socket | None = None

    def views(self) -> list[WorkerView]:
        """Every worker as the admin endpoint shows it."""
        return [w.view for w in self.workers]

    def _store_errors(self) -> tuple[tuple[str, int], ...]:
        """(operation, failures so far) of the fallback store held for the workers."""
        return () if self.store is None else self.store.stats().errors

    async def start(self) -> None:
        """Reserve the port, set up shared state, start the workers, serve admin and control.

        Raises:
            OSError: a port cannot be bound.
            RuntimeError: a worker did not start.
            ConfigError: the fallback store cannot be used.
        """
        config = self.config
        self._reserved, self.listen = reserve_port(config.listen)
        self.run_dir = Path(tempfile.mkdtemp(prefix="thrift-sidecar-", dir=run_dir_base()))
        if config.state.redis_url is None:
            self.table = BreakerTable.create(self.run_dir / BREAKER_TABLE)
        limit = config.metrics.max_method_labels
        self.labels = LabelTable.create(self.run_dir / LABEL_TABLE, limit)
        if config.fallback.cache.backend != "redis":
            self.store = build.make_store(config, None)
            self.host = StoreHost(self.store, self.run_dir / STORE_SOCKET)
            await self.host.start()
        results = await asyncio.gather(*(w.start() for w in self.workers), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise failed[0]
        self.watches = [asyncio.create_task(w.watch()) for w in self.workers]
        if config.metrics.listen is not None:
            self.admin = WorkersAdminServer(
                self.views,
                self.count,
                lambda: self.stopping,
                lambda: {"pid": os.getpid(), "run_dir": str(self.run_dir)},
                self._store_errors,
            )
            address = await self.admin.listen(*split_address(config.metrics.listen))
            admin_shown = f", admin on http://{address[0]}:{address[1]}"
        else:
            admin_shown = ""
        if config.control.listen is not None:
            self.control = WorkersControlServer(self.views)
            address = await self.control.listen(*split_address(config.control.listen))
            admin_shown += f", control on http://{address[0]}:{address[1]}"
        log.info(
            "thrift-sidecar %s: %d workers (pids %s) listening on %s%s",
            __version__,
            self.count,
            ", ".join(str(w.view.pid) for w in self.workers),
            self.listen,
            admin_shown,
        )

    def reload(self) -> None:
        """SIGHUP: every worker reads the config file again."""
        if self.stopping:
            log.warning("SIGHUP ignored: shutting down")
            return
        log.info("SIGHUP received: sent on to %d workers", self.count)
        for worker in self.workers:
            worker.signal(signal.SIGHUP)

    async def stop(self) -> bool:
        """Send SIGTERM to every worker, wait for their drains, close the rest.

        Returns:
            True when every worker exited with status 0 (a clean drain).
        """
        self.stopping = True
        self.stop_requested.set()
        for worker in self.workers:
            worker.signal(signal.SIGTERM)
        codes: list[int | None] = []
        deadline = self.config.drain_timeout + EXIT_GRACE
        for worker in self.workers:
            process = worker.process
            if process is None:
                continue
            try:
                codes.append(await asyncio.wait_for(process.wait(), deadline))
            except TimeoutError:
                log.error("worker %d did not exit in %gs: killed", worker.view.index, deadline)
                worker.signal(signal.SIGKILL)
                codes.append(await process.wait())
        for task in self.watches:
            task.cancel()
        await asyncio.gather(*self.watches, return_exceptions=True)
        await self.close()
        clean = all(code == 0 for code in codes)
        log.info("stopped: %d workers exited%s", len(codes), "" if clean else " (not all cleanly)")
        return clean

    async def close(self) -> None:
        """Close what `start` opened, whatever state it reached."""
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                worker.signal(signal.SIGKILL)
                await worker.process.wait()
        if self.admin is not None:
            await self.admin.close()
        if self.control is not None:
            await self.control.close()
        if self.host is not None:
            await self.host.close()
        if self.store is not None:
            await self.store.close()
        if self.table is not None:
            self.table.close()
        if self.labels is not None:
            self.labels.close()
        if self._reserved is not None:
            self._reserved.close()
        if self.run_dir != Path():
            shutil.rmtree(self.run_dir, ignore_errors=True)


async def supervise(
    config: SidecarConfig, config_path: str | None, overrides: dict[KeyPath, Any]
) -> bool:
    """Run ``workers`` worker processes until SIGTERM or SIGINT; see the module docstring.

    Returns:
        True when every worker drained cleanly.
    """
    loop = asyncio.get_running_loop()
    supervisor = Supervisor(config, config_path, overrides)

    def on_stop(name: str) -> None:
        if supervisor.stop_requested.is_set():
            log.info("%s received: already draining", name, extra={"signal": name})
            return
        log.info("%s received: stopping %d workers", name, supervisor.count, extra={"signal": name})
        supervisor.stop_requested.set()

    handlers = {
        signal.SIGTERM: lambda: on_stop("SIGTERM"),
        signal.SIGINT: lambda: on_stop("SIGINT"),
        signal.SIGHUP: supervisor.reload,
    }
    with signal_handlers(loop, handlers):
        try:
            await supervisor.start()
        except BaseException:
            supervisor.stopping = True
            await supervisor.close()
            raise
        await supervisor.stop_requested.wait()
        return await supervisor.stop()
