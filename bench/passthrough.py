"""The sidecar with its resilience pipeline cut out: the pass-through path, for comparison.

Runs the real `sidecar.app.Sidecar` (same server, decoders, upstream pool,
seqid rewrite, per-try timeout) but replaces the server's `call_factory`
(`Call`) with a bare forward (`sidecar.proxy.forward`): one attempt, no
breaker, no budget, no retry decision, no fallback cache, no per-call
metrics. `bench/pipeline.py` measures the full sidecar against this to
show what the resilience pipeline costs.

Usage:
    python bench/passthrough.py --listen H:P --upstream H:P --metrics-listen H:P
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

# PYTHONPATH first: a `sidecar` named there wins over this checkout's (speed.py runs
# the script from the compiled build that way, its forward compiled with it); then
# the checkout and this directory (Python put it first: it goes last).
sys.path.remove(str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))

from sidecar.app import Sidecar
from sidecar.cli.serving import run_async
from sidecar.config import load_config
from sidecar.proxy.forward import call_factory


async def serve(listen: str, upstream: str, metrics_listen: str) -> None:
    config = load_config(
        None,
        environ={},
        overrides={
            ("listen",): listen,
            ("upstream", "addresses"): [upstream],
            ("metrics", "listen"): metrics_listen,
            ("control", "listen"): "127.0.0.1:0",  # a port of its own beside other sidecars
            ("log", "level"): "warning",
        },
    )
    sidecar = Sidecar(config)
    await sidecar.start()
    factory = call_factory(sidecar.context.upstreams, config.retry.per_try_timeout)
    sidecar.server.call_factory = factory  # type: ignore[assignment]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await sidecar.stop(drain_timeout=2.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--metrics-listen", required=True)
    args = parser.parse_args()
    run_async(serve(args.listen, args.upstream, args.metrics_listen))


if __name__ == "__main__":
    main()
