"""The decoder of a client connection: detect what it speaks, then decode with the right one.

`AutoDecoder` feeds the first bytes to `detect.detect` and builds the decoder
for the answer; `make_decoder` and `decoder_for` build one directly when the
transport is configured.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Final

from sidecar.errors import RemoteProtocolError
from sidecar.protocol.decoders import DEFAULT_MAX_MESSAGE_SIZE, BufferedDecoder, FramedDecoder
from sidecar.protocol.detect import MAX_PREFIX, Detected, binary_only, detect, may_be_json
from sidecar.protocol.envelope import MessageHeader, Protocol
from sidecar.protocol.message import Message, Transport
from sidecar.protocol.skip import DEFAULT_MAX_DEPTH, UNBOUNDED
from sidecar.protocol.theader_decoder import THeaderDecoder

Decoder = FramedDecoder | BufferedDecoder | THeaderDecoder


def make_decoder(
    transport: Transport,
    max_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    max_depth: int = DEFAULT_MAX_DEPTH,
    protocol: Protocol = Protocol.BINARY,
    walk_steps: int = UNBOUNDED,
) -> FramedDecoder | BufferedDecoder:
    """A decoder for framed or buffered messages of ``protocol`` (THeader: `decoder_for`).

    ``walk_steps``: see `BufferedDecoder`.
    """
    if transport is Transport.FRAMED:
        return FramedDecoder(max_size, protocol)
    if transport is Transport.BUFFERED:
        return BufferedDecoder(max_size, max_depth, protocol, walk_steps)
    raise ValueError(f"make_decoder builds framed and buffered decoders, not {transport}")


def decoder_for(
    transport: Transport,
    protocol: Protocol = Protocol.BINARY,
    max_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    max_depth: int = DEFAULT_MAX_DEPTH,
    walk_steps: int = UNBOUNDED,
) -> Decoder:
    """A decoder for any transport (THeader carries either protocol, per frame)."""
    if transport is Transport.THEADER:
        return THeaderDecoder(max_size)
    return make_decoder(transport, max_size, max_depth, protocol, walk_steps)


BINARY_ONLY: Final[frozenset[tuple[Transport, Protocol]]] = frozenset(
    {
        (Transport.FRAMED, Protocol.BINARY),
        (Transport.BUFFERED, Protocol.BINARY),
    }
)
EVERYTHING: Final[frozenset[tuple[Transport, Protocol]]] = frozenset(
    (t, p) for t in Transport for p in Protocol
)


class AutoDecoder:
    """Detects the client's transport and protocol from its first bytes, then decodes with it.

    Args:
        make: builds the decoder of a binary framed/buffered connection (the
            original interface); others are built with `decoder_for`.
        max_size: message size limit of the decoders built here.
        max_depth: nesting limit of the decoders built here.
        accept: the (transport, protocol) pairs to decode; the others are
            refused as `detect_transport` refuses them. Default: binary only.
        walk_steps: the step budget of a buffered walk (`BufferedDecoder`).
    """

    __slots__ = (
        "_accept",
        "_error",
        "_inner",
        "_make",
        "_max_depth",
        "_max_size",
        "_prefix",
        "_walk_steps",
        "protocol",
        "transport",
    )

    def __init__(
        self,
        make: Callable[[Transport], Decoder] | None = None,
        *,
        max_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_depth: int = DEFAULT_MAX_DEPTH,
        accept: Collection[tuple[Transport, Protocol]] = BINARY_ONLY,
        walk_steps: int = UNBOUNDED,
    ) -> None:
        self._make = make
        self._walk_steps = walk_steps
        self._max_size = max_size
        self._max_depth = max_depth
        self._accept = frozenset(accept)
        self._prefix = bytearray()
        self._inner: Decoder | None = None
        self._error: RemoteProtocolError | None = None
        self.transport: Transport | None = None
        self.protocol: Protocol | None = None

    def partial_header(self) -> MessageHeader | None:
        """The envelope of the unfinished message being received, when readable."""
        inner = self._inner
        if inner is None or isinstance(inner, THeaderDecoder):
            return None
        return inner.partial_header()

    @property
    def inner(self) -> Decoder | None:
        """The decoder built for what was detected (None before): it answers every
        question asked of this one from then on."""
        return self._inner

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet returned in a message."""
        return len(self._prefix) if self._inner is None else self._inner.buffered_bytes

    @property
    def walk_pending(self) -> bool:
        """A buffered walk stopped for its step budget: `resume` goes on."""
        return self._inner is not None and self._inner.walk_pending

    def resume(self) -> list[Message]:
        """Go on with a walk stopped for its step budget."""
        return [] if self._inner is None else self._inner.resume()

    @property
    def error(self) -> RemoteProtocolError | None:
        """The error that broke this decoder, if any (every later call raises it)."""
        return self._inner.error if self._inner is not None else self._error

    def receive_data(self, data: bytes | bytearray) -> list[Message]:
        """Feed bytes; return the messages they complete (see the decoders)."""
        if self._inner is not None:
            return self._inner.receive_data(data)
        if self._error is not None:
            raise self._error
        try:
            found = self._detect(data)
        except RemoteProtocolError as exc:
            self._error = exc
            self._prefix = bytearray()
            raise
        if found is None:
            return []
        self.transport, self.protocol = found
        if (
            self._make is not None
            and found.protocol is Protocol.BINARY
            and (found.transport is not Transport.THEADER)
        ):
            self._inner = self._make(found.transport)
        else:
            self._inner = decoder_for(
                found.transport, found.protocol, self._max_size, self._max_depth, self._walk_steps
            )
        prefix, self._prefix = self._prefix, bytearray()
        return self._inner.receive_data(prefix)

    def _detect(self, data: bytes | bytearray) -> Detected | None:
        if not data:
            if self._prefix:
                raise RemoteProtocolError(
                    "connection ended before a whole message envelope", kind="truncated"
                )
            return None
        self._prefix += data
        found = detect(self._prefix)
        if found is None:
            if not may_be_json(self._prefix) and len(self._prefix) > MAX_PREFIX:
                raise RemoteProtocolError("not Thrift binary protocol", kind="garbage")
            return None
        if (found.transport, found.protocol) not in self._accept:
            binary_only(found)
        return found
