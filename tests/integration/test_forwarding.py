"""The forwarding core through a real sidecar: order, concurrency, bytes, failures.

- Many calls: 200 in a row on one connection, 100 connections at once, and a
  client that pipelines calls on one socket (a oneway among them) and must get
  its replies in request order with its own seqids.
- Byte transparency: the same call sent straight to the upstream and through
  the sidecar gets byte-identical replies.
- Failures are answered, not dropped: an upstream that does not listen, or
  that closes the connection in the middle of a call, gives the client a
  TApplicationException(INTERNAL_ERROR) with its own seqid, on a connection
  that stays usable. Retries are off and the breaker is effectively off
  (`FORWARDING_CORE`), so this is the core's behaviour.
"""

from __future__ import annotations

import socket
import struct
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import thriftpy2.protocol
import thriftpy2.transport

from sidecar.protocol.appexc import ApplicationExceptionType
from sidecar.protocol.envelope import MessageType, encode_header, parse_header
from sidecar.protocol.framing import encode_frame
from tests.integration import (
    FORWARDING_CORE,
    LIBRARIES,
    TRANSPORTS,
    Deployment,
    Deployments,
    merged,
    plain,
    reply_parts,
)
from tests.support.clients import application_exception_class, client, types_of
from tests.support.idl import canonical, load_thriftpy2_interop, sample_all_types
from tests.support.raw import decode_reply, encode_call, raw_call, raw_calls
from tests.support.servers import (
    Library,
    TransportName,
    UpstreamServer,
    thriftpy2_server,
    upstream_server,
)
from tests.support.sidecar import run_sidecar
from tests.support.wait import wait_until

INTERNAL_ERROR = int(ApplicationExceptionType.INTERNAL_ERROR)
# Distinct and not in sequence: a proxy that numbers calls itself shows.
SEQIDS = (1000, 7, 123456789, -5)


# -- many calls ---------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("library", LIBRARIES)
def test_200_sequential_calls_on_one_connection(
    deployments: Deployments, library: Library, transport: TransportName
) -> None:
    d = plain(deployments, library, transport)
    with client(library, d.address, transport) as c:
        answers = [c.add(i, i) for i in range(200)]
    assert answers == [2 * i for i in range(200)]


def test_100_concurrent_connections(deployments: Deployments) -> None:
    d = plain(deployments, "apache", "framed")
    clients = 100
    calls_each = 5
    open_at_barrier: list[int] = []

    def count_connections() -> None:
        open_at_barrier.append(int(d.sidecar.state()["client_connections"]))

    barrier = threading.Barrier(clients, action=count_connections, timeout=60.0)
    before = d.metric("thrift_sidecar_requests_total", method="add", outcome="ok")

    def run(index: int) -> list[tuple[int, int]]:
        library: Library = LIBRARIES[index % 2]
        base = (index + 1) * 1_000_000
        with client(library, d.address, "framed", timeout=30.0) as c:
            got = [(c.add(base, -1), base - 1)]
            barrier.wait()  # every connection is open and has been served once
            got.extend((c.add(base, j), base + j) for j in range(calls_each))
        return got

    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = [f.result(timeout=90.0) for f in [pool.submit(run, i) for i in range(clients)]]
    for got in results:
        assert [answer for answer, _ in got] == [expected for _, expected in got]
    assert open_at_barrier
    assert open_at_barrier[0] >= clients
    after = d.metric("thrift_sidecar_requests_total", method="add", outcome="ok")
    assert after - before == clients * (calls_each + 1)


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non-strict"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_pipelined_calls_reply_in_order_with_client_seqids(
    deployments: Deployments, transport: TransportName, strict: bool
) -> None:
    d = plain(deployments, "thriftpy2", transport)
    tag = f"pipelined-{uuid.uuid4().hex}"
    ns = load_thriftpy2_interop()
    sample = sample_all_types(ns)
    messages = [
        encode_call("add", {"a": 1, "b": 2}, seqid=SEQIDS[0], strict=strict),
        encode_call("getItem", {"id": -3}, seqid=SEQIDS[1], strict=strict),
        encode_call("notify", {"tag": tag}, seqid=424242, strict=strict),
        encode_call("echoAll", {"v": sample}, seqid=SEQIDS[2], strict=strict),
        encode_call("crash", seqid=SEQIDS[3], strict=strict),
    ]
    replies = raw_calls(d.address, messages, transport, replies=4, timeout=15.0)
    parts = [reply_parts(r) for r in replies]
    assert [(p.header.seqid, p.header.name) for p in parts] == [
        (SEQIDS[0], "add"),
        (SEQIDS[1], "getItem"),
        (SEQIDS[2], "echoAll"),
        (SEQIDS[3], "crash"),
    ]
    assert decode_reply("add", replies[0]) == 3
    with pytest.raises(ns.NotFound):
        decode_reply("getItem", replies[1])
    assert canonical(decode_reply("echoAll", replies[2])) == canonical(sample)
    assert (parts[3].header.type, parts[3].exc_type) == (MessageType.EXCEPTION, INTERNAL_ERROR)
    wait_until(lambda: tag in d.server.notifications, timeout=10.0, message=tag)


