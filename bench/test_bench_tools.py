"""Self-check of the benchmark's C tools against a real Thrift library.

- The upstream (`src/upstream.c`) answers a real thriftpy2 client built from
  `bench.thrift`, framed and buffered, payloads from 0 bytes to 1 MiB;
  replies carry the request's seqid, in the request's envelope form, in
  order for pipelined requests split at any byte; unknown methods get
  ``TApplicationException(UNKNOWN_METHOD)``.
- The load generator (`src/loadgen.c`) runs clean against it in both modes,
  and it counts what it must: a reply with the wrong seqid, message type,
  result field or payload is an error of that kind, and in open loop a call
  that waited behind a stalled server is timed from when it was due.

Runs in a few seconds: load generator runs last a fraction of a second.
"""

from __future__ import annotations

import contextlib
import io
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import thriftpy2
import thriftpy2.protocol
import thriftpy2.rpc
import thriftpy2.thrift
import thriftpy2.transport
from benchtools import BENCH_DIR, build_tools, run_loadgen, upstream_server

BENCH = thriftpy2.load(str(BENCH_DIR / "bench.thrift"), module_name="bench_thrift")
OTHER = thriftpy2.load_fp(
    io.StringIO("service Other { i32 nope(1: i32 x) }"), module_name="other_thrift"
)
TRANSPORTS = ("framed", "buffered")
CALL, REPLY, EXCEPTION = 1, 2, 3
# Seconds any single socket operation in these tests may block.
IO_TIMEOUT = 5.0


@pytest.fixture(scope="module")
def tools() -> dict[str, Path]:
    return build_tools()


@pytest.fixture(scope="module")
def upstream_port(tools: dict[str, Path]) -> Iterator[int]:
    with upstream_server(tools["upstream"]) as (_, port):
        yield port


def trans_factory(transport: str) -> Any:
    if transport == "framed":
        return thriftpy2.transport.TFramedTransportFactory()
    return thriftpy2.transport.TBufferedTransportFactory()


@contextlib.contextmanager
def client(service: Any, port: int, transport: str) -> Iterator[Any]:
    c = thriftpy2.rpc.make_client(
        service,
        "127.0.0.1",
        port,
        trans_factory=trans_factory(transport),
        proto_factory=thriftpy2.protocol.TBinaryProtocolFactory(),
        timeout=int(IO_TIMEOUT * 1000),
    )
    try:
        yield c
    finally:
        c.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_upstream_echoes_to_thriftpy2_client(upstream_port: int, transport: str) -> None:
    payloads = [b"", b"x", bytes(range(256)) * 64, bytes(64), b"\x80\x01" * (1 << 19)]
    with client(BENCH.Bench, upstream_port, transport) as c:
        for payload in payloads * 2:
            assert c.echo(payload) == payload


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_upstream_answers_unknown_method(upstream_port: int, transport: str) -> None:
    with client(OTHER.Other, upstream_port, transport) as c:
        with pytest.raises(thriftpy2.thrift.TApplicationException) as info:
            c.nope(1)
        assert info.value.type == thriftpy2.thrift.TApplicationException.UNKNOWN_METHOD
        assert "nope" in info.value.message
    # The connection-level state is per connection: echo still works afterwards.
    with client(BENCH.Bench, upstream_port, transport) as c:
        assert c.echo(b"after") == b"after"


def encode_echo_call(seqid: int, data: bytes, *, strict: bool = True) -> bytes:
    """An echo CALL encoded by thriftpy2's own binary protocol (no framing)."""
    buf = thriftpy2.transport.TMemoryBuffer()
    proto = thriftpy2.protocol.TBinaryProtocol(buf, strict_write=strict)
    proto.write_message_begin("echo", CALL, seqid)
    args = BENCH.Bench.echo_args(data=data)
    args.write(proto)
    proto.write_message_end()
    return buf.getvalue()


def decode_reply(raw: bytes) -> tuple[str, int, int, Any]:
    """(name, type, seqid, result) of one unframed reply, by thriftpy2."""
    buf = thriftpy2.transport.TMemoryBuffer(raw)
    proto = thriftpy2.protocol.TBinaryProtocol(buf, strict_read=False)
    name, mtype, seqid = proto.read_message_begin()
    result = BENCH.Bench.echo_result()
    result.read(proto)
    proto.read_message_end()
    return name, mtype, seqid, result.success


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


