"""Is a framed message's body one well-formed struct? Asked only when a call failed.

Buffered messages are walked field by field to find where they end, so they
are well formed by construction; a framed (or THeader) message's body is
taken on trust to keep the common path free of a walk. When such a call then
fails at the upstream (a timeout, a closed connection, garbage back), the
sidecar asks here whether the request itself was the cause: a call cut short
inside a correct frame length makes an upstream wait for bytes that never
come, and that must count against the client, not against the upstream.
"""

from __future__ import annotations

from sidecar.errors import RemoteProtocolError
from sidecar.protocol.compact_skip import compact_struct_end
from sidecar.protocol.envelope import Protocol
from sidecar.protocol.message import Message
from sidecar.protocol.skip import DEFAULT_MAX_DEPTH, struct_end


def check_body(message: Message, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
    """Raise unless the message's body is exactly one well-formed struct.

    Raises:
        RemoteProtocolError: the struct is malformed, too deep, cut short
            (kind ``truncated``) or followed by more bytes (kind ``garbage``).
    """
    body = message.body()
    if message.header.protocol is Protocol.COMPACT:
        end = compact_struct_end(body, 0, max_depth)
    else:
        end = struct_end(body, 0, max_depth)
    if end != len(body):
        raise RemoteProtocolError(
            f"{len(body) - end} bytes follow the arguments inside the frame", kind="garbage"
        )
