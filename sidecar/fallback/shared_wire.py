"""The wire format between a worker's `SharedStore` and the supervisor's `StoreHost`.

Every frame: a 9-byte `HEADER` (body length uint32, op uint8, request id
uint32, big-endian), then the body. A worker sends `PUT` (no answer), `GET`,
`STATS` and `FLUSH`; the host answers each of the last three with a frame of
the same op and request id. Bodies are fixed-size heads followed by the
variable fields (key, message, args), so a side writes a frame in a few
pieces and reads each field with one ``readexactly``; both sides check the
lengths (`MAX_FRAME_BYTES`, the fields adding up to the frame) and close a
connection whose frame breaks them. docs/fallback-stores.md ("Shared by
workers") has the table.
"""

from __future__ import annotations

import asyncio
import struct

from sidecar.fallback.store import CachedReply, StoreStats

# body length, op, request id (0 for a put: it has no answer).
HEADER = struct.Struct("!IBI")
PUT = 1  # worker -> host: PUT_HEAD, key, message, args. No answer.
GET = 2  # worker -> host: the key (UTF-8). Answer GET: empty (none) or REPLY_HEAD, message, args.
STATS = 3  # worker -> host: empty. Answer STATS: STATS_BODY, the backend name (UTF-8).
FLUSH = 4  # worker -> host: empty. Answered (like STATS) once earlier puts are applied.
OPS = frozenset({PUT, GET, STATS, FLUSH})
# key length, seqid offset, stored_at, message length, args length.
PUT_HEAD = struct.Struct("!HIdII")
# seqid offset, stored_at, message length, args length.
REPLY_HEAD = struct.Struct("!IdII")
# entries, bytes, healthy (0/1).
STATS_BODY = struct.Struct("!QQB")
# Largest frame body either side accepts; a larger one closes the connection
# (a reply that large is not worth sharing; the host's own bound, not a Thrift limit).
MAX_FRAME_BYTES = 64 << 20
MAX_KEY_BYTES = 0xFFFF  # PUT_HEAD's key length is a uint16
# A body up to this size is read with one ``readexactly`` and sliced; a larger
# one field by field. A readexactly costs about a microsecond and copies once;
# slicing copies again (64 KiB: a few microseconds).
READ_WHOLE_BYTES = 64 << 10


class WireError(Exception):
    """A frame that breaks the format: the connection that sent it is closed."""


def put_frame(key: bytes, reply: CachedReply) -> tuple[bytes, bytes, bytes, bytes]:
    """The pieces of a PUT frame, to be written in order (no copy of message or args)."""
    body = PUT_HEAD.size + len(key) + len(reply.message) + len(reply.args)
    head = HEADER.pack(body, PUT, 0) + PUT_HEAD.pack(
        len(key), reply.seqid_offset, reply.stored_at, len(reply.message), len(reply.args)
    )
    return head, key, reply.message, reply.args


def stats_body(stats: StoreStats) -> bytes:
    """The body of a STATS or FLUSH answer."""
    name = stats.backend.encode()
    return STATS_BODY.pack(stats.entries, stats.bytes, stats.healthy) + name


def parse_stats(body: bytes) -> tuple[int, int, bool, str]:
    """Entries, bytes, healthy and backend name from a STATS or FLUSH answer.

    Raises:
        WireError: the body is too short or the name is not UTF-8.
    """
    if len(body) < STATS_BODY.size:
        raise WireError("short stats answer")
    entries, size, healthy = STATS_BODY.unpack_from(body)
    try:
        name = body[STATS_BODY.size :].decode()
    except UnicodeDecodeError as exc:
        raise WireError("backend name is not UTF-8") from exc
    return entries, size, bool(healthy), name


async def read_header(reader: asyncio.StreamReader) -> tuple[int, int, int]:
    """Body length, op and request id of the next frame; checked against the bounds.

    Raises:
        asyncio.IncompleteReadError: the stream ended.
        WireError: an unknown op or a body over `MAX_FRAME_BYTES`.
    """
    length, op, request_id = HEADER.unpack(await reader.readexactly(HEADER.size))
    if op not in OPS:
        raise WireError(f"unknown op {op}")
    if length > MAX_FRAME_BYTES:
        raise WireError(f"frame of {length} bytes")
    return length, op, request_id


async def read_reply(reader: asyncio.StreamReader, length: int) -> CachedReply | None:
    """A GET answer's body of ``length`` bytes: read whole when small, else field by field.

    Raises:
        asyncio.IncompleteReadError: the stream ended.
        WireError: the fields do not add up to ``length``.
    """
    if length == 0:
        return None
    if length < REPLY_HEAD.size:
        raise WireError("short reply")
    if length <= READ_WHOLE_BYTES:
        body = await reader.readexactly(length)
        offset, stored_at, message_len, args_len = REPLY_HEAD.unpack_from(body)
        if REPLY_HEAD.size + message_len + args_len != length:
            raise WireError("reply fields do not add up to the frame")
        end = REPLY_HEAD.size + message_len
        return CachedReply(body[REPLY_HEAD.size : end], offset, stored_at, body[end:])
    offset, stored_at, message_len, args_len = REPLY_HEAD.unpack(
        await reader.readexactly(REPLY_HEAD.size)
    )
    if REPLY_HEAD.size + message_len + args_len != length:
        raise WireError("reply fields do not add up to the frame")
    message = await reader.readexactly(message_len)
    args = await reader.readexactly(args_len) if args_len else b""
    return CachedReply(message, offset, stored_at, args)
