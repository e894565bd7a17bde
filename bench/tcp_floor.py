"""A plain TCP proxy in Python on uvloop: the floor of any sidecar built this way.

HAProxy's job in the benchmark (TCP mode: bytes in, the same bytes out) done
with the sidecar's platform, CPython and uvloop, and nothing of the sidecar:
each client connection gets one upstream connection of its own, and every
read is written to the other side as it came. No framing, no seqid rewrite,
no pool, no pipeline. `speed.py`'s ``tcp-uvloop`` row runs it beside the
sidecar so that, in one run, the distance from HAProxy to this row is what
the platform costs (an event loop callback and Python objects for every
read), and the distance from this row to the sidecar is what the sidecar's
own work costs. docs/performance.md reads the figures.

Flow control as a proxy needs it: when one side's writes back up past the
transport's high-water mark, reading from the other side pauses until they
drain. ``--metrics-listen`` answers every HTTP request with 200, so the
benchmark's readiness check (``/readyz``) works as for the sidecar.

Usage:
    python bench/tcp_floor.py --listen H:P --upstream H:P --metrics-listen H:P
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import uvloop


class _Side(asyncio.Protocol):
    """One end of a proxied connection; ``peer`` is the other end once both are up."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.early: list[bytes] = []  # read before the upstream connection was made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None:  # a client's read already under way when it was paused
            self.early.append(data)
            return
        peer.transport.write(data)  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class _Client(_Side):
    """A client connection: connects its upstream, then both sides forward (the
    client's reads are paused until then)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__()
        self._upstream = upstream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.transport.pause_reading()  # type: ignore[union-attr]
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(_Side, *self._upstream)
        except OSError:
            self.transport.abort()
            return
        upstream.peer, self.peer = self, upstream
        if self.transport.is_closing():
            upstream.transport.close()  # type: ignore[union-attr]
            return
        for data in self.early:
            upstream.transport.write(data)  # type: ignore[union-attr]
        self.early.clear()
        self.transport.resume_reading()


class _Ready(asyncio.Protocol):
    """Answers any HTTP request with 200 and closes: the readiness check."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if b"\r\n\r\n" in data:
            self.transport.write(  # type: ignore[attr-defined]
                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            self.transport.close()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def serve(listen: str, upstream: str, metrics_listen: str) -> None:
    """Proxy ``listen`` to ``upstream`` until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    target = _address(upstream)
    proxy = await loop.create_server(lambda: _Client(target), *_address(listen))
    ready = await loop.create_server(_Ready, *_address(metrics_listen))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    proxy.close()
    ready.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--metrics-listen", required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.listen, args.upstream, args.metrics_listen))


if __name__ == "__main__":
    main()
