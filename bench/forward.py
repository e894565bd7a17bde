"""The pass-through's stand-in for `Call`: a call reduced to one exchange.

`passthrough.py` installs it as the server's call factory. Written typed, so
that `speed.py` can compile it with mypyc beside the compiled build: the
``passthrough-mypyc`` row then measures the compiled server and connections
with a compiled forward, the floor under the pipeline in that build.
Interpreted (as `pipeline.py` runs it) it costs about what the compiled
pipeline does.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable

from mypy_extensions import mypyc_attr

from sidecar.errors import UpstreamError
from sidecar.protocol.envelope import MessageType
from sidecar.protocol.framing import Message, Transport
from sidecar.proxy.balancer import UpstreamSet
from sidecar.proxy.call import Done, ProxiedCall
from sidecar.proxy.upstream import ReplyHandler, UpstreamConnection, UpstreamPool

_ONEWAY = MessageType.ONEWAY


# Python classes even when mypyc compiles this module (`native_class=False`): mypyc
# compiles it apart from the build, and a native class may not subclass a native
# class of another compilation (its table of methods would be laid out blind). As
# Python classes they subclass the build's as any interpreted class does.
@mypyc_attr(native_class=False)
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


@mypyc_attr(native_class=False)  # see `Forward`
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
            # A bound method, not a closure: mypyc cannot compile a closure in a
            # method of a Python class (`native_class=False`).
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
