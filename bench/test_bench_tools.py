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

- Compact protocol, THeader transport and TLS: the upstream answers Apache
  Thrift's Python client in every protocol x transport, plaintext and TLS,
  and closes connections its --protocol/--transport exclude; the load
  generator runs clean against a server made of Apache's transports and
  protocols, refuses a server its CA did not sign, and runs clean through a
  real sidecar in each `protocols.py` configuration (compact upstream,
  transcoding, THeader, TLS on both sides) to an upstream that accepts only
  what that configuration must deliver.

Runs in well under a minute: load generator runs last a fraction of a second.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import protocols
import pytest
import thriftpy2
import thriftpy2.protocol
import thriftpy2.rpc
import thriftpy2.thrift
import thriftpy2.transport
from benchtools import BENCH_DIR, build_tools, run_loadgen, sidecar_process, upstream_server
from thrift.protocol import TBinaryProtocol, TCompactProtocol
from thrift.protocol.THeaderProtocol import THeaderProtocol
from thrift.Thrift import TApplicationException, TMessageType, TType
from thrift.transport import TSocket, TSSLSocket, TTransport
from thrift.transport.THeaderTransport import THeaderClientType, THeaderSubprotocolID

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


# --- loopback.py: the kernel's floor under a call ---


def test_loopback_times_both_ways_of_calling_for_each_size(tools: dict[str, Path]) -> None:
    from loopback import measure, table

    results = {size: measure(tools["loopback"], size, 500, 2) for size in (64, 16384)}
    for got in results.values():
        assert set(got) == {"write_read_us", "sendto_recvfrom_us"}
        assert all(0 < us < 10_000 for us in got.values()), got
    lines = table(results).splitlines()
    assert len(lines) == 4
    assert lines[2].startswith("| 64 |")
    assert lines[3].startswith("| 16,384 |")
    assert f"{2 * results[64]['write_read_us']:.1f} |" in lines[2]


