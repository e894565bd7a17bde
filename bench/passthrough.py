"""The sidecar with its resilience pipeline cut out: the pass-through path, for comparison.

Runs the real `sidecar.app.Sidecar` (same server, decoders, upstream pool,
seqid rewrite, per-try timeout) but replaces the server's `call_factory` (`Call`) with a bare
forward: one attempt, no breaker, no budget, no retry decision, no fallback
cache, no per-call metrics. `bench/pipeline.py` measures the full sidecar
against this to show what the resilience pipeline costs.

Usage:
    python bench/passthrough.py --listen H:P --upstream H:P --metrics-listen H:P
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

# The checkout this script is in, after PYTHONPATH: a `sidecar` named there comes
# first (speed.py runs this script from the compiled build that way).
sys.path.append(str(Path(__file__).resolve().parents[1]))

from sidecar.app import Sidecar
from sidecar.cli.serving import run_async
from sidecar.config import load_config
from sidecar.errors import UpstreamError
from sidecar.protocol.envelope import MessageType
from sidecar.protocol.framing import Message, Transport
from sidecar.proxy.call import Done
from sidecar.proxy.upstream import UpstreamConnection, UpstreamPool


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
    upstreams = sidecar.context.upstreams
    timeout = config.retry.per_try_timeout

    class Forward:
        """A call reduced to one exchange: the `ReplyHandler` of the stand-in call."""

        __slots__ = ("client_transport", "done", "seqid")

        def __init__(self, message: Message, client_transport: Transport, done: Done) -> None:
            self.client_transport = client_transport
            self.done = done
            self.seqid = message.header.seqid

        def on_reply(self, reply: Message) -> None:
            reply.set_seqid(self.seqid)
            self.done(reply.to_wire(self.client_transport))

        def on_error(self, error: UpstreamError) -> None:
            self.done(None)

        def on_no_reply(self) -> None:
            self.done(None)

    class Started:
        malformed = False  # a bare forward never checks a call

        def __init__(self, message: Message, client_transport: Transport, done: Done) -> None:
            self.message, self.client_transport, self.done = message, client_transport, done

        def start(self) -> None:
            pool = upstreams.pick(self.client_transport)
            conn = pool.idle()
            if conn is None:  # fill the pool once; the benchmark warms up first
                task = asyncio.get_running_loop().create_task(pool.acquire(timeout))
                task.add_done_callback(lambda t: self.send(pool, t.result()))
            else:
                self.send(pool, conn)

        def send(self, pool: UpstreamPool, conn: UpstreamConnection) -> None:
            expires = pool.loop.time() + timeout
            if self.message.header.type == MessageType.ONEWAY:
                conn.send(self.message, None, expires, timeout)
                pool.release(conn, True)
                self.done(None)
            else:
                handler = Forward(self.message, self.client_transport, self.done)
                conn.send(self.message, handler, expires, timeout)

        def cancel(self) -> None:
            pass

        def cut(self, reason: str) -> None:
            return None

        def chain_target(self) -> None:
            """Never sends a call behind another (the full sidecar may, for a oneway)."""
            return None

        def waits_to_send(self) -> bool:
            return False

        def chain_after(self, conn: UpstreamConnection) -> None:
            raise AssertionError("never chained: chain_target is None")

    def call(_ctx: object, message: Message, client_transport: Transport, done: Done) -> Started:
        return Started(message, client_transport, done)

    sidecar.server.call_factory = call  # type: ignore[assignment]
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
