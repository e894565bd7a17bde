"""limits.max_buffered_bytes: what all clients together may hold in the sidecar.

Issue 13, finding 1: 40 connections each announcing a 16,000,000-byte frame
and sending all but its last byte took RSS from 71 MB to 697 MB, bounded only
by max_connections x max_frame_size. Now the connections with the oldest
unfinished messages are closed once the budget is used up (answered with a
PROTOCOL_ERROR where their seqid is readable), and well-behaved clients go on
being served. (The fuzzer's targeted run checks the process's RSS too.)
"""

from __future__ import annotations

import contextlib
import socket
import struct

from sidecar.app.memory import return_large_blocks
from sidecar.protocol.appexc import ApplicationExceptionType
from sidecar.protocol.envelope import MessageType, encode_header
from sidecar.protocol.framing import FramedDecoder
from tests.integration import reply_parts
from tests.support.clients import split_address, thriftpy2_client
from tests.support.servers import thriftpy2_server
from tests.support.sidecar import run_sidecar
from tests.support.wait import wait_until

MIB = 1 << 20
FRAME = 3 * MIB


def half_frame(seqid: int) -> bytes:
    """A framed echoBinary of 3 MiB, all but its last byte."""
    head = encode_header("echoBinary", MessageType.CALL, seqid)
    arg = b"\x0b\x00\x01" + (FRAME - len(head) - 8).to_bytes(4, "big")
    body = head + arg + b"y" * (FRAME - len(head) - len(arg))
    return struct.pack(">i", FRAME) + body[:-1]


def test_the_oldest_unfinished_messages_go_first_and_others_are_served() -> None:
    config = {"limits": {"max_buffered_bytes": "8MiB"}, "max_frame_size": "4MiB"}
    with (
        thriftpy2_server("framed") as upstream,
        run_sidecar([upstream.address], config=config) as sc,
        thriftpy2_client(sc.address, "framed") as good,
    ):
        socks = []
        try:
            for i in range(4):  # 12 MiB announced against an 8 MiB budget
                sock = socket.create_connection(split_address(sc.address), timeout=10.0)
                sock.sendall(half_frame(500 + i))
                socks.append(sock)
                assert good.add(i, 1) == i + 1  # served throughout
            wait_until(
                lambda: (
                    sc.metrics().value("thrift_sidecar_protocol_errors_total", kind="memory") >= 1
                ),
                message="a connection shed",
            )
            # The first (oldest) connection was the one closed, told why with its seqid.
            decoder = FramedDecoder(MIB)
            replies: list[bytes] = []
            for _ in range(50):
                chunk = socks[0].recv(65536)
                if not chunk:
                    break
                replies += [bytes(m.payload()) for m in decoder.receive_data(chunk)]
            [reply] = replies
            parts = reply_parts(reply)
            assert parts.header.seqid == 500
            assert parts.exc_type == ApplicationExceptionType.PROTOCOL_ERROR
            assert "limits.max_buffered_bytes" in (parts.exc_message or "")
            # 12 MiB against 8: the first two connections went, the last two stay.
            wait_until(
                lambda: (
                    sc.metrics().value("thrift_sidecar_protocol_errors_total", kind="memory") == 2
                ),
                message="two shed",
            )
            for sock in socks[2:]:
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):  # open, nothing to read: good
                    assert sock.recv(1) != b"", "a newer connection was closed"
            assert good.add(7, 7) == 14
        finally:
            for sock in socks:
                sock.close()


def test_large_blocks_are_returned_to_the_system_on_glibc() -> None:
    assert return_large_blocks()  # this machine runs glibc; elsewhere it says False