def test_many_pipelined_calls(deployments: Deployments) -> None:
    """More calls than the sidecar queues before it pauses reading (64)."""
    d = plain(deployments, "apache", "buffered")
    seqids = [(i * 7919) % 100_003 - 50_000 for i in range(300)]
    messages = [encode_call("add", {"a": i, "b": i}, seqid=s) for i, s in enumerate(seqids)]
    replies = raw_calls(d.address, messages, "buffered", timeout=30.0)
    assert [reply_parts(r).header.seqid for r in replies] == seqids
    assert [decode_reply("add", r) for r in replies] == [2 * i for i in range(300)]


# -- byte transparency --------------------------------------------------------------


def _transparency_calls(strict: bool) -> list[bytes]:
    ns = load_thriftpy2_interop()
    return [
        encode_call("getItem", {"id": 4}, seqid=SEQIDS[0], strict=strict),
        encode_call("getItem", {"id": -2}, seqid=SEQIDS[1], strict=strict),
        encode_call("echoAll", {"v": sample_all_types(ns)}, seqid=SEQIDS[2], strict=strict),
        encode_call("ping", seqid=SEQIDS[3], strict=strict),
        encode_call("crash", seqid=31, strict=strict),
        encode_call("ping", seqid=32, strict=strict, name="noSuchMethod"),
        encode_call("echoBinary", {"data": bytes(range(256)) * 4096}, seqid=0, strict=strict),
    ]


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non-strict"])
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("library", LIBRARIES)
def test_replies_are_byte_identical(
    deployments: Deployments, library: Library, transport: TransportName, strict: bool
) -> None:
    d = plain(deployments, library, transport)
    messages = _transparency_calls(strict)
    direct = raw_calls(d.upstream_address, messages, transport, timeout=15.0)
    via = raw_calls(d.address, messages, transport, timeout=15.0)
    assert len(via) == len(direct) == len(messages)
    for i, (a, b) in enumerate(zip(direct, via, strict=True)):
        assert a == b, f"reply {i} differs: {a[:80]!r} vs {b[:80]!r}"
    # Not trivially equal: the replies are what the calls asked for.
    assert decode_reply("getItem", via[0]).name == "item-4"
    assert reply_parts(via[5]).exc_type == ApplicationExceptionType.UNKNOWN_METHOD


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_non_strict_replies_are_byte_identical(
    deployments: Deployments, transport: TransportName
) -> None:
    """An upstream that writes old non-strict envelopes: parsed, seqid restored, unchanged."""
    d = deployments.get(
        f"non-strict-writer-{transport}",
        upstream=lambda: thriftpy2_server(transport, strict_write=False),
        config=merged(FORWARDING_CORE),
    )
    for strict in (True, False):
        messages = _transparency_calls(strict)
        direct = raw_calls(d.upstream_address, messages, transport, timeout=15.0)
        via = raw_calls(d.address, messages, transport, timeout=15.0)
        assert via == direct
        parts = [reply_parts(r) for r in via]
        assert not any(p.header.strict for p in parts)
        assert [p.header.seqid for p in parts[:4]] == list(SEQIDS)


