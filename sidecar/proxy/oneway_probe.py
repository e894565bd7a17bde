"""A probe call behind a CALL that may be oneway, so that a lone one is learned too.

A method the IDL and the config say nothing about is learned to be oneway
when a later call on the same upstream connection is answered first
(`sidecar.proxy.oneway`). A client's next call usually serves; but a client
that sends such a call and then nothing for a while (a Go client notifying
once a minute) left the sidecar waiting for a reply that never comes: the
per-try timeout fired, the breaker counted a failure and the client got a
`TApplicationException` it never asked for, in front of its next reply.

So when a CALL of such a method has waited `PROBE_AFTER` seconds with
nothing sent behind it, the sidecar sends a call of its own behind it: the
method `PROBE_NAME` (under the call's service, for a multiplexed upstream)
with no arguments, which a Thrift server answers with UNKNOWN_METHOD. A
server answers one connection's calls in order, so the probe's answer
arriving first proves the call oneway (and any unanswered one before it on
the connection), through the same rule as a client's next call
(`UpstreamConnection._take`). If the call's own reply comes first,
it was a slow two-way call and the probe's answer is read and dropped before
the connection goes back to the pool. Either way nothing reaches the client
and nothing is counted. Only a call known to be well formed is probed
(`Call._well_formed`): an upstream that reads a call cut short on into the
next frame would take the probe for the rest of it. Nor is a call the
server may answer out of order (`Call._answered_in_turn`): the probe's
answer coming first would prove nothing. The README ("Oneway calls whatever their message
type") says what the upstream sees.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from sidecar.errors import UpstreamError
from sidecar.protocol.auto import decoder_for
from sidecar.protocol.compact import encode_compact_header
from sidecar.protocol.envelope import MessageType, encode_header
from sidecar.protocol.envelope import Protocol as WireProtocol
from sidecar.protocol.message import Message, Transport, frame
from sidecar.proxy.upstream import ReplyHandler, UpstreamConnection

log: Final = logging.getLogger("sidecar.pipeline")

# Seconds a CALL of a method not known to be two-way waits alone before the
# probe goes behind it: most two-way calls are answered sooner, and are then
# known for good without a probe.
PROBE_AFTER: Final = 0.05
# The method the probe calls: a name no service defines, that says whose it is
# in the upstream's logs.
PROBE_NAME: Final = "thrift_sidecar_oneway_probe"
# An empty argument struct: its stop field, the same byte in both protocols.
_NO_ARGUMENTS: Final = b"\x00"


def probe_message(service: str, transport: Transport, protocol: WireProtocol) -> Message:
    """The probe call in the upstream's transport and protocol (seqid 0: `send` sets it)."""
    name = f"{service}:{PROBE_NAME}" if service else PROBE_NAME
    if protocol is WireProtocol.COMPACT:
        envelope = encode_compact_header(name, MessageType.CALL, 0)
    else:
        envelope = encode_header(name, MessageType.CALL, 0)
    decoder = decoder_for(transport, protocol)
    (message,) = decoder.receive_data(frame(envelope + _NO_ARGUMENTS, transport))
    return message


class OnewayProbe(ReplyHandler):
    """The probe of one call: a timer, then the probe call on the call's connection.

    Also the probe's `ReplyHandler`: its answer, or its failure, is nobody's
    business but the connection's (a failure closes the connection, and the
    call waiting there fails as it would have anyway).
    """

    __slots__ = ("_conn", "_handler", "_loop", "_service", "_timeout", "_timer")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        conn: UpstreamConnection,
        handler: ReplyHandler,
        service: str,
        timeout: float,
    ) -> None:
        """Arm the probe of ``handler``'s call on ``conn`` (its per-try ``timeout``)."""
        self._loop = loop
        self._conn = conn
        self._handler = handler
        self._service = service
        self._timeout = timeout
        self._timer: asyncio.TimerHandle | None = loop.call_later(
            min(PROBE_AFTER, timeout / 2), self._due
        )

    def cancel(self) -> None:
        """The call was answered or ended: no probe (one already sent stays on its way)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _due(self) -> None:
        self._timer = None
        conn = self._conn
        if conn.closed or not conn.sent_last(self._handler):
            return  # answered, failed, or a later call went behind it: that one tells
        pool = conn.pool
        try:
            message = probe_message(self._service, pool.transport_kind, pool.protocol)
            conn.send(message, self, self._loop.time() + self._timeout, self._timeout)
        except Exception:  # a bug: the call goes on waiting as it did without a probe
            log.exception("could not send the oneway probe to upstream %s", pool.address)
            return
        log.debug("sent a oneway probe to %s behind a call waiting for its reply", pool.address)

    # ReplyHandler: the probe's own outcome changes nothing.
    def on_reply(self, reply: Message) -> None:
        """The upstream answered the probe (UNKNOWN_METHOD, as a rule): dropped."""

    def on_error(self, error: UpstreamError) -> None:
        """The probe failed with its connection: the call there failed too, and says so."""

    def on_no_reply(self) -> None:
        """A call behind the probe was answered first (an upstream that answers out of
        order): nothing to do."""
