"""One worker's part in ``workers: N``: `WorkerRole`, what the supervisor tells a worker.

The supervisor (`sidecar.app.supervisor`) starts each worker as ``python -m
sidecar worker`` with its role as JSON in the environment (`WORKER_ENV`): the
config file and flag overrides to load (the worker loads them itself, as ``run``
does, and again on SIGHUP), the address every worker binds with SO_REUSEPORT,
the run directory holding the shared breaker table and the fallback store's
socket, and the pipe on which the worker reports its private admin and control
addresses once it listens. `WorkerRole.adjust` is applied to every config the
worker loads, so a reload never sees those keys change. Why: docs/workers.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.config import SidecarConfig
from sidecar.config.base import KeyPath

log = logging.getLogger("sidecar")

WORKER_ENV = "THRIFT_SIDECAR_WORKER"
# Files in the supervisor's run directory.
BREAKER_TABLE = "breakers"
LABEL_TABLE = "labels"
STORE_SOCKET = "cache.sock"
# Workers' private admin and control listeners: loopback, any free port.
PRIVATE_ADDRESS = "127.0.0.1:0"
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class WorkerRole:
    """What one worker is told by the supervisor.

    Attributes:
        index: 0 .. count - 1, the ``worker`` label of its metrics.
        count: how many workers the sidecar runs.
        listen: the address every worker binds (the port resolved by the supervisor).
        run_dir: the supervisor's directory: breaker table, store socket.
        report_fd: the pipe to write this worker's addresses to once it listens.
        config_path: the config file, as ``run`` was given it.
        overrides: the flags' key paths and values, as ``run`` was given them.
        shared_breakers: breaker state lives in the run directory's table
            (not with a fleet, whose Redis shares it).
        shared_store: the fallback store is the supervisor's (not with the
            ``redis`` backend, which every worker reaches itself).
        supervisor_pid: the supervisor's process id (PID 1 in a container
            whose entrypoint is ``sidecar run``).
    """

    index: int
    count: int
    listen: str
    run_dir: str
    report_fd: int
    config_path: str | None
    overrides: tuple[tuple[KeyPath, Any], ...]
    shared_breakers: bool
    shared_store: bool
    supervisor_pid: int

    def to_env(self) -> str:
        """The role as the JSON put in `WORKER_ENV`."""
        fields = dict(self.__dict__)
        fields["overrides"] = [[list(path), value] for path, value in self.overrides]
        return json.dumps(fields)

    @classmethod
    def from_env(cls, text: str) -> WorkerRole:
        """The role `to_env` wrote."""
        fields = json.loads(text)
        fields["overrides"] = tuple((tuple(path), value) for path, value in fields["overrides"])
        return cls(**fields)

    @property
    def override_map(self) -> dict[KeyPath, Any]:
        """The overrides as `sidecar.cli.loading.load_checked` takes them."""
        return dict(self.overrides)

    @property
    def breaker_table(self) -> Path:
        """The shared breaker table's file."""
        return Path(self.run_dir) / BREAKER_TABLE

    @property
    def label_table(self) -> Path:
        """The shared method label table's file."""
        return Path(self.run_dir) / LABEL_TABLE

    @property
    def store_socket(self) -> Path:
        """The supervisor's fallback store socket."""
        return Path(self.run_dir) / STORE_SOCKET

    def adjust(self, config: SidecarConfig) -> SidecarConfig:
        """The config as this worker runs it: the shared listen address, private
        admin and control listeners (the supervisor's are the public ones)."""
        update: dict[str, Any] = {"listen": self.listen}
        if config.metrics.listen is not None:
            update["metrics"] = config.metrics.model_copy(update={"listen": PRIVATE_ADDRESS})
        if config.control.listen is not None:
            update["control"] = config.control.model_copy(update={"listen": PRIVATE_ADDRESS})
        return config.model_copy(update=update)

    def orphaned(self) -> bool:
        """Whether the supervisor is gone (this process was handed to another parent)."""
        return os.getppid() != self.supervisor_pid

    def report(self, admin: tuple[str, int] | None, control: tuple[str, int] | None) -> None:
        """Tell the supervisor where this worker's admin and control listeners are."""
        line = json.dumps({"pid": os.getpid(), "admin": admin, "control": control}) + "\n"
        os.write(self.report_fd, line.encode())


def die_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when its parent dies (the supervisor
    killed with SIGKILL leaves no worker behind); a no-op where prctl is missing."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        log.debug("prctl(PR_SET_PDEATHSIG) is not available")
