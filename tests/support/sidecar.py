"""Run a real sidecar for tests: as a subprocess (the CLI) or in a thread (the app).

- `run_sidecar(...)` starts ``python -m sidecar run`` with a YAML config on
  free loopback ports, waits for ``/readyz``, and stops it with SIGTERM by its
  PID. Use it wherever a user would run the process: signals, exit codes,
  logs, metrics over HTTP.
- `SidecarThread` runs `sidecar.app.Sidecar` on its own event loop in a
  background thread, so a test can look inside (breakers, stores) and call
  into the loop with `SidecarThread.call`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from prometheus_client.parser import text_string_to_metric_families

from sidecar.app import Sidecar
from sidecar.config import SidecarConfig, load_config
from sidecar.testing import ports
from tests.support.wait import wait_until
from tests.support.zygote import ForkedProcess, Zygote

REPO_ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (`sidecar.testing.ports`)."""
    return ports.free_port("127.0.0.1")


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body) of a GET; HTTP errors are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples by (name, sorted labels), parsed with prometheus_client's own parser."""
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


class Metrics:
    """A parsed scrape with helpers to read values by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = parse_metrics(text)

    def value(self, name: str, **labels: str) -> float:
        """The value of one sample (0 when absent); labels not given must match any."""
        return sum(self.matching(name, **labels).values())

    def matching(self, name: str, **labels: str) -> dict[tuple[tuple[str, str], ...], float]:
        found = {}
        for (sample_name, sample_labels), value in self.samples.items():
            if sample_name != name:
                continue
            as_dict = dict(sample_labels)
            if all(as_dict.get(k) == v for k, v in labels.items()):
                found[sample_labels] = value
        return found


def base_config(upstreams: list[str], **overrides: Any) -> dict[str, Any]:
    """A config dict on free loopback ports; ``overrides`` are merged in (nested dicts too)."""
    config: dict[str, Any] = {
        "listen": f"127.0.0.1:{free_port()}",
        "upstream": {"addresses": list(upstreams)},
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        # Its default (127.0.0.1:9465) is one port for every sidecar of a machine.
        "control": {"listen": f"127.0.0.1:{free_port()}"},
        "drain_timeout": "5s",
    }
    _merge(config, overrides)
    return config


def merged(*configs: dict[str, Any]) -> dict[str, Any]:
    """Configs merged left to right (nested dicts too) into a new dict."""
    out: dict[str, Any] = {}
    for config in configs:
        _merge(out, config)
    return out


def _merge(into: dict[str, Any], extra: dict[str, Any]) -> None:
    """Merge ``extra`` into ``into``; nested dicts are copied, never shared."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        elif isinstance(value, dict):
            into[key] = {}
            _merge(into[key], value)
        else:
            into[key] = value


def sidecar_environ() -> dict[str, str]:
    """The environment a sidecar of `run_sidecar` starts with, before a test's own settings."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    environ["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + environ.get("PYTHONPATH", "")
    return environ


# Sidecars are forked from a zygote that has imported the sidecar (tests/support/zygote.py),
# unless THRIFT_SIDECAR_TEST_FORK=0: then each is a fresh ``python -m sidecar``.
FORK = os.environ.get("THRIFT_SIDECAR_TEST_FORK", "1") != "0"
_zygotes: list[Zygote] = []
_zygote_lock = threading.Lock()


def zygote() -> Zygote:
    """The session's zygote, started on first use and ended when the session ends."""
    with _zygote_lock:
        if not _zygotes:
            _zygotes.append(Zygote(sidecar_environ()))
            atexit.register(_zygotes[0].close)
        return _zygotes[0]


@dataclass
class SidecarProcess:
    """A sidecar process started by `run_sidecar`."""

    proc: subprocess.Popen[str] | ForkedProcess
    config: dict[str, Any]
    config_path: Path
    log_path: Path
    _log_file: Any = field(repr=False, default=None)
    _kept_log: str | None = field(repr=False, default=None)

    @property
    def address(self) -> str:
        return str(self.config["listen"])

    @property
    def admin(self) -> str:
        return "http://" + str(self.config["metrics"]["listen"])

    def metrics(self) -> Metrics:
        status, body = http_get(self.admin + "/metrics")
        assert status == 200, body
        return Metrics(body)

    def state(self) -> dict[str, Any]:
        status, body = http_get(self.admin + "/state")
        assert status == 200, body
        return dict(json.loads(body))

    def log(self) -> str:
        """The sidecar's output so far (kept when `run_sidecar` removes its directory)."""
        if self._kept_log is not None:
            return self._kept_log
        return self.log_path.read_text(errors="replace")

    def keep_log(self) -> None:
        """Read the log into memory, so that it outlives the process's directory."""
        self._kept_log = self.log_path.read_text(errors="replace")

    def write_config(self, config: dict[str, Any] | str) -> None:
        """Replace the config file (then send SIGHUP to reload it)."""
        text = config if isinstance(config, str) else yaml.safe_dump(config)
        self.config_path.write_text(text)

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then wait; returns the exit status (kills after the timeout)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log_file is not None:
            self._log_file.close()
        return int(self.proc.returncode)


