"""limits.max_buffered_bytes: what all clients together may hold in the sidecar.

Issue 13, finding 1: 40 connections each announcing a 16,000,000-byte frame
and sending all but its last byte took RSS from 71 MB to 697 MB, bounded only
by max_connections x max_frame_size. Now the connections that have held bytes
without progress the longest are closed once the budget is used up (answered
with a PROTOCOL_ERROR where their seqid is readable), and well-behaved clients
go on being served. (The fuzzer's targeted run checks the process's RSS too.)
Replies a client leaves unread count too, and such a client is cut off
(docs/robustness.md, "Memory").
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any

from sidecar.app.memory import return_large_blocks
from sidecar.protocol.appexc import ApplicationExceptionType
from sidecar.protocol.envelope import MessageType, encode_header
from sidecar.protocol.framing import FramedDecoder
from tests.integration import framed_replies, reply_parts
from tests.support.clients import split_address, thriftpy2_client
from tests.support.servers import UpstreamServer, thriftpy2_server
from tests.support.sidecar import SidecarProcess, run_sidecar
from tests.support.wait import wait_until

MIB = 1 << 20
FRAME = 3 * MIB


@contextlib.contextmanager
def senders(sc: SidecarProcess) -> Iterator[Callable[[bytes], socket.socket]]:
    """``send(data)``: a new client connection that has sent ``data``; all are closed
    on exit."""
    with contextlib.ExitStack() as stack:

        def send(data: bytes) -> socket.socket:
            address = split_address(sc.address)
            sock = stack.enter_context(socket.create_connection(address, timeout=10.0))
            sock.sendall(data)
            return sock

        yield send


@contextlib.contextmanager
def budget_rig(
    config: dict[str, Any],
) -> Iterator[tuple[UpstreamServer, SidecarProcess, Any, Callable[[bytes], socket.socket]]]:
    """A thriftpy2 upstream, a sidecar with ``config`` in front, a well-behaved client
    of it, and `senders` for the rest."""
    with (
        thriftpy2_server("framed") as upstream,
        run_sidecar([upstream.address], config=config) as sc,
        thriftpy2_client(sc.address, "framed") as good,
        senders(sc) as send,
    ):
        yield upstream, sc, good, send


def memory_closes(sc: SidecarProcess) -> float:
    """Connections closed for the memory budget so far."""
    return sc.metrics().value("thrift_sidecar_protocol_errors_total", kind="memory")


def half_frame(seqid: int) -> bytes:
    """A framed echoBinary of 3 MiB, all but its last byte."""
    head = encode_header("echoBinary", MessageType.CALL, seqid)
    arg = b"\x0b\x00\x01" + (FRAME - len(head) - 8).to_bytes(4, "big")
    body = head + arg + b"y" * (FRAME - len(head) - len(arg))
    return struct.pack(">i", FRAME) + body[:-1]


def test_the_longest_stalled_unfinished_messages_go_first_and_others_are_served() -> None:
    config = {"limits": {"max_buffered_bytes": "8MiB"}, "max_frame_size": "4MiB"}
    with budget_rig(config) as (_, sc, good, send):
        socks: list[socket.socket] = []
        for i in range(4):  # 12 MiB announced against an 8 MiB budget
            socks.append(send(half_frame(500 + i)))
            assert good.add(i, 1) == i + 1  # served throughout
        wait_until(lambda: memory_closes(sc) >= 1, message="a connection shed")
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
        wait_until(lambda: memory_closes(sc) == 2, message="two shed")
        for sock in socks[2:]:
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):  # open, nothing to read: good
                assert sock.recv(1) != b"", "a newer connection was closed"
        assert good.add(7, 7) == 14


def test_large_blocks_are_returned_to_the_system_on_glibc() -> None:
    assert return_large_blocks()  # this machine runs glibc; elsewhere it says False


def echo_call(seqid: int, size: int) -> bytes:
    """A whole framed echoBinary call whose argument (and so its reply) is ``size`` bytes."""
    head = encode_header("echoBinary", MessageType.CALL, seqid)
    body = head + b"\x0b\x00\x01" + size.to_bytes(4, "big") + b"z" * size + b"\x00"
    return struct.pack(">i", len(body)) + body


def ended(sock: socket.socket, most: int) -> int | None:
    """Read ``sock`` to its end: the bytes it gave, or None if it is still open after
    ``most`` bytes (a reset counts as the end)."""
    sock.settimeout(10.0)
    got = 0
    while got <= most:
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += len(chunk)
    return None


def test_replies_a_client_does_not_take_count_against_the_budget() -> None:
    """Clients that send a call with a 6 MiB answer and never read it held the answers
    in the sidecar outside the budget (24 of them: RSS +150 MB against a 16 MiB
    budget). The replies past the transport's high-water mark now count: the client
    that has left its reply the longest is cut off first, the others are served."""
    config = {"limits": {"max_buffered_bytes": "8MiB"}, "max_frame_size": "8MiB"}
    size = 6 * MIB
    with budget_rig(config) as (upstream, sc, good, send):
        socks: list[socket.socket] = []
        for i in range(4):  # 24 MiB of replies against an 8 MiB budget
            socks.append(send(echo_call(600 + i, size)))
            wait_until(lambda i=i: upstream.calls["echoBinary"] == i + 1, message="the echo ran")
            assert good.add(i, 1) == i + 1  # served throughout
        wait_until(lambda: memory_closes(sc) >= 1, message="a non-reader cut off")
        first = ended(socks[0], size)
        assert first is not None, "the oldest non-reader is still connected"
        assert first < size + 64, "it was cut off, not answered in full"
        assert ended(socks[-1], size) is None  # the newest still gets its reply
        assert "has not taken" in sc.log()
        assert good.add(7, 7) == 14


def test_an_idle_client_that_does_not_take_its_reply_is_cut_off_once() -> None:
    """idle_timeout closed such a connection with a close that waits for the reply to
    be written: it stayed, and every sweep counted and logged it again."""
    config = {"idle_timeout": "1s", "max_frame_size": "8MiB"}
    with (
        thriftpy2_server("framed") as upstream,
        run_sidecar([upstream.address], config=config) as sc,
        socket.create_connection(split_address(sc.address), timeout=10.0) as sock,
    ):
        sock.sendall(echo_call(700, 6 * MIB))
        wait_until(
            lambda: sc.metrics().value("thrift_sidecar_client_idle_closes_total") >= 1,
            timeout=10,
            message="an idle close",
        )
        assert ended(sock, 6 * MIB) is not None
        wait_until(
            lambda: sc.metrics().value("thrift_sidecar_client_connections") == 0,
            message="the connection gone",
        )
        assert sc.metrics().value("thrift_sidecar_client_idle_closes_total") == 1


def test_a_client_whose_message_arrived_whole_is_not_shed_for_it() -> None:
    """A message that came in pieces and ran at once left its connection marked as
    holding an unfinished message since it began: over the budget later, that idle
    connection was the oldest and was closed first, for nothing."""
    config = {"limits": {"max_buffered_bytes": "8MiB"}, "max_frame_size": "4MiB"}
    with budget_rig(config) as (_, sc, barrier, send):
        early = send(b"")
        call = echo_call(800, MIB)
        early.sendall(call[: len(call) // 2])
        assert barrier.add(1, 1) == 2
        early.sendall(call[len(call) // 2 :])
        assert len(framed_replies(early, 1)) == 1  # run and answered: it holds nothing now
        socks: list[socket.socket] = []
        for i in range(3):  # 9 MiB of unfinished messages against 8
            socks.append(send(half_frame(810 + i)))
            assert barrier.add(i, 1) == i + 1
        wait_until(lambda: memory_closes(sc) >= 1, message="a connection shed")
        early.sendall(echo_call(801, 10))
        [reply] = framed_replies(early, 1)
        assert reply_parts(reply).header.seqid == 801


def test_a_message_still_arriving_outlasts_those_that_stopped() -> None:
    """Over the budget, the connections whose unfinished messages made no progress the
    longest go first, not those whose messages began first: a client uploading a
    large call in pieces, begun before a flood of stalled ones, finishes it."""
    config = {"limits": {"max_buffered_bytes": "8MiB"}, "max_frame_size": "4MiB"}
    with budget_rig(config) as (_, sc, barrier, send):
        uploader = send(b"")
        call = echo_call(900, 2 * MIB)
        uploader.sendall(call[:MIB])  # begun first
        assert barrier.add(1, 1) == 2
        socks: list[socket.socket] = []
        for i in range(2):  # stalled: 6 MiB, and the uploader's 1 MiB
            socks.append(send(half_frame(910 + i)))
            assert barrier.add(i, 1) == i + 1
        uploader.sendall(call[MIB : MIB + 64 * 1024])  # progress
        assert barrier.add(5, 1) == 6
        socks.append(send(half_frame(912)))  # 10 MiB: one 3 MiB holder must go
        wait_until(lambda: memory_closes(sc) >= 1, message="a connection shed")
        [shed] = framed_replies(socks[0], 1)
        assert reply_parts(shed).header.seqid == 910  # the one stalled longest
        uploader.sendall(call[MIB + 64 * 1024 :])
        [reply] = framed_replies(uploader, 1)
        parts = reply_parts(reply)
        assert parts.header.seqid == 900
        assert parts.exc_type is None
