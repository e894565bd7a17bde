"""``sidecar top``'s loop: scrape ``/metrics`` and ``/state`` over HTTP, redraw once an interval.

Interactive: the screen is cleared and redrawn with plain ANSI codes every
interval; Ctrl-C ends it with status 0. ``--once``: two scrapes one
interval apart, one frame printed, status 0 (1 when the admin port cannot be
read). A scrape that fails while watching is shown and retried.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from typing import TextIO

from sidecar.top.screen import render
from sidecar.top.snapshot import Snapshot
from sidecar.top.table import table

DEFAULT_ADMIN = "127.0.0.1:9464"
CLEAR = "\x1b[H\x1b[2J"
HIDE_CURSOR = "\x1b[?25l"
SHOW_CURSOR = "\x1b[?25h"
# Hosts that mean "every interface" when bound, and are not an address to connect to.
_WILDCARDS = {
    "0.0.0.0": "127.0.0.1",
    "::": "::1",
    "[::]": "[::1]",
    "*": "127.0.0.1",
    "": "127.0.0.1",
}


def default_admin(environ: dict[str, str] | None = None) -> str:
    """The admin URL: from ``SIDECAR_METRICS_LISTEN`` (a wildcard host becomes loopback)."""
    env = os.environ if environ is None else environ
    return admin_url(env.get("SIDECAR_METRICS_LISTEN") or DEFAULT_ADMIN)


def admin_url(address: str) -> str:
    """``http://host:port`` for ``host:port`` or a URL; a wildcard host becomes loopback."""
    if "://" in address:
        return address.rstrip("/")
    host, _, port = address.rpartition(":")
    return f"http://{_WILDCARDS.get(host, host)}:{port}"


def scrape(admin: str, timeout: float = 5.0) -> Snapshot:
    """One reading of the sidecar at ``admin`` (raises OSError or ValueError)."""
    at = time.monotonic()
    with urllib.request.urlopen(admin + "/metrics", timeout=timeout) as response:
        text = response.read().decode("utf-8")
    with urllib.request.urlopen(admin + "/state", timeout=timeout) as response:
        state = json.loads(response.read())
    return Snapshot.from_text(text, state, at)


def once(admin: str, interval: float, out: TextIO) -> int:
    """Two scrapes ``interval`` seconds apart, one frame."""
    try:
        first = scrape(admin)
        time.sleep(interval)
        second = scrape(admin)
    except (OSError, ValueError) as exc:
        print(f"sidecar top: cannot read {admin}: {exc}", file=sys.stderr)
        return 1
    out.write(render(table(first, second), admin))
    out.flush()
    return 0


def watch(admin: str, interval: float, out: TextIO, frames: int | None = None) -> int:
    """Redraw every ``interval`` seconds until Ctrl-C (or ``frames`` frames were drawn)."""
    previous: Snapshot | None = None
    drawn = 0
    out.write(HIDE_CURSOR)
    try:
        while frames is None or drawn < frames:
            started = time.monotonic()
            try:
                current = scrape(admin)
            except (OSError, ValueError) as exc:
                out.write(f"{CLEAR}sidecar top: cannot read {admin}: {exc}\nretrying...\n")
                previous = None
            else:
                if previous is not None:
                    out.write(CLEAR + render(table(previous, current), admin))
                    drawn += 1
                else:
                    out.write(f"{CLEAR}sidecar top: reading {admin} ...\n")
                previous = current
            out.flush()
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        pass
    finally:
        out.write(SHOW_CURSOR + "\n")
        out.flush()
    return 0
