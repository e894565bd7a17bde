"""The fault-injecting proxy does what each action says, against a real upstream.

Plans are checked without sockets (schedules, seeded rates, validation); the
proxy with a thriftpy2 upstream behind it and raw or library clients in
front: each action once, on both transports where framing matters; THeader
calls (Apache's THeader client and server, binary and compact) relayed,
delayed and answered with an error in their own protocol.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import thriftpy2.thrift
import thriftpy2.transport
from thrift.protocol.THeaderProtocol import THeaderProtocol
from thrift.Thrift import TApplicationException
from thrift.transport import TSocket
from thrift.transport.THeaderTransport import THeaderClientType, THeaderSubprotocolID

from sidecar.errors import RemoteProtocolError
from sidecar.protocol.appexc import ApplicationExceptionType, parse_application_exception
from sidecar.protocol.auto import decoder_for
from sidecar.protocol.envelope import MessageType, parse_header
from sidecar.protocol.framing import Transport, frame, make_decoder
from sidecar.testing.faults import Action, Fault, FaultPlan, FaultProxyThread, start_in_thread
from tests.interop.matrix import Wire
from tests.interop.upstream import WireUpstream
from tests.support.apache_gen import load_apache_interop
from tests.support.clients import split_address, thriftpy2_client
from tests.support.idl import load_thriftpy2_interop
from tests.support.raw import decode_reply, encode_call, raw_call, raw_calls
from tests.support.servers import Thriftpy2Server, TransportName, thriftpy2_server
from tests.support.wait import wait_until

TRANSPORTS: tuple[TransportName, ...] = ("framed", "buffered")


@pytest.fixture(scope="module", params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> TransportName:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def upstream(transport: TransportName) -> Iterator[Thriftpy2Server]:
    with thriftpy2_server(transport) as server:
        yield server


@pytest.fixture
def proxy(upstream: Thriftpy2Server) -> Iterator[FaultProxyThread]:
    with FaultProxyThread(upstream.address, upstream.transport, FaultPlan()) as p:
        yield p


def _order() -> object:
    idl = load_thriftpy2_interop()
    return idl.Order(customer="c", lines=[idl.OrderLine(itemId=2, quantity=1)])


# -- plans, no sockets --------------------------------------------------------------


def test_schedule_comes_first_then_rates_from_a_seeded_source() -> None:
    plan = FaultPlan({"reset_after": 0.5}, schedule=["garbage", ("delay", 0.25), "delay"], delay=2)
    assert plan.next_call() == Fault(Action.GARBAGE)
    assert plan.next_call() == Fault(Action.DELAY, 0.25)
    plan.set_delay(3)
    assert plan.next_call() == Fault(Action.DELAY, 3.0)  # the plan's delay when used
    assert plan.pending == 0
    drawn = [plan.next_call().action for _ in range(2000)]
    twin = FaultPlan({"reset_after": 0.5}, delay=2)
    assert [twin.next_call().action for _ in range(2000)] == drawn
    share = drawn.count(Action.RESET_AFTER) / len(drawn)
    assert 0.45 < share < 0.55
    assert set(drawn) == {Action.OK, Action.RESET_AFTER}


def test_rates_cover_every_call_action_in_proportion() -> None:
    rates = {
        "reset_before": 0.1,
        "reset_after": 0.1,
        "delay": 0.1,
        "internal_error": 0.1,
        "garbage": 0.1,
        "close_after": 0.1,
    }
    plan = FaultPlan(rates, seed=7)
    n = 10_000
    drawn = [plan.next_call().action for _ in range(n)]
    for action in rates:
        assert 0.08 < drawn.count(Action(action)) / n < 0.12, action
    assert 0.37 < drawn.count(Action.OK) / n < 0.43


def test_connection_schedule_then_refuse_rate() -> None:
    plan = FaultPlan({"refuse": 1.0, "garbage": 0.0}, connect_schedule=["ok", "refuse", "ok"])
    assert [plan.next_connection() for _ in range(5)] == [
        Action.OK,
        Action.REFUSE,
        Action.OK,
        Action.REFUSE,
        Action.REFUSE,
    ]
    assert plan.next_call() == Fault(Action.OK)  # refuse is never a call action
    plan.clear()
    assert plan.next_connection() is Action.OK


@pytest.mark.parametrize(
    "bad",
    [
        {"reset_after": 1.5},
        {"reset_after": 0.6, "reset_before": 0.6},
        {"delay": -0.1},
        {"explode": 0.1},
    ],
)
def test_bad_rates_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 (several messages)
        FaultPlan(bad)


def test_bad_steps_are_refused() -> None:
    plan = FaultPlan()
    with pytest.raises(ValueError, match="connection action"):
        plan.extend_connect_schedule(["garbage"])
    with pytest.raises(ValueError, match="not a call action"):
        plan.extend_schedule(["refuse"])
    with pytest.raises(ValueError, match="only delay steps"):
        plan.extend_schedule([("garbage", 1.0)])
    with pytest.raises(ValueError, match="negative"):
        plan.set_delay(-1)


def test_plan_changes_from_other_threads_are_safe() -> None:
    plan = FaultPlan(seed=3)
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            plan.set_rates(reset_before=0.5)
            plan.extend_schedule(["garbage"] * 10)
            plan.clear()

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        seen = {plan.next_call().action for _ in range(20_000)}
    finally:
        stop.set()
        thread.join(5)
    assert seen <= {Action.OK, Action.RESET_BEFORE, Action.GARBAGE}


def test_garbage_cannot_pass_for_a_message() -> None:
    plan = FaultPlan(seed=1)
    for _ in range(50):
        junk = plan.garbage()
        assert junk[0] == 0xFF
        assert 16 <= len(junk) <= 64
        for kind in Transport:
            with pytest.raises(RemoteProtocolError):
                decoder_for(kind).receive_data(junk)


# -- the proxy with a real upstream ---------------------------------------------------


def test_ok_forwards_and_relays(upstream: Thriftpy2Server, proxy: FaultProxyThread) -> None:
    before = upstream.calls["add"]
    with thriftpy2_client(proxy.address, upstream.transport) as client:
        assert [client.add(i, i) for i in range(5)] == [0, 2, 4, 6, 8]
    assert upstream.calls["add"] - before == 5
    stats = proxy.stats
    assert (stats.connections, stats.calls, stats.forwarded) == (1, 5, 5)
    assert stats.action("ok") == 5
    assert stats.by_method == {"add": 5}


def test_refuse_resets_the_connection_at_once(
    upstream: Thriftpy2Server, proxy: FaultProxyThread
) -> None:
    proxy.plan.extend_connect_schedule(["refuse"])
    with pytest.raises(ConnectionResetError):
        raw_call(proxy.address, encode_call("ping"), upstream.transport, timeout=5)
    # The next connection is served.
    decode_reply("ping", raw_call(proxy.address, encode_call("ping"), upstream.transport))
    stats = proxy.stats
    assert (stats.connections, stats.refused, stats.calls) == (2, 1, 1)


def test_down_refuses_connects_until_up_on_the_same_port(
    upstream: Thriftpy2Server, proxy: FaultProxyThread
) -> None:
    with thriftpy2_client(proxy.address, upstream.transport) as client:
        assert client.add(1, 2) == 3
        proxy.set_down(True)
        assert proxy.proxy.down
        # The open connection was reset with the listener.
        with pytest.raises((thriftpy2.transport.TTransportException, OSError)):
            client.add(1, 2)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(split_address(proxy.address), timeout=5).close()
    port = proxy.port
    proxy.set_down(False)
    assert proxy.port == port
    with thriftpy2_client(proxy.address, upstream.transport) as client:
        assert client.add(2, 2) == 4


def test_reset_before_never_reaches_the_upstream(
    upstream: Thriftpy2Server, proxy: FaultProxyThread
) -> None:
    before = upstream.calls["placeOrder"]
    proxy.plan.extend_schedule(["reset_before"])
    message = encode_call("placeOrder", {"order": _order()})
    with pytest.raises(ConnectionResetError):
        raw_call(proxy.address, message, upstream.transport)
    assert upstream.calls["placeOrder"] == before
    assert proxy.stats.forwarded == 0
    assert proxy.stats.action("reset_before") == 1


def test_reset_after_executes_and_loses_the_reply(
    upstream: Thriftpy2Server, proxy: FaultProxyThread
) -> None:
    before = upstream.calls["placeOrder"]
    proxy.plan.extend_schedule(["reset_after"])
    message = encode_call("placeOrder", {"order": _order()})
    with pytest.raises(ConnectionResetError):
        raw_call(proxy.address, message, upstream.transport)
    assert upstream.calls["placeOrder"] == before + 1
    assert proxy.stats.forwarded == 1


def test_close_after_relays_the_reply_then_closes_with_a_fin(
    upstream: Thriftpy2Server, proxy: FaultProxyThread
) -> None:
    proxy.plan.extend_schedule(["close_after"])
    with socket.create_connection(split_address(proxy.address), timeout=5) as sock:
        sock.sendall(frame(encode_call("add", {"a": 20, "b": 22}), Transport(upstream.transport)))
        received = b""
        deadline = time.monotonic() + 5
        while True:  # the reply, then the end of the stream (a reset would raise)
            assert time.monotonic() < deadline, "no end of stream within 5 s"
            data = sock.recv(65536)
            if not data:
                break
            received += data
    decoder = make_decoder(Transport(upstream.transport))
    [reply] = decoder.receive_data(received)
    assert decode_reply("add", bytes(reply.payload())) == 42
    assert proxy.stats.action("close_after") == 1
    assert proxy.stats.forwarded == 1


@pytest.mark.parametrize("protocol", ["binary", "compact"])
def test_theader_calls_are_relayed_delayed_and_answered_in_their_protocol(protocol: str) -> None:
    gen = load_apache_interop()
    upstream = WireUpstream(Wire(protocol, "header", False))  # type: ignore[arg-type]
    upstream.start()
    plan = FaultPlan(schedule=["ok", ("delay", 0.3), "internal_error"])
    try:
        with FaultProxyThread(upstream.address, "theader", plan) as proxy:
            host, port = split_address(proxy.address)
            sock = TSocket.TSocket(host, port)
            sock.setTimeout(5000)
            sub = (
                THeaderSubprotocolID.COMPACT
                if protocol == "compact"
                else THeaderSubprotocolID.BINARY
            )
            proto = THeaderProtocol(sock, [THeaderClientType.HEADERS], sub)
            client = gen.Interop.Client(proto)
            sock.open()
            try:
                assert client.add(1, 2) == 3
                started = time.monotonic()
                assert client.add(2, 3) == 5
                assert time.monotonic() - started >= 0.3
                with pytest.raises(TApplicationException) as raised:
                    client.add(3, 4)
                assert raised.value.type == ApplicationExceptionType.INTERNAL_ERROR
                assert client.add(4, 5) == 9  # the connection goes on
            finally:
                sock.close()
            assert proxy.stats.forwarded == 3
    finally:
        upstream.stop()
    assert upstream.calls["add"] == 3


def test_delay_waits_then_forwards(upstream: Thriftpy2Server, proxy: FaultProxyThread) -> None:
    proxy.plan.extend_schedule([("delay", 0.3)])
    started = time.monotonic()
    reply = raw_call(proxy.address, encode_call("add", {"a": 20, "b": 22}), upstream.transport)
    assert time.monotonic() - started >= 0.3
    assert decode_reply("add", reply) == 42


def test_internal_error_answers_with_the_seqid_and_keeps_the_connection(
    upstream: Thriftpy2Server, proxy: FaultProxyThread
) -> None:
    before = upstream.calls["add"]
    proxy.plan.extend_schedule(["internal_error", "ok"])
    messages = [
        encode_call("add", {"a": 1, "b": 1}, seqid=77),
        encode_call("add", {"a": 2, "b": 2}, seqid=78, strict=False),
    ]
    first, second = raw_calls(proxy.address, messages, upstream.transport)
    header = parse_header(first)
    assert header is not None
    assert (header.type, header.seqid, header.name, header.strict) == (
        MessageType.EXCEPTION,
        77,
        "add",
        True,
    )
    exc_type, text = parse_application_exception(first[header.body_offset :])
    assert exc_type == ApplicationExceptionType.INTERNAL_ERROR
    assert "fault injected" in text
    assert decode_reply("add", second) == 4
    assert upstream.calls["add"] == before + 1  # only the second call was forwarded


def test_garbage_answers_unreadable_bytes_without_forwarding(
    upstream: Thriftpy2Server, proxy: FaultProxyThread
) -> None:
    before = upstream.calls.total()
    proxy.plan.extend_schedule(["garbage"])
    with socket.create_connection(split_address(proxy.address), timeout=5) as sock:
        message = encode_call("ping")
        sock.sendall(
            len(message).to_bytes(4, "big") + message if upstream.transport == "framed" else message
        )
        data = sock.recv(1024)
    assert data[0] == 0xFF
    with pytest.raises(RemoteProtocolError):
        make_decoder(Transport(upstream.transport)).receive_data(data)
    assert upstream.calls.total() == before
    assert proxy.stats.action("garbage") == 1


def test_oneway_is_forwarded_without_waiting(
    upstream: Thriftpy2Server, proxy: FaultProxyThread
) -> None:
    tag = f"tag-{time.monotonic_ns()}"
    messages = [encode_call("notify", {"tag": tag}), encode_call("notifications", seqid=2)]
    (reply,) = raw_calls(proxy.address, messages, upstream.transport, replies=1)
    assert tag in decode_reply("notifications", reply)
    assert proxy.stats.forwarded == 2


def test_late_reply_is_counted_when_the_client_has_gone(
    upstream: Thriftpy2Server, proxy: FaultProxyThread
) -> None:
    before = upstream.calls["add"]
    proxy.plan.extend_schedule([("delay", 0.3)])
    with pytest.raises(TimeoutError):
        raw_call(
            proxy.address, encode_call("add", {"a": 1, "b": 2}), upstream.transport, timeout=0.1
        )
    wait_until(lambda: proxy.stats.late_replies == 1, timeout=5, message="late reply")
    assert upstream.calls["add"] == before + 1  # a slow upstream still executes it


def test_rates_apply_while_running_and_stats_add_up(upstream: Thriftpy2Server) -> None:
    plan = FaultPlan(seed=11)
    proxy = start_in_thread(upstream.address, upstream.transport, plan)
    try:
        plan.set_rates(internal_error=0.5)
        errors: list[int] = []
        with thriftpy2_client(proxy.address, upstream.transport) as client:
            for i in range(200):
                try:
                    assert client.add(i, 1) == i + 1
                except thriftpy2.thrift.TApplicationException as exc:
                    errors.append(exc.type)
        assert set(errors) == {ApplicationExceptionType.INTERNAL_ERROR}
        stats = proxy.stats
        assert stats.calls == 200
        assert stats.action("internal_error") == len(errors)
        assert stats.forwarded == 200 - len(errors)
        assert 70 < len(errors) < 130
    finally:
        proxy.stop()
    proxy.stop()  # twice is fine


def test_unreachable_upstream_resets_the_client() -> None:
    # A port that was free a moment ago: nothing listens there.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    with FaultProxyThread(dead, "framed") as proxy:
        with pytest.raises(ConnectionResetError):
            raw_call(proxy.address, encode_call("ping"), "framed")
        assert proxy.stats.upstream_failures == 1
        assert proxy.stats.upstream_failure_kinds == {"connect: ECONNREFUSED": 1}


def test_an_upstream_gone_since_the_last_call_is_told_from_one_never_reached(
    upstream: Thriftpy2Server, proxy: FaultProxyThread
) -> None:
    """A connection that served a call, its upstream gone since: "later call"; a
    connection's first call to an upstream that accepts and closes: "first call"."""
    call = frame(encode_call("ping"), Transport(upstream.transport))
    with socket.create_connection(split_address(proxy.address), timeout=5) as sock:
        sock.sendall(call)
        assert sock.recv(4096)  # answered: the proxy's upstream connection is up
        upstream.close_connections()  # the upstream drops it, as a restart does
        sock.sendall(call)
        with pytest.raises(ConnectionResetError):
            assert not sock.recv(4096)
    kinds = proxy.stats.upstream_failure_kinds
    assert list(kinds) == ["later call: ConnectionError"], kinds

    closing = socket.create_server(("127.0.0.1", 0))  # accepts, reads nothing, closes
    host, port = closing.getsockname()
    try:
        with FaultProxyThread(f"{host}:{port}", "framed") as second:
            with socket.create_connection(split_address(second.address), timeout=5) as sock:
                sock.sendall(frame(encode_call("ping"), Transport.FRAMED))
                accepted, _ = closing.accept()
                accepted.settimeout(5)
                assert accepted.recv(4096)  # the call came; closed unanswered (a FIN)
                accepted.close()
                with pytest.raises(ConnectionResetError):
                    assert not sock.recv(4096)
            wait_until(lambda: second.stats.upstream_failures == 1, timeout=5.0)
            assert list(second.stats.upstream_failure_kinds) == ["first call: ConnectionError"]
    finally:
        closing.close()