@pytest.mark.parametrize("strict", [True, False])
def test_upstream_pipelined_framed_replies_keep_seqids(upstream_port: int, strict: bool) -> None:
    calls = [(7, b"a"), (-(1 << 31), b"bb" * 100), ((1 << 31) - 1, b""), (0, b"z")]
    wire = b"".join(
        struct.pack("!i", len(m)) + m
        for m in (encode_echo_call(s, d, strict=strict) for s, d in calls)
    )
    with socket.create_connection(("127.0.0.1", upstream_port), timeout=IO_TIMEOUT) as sock:
        sock.sendall(wire)
        for seqid, data in calls:
            (length,) = struct.unpack("!i", recv_exact(sock, 4))
            raw = recv_exact(sock, length)
            assert (raw[:4] == b"\x80\x01\x00\x02") is strict  # the request's envelope form
            assert decode_reply(raw) == ("echo", REPLY, seqid, data)


def test_upstream_buffered_replies_to_bytes_in_any_split(upstream_port: int) -> None:
    calls = [(11, b"q" * 5000), (12, bytes(range(256))), (13, b"")]
    wire = b"".join(encode_echo_call(s, d) for s, d in calls)
    with socket.create_connection(("127.0.0.1", upstream_port), timeout=IO_TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Dribble the first bytes one by one, then the rest in odd chunks.
        for i in range(40):
            sock.sendall(wire[i : i + 1])
        for start in range(40, len(wire), 997):
            sock.sendall(wire[start : start + 997])
        for seqid, data in calls:
            expected = len(encode_echo_call(seqid, data))  # echo reply: same size as the call
            assert decode_reply(recv_exact(sock, expected)) == ("echo", REPLY, seqid, data)


@pytest.mark.parametrize(
    ("transport", "payload", "rate"),
    [
        ("framed", 64, 0.0),
        ("buffered", 16384, 0.0),
        ("framed", 16384, 2000.0),
        ("buffered", 64, 2000.0),
    ],
)
def test_loadgen_runs_clean_against_upstream(
    tools: dict[str, Path], upstream_port: int, transport: str, payload: int, rate: float
) -> None:
    report = run_loadgen(
        tools["loadgen"],
        upstream_port,
        conns=4,
        payload=payload,
        transport=transport,
        duration=0.3,
        warmup=0.1,
        rate=rate,
    )
    assert report["errors"] == 0, report
    assert report["transport"] == transport
    assert report["calls"] > 0
    assert report["calls_all"] >= report["calls"]
    assert 0 < report["latency_us"]["p50"] <= report["latency_us"]["p99"]
    assert report["latency_us"]["p99"] <= report["latency_us"]["max"]
    if rate:
        # Open loop issues exactly the calls that fall due in the window: 0.3 s x 2000/s.
        assert report["mode"] == "open"
        assert report["calls"] == pytest.approx(600, abs=2)
    else:
        assert report["mode"] == "closed"


# --- a misbehaving framed server, to show the load generator notices ---

Mutator = Callable[[bytes], bytes]


def _set_type(msg: bytes, mtype: int) -> bytes:
    return msg[:3] + bytes([mtype]) + msg[4:]


def _bump_seqid(msg: bytes) -> bytes:
    at = 8 + struct.unpack("!i", msg[4:8])[0]
    (seqid,) = struct.unpack("!I", msg[at : at + 4])
    return msg[:at] + struct.pack("!I", (seqid + 1) & 0xFFFFFFFF) + msg[at + 4 :]


def _field_id_one(msg: bytes) -> bytes:
    at = 12 + struct.unpack("!i", msg[4:8])[0]  # the result struct's first field header
    return msg[: at + 1] + b"\x00\x01" + msg[at + 3 :]


def _flip_last_payload_byte(msg: bytes) -> bytes:
    return msg[:-2] + bytes([msg[-2] ^ 0xFF]) + msg[-1:]


def _reply_from_call(msg: bytes) -> bytes:
    """The echo call turned into its well-formed reply: type REPLY, field 1 -> field 0."""
    at = 12 + struct.unpack("!i", msg[4:8])[0]
    return _set_type(msg, REPLY)[:at] + b"\x0b\x00\x00" + msg[at + 3 :]


@contextlib.contextmanager
def framed_server(mutate: Mutator, stall_first: float = 0.0, answer: bool = True) -> Iterator[int]:
    """A thread that answers framed echo calls, passing each reply through ``mutate``."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def serve(sock: socket.socket) -> None:
        sock.settimeout(0.05)
        stalled = False
        with sock:
            while not stop.is_set():
                try:
                    (length,) = struct.unpack("!i", recv_exact(sock, 4))
                    msg = recv_exact(sock, length)
                except TimeoutError:
                    continue
                except (ConnectionError, OSError):
                    return
                if not answer:
                    continue
                if stall_first and not stalled:
                    stalled = True
                    stop.wait(stall_first)
                reply = mutate(_reply_from_call(msg))
                with contextlib.suppress(OSError):
                    sock.sendall(struct.pack("!i", len(reply)) + reply)

    def accept() -> None:
        while not stop.is_set():
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            t = threading.Thread(target=serve, args=(sock,), daemon=True)
            threads.append(t)
            t.start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        acceptor.join(IO_TIMEOUT)
        for t in threads:
            t.join(IO_TIMEOUT)
        listener.close()


def test_framed_server_helper_answers_correctly(tools: dict[str, Path]) -> None:
    # The control: unmutated, the helper's replies are all good.
    with framed_server(lambda m: m) as port:
        report = run_loadgen(
            tools["loadgen"], port, conns=1, payload=64, transport="framed", duration=0.2, warmup=0
        )
    assert report["errors"] == 0, report
    assert report["calls"] > 0


@pytest.mark.parametrize(
    ("mutate", "kind"),
    [
        (_bump_seqid, "seqid"),
        (lambda m: _set_type(m, EXCEPTION), "type"),
        (lambda m: _set_type(m, CALL), "type"),
        (_field_id_one, "result"),
        (_flip_last_payload_byte, "payload"),
    ],
)
def test_loadgen_counts_bad_replies(tools: dict[str, Path], mutate: Mutator, kind: str) -> None:
    with framed_server(mutate) as port:
        report = run_loadgen(
            tools["loadgen"], port, conns=2, payload=64, transport="framed", duration=0.2, warmup=0
        )
    assert report["calls"] == 0, report
    assert report["calls_all"] == 0
    assert report["errors"] > 0
    assert report["error_kinds"] == {kind: report["errors"]}


def test_loadgen_counts_unanswered_calls_in_open_loop(tools: dict[str, Path]) -> None:
    with framed_server(lambda m: m, answer=False) as port:
        report = run_loadgen(
            tools["loadgen"],
            port,
            conns=2,
            payload=64,
            transport="framed",
            duration=0.2,
            warmup=0,
            rate=100,
            drain=0.2,
        )
    # 20 calls fall due; one per connection went out, the rest queued behind it.
    assert report["calls"] == 0
    assert report["error_kinds"] == {"unfinished": 20}


def test_open_loop_times_calls_from_when_they_were_due(tools: dict[str, Path]) -> None:
    stall = 0.3
    with framed_server(lambda m: m, stall_first=stall) as port:
        started = time.monotonic()
        report = run_loadgen(
            tools["loadgen"],
            port,
            conns=1,
            payload=64,
            transport="framed",
            duration=0.5,
            warmup=0,
            rate=1000,
        )
        assert time.monotonic() - started >= 0.5
    assert report["errors"] == 0, report
    assert report["calls"] == pytest.approx(500, abs=2)
    lat = report["latency_us"]
    # The first call waited `stall`; the ~300 calls due during the stall queued
    # behind it and are charged from their due times, so the median call was
    # late by tens of milliseconds. Timing from the actual send (coordinated
    # omission) would show one slow call and a median of microseconds.
    assert lat["max"] >= stall * 1e6 * 0.9
    assert lat["p50"] >= 20_000, lat