def test_loopback_refuses_a_size_it_cannot_hold(tools: dict[str, Path]) -> None:
    import subprocess

    done = subprocess.run(
        [str(tools["loopback"]), str(1 << 20), "10"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert "SIZE must be" in done.stderr


# --- speed.py: issue 12's figures (cache-on sidecar, fixed rate, process trees) ---


def test_speed_default_cases_are_the_issues_list() -> None:
    from run import Case
    from speed import DEFAULT_CASES, parse_cases

    cases = parse_cases(DEFAULT_CASES)
    closed = {(c.conns, c.payload, c.transport) for c in cases if not c.rate}
    assert closed == {
        (conns, payload, transport)
        for payload in (64, 16384)
        for conns, transport in ((16, "framed"), (64, "framed"), (16, "buffered"))
    }
    assert {c for c in cases if c.rate} == {
        Case(16, 64, "framed", 3000.0),
        Case(16, 16384, "framed", 3000.0),
    }
    with pytest.raises(ValueError, match="bad case"):
        parse_cases("16:64:udp")


def test_speed_cache_config_is_checked_by_the_sidecar(tmp_path: Path) -> None:
    from benchtools import REPO_ROOT
    from speed import CACHE_CONFIG, config_accepted

    accepted, _ = config_accepted(CACHE_CONFIG, REPO_ROOT, tmp_path)
    assert accepted
    refused, why = config_accepted(CACHE_CONFIG + "no_such_key: 1\n", REPO_ROOT, tmp_path)
    assert refused is False
    assert "no_such_key" in why


def _state(admin_url: str) -> dict[str, Any]:
    import json
    import urllib.request

    with urllib.request.urlopen(admin_url + "/state", timeout=IO_TIMEOUT) as response:
        state: dict[str, Any] = json.loads(response.read())
    return state


def _short_clean_run(loadgen: Path, port: int) -> None:
    """A short load generator run (4 connections, 64 B, framed): calls made, no errors."""
    report = run_loadgen(
        loadgen, port, conns=4, payload=64, transport="framed", duration=0.3, warmup=0.1
    )
    assert report["errors"] == 0, report
    assert report["calls"] > 0


@pytest.mark.parametrize(("variant", "entries"), [("sidecar", 0), ("cached", 1)])
def test_speed_cached_variant_stores_every_reply(
    tools: dict[str, Path], upstream_port: int, tmp_path: Path, variant: str, entries: int
) -> None:
    # The cache-on rows must really cache: after a run the memory store holds
    # the one key all the load generator's calls share (same method, same
    # arguments); the default variant caches nothing (echo is not idempotent).
    from benchtools import REPO_ROOT, sidecar_process
    from speed import VARIANTS

    config = {v.name: v for v in VARIANTS}[variant].config
    program = ["-m", "sidecar", "run", "--log-level", "warning"]
    if config is not None:
        (tmp_path / "c.yaml").write_text(config)
        program += ["--config", str(tmp_path / "c.yaml")]
    with sidecar_process(program, upstream_port, tmp_path / "s.log", source=REPO_ROOT) as sc:
        assert _state(sc.admin_url)["fallback_store"]["entries"] == 0
        _short_clean_run(tools["loadgen"], sc.port)
        assert _state(sc.admin_url)["fallback_store"]["entries"] == entries


def test_tree_cpu_times_counts_children() -> None:
    # A parent that starts a child burning CPU for 0.3 s, then both wait:
    # the parent's own figure misses the child's seconds, the tree's has them.
    import subprocess
    import sys

    from benchtools import cpu_times, process_tree, stop_process, tree_cpu_times

    burn = (
        "import time\n"
        "end, give_up = time.process_time() + 0.3, time.monotonic() + 30\n"
        "while time.process_time() < end and time.monotonic() < give_up: pass\n"
        "print('burnt', flush=True)\n"
        "import sys; sys.stdin.read()\n"
    )
    parent_code = (
        "import subprocess, sys\n"
        f"child = subprocess.Popen([sys.executable, '-c', {burn!r}], stdout=sys.stdout)\n"
        "sys.stdin.read()\n"
        "child.kill()\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        from benchtools import read_line

        assert read_line(parent, 30.0).strip() == "burnt"
        tree = process_tree(parent.pid)
        assert len(tree) == 2
        assert tree[0] == parent.pid
        own = sum(cpu_times(parent.pid))
        total = sum(tree_cpu_times(parent.pid))
        assert total - own >= 0.25  # the child's 0.3 s (clock ticks of 10 ms)
    finally:
        stop_process(parent)


def test_speed_goals_from_medians() -> None:
    # The verdicts follow the medians: throughput 0.8x (met, >= 0.75), CPU
    # 2.0x (not met, <= 1.6), added p50 paired by round (20 vs 10 µs: 2x).
    from run import Case, summarize
    from speed import goal_lines, render

    closed = Case(16, 64, "framed")
    fixed = Case(16, 64, "framed", 3000.0)

    def run(
        target: str, case: Case, rnd: int, calls: float, cpu: float, p50: float
    ) -> dict[str, Any]:
        metrics = dict.fromkeys(
            (
                "proxy_user_per_call_us",
                "proxy_sys_per_call_us",
                "upstream_cpu_per_call_us",
                "loadgen_cpu_per_call_us",
                "proxy_core_share",
                "upstream_core_share",
                "loadgen_core_share",
                "others_core_share",
            ),
            0.0,
        )
        return {
            **metrics,
            "target": target,
            "conns": case.conns,
            "payload": case.payload,
            "transport": case.transport,
            "rate": case.rate,
            "round": rnd,
            "calls_per_s": calls,
            "p50_us": p50,
            "p99_us": p50,
            "errors": 0,
            "proxy_cpu_per_call_us": None if target == "direct" else cpu,
        }

    runs = []
    for rnd, drift in enumerate((0.0, 50.0, 100.0)):  # a drift the pairing removes
        runs += [
            run("direct", closed, rnd, 200_000, 0, 80),
            run("haproxy", closed, rnd, 100_000, 10.0, 150),
            run("cached", closed, rnd, 80_000, 20.0, 300),
            run("direct", fixed, rnd, 3000, 0, 50 + drift),
            run("haproxy", fixed, rnd, 3000, 20.0, 60 + drift),
            run("cached", fixed, rnd, 3000, 25.0, 70 + drift),
        ]
    targets = ["direct", "haproxy", "cached"]
    summary = summarize(runs, [closed, fixed], targets)
    lines = "\n".join(goal_lines(summary, [closed, fixed], targets))
    assert "| throughput ≥ 0.75x, 16 conns 64 B framed | cached | 0.80x | met |" in lines
    assert "| CPU per call ≤ 1.6x, 16 conns 64 B framed | cached | 2.00x | NOT met |" in lines
    assert "| added p50 ≤ 1.2x, 3000/s 16 conns 64 B framed | cached | 2.00x | NOT met |" in lines
    assert "| CPU per call ≤ 1.5x, 3000/s 16 conns 64 B framed | cached | 1.25x | met |" in lines
    meta = {
        "started": "t",
        "rounds": 3,
        "duration_s": 1.0,
        "warmup_s": 0.1,
        "cpus": 2,
        "python": "3",
        "haproxy": "h",
        "kernel": "k",
        "source": "s",
        "loadavg_before": "1 1 1",
        "loadavg_after": "1 1 1",
        "loadavg_rounds": ["1 1 1"],
        "not_measured": ["`cached-w2`: refused"],
    }
    text = render(summary, [closed, fixed], targets, meta)
    assert "Not measured: `cached-w2`: refused" in text
    tables = [block.splitlines() for block in text.split("\n\n") if block.startswith("|")]
    assert len(tables) == 3  # closed loop, fixed rate, goals
    for table in tables:
        # Every row has as many cells as its header.
        assert {row.count("|") for row in table} == {table[0].count("|")}, table


def test_compare_cases_take_an_optional_rate() -> None:
    from compare import parse_cases as compare_cases

    assert compare_cases("framed:64,buffered:16384:3000") == [
        ("framed", 64, 0.0),
        ("buffered", 16384, 3000.0),
    ]
    for bad in ("framed", "udp:64", "framed:x", "framed:64:fast"):
        with pytest.raises(ValueError, match="bad case"):
            compare_cases(bad)


# --- compact, THeader and TLS: the C tools against Apache Thrift and the sidecar ---

APACHE_PROTOCOLS = ("binary", "compact")
APACHE_TRANSPORTS = ("framed", "buffered", "theader")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return protocols.make_certs(tmp_path_factory.mktemp("certs"))


def apache_protocol(sock: Any, protocol: str, transport: str) -> Any:
    """Apache Thrift's protocol object for one side of a connection over ``sock``."""
    if transport == "theader":
        sub = THeaderSubprotocolID.COMPACT if protocol == "compact" else THeaderSubprotocolID.BINARY
        return THeaderProtocol(sock, [THeaderClientType.HEADERS], sub)
    wrap = TTransport.TFramedTransport if transport == "framed" else TTransport.TBufferedTransport
    trans = wrap(sock)
    if protocol == "compact":
        return TCompactProtocol.TCompactProtocol(trans)
    return TBinaryProtocol.TBinaryProtocol(trans)


def apache_call(proto: Any, name: str, seqid: int, data: bytes) -> bytes:
    """One call of ``name(1: binary data)`` with Apache's protocol; returns field 0 of the reply.

    Raises:
        TApplicationException: the server answered with one.
    """
    proto.writeMessageBegin(name, TMessageType.CALL, seqid)
    proto.writeStructBegin("args")
    proto.writeFieldBegin("data", TType.STRING, 1)
    proto.writeBinary(data)
    proto.writeFieldEnd()
    proto.writeFieldStop()
    proto.writeStructEnd()
    proto.writeMessageEnd()
    proto.trans.flush()
    rname, mtype, rseqid = proto.readMessageBegin()
    assert (rname, rseqid) == (name, seqid)
    if mtype == TMessageType.EXCEPTION:
        exc = TApplicationException()
        exc.read(proto)
        proto.readMessageEnd()
        raise exc
    assert mtype == TMessageType.REPLY
    fields = read_fields(proto)
    proto.readMessageEnd()
    assert list(fields) == [0], fields
    return fields[0]


def read_fields(proto: Any) -> dict[int, Any]:
    """The binary fields of a struct by id (others skipped), read with Apache's protocol."""
    fields: dict[int, Any] = {}
    proto.readStructBegin()
    for _ in range(1000):  # bounded: the structs here have one field
        _, ftype, fid = proto.readFieldBegin()
        if ftype == TType.STOP:
            break
        if ftype == TType.STRING:
            fields[fid] = proto.readBinary()
        else:
            proto.skip(ftype)
        proto.readFieldEnd()
    proto.readStructEnd()
    return fields


@contextlib.contextmanager
def apache_client(
    port: int, protocol: str, transport: str, ca: Path | None = None
) -> Iterator[Any]:
    """An Apache Thrift client protocol connected to 127.0.0.1:``port`` (TLS when ``ca``)."""
    if ca is None:
        sock = TSocket.TSocket("127.0.0.1", port)
    else:
        context = ssl.create_default_context(cafile=str(ca))
        sock = TSSLSocket.TSSLSocket("127.0.0.1", port, ssl_context=context)
    sock.setTimeout(IO_TIMEOUT * 1000)
    sock.open()
    try:
        yield apache_protocol(sock, protocol, transport)
    finally:
        sock.close()


@contextlib.contextmanager
def apache_echo_server(
    protocol: str, transport: str, tls: ssl.SSLContext | None = None
) -> Iterator[int]:
    """An echo server made of Apache Thrift's transports and protocols; yields its port.

    One thread accepts (polling a stop flag), one thread per connection
    answers ``echo`` until the peer closes; all are joined on exit.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def serve(conn: socket.socket) -> None:
        sock = TSocket.TSocket()
        sock.setHandle(conn)
        proto = apache_protocol(sock, protocol, transport)
        try:
            for _ in range(10**7):  # bounded; ends when the client closes
                name, _, seqid = proto.readMessageBegin()
                data = read_fields(proto)[1]
                proto.readMessageEnd()
                proto.writeMessageBegin(name, TMessageType.REPLY, seqid)
                proto.writeStructBegin("result")
                proto.writeFieldBegin("success", TType.STRING, 0)
                proto.writeBinary(data)
                proto.writeFieldEnd()
                proto.writeFieldStop()
                proto.writeStructEnd()
                proto.writeMessageEnd()
                proto.trans.flush()
        except (TTransport.TTransportException, OSError, EOFError):
            pass
        finally:
            conn.close()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(IO_TIMEOUT)
            if tls is not None:
                try:
                    conn = tls.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError):
                    conn.close()
                    continue
            worker = threading.Thread(target=serve, args=(conn,), daemon=True)
            worker.start()
            threads.append(worker)

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        acceptor.join(IO_TIMEOUT)
        listener.close()
        for worker in threads:
            worker.join(IO_TIMEOUT + 1)


def server_context(certs: dict[str, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(certs["cert"]), str(certs["key"]))
    return context


@pytest.mark.parametrize("transport", APACHE_TRANSPORTS)
@pytest.mark.parametrize("protocol", APACHE_PROTOCOLS)
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_upstream_serves_apache_clients(
    tools: dict[str, Path], certs: dict[str, Path], protocol: str, transport: str, tls: bool
) -> None:
    flags = ["--protocol", protocol, "--transport", transport] + (["--tls"] if tls else [])
    payloads = [b"", b"x", bytes(range(256)), b"\x82\x21" * 40000]
    ca = certs["ca"] if tls else None
    with (
        protocols.upstream(tools["upstream"], flags, certs) as (_, port),
        apache_client(port, protocol, transport, ca) as proto,
    ):
        for seqid, payload in enumerate(payloads * 2, start=1000):
            assert apache_call(proto, "echo", seqid, payload) == payload
        with pytest.raises(TApplicationException) as info:
            apache_call(proto, "nope", 7, b"")
        assert info.value.type == TApplicationException.UNKNOWN_METHOD
        assert "nope" in str(info.value.message)
        assert apache_call(proto, "echo", 8, b"after") == b"after"


@pytest.mark.parametrize(
    ("flags", "protocol", "transport"),
    [
        (["--protocol", "binary"], "compact", "framed"),
        (["--protocol", "compact"], "binary", "buffered"),
        (["--protocol", "binary"], "compact", "theader"),
        (["--transport", "theader"], "binary", "framed"),
        (["--transport", "framed"], "binary", "theader"),
    ],
)
def test_upstream_closes_connections_it_was_told_to_refuse(
    tools: dict[str, Path], certs: dict[str, Path], flags: list[str], protocol: str, transport: str
) -> None:
    with (
        protocols.upstream(tools["upstream"], flags, certs) as (_, port),
        apache_client(port, protocol, transport) as proto,
        pytest.raises((TTransport.TTransportException, EOFError, OSError)),
    ):
        apache_call(proto, "echo", 1, b"refused")


@pytest.mark.parametrize("transport", APACHE_TRANSPORTS)
@pytest.mark.parametrize("protocol", APACHE_PROTOCOLS)
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_loadgen_runs_clean_against_apache_server(
    tools: dict[str, Path], certs: dict[str, Path], protocol: str, transport: str, tls: bool
) -> None:
    row = protocols.Row("check", "apache", "-", None, protocol, transport, tls)
    timing = argparse.Namespace(duration=0.3, warmup=0.1)
    with apache_echo_server(protocol, transport, server_context(certs) if tls else None) as port:
        for payload in (64, 40000):
            argv = protocols.loadgen_args(row, port, timing, certs, conns=2)
            argv[argv.index("--payload") + 1] = str(payload)
            report = protocols.run_loadgen_argv(tools["loadgen"], argv)
            assert report["errors"] == 0, report
            assert report["calls"] > 0
            assert (report["protocol"], report["transport"], report["tls"]) == (
                protocol,
                transport,
                tls,
            )


def test_loadgen_refuses_a_server_its_ca_did_not_sign(
    tools: dict[str, Path], certs: dict[str, Path], tmp_path: Path
) -> None:
    other = protocols.make_certs(tmp_path)  # another CA
    row = protocols.Row("check", "apache", "-", None, tls=True)
    timing = argparse.Namespace(duration=0.2, warmup=0.0)
    with protocols.upstream(tools["upstream"], ["--tls"], certs) as (_, port):
        good = protocols.run_loadgen_argv(
            tools["loadgen"], protocols.loadgen_args(row, port, timing, certs, conns=1)
        )
        assert good["errors"] == 0
        assert good["calls"] > 0
        with pytest.raises(RuntimeError, match="cannot connect"):
            protocols.run_loadgen_argv(
                tools["loadgen"], protocols.loadgen_args(row, port, timing, other, conns=1)
            )


@pytest.mark.parametrize(
    "row",
    [r for r in protocols.ROWS if r.proxy and r.proxy.startswith("sidecar-")],
    ids=lambda r: r.proxy,
)
def test_tools_through_the_sidecar(
    tools: dict[str, Path], certs: dict[str, Path], tmp_path: Path, row: protocols.Row
) -> None:
    # The upstream accepts only what the row must deliver: a sidecar that
    # sent another protocol or transport, or plaintext, would fail the calls.
    assert row.proxy is not None
    up_name, text = protocols.SIDECARS[row.proxy]
    for name in ("ca", "cert", "key"):
        (tmp_path / certs[name].name).write_bytes(certs[name].read_bytes())
    config = tmp_path / "sidecar.yaml"
    config.write_text(text or "{}\n")
    timing = argparse.Namespace(duration=0.5, warmup=0.1)
    with protocols.upstream(tools["upstream"], protocols.UPSTREAMS[up_name], certs) as up:
        program = ["-m", "sidecar", "run", "--config", str(config)]
        with sidecar_process(program, up[1], tmp_path / "sidecar.log") as sidecar:
            argv = protocols.loadgen_args(row, sidecar.port, timing, certs, conns=4)
            report = protocols.run_loadgen_argv(tools["loadgen"], argv)
    assert report["errors"] == 0, report
    assert report["calls"] > 0


def test_protocols_summary_pairs_rounds_and_renders_every_row() -> None:
    def run(rnd: int, row: protocols.Row, cpu: float | None) -> dict[str, Any]:
        return {
            "round": rnd,
            "group": row.group,
            "target": row.target,
            "calls_per_s": 1000.0 + rnd,
            "p50_us": 100.0,
            "p99_us": 200.0,
            "errors": rnd,
            "proxy_cpu_per_call_us": None if row.proxy is None else cpu,
            "others_core_share": 0.1 * rnd,
        }

    # Round r costs 10 * (r + 1) everywhere, plus 5 on transcoding and 7 on TLS
    # sidecar: the per-round differences are exactly 5 and 7 however rounds drift.
    runs = []
    for rnd in range(3):
        for row in protocols.ROWS:
            extra = {"sidecar-transcode": 5.0, "sidecar-tls": 7.0}.get(row.proxy or "", 0.0)
            runs.append(run(rnd, row, 10.0 * (rnd + 1) + extra))
    summary = protocols.summarize(runs)
    deltas = summary["cpu_deltas_us"]
    assert deltas["transcoding (transcoding - compact same)"] == pytest.approx(5.0)
    assert deltas["TLS - plaintext (sidecar)"] == pytest.approx(7.0)
    assert deltas["TLS - plaintext (haproxy)"] == pytest.approx(0.0)
    assert summary["rows"]["binary framed / sidecar"]["proxy_cpu_per_call_us"] == 20.0
    assert summary["rows"]["TLS / direct"]["proxy_cpu_per_call_us"] is None
    assert summary["rows"]["THeader / sidecar"]["errors"] == 3
    meta = {"rounds": 3, "duration_s": 3.0, "loadavg_before": "1 1 1", "loadavg_after": "2 2 2"}
    text = protocols.render(summary, meta)
    table = [line for line in text.splitlines() if line.startswith("| ") and "µs" not in line]
    assert len(table) == len(protocols.ROWS)
    assert "| compact framed | sidecar transcoding | 1,001 | 25.0 |" in text


def test_speed_runs_the_mypyc_rows_only_from_a_compiled_build(tmp_path: Path) -> None:
    # The *-mypyc rows say they are the compiled build's: speed.py measures
    # them only when --compiled holds one (sidecar.native.build() there).
    import os

    from benchtools import REPO_ROOT
    from speed import VARIANTS, build_of

    from sidecar import native

    assert {v.name for v in VARIANTS if v.compiled} == {
        "cached-mypyc",
        "cached-mypyc-w2",
        "passthrough-mypyc",
    }
    expected = os.environ.get("THRIFT_SIDECAR_EXPECT_BUILD") or native.build()
    assert build_of(REPO_ROOT) == expected
    assert build_of(tmp_path) != "mypyc"  # nothing compiled there


def test_passthrough_runs_the_sidecar_that_pythonpath_names(tmp_path: Path) -> None:
    # speed.py's passthrough-mypyc row runs passthrough.py with the compiled build
    # first on PYTHONPATH: the script must import that build, not its own checkout's.
    import os
    import subprocess
    import sys

    from speed import PASSTHROUGH, VARIANTS

    stub = tmp_path / "sidecar"
    stub.mkdir()
    (stub / "__init__.py").write_text("raise SystemExit('the sidecar on PYTHONPATH')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, str(PASSTHROUGH), "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "the sidecar on PYTHONPATH" in done.stderr
    (row,) = [v for v in VARIANTS if v.program[0] == str(PASSTHROUGH)]
    assert row.compiled
    assert row.config is None


def test_the_passthrough_row_answers_every_call_through_the_builds_forward(
    tools: dict[str, Path], upstream_port: int, tmp_path: Path
) -> None:
    # The passthrough-mypyc row is `passthrough.py` run from the compiled build, its
    # bare forward (`sidecar.proxy.forward`) compiled with the build: its classes
    # subclass the build's `ProxiedCall` and `ReplyHandler`. Compiled apart from the
    # build (as it was), native subclasses had their method tables laid out blind and
    # every call failed. Run from this suite's build: the compiled suite's is the row's.
    from benchtools import REPO_ROOT
    from speed import VARIANTS, variant_target

    import sidecar.proxy.forward

    (variant,) = [v for v in VARIANTS if v.name == "passthrough-mypyc"]
    assert Path(sidecar.proxy.forward.__file__).is_relative_to(REPO_ROOT)
    with variant_target(variant, tmp_path, upstream_port, REPO_ROOT) as target:
        assert target.proc is not None
        _short_clean_run(tools["loadgen"], target.port)


@pytest.mark.parametrize(("payload", "transport"), [(64, "framed"), (16384, "buffered")])
def test_the_tcp_floor_row_forwards_every_byte(
    tools: dict[str, Path], upstream_port: int, tmp_path: Path, payload: int, transport: str
) -> None:
    # speed.py's tcp-uvloop row: a plain TCP proxy on uvloop, without the sidecar. The
    # load generator checks every reply byte for byte, framed and buffered; the
    # process runs on uvloop, as the sidecar does.
    from benchtools import REPO_ROOT
    from speed import TCP_FLOOR, VARIANTS, variant_target

    (variant,) = [v for v in VARIANTS if v.name == "tcp-uvloop"]
    assert variant.program == (str(TCP_FLOOR),)
    with variant_target(variant, tmp_path, upstream_port, REPO_ROOT) as target:
        report = run_loadgen(
            tools["loadgen"],
            target.port,
            conns=4,
            payload=payload,
            transport=transport,
            duration=0.3,
            warmup=0.1,
        )
        assert report["errors"] == 0, report
        assert report["calls"] > 0
        assert target.proc is not None
        maps = Path(f"/proc/{target.proc.pid}/maps").read_text()
        assert "/uvloop/loop." in maps


@pytest.mark.one_build("tests a benchmark tool on the tcp floor, which the build does not change")
def test_instructions_counts_a_run_through_the_floor(
    tools: dict[str, Path], upstream_port: int, tmp_path: Path
) -> None:
    # instructions.py under callgrind, on its cheaper variant: the load generator runs
    # clean through it, callgrind's counters cover the calls, and the figure is a
    # plausible count a call (the floor's is about 7,600; the count includes the
    # loop's own turns, so it must be above the few hundred of a write and a read).
    from benchtools import REPO_ROOT
    from instructions import BENCH_DIR, count

    counted = count(
        "tcp-floor",
        [str(BENCH_DIR / "tcp_floor.py")],
        REPO_ROOT,
        upstream_port,
        tools["loadgen"],
        1.0,
        tmp_path,
    )
    assert counted.calls > 0
    assert 1_000 < counted.per_call < 200_000, counted
    assert counted.functions == {}  # no compiled sidecar function in the floor


def test_instructions_names_the_compiled_functions_as_python_does() -> None:
    from instructions import Counted, parse_annotate, table

    text = "\n".join(
        [
            "Ir",
            "1,000,000 (100.0%)  PROGRAM TOTALS",
            "  600,000 (60.00%)  /b/build/__native_sidecar___proxy___call.c:"
            "CPyDef_call___Call____after_attempt [/b/x__mypyc.so]",
            "  610,000 (61.00%)  /b/build/__native_sidecar___proxy___call.c:"
            "CPyPy_call___Call____after_attempt [/b/x__mypyc.so]",
            "   50,000 ( 5.00%)  Objects/obmalloc.c:_PyObject_Free [libpython3.11.so]",
        ]
    )
    total, functions = parse_annotate(text)
    assert total == 1_000_000
    assert functions == {"call.Call._after_attempt": 610_000}  # the wrapper's count is kept
    with pytest.raises(ValueError, match="PROGRAM TOTALS"):
        parse_annotate("Ir\n")
    report = table(
        [Counted("sidecar", 10, total, functions), Counted("tcp-floor", 20, 500_000, {})], 5
    )
    assert "| sidecar | 10 | 100,000 | 4.00 |" in report
    assert "| tcp-floor | 20 | 25,000 | 1.00 |" in report
    assert "| call.Call._after_attempt | 61,000 |" in report
    assert "inside its two connections" not in report  # neither data_received was counted
    functions["client.ClientConnection.data_received"] = 300_000
    functions["upstream.UpstreamConnection.data_received"] = 200_000
    report = table([Counted("sidecar", 10, total, functions)], 5)
    assert "sidecar, inside its two connections: 50,000 a call" in report
