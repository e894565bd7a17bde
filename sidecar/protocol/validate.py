"""Is a framed message's body one well-formed struct?

Buffered messages are walked field by field to find where they end, so they
are well formed by construction; a framed (or THeader) message's length is
in its frame, and its body is walked here: before the call is sent
(``limits.validate_framed_calls``, the default), or, with that off, only
when the call failed at the upstream. A call cut short inside a correct
frame length makes an upstream wait for bytes that never come, a lying
string length can make it allocate or read on into the next frame, and a
second message hidden behind the first gets answered too: such calls must
cost the client, not the upstream and everyone behind it.

The walk is bounded (``steps``): a body that would take longer to check
(a list of a million empty structs costs a step per byte) is not checked,
and the call is treated as one the sidecar could not show well formed.
"""

from __future__ import annotations

from typing import Final

from sidecar.errors import RemoteProtocolError
from sidecar.protocol.compact_skip import CompactSkipper
from sidecar.protocol.envelope import Protocol
from sidecar.protocol.message import Message
from sidecar.protocol.skip import DEFAULT_MAX_DEPTH, UNBOUNDED, StructSkipper, flat_struct_end

_NO_LIMIT: Final = 1 << 62
_COMPACT: Final = Protocol.COMPACT  # a plain name: reading an enum member costs a call


def check_body(
    message: Message, max_depth: int = DEFAULT_MAX_DEPTH, steps: int = UNBOUNDED
) -> bool:
    """Raise unless the message's body is exactly one well-formed struct.

    Returns:
        True when it is; False when ``steps`` ran out before the walk was through.

    Raises:
        RemoteProtocolError: the struct is malformed, too deep, cut short
            (kind ``truncated``) or followed by more bytes (kind ``garbage``).
    """
    header = message.header
    if header.protocol is not _COMPACT:
        # The usual call, a flat struct, without a skipper (the same answer, cheaper).
        buf = message.buf
        start = message.start + header.body_offset
        size = len(buf)
        end = flat_struct_end(buf, start, size, steps)
        if end == size:
            return True
    body = message.body()
    skipper = (
        CompactSkipper(max_depth)
        if message.header.protocol is Protocol.COMPACT
        else StructSkipper(max_depth)
    )
    end = skipper.advance(body, 0, len(body), _NO_LIMIT, steps)
    if skipper.out_of_steps:
        return False
    if not skipper.done:
        raise RemoteProtocolError("struct ends past the end of the data", kind="truncated")
    if end != len(body):
        raise RemoteProtocolError(
            f"{len(body) - end} bytes follow the arguments inside the frame", kind="garbage"
        )
    return True
