"""The sidecar the demo runs: its settings, ports, and ``python -m sidecar run`` as a child.

The settings are ``config/demo.yaml`` (shipped in the package as
``sidecar/demo/demo.yaml``) with the demo's ports and the packaged IDL filled
in. The sidecar is started as a user would start it, and read over HTTP.
`stop_on_sigterm` lets the demo stop it on SIGTERM as on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from sidecar.demo.readings import MetricsView

# Seconds to wait for the sidecar to exit on SIGTERM before it is killed.
STOP_TIMEOUT = 15.0


class DemoError(Exception):
    """The demo could not start or lost a part it needs."""


@contextlib.contextmanager
def packaged_demo_settings() -> Iterator[dict[str, Any]]:
    """The demo settings (``config/demo.yaml``, shipped as ``sidecar/demo/demo.yaml``)."""
    resource = importlib.resources.files("sidecar.demo").joinpath("demo.yaml")
    yield dict(yaml.safe_load(resource.read_text(encoding="utf-8")))


def demo_config(
    settings: dict[str, Any], *, listen: str, admin: str, upstream: str, idl: Path
) -> dict[str, Any]:
    """The demo settings with the ports and the packaged IDL filled in."""
    config = dict(settings)
    config["listen"] = listen
    config["idl"] = str(idl)
    config["upstream"] = {**dict(config.get("upstream") or {}), "addresses": [upstream]}
    config["metrics"] = {**dict(config.get("metrics") or {}), "listen": admin}
    config["control"] = {"listen": None}  # the demo needs no runtime control
    return config


class SidecarProcess:
    """``python -m sidecar run --config FILE`` as a child process, with its log in a file."""

    def __init__(self, config_path: Path, log_path: Path, admin_url: str) -> None:
        self.admin_url = admin_url
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run", "--config", str(config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise DemoError(
                    f"the sidecar exited with status {self.proc.returncode} while starting:\n"
                    + self.log_tail()
                )
            url = self.admin_url + "/readyz"
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1.0) as response:
                if response.status == 200:
                    return
            if time.monotonic() > deadline:
                raise DemoError(
                    f"the sidecar was not ready after {timeout:g}s:\n" + self.log_tail()
                )
            time.sleep(0.05)

    def scrape(self) -> MetricsView:
        if self.proc.poll() is not None:
            raise DemoError(
                f"the sidecar exited with status {self.proc.returncode}:\n" + self.log_tail()
            )
        try:
            with urllib.request.urlopen(self.admin_url + "/metrics", timeout=5.0) as response:
                return MetricsView(response.read().decode())
        except (OSError, urllib.error.URLError) as exc:
            raise DemoError(f"cannot read {self.admin_url}/metrics: {exc}") from None

    def stop(self) -> int | None:
        """SIGTERM, wait, kill if it hangs; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt (as Ctrl-C), so the demo cleans up either way."""

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
