"""Clients that break the protocol lose their own connection, and nobody else notices.

One sidecar (``max_frame_size: 1MiB``, ``max_depth: 16``) receives each kind
of bad input on a fresh raw connection. For each case:

- where the bad message's seqid was readable, the client first gets a
  TApplicationException(PROTOCOL_ERROR) with that seqid (and the replies to
  the good calls it sent before, in order);
- the sidecar closes that connection by itself (the client does not
  half-close unless the case is "input ends early");
- ``thrift_sidecar_protocol_errors_total{kind}`` rises by one, for the right kind;
- two well-behaved clients connected before the bad input, and a new one
  after it, get correct answers; the sidecar process is still alive.

A second sidecar with a short ``idle_timeout`` closes a silent connection,
a stalled half message and one trickling a byte at a time (slowloris: bytes
that never complete a message are no activity), but neither a busy one nor
an active one.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from sidecar.protocol.appexc import ApplicationExceptionType
from sidecar.protocol.envelope import MessageType, encode_header
from sidecar.protocol.framing import encode_frame
from tests.integration import (
    FORWARDING_CORE,
    Deployment,
    Deployments,
    merged,
    raw_connection,
    read_until_closed,
    reply_parts,
    split_replies,
)
from tests.support.clients import client, split_address
from tests.support.raw import decode_reply, encode_call
from tests.support.servers import TransportName, thriftpy2_server
from tests.support.wait import wait_until

MAX_FRAME = 1 << 20
MAX_DEPTH = 16
IDLE_TIMEOUT = 2.0
PROTOCOL_ERROR = int(ApplicationExceptionType.PROTOCOL_ERROR)

_I32 = struct.Struct(">i")


def _bad_input_sidecar(deployments: Deployments) -> Deployment:
    return deployments.get(
        "bad-input",
        upstream=lambda: thriftpy2_server("framed"),
        # Framed to the upstream whatever the client speaks: one upstream serves both.
        config=merged(
            FORWARDING_CORE,
            {
                "max_frame_size": "1MiB",
                "max_depth": MAX_DEPTH,
                "upstream": {"transport": "framed"},
            },
        ),
        protocol_errors_expected=True,
    )


def _call(name: str, seqid: int, strict: bool = True) -> bytes:
    return encode_header(name, MessageType.CALL, seqid, strict)


def _nested_lists(depth: int) -> bytes:
    """An args struct whose field 1 is a list of lists ... ``depth`` deep, then STOP."""
    return (
        b"\x0f\x00\x01" + (b"\x0f" + _I32.pack(1)) * (depth - 1) + b"\x08" + _I32.pack(0) + b"\x00"
    )


@dataclass(frozen=True)
class BadInput:
    """One kind of bad input and what the sidecar must do about it.

    Attributes:
        name: test id.
        data: the bytes sent, exactly.
        kind: the ``protocol_errors_total`` label that must rise.
        seqid: seqid of the PROTOCOL_ERROR answer; None when none is possible.
        method: method name in that answer.
        transport: how the answers are framed.
        half_close: the client ends its side after sending (input ends early).
        good: (method, seqid, value) of good calls in front of the bad input,
            answered first.
        strict: the answer's envelope form (the form the client used).
    """

    name: str
    data: bytes
    kind: str
    seqid: int | None = None
    method: str = ""
    transport: TransportName = "framed"
    half_close: bool = False
    good: tuple[tuple[str, int, Any], ...] = ()
    strict: bool = True

    def __str__(self) -> str:
        return self.name


CASES = [
    BadInput("garbage", b"\xde\xad\xbe\xef" * 16, "garbage"),
    BadInput("bad-version-bytes", b"\x80\x02\x00\x01" + b"\x00" * 16, "garbage"),
    BadInput("zero-frame-length", b"\x00\x00\x00\x00\x80\x01\x00\x01" + b"\x00" * 8, "garbage"),
    BadInput(
        "garbage-struct-buffered",
        _call("add", 4242) + b"\x63\x00\x01" + b"\x00" * 8,
        "garbage",
        seqid=4242,
        method="add",
        transport="buffered",
    ),
    BadInput(
        "oversized-frame",
        _I32.pack(2 * MAX_FRAME) + _call("getItem", 777) + b"\x0a\x00\x01",
        "oversized",
        seqid=777,
        method="getItem",
    ),
    BadInput(
        "oversized-buffered-string",
        _call("echoBinary", 778) + b"\x0b\x00\x01" + _I32.pack(2 * MAX_FRAME) + b"x" * 64,
        "oversized",
        seqid=778,
        method="echoBinary",
        transport="buffered",
    ),
    BadInput(
        "oversized-frame-after-a-good-call",
        encode_frame(encode_call("add", {"a": 20, "b": 22}, seqid=5))
        + _I32.pack(2 * MAX_FRAME)
        + _call("getItem", 901),
        "oversized",
        seqid=901,
        method="getItem",
        good=(("add", 5, 42),),
    ),
    BadInput(
        "truncated-frame",
        _I32.pack(200) + _call("add", 779) + b"\x0a\x00\x01\x00\x00",
        "truncated",
        seqid=779,
        method="add",
        half_close=True,
    ),
    BadInput(
        "truncated-buffered",
        _call("add", 780) + b"\x0a\x00\x01\x00\x00",
        "truncated",
        seqid=780,
        method="add",
        transport="buffered",
        half_close=True,
    ),
    BadInput(
        "truncated-buffered-after-a-good-call",
        encode_call("add", {"a": 1, "b": 2}, seqid=-5) + _call("getItem", 123456789) + b"\x0a",
        "truncated",
        seqid=123456789,
        method="getItem",
        transport="buffered",
        half_close=True,
        good=(("add", -5, 3),),
    ),
    BadInput(
        "truncated-non-strict-buffered",
        _call("add", 783, strict=False) + b"\x0a\x00\x01",
        "truncated",
        seqid=783,
        method="add",
        transport="buffered",
        half_close=True,
        strict=False,
    ),
    BadInput("truncated-envelope", b"\x80\x01\x00\x01\x00\x00", "truncated", half_close=True),
    # Compact with a version the protocol does not have (the low bits must be 1).
    BadInput("compact-bad-version", b"\x82\x22\x01\x07getItem\x16\x0e\x00", "garbage"),
    BadInput(
        "framed-compact-bad-version", _I32.pack(12) + b"\x82\x22\x01\x07getItem\x00", "garbage"
    ),
    BadInput("http-get", b"GET /metrics HTTP/1.1\r\nHost: sidecar\r\n\r\n", "http"),
    BadInput(
        "http-post",
        b"POST / HTTP/1.1\r\nContent-Type: application/x-thrift\r\nContent-Length: 0\r\n\r\n",
        "http",
    ),
    BadInput(
        "nested-too-deep-buffered",
        _call("echoAll", 781) + _nested_lists(4 * MAX_DEPTH),
        "too_deep",
        seqid=781,
        method="echoAll",
        transport="buffered",
    ),
    BadInput(
        "unknown-message-type",
        struct.pack(">I", 0x80010009) + _I32.pack(3) + b"add" + _I32.pack(782) + b"\x00",
        "bad_type",
        seqid=782,
        method="add",
        transport="buffered",
    ),
]


@dataclass
class GoodClients:
    """Well-behaved clients connected before the bad input."""

    framed: Any
    buffered: Any
    calls: int = 0

    def check(self) -> None:
        """Each answers a call with a fresh, distinct value."""
        self.calls += 1
        n = self.calls * 1000
        assert self.framed.add(n, 1) == n + 1
        assert self.buffered.add(n, 2) == n + 2


@pytest.fixture
def good_clients(deployments: Deployments) -> Iterator[GoodClients]:
    d = _bad_input_sidecar(deployments)
    with (
        client("thriftpy2", d.address, "framed") as framed,
        client("apache", d.address, "buffered") as buffered,
    ):
        good = GoodClients(framed, buffered)
        good.check()  # both are connected and served before the test begins
        yield good


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input_closes_only_that_connection(
    deployments: Deployments, good_clients: GoodClients, case: BadInput
) -> None:
    d = _bad_input_sidecar(deployments)
    before = d.protocol_errors(case.kind)
    with raw_connection(d.address) as sock:
        sock.sendall(case.data)
        if case.half_close:
            sock.shutdown(socket.SHUT_WR)
        # The sidecar closes the connection by itself (no half-close from us otherwise).
        received = read_until_closed(sock, timeout=10.0)
    if case.kind == "http":
        # An HTTP client is told, in HTTP, where the HTTP endpoints are.
        assert received.startswith(b"HTTP/1.1 400 Bad Request\r\n"), received
        assert b"admin port" in received
        received = b""
    replies = split_replies(received, case.transport)
    expected = len(case.good) + (case.seqid is not None)
    assert len(replies) == expected, f"replies: {replies!r}"
    for reply, (method, seqid, value) in zip(replies, case.good, strict=False):
        parts = reply_parts(reply)
        assert (parts.header.type, parts.header.seqid) == (MessageType.REPLY, seqid)
        assert decode_reply(method, reply) == value
    if case.seqid is not None:
        parts = reply_parts(replies[-1])
        assert parts.header.type == MessageType.EXCEPTION
        assert (parts.header.seqid, parts.header.name) == (case.seqid, case.method)
        assert parts.exc_type == PROTOCOL_ERROR
        assert parts.header.strict is case.strict
    # Counted once, under the right kind.
    wait_until(lambda: d.protocol_errors(case.kind) >= before + 1, message=f"kind={case.kind}")
    assert d.protocol_errors(case.kind) == before + 1
    # Nobody else noticed.
    good_clients.check()
    with client("apache", d.address, "framed") as after:
        assert after.add(case.seqid or 0, 1) == (case.seqid or 0) + 1
    with client("thriftpy2", d.address, "buffered") as after:
        assert after.getItem(3).name == "item-3"
    assert d.alive()


def test_sidecar_survives_all_bad_input_at_once(
    deployments: Deployments, good_clients: GoodClients
) -> None:
    """Every case on its own connection, all sent together; then the good clients."""
    d = _bad_input_sidecar(deployments)
    socks: list[socket.socket] = []
    try:
        for _ in CASES:
            socks.append(socket.create_connection(split_address(d.address), 5.0))
        for sock, case in zip(socks, CASES, strict=True):
            sock.sendall(case.data)
            if case.half_close:
                sock.shutdown(socket.SHUT_WR)
        for sock in socks:
            read_until_closed(sock, timeout=10.0)
    finally:
        for sock in socks:
            sock.close()
    good_clients.check()
    assert d.alive()


# -- idle clients ----------------------------------------------------------------------


def _idle_sidecar(deployments: Deployments) -> Deployment:
    return deployments.get(
        "idle-timeout",
        upstream=lambda: thriftpy2_server("framed"),
        config=merged(FORWARDING_CORE, {"idle_timeout": f"{IDLE_TIMEOUT}s"}),
    )


def _closed(sock: socket.socket) -> bool:
    """Has the peer closed ``sock``? (Never blocks; data from it is a test failure.)"""
    sock.setblocking(False)
    try:
        data = sock.recv(1)
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    assert data == b"", f"unexpected bytes from the sidecar: {data!r}"
    return True


def test_idle_connections_are_closed_by_the_sidecar(deployments: Deployments) -> None:
    d = _idle_sidecar(deployments)
    slow_ms = int(IDLE_TIMEOUT * 1500)
    slow_result: list[int] = []

    def slow_call() -> None:
        with client("apache", d.address, "framed", timeout=30.0) as c:
            slow_result.append(c.sleepMs(slow_ms))

    with (
        client("thriftpy2", d.address, "framed") as active,
        raw_connection(d.address) as silent,
        raw_connection(d.address) as stalled,
    ):
        assert active.add(1, 1) == 2
        started = time.monotonic()
        # Half a message, then nothing: as idle as saying nothing.
        stalled.sendall(encode_frame(encode_call("add", {"a": 1, "b": 1}))[:9])
        slow = threading.Thread(target=slow_call, daemon=True)
        slow.start()
        calls = 0

        def both_closed() -> bool:
            nonlocal calls
            calls += 1
            assert active.add(calls, calls) == 2 * calls  # busy clients stay open
            return _closed(silent) and _closed(stalled)

        wait_until(both_closed, timeout=IDLE_TIMEOUT + 15.0, interval=0.05, message="idle close")
        # Not before its time (a lower bound, which load can only make longer).
        assert time.monotonic() - started >= IDLE_TIMEOUT * 0.9
        slow.join(30.0)
        assert slow_result == [slow_ms]  # a call in flight longer than idle_timeout is not cut
        assert active.add(-1, -1) == -2
    with client("apache", d.address, "framed") as after:
        assert after.add(2, 2) == 4
    assert d.alive()


def test_a_connection_trickling_bytes_is_closed_after_idle_timeout(
    deployments: Deployments,
) -> None:
    """Slowloris: one byte every 100 ms never completes a message, so it is not activity."""
    d = _idle_sidecar(deployments)
    # A frame of 200 bytes: a valid start, then bytes that are never all sent.
    message = encode_frame(encode_call("add", {"a": 1, "b": 1}) + bytes(160))
    with (
        client("thriftpy2", d.address, "framed") as active,
        raw_connection(d.address) as trickle,
    ):
        started = time.monotonic()
        closed_after: float | None = None
        # Bounded: at most len(message) - 1 bytes, ten a second, and IDLE_TIMEOUT + 15 s.
        for byte in message[:-1]:
            if time.monotonic() - started > IDLE_TIMEOUT + 15.0:
                break
            try:
                trickle.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - started
                break
            if _closed(trickle):
                closed_after = time.monotonic() - started
                break
            assert active.add(2, 3) == 5  # a real client is served meanwhile
            trickle.setblocking(True)
            time.sleep(0.1)  # the pace of the attack, not a wait for a condition
        assert closed_after is not None, "the trickling connection was never closed"
        assert closed_after >= IDLE_TIMEOUT * 0.9
    assert d.alive()