# -- failures are answered ------------------------------------------------------------


def _nothing_listens(deployments: Deployments) -> Deployment:
    return deployments.get("upstream-down", upstream=None, config=merged(FORWARDING_CORE))


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non-strict"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_upstream_not_listening_raw(
    deployments: Deployments, transport: TransportName, strict: bool
) -> None:
    d = _nothing_listens(deployments)
    attempts_before = d.metric("thrift_sidecar_upstream_attempts_total", method="add")
    messages = [
        encode_call("add", {"a": 1, "b": 2}, seqid=SEQIDS[2], strict=strict),
        encode_call("notify", {"tag": "lost"}, seqid=8, strict=strict),
        encode_call("getItem", {"id": 1}, seqid=SEQIDS[3], strict=strict),
    ]
    # Two answers on one connection (none for the oneway): the connection stays up.
    replies = raw_calls(d.address, messages, transport, replies=2)
    for reply, seqid, name in zip(replies, (SEQIDS[2], SEQIDS[3]), ("add", "getItem"), strict=True):
        parts = reply_parts(reply)
        assert parts.header.type == MessageType.EXCEPTION
        assert (parts.header.seqid, parts.header.name) == (seqid, name)
        assert parts.header.strict is strict
        assert parts.exc_type == INTERNAL_ERROR
        assert parts.exc_message is not None
        assert "cannot connect to the upstream" in parts.exc_message
        assert d.upstream_address not in parts.exc_message  # not the client's business
    # Retries off: one attempt per call.
    attempts_after = d.metric("thrift_sidecar_upstream_attempts_total", method="add")
    assert attempts_after - attempts_before == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("library", LIBRARIES)
def test_upstream_not_listening_library_client(
    deployments: Deployments, library: Library, transport: TransportName
) -> None:
    d = _nothing_listens(deployments)
    tae = application_exception_class(library)
    with client(library, d.address, transport) as c:
        for _ in range(2):  # the same connection answers again
            with pytest.raises(tae) as info:
                c.echoAll(sample_all_types(types_of(library)))
            assert info.value.type == tae.INTERNAL_ERROR
            assert "cannot connect to the upstream" in str(info.value.message)


class _CloseOnce:
    """An upstream hook that drops every connection during the next call of ``method``."""

    def __init__(self, server: UpstreamServer, method: str) -> None:
        self.server = server
        self.method = method
        self.fired = threading.Event()

    def __call__(self, name: str) -> None:
        if name == self.method and not self.fired.is_set():
            self.fired.set()
            self.server.close_connections()


def _closing(deployments: Deployments, library: Library, transport: TransportName) -> Deployment:
    kwargs: dict[str, Any] = {"library_errors": True} if library == "thriftpy2" else {}
    return deployments.get(
        f"closing-{library}-{transport}",
        upstream=lambda: upstream_server(library, transport, **kwargs),
        config=merged(FORWARDING_CORE),
    )


CLOSING = [("thriftpy2", "framed"), ("thriftpy2", "buffered"), ("apache", "framed")]


