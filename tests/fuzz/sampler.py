"""Watch the sidecar process during a fuzz run: RSS and open fds (psutil), and whether it exited."""

from __future__ import annotations

import contextlib
import threading

import psutil

from tests.fuzz.report import Usage
from tests.support.sidecar import SidecarProcess

_MB = 1 << 20


class Sampler:
    """Samples the sidecar's RSS and open fds every ``interval`` s in a thread; notes an exit."""

    def __init__(self, sidecar: SidecarProcess, interval: float = 0.05) -> None:
        self._sidecar = sidecar
        self._proc = psutil.Process(sidecar.proc.pid)
        self._interval = interval
        self._stop = threading.Event()
        self.rss = Usage()
        self.fds = Usage()
        self.crashed = ""
        rss, fds = self.sample()
        self.rss.before = self.rss.peak = rss
        self.fds.before = self.fds.peak = fds
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> tuple[float, int]:
        return self._proc.memory_info().rss / _MB, self._proc.num_fds()

    @property
    def alive(self) -> bool:
        return not self.crashed

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            code = self._sidecar.proc.poll()
            if code is not None:
                tail = self._sidecar.log()[-2000:]
                self.crashed = f"exit status {code}; log ends:\n{tail}"
                return
            with contextlib.suppress(psutil.Error):
                rss, fds = self.sample()
                self.rss.peak = max(self.rss.peak, rss)
                self.fds.peak = max(self.fds.peak, fds)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
