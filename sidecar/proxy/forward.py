"""A call reduced to one exchange: the pass-through benchmark's kind of call.

`bench/passthrough.py` installs it as the server's call factory: the
sidecar's server, decoders, upstream pool and seqid rewrite with the call's
pipeline replaced by one attempt (no breaker, budget, retry, cache or
per-call metrics), the floor under the pipeline in the build it is part of.
It is a module of the package, compiled with the per-call modules, because
its classes subclass two of theirs (`ProxiedCall`, `ReplyHandler`): a native
class may subclass a native class of its own compilation only (compiled
apart, its table of methods would be laid out blind). The sidecar itself
never uses it.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Final

from sidecar.errors import UpstreamError
from sidecar.protocol.envelope import MessageType
from sidecar.protocol.framing import Message, Transport
from sidecar.proxy.balancer import UpstreamSet
from sidecar.proxy.call import Done, ProxiedCall
from sidecar.proxy.upstream import ReplyHandler, UpstreamConnection, UpstreamPool

_ONEWAY: Final = MessageType.ONEWAY


class Forward(ReplyHandler):
    """The reply handler of one forwarded call: the reply goes back under the client's seqid."""

    def __init__(self, seqid: int, client_transport: Transport, done: Done) -> None:
        self.client_transport = client_transport
        self.done = done
        self.seqid = seqid

    def on_reply(self, reply: Message) -> None:
        reply.set_seqid(self.seqid)
        self.done(reply.to_wire(self.client_transport))

    def on_error(self, error: UpstreamError) -> None:
        self.done(None)

    def on_no_reply(self) -> None:
        self.done(None)


class Started(ProxiedCall):
    """One call: written to an idle upstream connection, nothing else (no retry, no breaker).

    Never `malformed`: a bare forward never checks a call."""

    def __init__(
        self,
        upstreams: UpstreamSet,
        timeout: float,
        message: Message,
        client_transport: Transport,
        done: Done,
    ) -> None:
        super().__init__()
        self.upstreams = upstreams
        self.timeout = timeout
        self.message = message
        self.client_transport = client_transport
        self.done = done

    def start(self) -> None:
        pool = self.upstreams.pick(self.client_transport)
        conn = pool.idle()
        if conn is None:  # fill the pool once; the benchmark warms up first
            task = asyncio.get_running_loop().create_task(pool.acquire(self.timeout))
            task.add_done_callback(functools.partial(self._connected, pool))
        else:
            self.send(pool, conn)

    def _connected(self, pool: UpstreamPool, task: asyncio.Task[UpstreamConnection]) -> None:
        self.send(pool, task.result())

    def send(self, pool: UpstreamPool, conn: UpstreamConnection) -> None:
        timeout = self.timeout
        expires = pool.loop.time() + timeout
        message = self.message
        if message.header.type is _ONEWAY:
            conn.send(message, None, expires, timeout)
            pool.release(conn, True)
            self.done(None)
        else:
            handler = Forward(message.header.seqid, self.client_transport, self.done)
            conn.send(message, handler, expires, timeout)

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


def call_factory(
    upstreams: UpstreamSet, timeout: float
) -> Callable[[object, Message, Transport, Done], Started]:
    """The server's call factory: every call a `Started` on ``upstreams``."""

    def call(_ctx: object, message: Message, client_transport: Transport, done: Done) -> Started:
        return Started(upstreams, timeout, message, client_transport, done)

    return call