@contextlib.contextmanager
def run_sidecar(
    upstreams: list[str],
    *,
    config: dict[str, Any] | None = None,
    args: list[str] | None = None,
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
    ready_timeout: float = 20.0,
    open_files: int | None = None,
    prefix: list[str] | None = None,
) -> Iterator[SidecarProcess]:
    """Start ``python -m sidecar run --config FILE`` and stop it on exit.

    Args:
        upstreams: upstream addresses (``host:port``).
        config: extra config merged into `base_config`.
        args: extra command-line arguments.
        env: extra environment variables (the rest of SIDECAR_* is cleared).
        wait_ready: wait until ``/readyz`` answers 200.
        open_files: the process's open-file limit (``RLIMIT_NOFILE``, soft and
            hard), set in the child before it runs; None keeps this process's.
        prefix: a command the sidecar runs under (``unshare --fork --pid``).
    """
    full = base_config(upstreams, **(config or {}))
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-test-"))
    config_path = workdir / "sidecar.yaml"
    config_path.write_text(yaml.safe_dump(full))
    log_path = workdir / "sidecar.log"
    log_file = log_path.open("w")
    environ = sidecar_environ()
    environ.update(env or {})
    cmd = [
        *(prefix or []),
        sys.executable,
        "-m",
        "sidecar",
        "run",
        "--config",
        str(config_path),
        *(args or []),
    ]

    def limit_open_files() -> None:  # runs in the child, between fork and exec
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

    proc: subprocess.Popen[str] | ForkedProcess
    if prefix is None and not any(k.startswith("PYTHON") for k in env or {}) and FORK:
        args_ = cmd[cmd.index("sidecar") + 1 :]
        proc = zygote().fork(args_, environ, workdir, log_file.fileno(), open_files)
    else:
        proc = subprocess.Popen(
            cmd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=environ,
            cwd=workdir,
            text=True,
            preexec_fn=limit_open_files if open_files is not None else None,
        )
    sidecar = SidecarProcess(proc, full, config_path, log_path, log_file)
    try:
        if wait_ready:

            def ready() -> bool:
                if proc.poll() is not None:
                    raise RuntimeError(f"sidecar exited with {proc.returncode}:\n{sidecar.log()}")
                try:
                    return http_get(sidecar.admin + "/readyz", timeout=1.0)[0] == 200
                except OSError:
                    return False

            wait_until(ready, timeout=ready_timeout, message="sidecar /readyz")
        yield sidecar
    finally:
        sidecar.stop()
        sidecar.keep_log()
        shutil.rmtree(workdir, ignore_errors=True)


class SidecarThread:
    """A `Sidecar` on its own event loop in a background thread.

    Use as a context manager; ``.sidecar`` is the app, ``.address`` its
    Thrift address, ``.admin`` its admin URL.
    """

    def __init__(self, config: SidecarConfig | dict[str, Any], **sidecar_kwargs: Any) -> None:
        if isinstance(config, dict):
            with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
                yaml.safe_dump(config, f)
            try:
                config = load_config(f.name, environ={})
            finally:
                Path(f.name).unlink()
        self.config = config
        self._kwargs = sidecar_kwargs
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.sidecar: Sidecar | None = None

    def __enter__(self) -> SidecarThread:
        self._thread.start()
        self.sidecar = Sidecar(self.config, **self._kwargs)
        self.run(self.sidecar.start())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.sidecar is not None:
                self.run(self.sidecar.stop(drain_timeout=2.0), timeout=15.0)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            self.loop.close()

    @property
    def address(self) -> str:
        assert self.sidecar is not None
        assert self.sidecar.listen_address is not None
        host, port = self.sidecar.listen_address
        return f"{host}:{port}"

    @property
    def admin(self) -> str:
        assert self.sidecar is not None
        assert self.sidecar.admin_address is not None
        host, port = self.sidecar.admin_address
        return f"http://{host}:{port}"

    def run(self, coro: Any, timeout: float = 10.0) -> Any:
        """Run a coroutine on the sidecar's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run a plain function on the sidecar's loop thread and return its result."""
        result: Future[T] = Future()

        def invoke() -> None:
            try:
                result.set_result(fn())
            except BaseException as exc:
                result.set_exception(exc)

        self.loop.call_soon_threadsafe(invoke)
        return result.result(timeout)

    def metrics(self) -> Metrics:
        status, body = http_get(self.admin + "/metrics")
        assert status == 200, body
        return Metrics(body)