@pytest.mark.parametrize(("library", "transport"), CLOSING)
def test_upstream_closes_mid_call(
    deployments: Deployments, library: Library, transport: TransportName
) -> None:
    d = _closing(deployments, library, transport)
    server = d.server
    try:
        # Raw: the answer carries the client's seqid and says what happened.
        hook = server.hook = _CloseOnce(server, "add")
        before = server.calls["add"]
        reply = raw_call(d.address, encode_call("add", {"a": 2, "b": 2}, seqid=-5), transport)
        assert hook.fired.is_set()
        parts = reply_parts(reply)
        assert (parts.header.type, parts.header.seqid) == (MessageType.EXCEPTION, -5)
        assert parts.exc_type == INTERNAL_ERROR
        assert parts.exc_message is not None
        assert "closed the connection" in parts.exc_message
        assert server.calls["add"] == before + 1  # not retried
        # A library client: the error, then a normal answer on the same connection.
        tae = application_exception_class(library)
        with client(library, d.address, transport) as c:
            assert c.add(1, 1) == 2
            hook = server.hook = _CloseOnce(server, "add")
            with pytest.raises(tae) as info:
                c.add(3, 4)
            assert info.value.type == tae.INTERNAL_ERROR
            assert hook.fired.is_set()
            assert c.add(5, 6) == 11
    finally:
        server.hook = None


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_upstream_drops_connection_on_undeclared_error(
    deployments: Deployments, transport: TransportName
) -> None:
    """thriftpy2's own behaviour (``library_errors=True``): crash() drops the connection."""
    d = _closing(deployments, "thriftpy2", transport)
    before = d.server.calls["crash"]
    reply = raw_call(d.address, encode_call("crash", seqid=SEQIDS[0]), transport)
    parts = reply_parts(reply)
    assert (parts.header.type, parts.header.seqid, parts.header.name) == (
        MessageType.EXCEPTION,
        SEQIDS[0],
        "crash",
    )
    assert parts.exc_type == INTERNAL_ERROR
    assert parts.exc_message is not None
    assert "closed the connection" in parts.exc_message
    assert d.server.calls["crash"] == before + 1
    tae = application_exception_class("apache")
    with client("apache", d.address, transport) as c:
        with pytest.raises(tae) as info:
            c.crash()
        assert info.value.type == tae.INTERNAL_ERROR
        assert c.add(20, 22) == 42


# -- an upstream that sends garbage right after a good reply ------------------------------


class _GarbageAfterReply:
    """A framed upstream that answers ``add`` correctly, then writes garbage in the same send.

    Real sockets, but not a Thrift library: no library sends this. The
    connection stays open after the garbage, so a sidecar that kept it in its
    pool would read the garbage as the start of the next reply.
    """

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.connections = 0
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"

    def __enter__(self) -> _GarbageAfterReply:
        self._spawn(self._accept)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5.0)
        self._listener.close()

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            self._spawn(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(0.1)
            data = b""
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    return
                data += chunk
                if len(data) < 4 or len(data) < 4 + struct.unpack_from(">i", data)[0]:
                    continue
                call = _decode_add_call(data[4:])
                result = struct.pack(">bhq", 10, 0, call.a + call.b) + b"\x00"
                reply = encode_header("add", MessageType.REPLY, call.seqid) + result
                conn.sendall(encode_frame(reply) + b"\xde\xad\xbe\xef garbage")
                data = b""


@dataclass
class _Call:
    seqid: int
    a: int
    b: int


def _decode_add_call(message: bytes) -> _Call:
    """The seqid and arguments of an ``add`` call (no frame prefix), decoded by thriftpy2."""
    header = parse_header(message)
    assert header is not None
    args = load_thriftpy2_interop().Interop.add_args()
    body = thriftpy2.transport.TCyMemoryBuffer(message[header.body_offset :])
    thriftpy2.protocol.TCyBinaryProtocol(body).read_struct(args)
    return _Call(header.seqid, args.a, args.b)


def test_garbage_after_a_reply_discards_the_upstream_connection() -> None:
    with (
        _GarbageAfterReply() as upstream,
        run_sidecar([upstream.address], config=merged(FORWARDING_CORE)) as sidecar,
    ):
        replies = [
            raw_call(sidecar.address, encode_call("add", {"a": i, "b": 1}, seqid=i), "framed")
            for i in (10, 20, 30)
        ]
        assert [decode_reply("add", r) for r in replies] == [11, 21, 31]
        assert [reply_parts(r).header.seqid for r in replies] == [10, 20, 30]
        # Never reused after the garbage: a new upstream connection per call.
        assert upstream.connections == 3
