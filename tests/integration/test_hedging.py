"""Hedged calls through a real sidecar process, to real upstreams.

The upstream holds chosen calls (`Hold`: the next execution of a method waits
until released, at most 10 s), so which attempt is slow is decided by the
test, not by timing. What is checked: the hedge overtakes a held first
attempt and the client gets exactly one reply, the fast one, under its own
seqid; the loser's reply, released later, reaches nobody (other clients'
pipelined calls on the same pool get their own replies, every one checked);
a method that is not idempotent is never hedged; the hedge budget bounds
hedges; a half-open probe is not hedged; with two addresses the hedge goes
to the other one (a fault proxy delays every call on the first); and, with a
fault proxy's schedule, an attempt that fails while the other is in flight
waits for it instead of failing the call (no retries are allowed here), as
does a hedge whose connection is refused. A THeader call (Apache's THeader
client, binary or compact, each frame inside a frame length of its own or
not, to an Apache THeader upstream) is hedged as a copy of its frame: the
client gets one reply, under its own seqid (in the frame and in the
message), in its own THeader form, whichever attempt wins (decided by the
order the upstream runs them in, and again by the fault proxy's delays).

A hedge still waiting for its connection when the first attempt answers
leaves nothing behind: waiting for the one connection of a pool, the
connection handed to it as the call is answered goes back idle; connecting
to an address whose accept queue is full, its connect is given up and its
pool slot freed (/state pools, ``upstream_connections``); in both, the
client gets one reply, and the hedge counts as started, not won, with no
attempt recorded. A hedge handed a connection the upstream has just closed (the fault
proxy's ``close_after``) fails as connection_closed and the call waits for
its first attempt.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from thrift.protocol.THeaderProtocol import THeaderProtocol
from thrift.transport.THeaderTransport import THeaderClientType, THeaderSubprotocolID
from thrift.transport.TTransport import TFramedTransport, TMemoryBuffer

from sidecar.protocol.envelope import parse_header
from sidecar.protocol.framing import Message, Transport, frame, make_decoder
from sidecar.protocol.theader_decoder import THeaderDecoder
from sidecar.testing.faults import FaultPlan, FaultProxyThread
from tests.interop.matrix import Wire
from tests.interop.upstream import WireUpstream
from tests.support.apache_gen import load_apache_interop
from tests.support.clients import split_address, thriftpy2_client
from tests.support.hold import HOLD_LIMIT, Hold, held_server
from tests.support.listeners import NotAccepting
from tests.support.raw import decode_reply, encode_call
from tests.support.servers import Thriftpy2Server, thriftpy2_server
from tests.support.sidecar import SidecarProcess, free_port, run_sidecar
from tests.support.wait import wait_until

# Hedge after 100 ms (well above a call on a busy machine); per-try timeouts and
# the deadline far beyond any hold, so that only a hedge can answer a held call in
# time; no retries to confuse counts.
CONFIG: dict[str, Any] = {
    "hedge": {"delay": "100ms", "budget": {"min_hedges_per_second": 100}},
    "retry": {"max_attempts": 1, "per_try_timeout": "20s", "deadline": "30s"},
    "breaker": {"fail_max": 1000},
    # Declared two-way: a held placeOrder is never answered before, and the oneway
    # probe that would go behind it would keep its connection from the calls here.
    "methods": {"placeOrder": {"idempotent": False, "oneway": False}},
}


class RawClient:
    """One client connection over a bare socket: exact seqids out, every reply byte back."""

    def __init__(self, address: str) -> None:
        self.sock = socket.create_connection(split_address(address), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._decoder = make_decoder(Transport.FRAMED, 1 << 20)
        self._replies: list[bytes] = []

    def send(self, *messages: bytes) -> None:
        self.sock.sendall(b"".join(frame(m, Transport.FRAMED) for m in messages))

    def read(self, count: int, timeout: float = 10.0) -> list[bytes]:
        """The next ``count`` replies, within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while len(self._replies) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{len(self._replies)} of {count} replies in {timeout}s")
            self.sock.settimeout(remaining)
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the sidecar closed the connection")
            self._replies.extend(bytes(m.payload()) for m in self._decoder.receive_data(data))
        out, self._replies = self._replies[:count], self._replies[count:]
        return out

    def round_trip(self, seqid: int, item_id: int) -> None:
        """getItem(item_id) under ``seqid``, and its reply checked (`check_item`)."""
        self.send(get_item(seqid, item_id))
        check_item(self.read(1)[0], seqid, item_id)

    def nothing_pending(self) -> bool:
        """No reply bytes wait to be read (looked at once: a socket timeout would wait it out)."""
        self.sock.settimeout(0.0)
        try:
            self.sock.recv(65536)
        except BlockingIOError:
            return not self._replies
        return False  # bytes, or the connection closed

    def close(self) -> None:
        self.sock.close()


def get_item(seqid: int, item_id: int) -> bytes:
    return encode_call("getItem", {"id": item_id}, seqid=seqid)


def check_item(reply: bytes, seqid: int, item_id: int) -> None:
    """The reply answers getItem(item_id) under ``seqid``."""
    header = parse_header(reply)
    assert header is not None
    assert header.seqid == seqid, (header.seqid, seqid)
    assert decode_reply("getItem", reply).id == item_id


@pytest.fixture
def held_upstream() -> Iterator[tuple[Thriftpy2Server, Hold]]:
    with held_server() as upstream:
        yield upstream


def hedges(sidecar: SidecarProcess, method: str) -> tuple[float, float, float]:
    """(sent, won, refused by the budget) for ``method``."""
    m = sidecar.metrics()
    return (
        m.value("thrift_sidecar_hedges_total", method=method),
        m.value("thrift_sidecar_hedges_won_total", method=method),
        m.value("thrift_sidecar_hedge_budget_exhausted_total", method=method),
    )


def _attempts(sidecar: SidecarProcess, result: str) -> float:
    """getItem's upstream attempts that ended with ``result``."""
    return sidecar.metrics().value(
        "thrift_sidecar_upstream_attempts_total", method="getItem", result=result
    )


def losers_answer(sidecar: SidecarProcess, release: Callable[[], None], losers: int = 1) -> None:
    """``release`` the held losing attempts; wait until their ``losers`` replies are
    recorded as ok attempts (the sidecar reads them and drops them)."""
    ok_attempts = _attempts(sidecar, "ok")
    release()
    wait_until(
        lambda: _attempts(sidecar, "ok") == ok_attempts + losers,
        timeout=10,
        message=f"the {losers} losers' replies recorded",
    )


def test_a_hedge_overtakes_a_held_attempt_and_the_loser_reaches_nobody(
    held_upstream: tuple[Thriftpy2Server, Hold],
) -> None:
    upstream, hold = held_upstream
    with run_sidecar([upstream.address], config=CONFIG) as sidecar:
        a = RawClient(sidecar.address)
        others = [RawClient(sidecar.address) for _ in range(3)]
        try:
            a.round_trip(1, 1)  # getItem answered once: known to be two-way

            hold.arm("getItem")
            a.send(get_item(4242, 7))
            [reply] = a.read(1)  # without a hedge: only after the hold (10 s): TimeoutError
            check_item(reply, 4242, 7)
            assert hold.held == 1  # the first attempt is still held at the upstream
            assert hedges(sidecar, "getItem")[:2] == (1, 1)

            # Other clients pipeline calls on the same pool while the loser is held.
            for n, client in enumerate(others):
                client.send(*(get_item(100 * n + i, 100 * n + i) for i in range(1, 6)))
            for n, client in enumerate(others):
                for i, got in enumerate(client.read(5), start=1):
                    check_item(got, 100 * n + i, 100 * n + i)

            # The loser is answered now; its reply is read and dropped by the sidecar.
            losers_answer(sidecar, hold.release)
            assert a.nothing_pending()
            # Every connection, and the pool with the loser's connection back in it,
            # still pairs each call with its own reply.
            for round_ in range(3):
                for n, client in enumerate([a, *others]):
                    seqid = 1000 * (round_ + 1) + n
                    client.send(get_item(seqid, seqid % 997 + 1), get_item(seqid + 500, n + 1))
                for n, client in enumerate([a, *others]):
                    seqid = 1000 * (round_ + 1) + n
                    first, second = client.read(2)
                    check_item(first, seqid, seqid % 997 + 1)
                    check_item(second, seqid + 500, n + 1)
            assert a.nothing_pending()
        finally:
            for client in [a, *others]:
                client.close()
        calls = 1 + 1 + 15 + 3 * 8
        m = sidecar.metrics()
        assert m.value("thrift_sidecar_requests_total", method="getItem") == calls
        assert m.value("thrift_sidecar_requests_total", method="getItem", outcome="ok") == calls
        # Every hedge ran at the upstream too (one, unless a call was slow for 100 ms).
        sent, won, refused = hedges(sidecar, "getItem")
        assert upstream.calls["getItem"] == calls + sent
        assert (won, refused) == (sent, 0)


def test_a_method_that_is_not_idempotent_is_never_hedged(
    held_upstream: tuple[Thriftpy2Server, Hold],
) -> None:
    upstream, hold = held_upstream
    with (
        run_sidecar([upstream.address], config=CONFIG) as sidecar,
        thriftpy2_client(sidecar.address, "framed") as client,
        thriftpy2_client(sidecar.address, "framed") as reader,
        ThreadPoolExecutor(1) as pool,
    ):
        order = {"customer": "c", "lines": [{"itemId": 1, "quantity": 2}]}
        idl_order = _order(order)
        client.placeOrder(idl_order)  # answered once: two-way, as getItem below
        reader.getItem(1)
        hold.arm("placeOrder")
        placed = pool.submit(client.placeOrder, idl_order)
        wait_until(lambda: hold.held == 1, timeout=10, message="placeOrder held at the upstream")
        # A getItem held after it is hedged 100 ms later: by then placeOrder has
        # waited longer than the hedge delay too.
        hold.arm("getItem")
        assert reader.getItem(3).id == 3
        assert hedges(sidecar, "getItem")[0] == 1
        assert upstream.calls["placeOrder"] == 2  # the first call and the held one, once
        hold.release()
        assert placed.result(10).orderId == 2
        assert upstream.calls["placeOrder"] == 2
        assert hedges(sidecar, "placeOrder") == (0, 0, 0)


def _order(order: dict[str, Any]) -> Any:
    from tests.support.idl import load_thriftpy2_interop

    idl = load_thriftpy2_interop()
    return idl.Order(
        customer=order["customer"], lines=[idl.OrderLine(**line) for line in order["lines"]]
    )


def test_the_hedge_budget_bounds_hedges_when_every_call_is_slow() -> None:
    calls, threads = 200, 4
    slow = 0.03  # every getItem takes 30 ms, the hedge 5 ms after the send never wins

    def every_call_slow(name: str) -> None:
        if name == "getItem":
            time.sleep(slow)

    config = {
        "hedge": {
            "delay": "5ms",
            "budget": {"ratio": 0.1, "min_hedges_per_second": 1, "window": "10s"},
        },
        "retry": {"max_attempts": 1, "per_try_timeout": "5s", "deadline": "10s"},
    }
    with (
        thriftpy2_server("framed") as upstream,
        run_sidecar([upstream.address], config=config) as sidecar,
    ):
        upstream.hook = every_call_slow

        def worker(t: int) -> int:
            good = 0
            with thriftpy2_client(sidecar.address, "framed") as client:
                for i in range(calls // threads):
                    good += client.getItem(t * 1000 + i).id == t * 1000 + i
            return good

        started = time.monotonic()
        with ThreadPoolExecutor(threads) as pool:
            assert sum(pool.map(worker, range(threads))) == calls
        elapsed = time.monotonic() - started
        sent, won, refused = hedges(sidecar, "getItem")
        executed = upstream.calls["getItem"]
    print(
        f"\n{calls} calls, each {slow * 1000:g} ms at the upstream, hedge after 5 ms, budget "
        f"10% + 1/s x 10s: hedges sent {sent:g}, won {won:g}, refused {refused:g}, "
        f"upstream executions {executed} ({elapsed:.1f}s)"
    )
    assert elapsed < 10  # the bound below holds within one budget window
    floor = 1 * 10
    assert sent <= 0.1 * calls + floor
    assert sent >= floor  # the budget was spent, not unused
    # Nearly every call wanted a hedge (sent or refused); not those sent before getItem
    # was first answered (one per client at most), nor one answered before its timer
    # ran on a loaded machine.
    assert calls // 2 <= sent + refused <= calls - 1
    # Every hedge sent reached the upstream: the sidecar waited for its reply too.
    wait_until(lambda: upstream.calls["getItem"] == calls + sent, timeout=10)


def test_with_two_addresses_the_hedge_goes_to_the_other_one() -> None:
    calls = 40
    with (
        thriftpy2_server("framed") as a,
        thriftpy2_server("framed") as b,
        FaultProxyThread(
            a.address, "framed", FaultPlan({"delay": 1.0}, delay=0.5, seed=1)
        ) as slow_a,
    ):
        config = {
            "hedge": {"delay": "100ms", "budget": {"min_hedges_per_second": 100}},
            "retry": {"max_attempts": 1, "per_try_timeout": "5s", "deadline": "10s"},
            # Nothing ejects the slow address: every attempt on it succeeds, late.
        }
        with run_sidecar([slow_a.address, b.address], config=config) as sidecar:
            with thriftpy2_client(sidecar.address, "framed") as client:
                client.ping()
                client.ping()  # getItem: known two-way after its first answer
                for i in range(1, calls + 1):
                    assert client.getItem(i).id == i
            sent, won, refused = hedges(sidecar, "getItem")
            via_a = slow_a.stats.by_method.get("getItem", 0)
            m = sidecar.metrics()
            print(
                f"\n{calls} getItem calls over a slow address (every call +500 ms) and a fast "
                f"one: {via_a} went to the slow one, hedges sent {sent:g}, won {won:g}; "
                f"requests ok {m.value('thrift_sidecar_requests_total', outcome='ok'):g}"
            )
            # Calls alternate between the addresses (a hedge leaves the rotation as it
            # was), and every call that went to the slow address first (but the very
            # first getItem, before the method was known) was hedged to the fast one.
            assert calls // 2 - 1 <= via_a <= calls // 2 + 1
            assert b.calls["getItem"] == calls - via_a + sent
            assert won == sent
            assert sent >= via_a - 1
            assert refused == 0


@pytest.fixture
def proxied(
    held_upstream: tuple[Thriftpy2Server, Hold],
) -> Iterator[tuple[Thriftpy2Server, Hold, FaultProxyThread, SidecarProcess]]:
    """The held upstream behind a fault proxy (its plan empty), behind a sidecar."""
    upstream, hold = held_upstream
    with (
        FaultProxyThread(upstream.address, "framed", FaultPlan(seed=3)) as proxy,
        run_sidecar([proxy.address], config=CONFIG) as sidecar,
    ):
        yield upstream, hold, proxy, sidecar


def one_attempt_closed_and_the_call_answered(
    sidecar: SidecarProcess, upstream: Thriftpy2Server, hedges_won: int
) -> None:
    """After getItem(1) and a hedged getItem(2) one of whose attempts was reset: one hedge
    (``hedges_won`` of it won), both calls ok, no retry, one attempt closed, and the
    upstream ran getItem(1), then getItem(2) twice."""
    m = sidecar.metrics()
    assert hedges(sidecar, "getItem")[:2] == (1, hedges_won)
    assert m.value("thrift_sidecar_requests_total", method="getItem", outcome="ok") == 2
    assert m.value("thrift_sidecar_retries_total") == 0
    assert _attempts(sidecar, "connection_closed") == 1
    assert upstream.calls["getItem"] == 3


def test_a_hedge_that_fails_waits_for_the_first_attempt(
    proxied: tuple[Thriftpy2Server, Hold, FaultProxyThread, SidecarProcess],
) -> None:
    upstream, _, proxy, sidecar = proxied
    with thriftpy2_client(sidecar.address, "framed") as client:
        assert client.getItem(1).id == 1
        # The first attempt waits 300 ms at the proxy; its hedge is reset after the
        # upstream ran it. With max_attempts 1, answering the hedge's failure at once
        # would give the client an error.
        proxy.plan.extend_schedule([("delay", 0.3), "reset_after"])
        assert client.getItem(2).id == 2
    one_attempt_closed_and_the_call_answered(sidecar, upstream, hedges_won=0)


def test_a_first_attempt_that_fails_waits_for_its_hedge(
    proxied: tuple[Thriftpy2Server, Hold, FaultProxyThread, SidecarProcess],
) -> None:
    upstream, hold, proxy, sidecar = proxied
    with thriftpy2_client(sidecar.address, "framed") as client, ThreadPoolExecutor(1) as pool:
        assert client.getItem(1).id == 1
        # The first attempt is held at the upstream, then its reply is lost (reset);
        # the hedge waits 300 ms at the proxy and answers.
        proxy.plan.extend_schedule(["reset_after", ("delay", 0.3)])
        hold.arm("getItem")
        answer = pool.submit(client.getItem, 2)
        wait_until(lambda: hedges(sidecar, "getItem")[0] == 1, message="the hedge sent")
        hold.release()  # the first attempt's reply comes, and the proxy resets instead
        assert answer.result(10).id == 2
    one_attempt_closed_and_the_call_answered(sidecar, upstream, hedges_won=1)


def test_a_hedge_whose_connect_is_refused_waits_for_the_first_attempt(
    held_upstream: tuple[Thriftpy2Server, Hold],
) -> None:
    upstream, hold = held_upstream
    refusing = f"127.0.0.1:{free_port()}"  # nothing listens there: connects are refused
    with (
        run_sidecar([upstream.address, refusing], config=CONFIG) as sidecar,
        thriftpy2_client(sidecar.address, "framed") as client,
        ThreadPoolExecutor(1) as pool,
    ):
        # Calls take the addresses in turn: getItem(1) the live one (getItem is then
        # known two-way), ping the refusing one, getItem(2) the live one again.
        assert client.getItem(1).id == 1
        with pytest.raises(Exception, match="cannot connect to the upstream"):
            client.ping()
        hold.arm("getItem")
        answer = pool.submit(client.getItem, 2)
        # Its hedge goes to the address not tried yet, which refuses the connection:
        # a failure before anything was sent, while the first attempt is in flight.
        wait_until(
            lambda: _attempts(sidecar, "connect_error") == 1,
            message="the hedge's connect refused",
        )
        assert hold.held == 1
        hold.release()
        assert answer.result(10).id == 2  # answering the hedge's failure would be an error
        m = sidecar.metrics()
        assert hedges(sidecar, "getItem") == (1, 0, 0)
        assert m.value("thrift_sidecar_requests_total", method="getItem", outcome="ok") == 2
        assert m.value("thrift_sidecar_retries_total") == 0
    assert upstream.calls["getItem"] == 2


def test_a_half_open_probe_is_not_hedged(
    held_upstream: tuple[Thriftpy2Server, Hold],
) -> None:
    upstream, hold = held_upstream
    config = {
        **CONFIG,
        # One breaker per method: getItem's is half-open while listItems' stays closed.
        "breaker": {"scope": "method", "fail_max": 1, "reset_timeout": "200ms"},
        "methods": {"crash": {"idempotent": True}},
    }
    with (
        run_sidecar([upstream.address], config=config) as sidecar,
        thriftpy2_client(sidecar.address, "framed") as prober,
        thriftpy2_client(sidecar.address, "framed") as clock,
        ThreadPoolExecutor(1) as pool,
    ):
        assert prober.getItem(1).id == 1
        assert clock.listItems(1)[0].id == 1
        # getItem's circuit opens on a failure (an undeclared error: INTERNAL_ERROR).
        upstream.hook = _fail_next_get_item(hold)
        with pytest.raises(Exception, match="Internal error"):
            prober.getItem(2)
        breaker = f"{upstream.address}/getItem"
        assert sidecar.metrics().value("thrift_sidecar_breaker_state", breaker=breaker) == 2
        # After reset_timeout the next getItem is the probe; it is held at the upstream.
        hold.arm("getItem")
        probe = pool.submit(_probe_when_half_open, prober)
        wait_until(lambda: hold.held == 1, timeout=10, message="the probe held")
        # listItems, held as well, is hedged 100 ms later: by then the probe has waited
        # longer than the delay too, and was not hedged.
        hold.arm("listItems")
        assert len(clock.listItems(2)) == 2
        assert hedges(sidecar, "listItems")[0] == 1
        assert hedges(sidecar, "getItem")[0] == 0
        hold.release()
        assert probe.result(10).id == 3
        assert upstream.calls["getItem"] == 3  # 1, the failure, and the probe once


def _fail_next_get_item(hold: Hold) -> Any:
    """A hook: the next getItem raises an undeclared error; then every call goes to ``hold``."""
    failed: list[bool] = []

    def hook(name: str) -> None:
        if name == "getItem" and not failed:
            failed.append(True)
            raise RuntimeError("planted failure")
        hold(name)

    return hook


def _probe_when_half_open(client: Any) -> Any:
    """getItem(3), retried while the circuit is still open (its reset_timeout, 200 ms)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return client.getItem(3)
        except Exception as exc:
            if "circuit open" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def test_max_extra_two_sends_a_second_hedge_a_delay_after_the_first(
    held_upstream: tuple[Thriftpy2Server, Hold],
) -> None:
    upstream, hold = held_upstream
    config = {**CONFIG, "hedge": {**CONFIG["hedge"], "max_extra": 2}}
    with run_sidecar([upstream.address], config=config) as sidecar:
        with thriftpy2_client(sidecar.address, "framed") as client:
            assert client.getItem(1).id == 1
            hold.arm("getItem", 2)  # the first attempt and the first hedge
            assert client.getItem(2).id == 2  # with max_extra 1: held for 10 s
            assert hold.held == 2
            assert hedges(sidecar, "getItem")[:2] == (2, 1)
            losers_answer(sidecar, hold.release, losers=2)  # their replies are dropped
            assert client.getItem(3).id == 3
        assert upstream.calls["getItem"] == 1 + 3 + 1
        m = sidecar.metrics()
        assert m.value("thrift_sidecar_requests_total", method="getItem", outcome="ok") == 3


# -- THeader: the hedge is a copy of a THeader frame -----------------------------------


class Race:
    """A getItem hook deciding which attempt answers first, by order, not by timing.

    After `arm`, the first getItem execution (the call's own attempt) and the
    second (its hedge) are ordered: with ``hedge_wins`` the first waits until
    `release` and the hedge answers at once; otherwise the first answers as
    soon as the hedge has reached the upstream, and the hedge waits until
    `release`. Every wait ends after `HOLD_LIMIT` seconds at most.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen = -1  # getItem executions since `arm` (-1: not armed)
        self.hedge_wins = False
        self.hedge_arrived = threading.Event()
        self.released = threading.Event()

    def arm(self, hedge_wins: bool) -> None:
        with self._lock:
            self._seen = 0
            self.hedge_wins = hedge_wins

    def release(self) -> None:
        self.released.set()

    def __call__(self, name: str) -> None:
        if name != "getItem":
            return
        with self._lock:
            if self._seen < 0:
                return
            self._seen += 1
            seen = self._seen
        if seen == 1:  # the call's own attempt
            if self.hedge_wins:
                self.released.wait(HOLD_LIMIT)
            else:
                self.hedge_arrived.wait(HOLD_LIMIT)
        elif seen == 2:  # the hedge
            self.hedge_arrived.set()
            if not self.hedge_wins:
                self.released.wait(HOLD_LIMIT)


def theader_get_item(protocol: str, outer_framed: bool, seqid: int, item_id: int) -> bytes:
    """getItem(item_id) as Apache's THeader client writes it (in a frame if ``outer_framed``)."""
    gen = load_apache_interop()
    out = TMemoryBuffer()
    trans: Any = TFramedTransport(out) if outer_framed else out
    proto = THeaderProtocol(trans, [THeaderClientType.HEADERS], _SUBPROTOCOL[protocol])
    proto.set_header(b"trace-id", f"trace-{seqid}".encode())
    client = gen.Interop.Client(proto)
    client._seqid = seqid
    client.send_getItem(item_id)
    return bytes(out.getvalue())


def theader_item(wire: bytes, protocol: str, outer_framed: bool) -> Any:
    """The getItem result in one THeader reply, read by Apache's THeader client."""
    gen = load_apache_interop()
    trans: Any = TMemoryBuffer(wire)
    if outer_framed:
        trans = TFramedTransport(trans)
    proto = THeaderProtocol(trans, [THeaderClientType.HEADERS], _SUBPROTOCOL[protocol])
    return gen.Interop.Client(proto).recv_getItem()


_SUBPROTOCOL = {"binary": THeaderSubprotocolID.BINARY, "compact": THeaderSubprotocolID.COMPACT}


class THeaderClient:
    """A THeader client connection over a bare socket: the exact bytes of every reply.

    Apache's THeader client writes the calls and reads the values; the socket
    is the test's, so that the reply's seqids (the frame's and the message's),
    its framing, and anything sent after it can be checked, which no library
    client checks.
    """

    def __init__(self, address: str, protocol: str, outer_framed: bool) -> None:
        self.protocol = protocol
        self.outer_framed = outer_framed
        self.sock = socket.create_connection(split_address(address), timeout=10)
        self._decoder = THeaderDecoder(1 << 20)
        self._pending = bytearray()

    def call(self, seqid: int, item_id: int) -> None:
        self.sock.sendall(theader_get_item(self.protocol, self.outer_framed, seqid, item_id))

    def reply(self, timeout: float = 10.0) -> tuple[bytes, Message]:
        """The next reply: its bytes, and the message the sidecar's decoder reads in them."""
        deadline = time.monotonic() + timeout
        while True:
            # One reply at a time is awaited: the decoder is fed the bytes of one reply.
            length = self._frame_length()
            if length is not None and len(self._pending) >= length:
                wire = bytes(self._pending[:length])
                del self._pending[:length]
                [message] = self._decoder.receive_data(wire)
                return wire, message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no whole reply in {timeout}s ({len(self._pending)} bytes)")
            self.sock.settimeout(remaining)
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the sidecar closed the connection")
            self._pending += data

    def round_trip(self, seqid: int, item_id: int) -> Message:
        """getItem(item_id) under ``seqid``: its reply's value checked, its message returned."""
        self.call(seqid, item_id)
        wire, message = self.reply()
        assert theader_item(wire, self.protocol, self.outer_framed).id == item_id
        return message

    def _frame_length(self) -> int | None:
        """Bytes of the first whole reply in ``_pending`` (its outer frame included)."""
        if len(self._pending) < 4:
            return None
        return 4 + int(struct.unpack_from(">i", self._pending, 0)[0])

    def nothing_pending(self) -> bool:
        """No reply bytes wait to be read (looked at once, without waiting)."""
        self.sock.settimeout(0.0)
        try:
            self.sock.recv(65536)
        except BlockingIOError:
            return not self._pending
        return False

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("hedge_wins", [True, False], ids=["hedge-wins", "first-wins"])
@pytest.mark.parametrize(
    ("protocol", "outer_framed"),
    [("binary", False), ("compact", False), ("binary", True), ("compact", True)],
    ids=["binary-theader", "compact-theader", "binary-in-a-frame", "compact-in-a-frame"],
)
def test_a_theader_call_hedged_gets_one_reply_under_its_own_seqid_in_its_own_form(
    protocol: str, outer_framed: bool, hedge_wins: bool
) -> None:
    race = Race()
    upstream = WireUpstream(Wire(protocol, "header", False))  # type: ignore[arg-type]
    upstream.hook = race
    upstream.start()
    try:
        with run_sidecar([upstream.address], config=CONFIG) as sidecar:
            client = THeaderClient(sidecar.address, protocol, outer_framed)
            try:
                client.round_trip(1, 1)  # getItem answered once: known to be two-way

                race.arm(hedge_wins)
                # A seqid whose compact varint is longer than the upstream connections'
                # own seqids: each attempt's copy is patched to a shorter one, the reply
                # back to this one.
                seqid = 0x7FFF_FF00
                # With no hedge, hedge-wins: answered only after the hold (10 s).
                reply = client.round_trip(seqid, 7)
                assert reply.header.seqid == seqid
                assert reply.theader is not None
                assert reply.theader.seqid == seqid
                assert reply.theader.outer_framed is outer_framed
                assert reply.header.protocol.value == protocol
                assert upstream.calls["getItem"] == 3  # both attempts ran
                assert hedges(sidecar, "getItem")[:2] == (1, 1 if hedge_wins else 0)

                # The loser answers now; its reply is read and dropped by the sidecar.
                losers_answer(sidecar, race.release)
                assert client.nothing_pending()
                # The connection and the pool still pair each call with its own reply.
                for n in range(3):
                    assert client.round_trip(100 + n, 10 + n).header.seqid == 100 + n
                assert client.nothing_pending()
            finally:
                client.close()
            m = sidecar.metrics()
            assert m.value("thrift_sidecar_requests_total", method="getItem", outcome="ok") == 5
            assert m.value("thrift_sidecar_requests_total", method="getItem") == 5
    finally:
        race.release()
        upstream.stop()


@pytest.mark.parametrize("hedge_wins", [True, False], ids=["hedge-wins", "first-wins"])
@pytest.mark.parametrize("outer_framed", [False, True], ids=["theader", "theader-in-a-frame"])
def test_a_theader_call_whose_attempts_the_fault_proxy_delays_gets_one_reply(
    outer_framed: bool, hedge_wins: bool
) -> None:
    """The same through the fault proxy (compact THeader): its delays decide which
    attempt answers first, and the loser's reply still comes, later."""
    protocol = "compact"
    upstream = WireUpstream(Wire(protocol, "header", False))  # type: ignore[arg-type]
    upstream.start()
    try:
        with (
            FaultProxyThread(upstream.address, "theader", FaultPlan(seed=4)) as proxy,
            run_sidecar([proxy.address], config=CONFIG) as sidecar,
        ):
            client = THeaderClient(sidecar.address, protocol, outer_framed)
            try:
                client.round_trip(1, 1)  # getItem answered once: known to be two-way
                # The first attempt, then its hedge (100 ms later): the slow one 1 s,
                # the other one at once (hedge-wins) or after 300 ms (first-wins).
                steps = [("delay", 1.0), "ok"] if hedge_wins else [("delay", 0.3), ("delay", 1.0)]
                proxy.plan.extend_schedule(steps)
                ok_attempts = _attempts(sidecar, "ok")
                reply = client.round_trip(90_000, 7)
                assert reply.header.seqid == 90_000
                assert reply.theader is not None
                assert (reply.theader.seqid, reply.theader.outer_framed) == (90_000, outer_framed)
                assert hedges(sidecar, "getItem")[:2] == (1, 1 if hedge_wins else 0)
                wait_until(
                    lambda: _attempts(sidecar, "ok") == ok_attempts + 2,
                    timeout=10,
                    message="the winner's and the loser's replies recorded",
                )
                assert client.nothing_pending()
                assert client.round_trip(2, 2).header.seqid == 2
                assert client.nothing_pending()
            finally:
                client.close()
            assert proxy.stats.by_method.get("getItem", 0) == 4
    finally:
        upstream.stop()
    assert upstream.calls["getItem"] == 4


# -- a hedge still waiting for its connection when the call is answered ------------------


def pool_state(sidecar: SidecarProcess, address: str) -> tuple[int, int, int]:
    """(open, idle, busy) connections of the pool of ``address``, from /state (0s: no pool)."""
    for pool in sidecar.state()["pools"]:
        if pool["address"] == address:
            return pool["open"], pool["idle"], pool["busy"]
    return 0, 0, 0


def connections_gauge(sidecar: SidecarProcess, address: str) -> tuple[float, float]:
    """(busy, idle) from thrift_sidecar_upstream_connections."""
    m = sidecar.metrics()
    return (
        m.value("thrift_sidecar_upstream_connections", upstream=address, state="busy"),
        m.value("thrift_sidecar_upstream_connections", upstream=address, state="idle"),
    )


def test_a_hedge_waiting_for_the_only_connection_gives_it_back_when_the_first_attempt_answers(
    held_upstream: tuple[Thriftpy2Server, Hold],
) -> None:
    """One address, one connection: the hedge waits for the connection the first attempt
    holds. When the first attempt answers, the pool hands that connection to the waiting
    hedge at the moment the call is answered and the hedge cancelled: it must go back to
    the pool, idle, not be lost with the cancelled hedge (the next call would wait for a
    connection that never comes) nor carry the hedge."""
    upstream, hold = held_upstream
    config = {**CONFIG, "upstream": {"pool_size": 1}}
    address = upstream.address
    with run_sidecar([address], config=config) as sidecar:
        client = RawClient(sidecar.address)
        try:
            client.round_trip(1, 1)
            hold.arm("getItem")
            client.send(get_item(4242, 2))
            wait_until(lambda: hedges(sidecar, "getItem")[0] == 1, message="the hedge started")
            assert hold.held == 1
            assert pool_state(sidecar, address) == (1, 0, 1)  # the hedge waits for that one
            hold.release()
            check_item(client.read(1)[0], 4242, 2)
            for i in range(3, 6):  # on that same connection: the pool holds only one
                client.round_trip(i, i)
            assert client.nothing_pending()
        finally:
            client.close()
        wait_until(
            lambda: pool_state(sidecar, address) == (1, 1, 0),
            message="the connection idle in the pool",
        )
        wait_until(
            lambda: connections_gauge(sidecar, address) == (0, 1),
            message="upstream_connections: one idle",
        )
        assert hedges(sidecar, "getItem") == (1, 0, 0)
        m = sidecar.metrics()
        assert m.value("thrift_sidecar_requests_total", method="getItem", outcome="ok") == 5
        assert m.value("thrift_sidecar_upstream_attempts_total", method="getItem") == 5
    assert upstream.calls["getItem"] == 5  # the hedge was never sent


def test_a_hedge_still_connecting_when_the_first_attempt_answers_leaves_nothing_behind(
    held_upstream: tuple[Thriftpy2Server, Hold],
) -> None:
    upstream, hold = held_upstream
    port = free_port()
    slow = f"127.0.0.1:{port}"
    # The hedge's connect may take up to 10 s: it is pending when the first attempt answers.
    config = {**CONFIG, "upstream": {"connect_timeout": "10s"}}
    with (
        run_sidecar([upstream.address, slow], config=config) as sidecar,
        thriftpy2_client(sidecar.address, "framed") as first,
    ):
        # Calls take the addresses in turn: getItem(1) the live one (getItem is then
        # known two-way), ping the other (nothing listens yet: refused at once),
        # getItem(2) the live one again.
        assert first.getItem(1).id == 1
        with pytest.raises(Exception, match="cannot connect to the upstream"):
            first.ping()
        listener = NotAccepting(port)
        client = RawClient(sidecar.address)
        try:
            hold.arm("getItem")
            client.send(get_item(4242, 2))
            # The hedge goes to the address not tried yet, and its connect hangs there,
            # holding a slot of that pool.
            wait_until(lambda: hedges(sidecar, "getItem")[0] == 1, message="the hedge started")
            wait_until(
                lambda: pool_state(sidecar, slow) == (1, 0, 1), message="the hedge connecting"
            )
            assert hold.held == 1
            hold.release()
            check_item(client.read(1)[0], 4242, 2)
            # The call was answered: the hedge's connect was given up and its slot freed.
            wait_until(
                lambda: pool_state(sidecar, slow) == (0, 0, 0),
                message="the connecting hedge's slot freed",
            )
            wait_until(
                lambda: connections_gauge(sidecar, slow) == (0, 0),
                message="upstream_connections: none to the slow address",
            )
            assert client.nothing_pending()
        finally:
            client.close()
            listener.close()
        m = sidecar.metrics()
        assert hedges(sidecar, "getItem") == (1, 0, 0)
        assert m.value("thrift_sidecar_requests_total", method="getItem", outcome="ok") == 2
        # The hedge made no attempt: nothing recorded against the slow address.
        assert m.value("thrift_sidecar_upstream_attempts_total", method="getItem") == 2
        assert m.value("thrift_sidecar_upstream_ejections_total", upstream=slow) == 0
    assert upstream.calls["getItem"] == 2


# -- a hedge whose connection the upstream closed before the hedge was sent --------------


def test_a_hedge_on_a_connection_the_upstream_closed_waits_for_the_first_attempt(
    held_upstream: tuple[Thriftpy2Server, Hold],
) -> None:
    """The hedge waits for the one connection of the other address, busy with another
    client's call. The upstream answers that call and closes the connection (a server
    that ends connections after a call): the pool hands the connection to the hedge as
    the reply is read, and the end of the connection comes next. Mostly the hedge finds
    the connection closed before it writes (`Hedger._send`); when the end comes a moment
    later, the hedge is written and fails as the connection closes. Either way it is the
    hedge's failure (connection_closed), not the call's: the call waits for its first
    attempt, and the client gets its one answer, nothing more."""
    first, hold_first = held_upstream
    hold_other = Hold()
    config = {**CONFIG, "upstream": {"pool_size": 1}}
    with (
        thriftpy2_server("framed") as other,
        FaultProxyThread(other.address, "framed", FaultPlan(seed=5)) as closing,
        run_sidecar([first.address, closing.address], config=config) as sidecar,
    ):
        other.hook = hold_other
        client = RawClient(sidecar.address)
        neighbour = RawClient(sidecar.address)
        try:
            # Calls take the addresses in turn: getItem(1) the first one (getItem is
            # then known two-way); placeOrder the other one, held there, its reply
            # followed by the end of the connection; getItem(2) the first one, held.
            client.round_trip(1, 1)
            hold_other.arm("placeOrder")
            closing.plan.extend_schedule(["close_after"])
            neighbour.send(place_order(77))
            wait_until(lambda: hold_other.held == 1, message="placeOrder held")
            hold_first.arm("getItem")
            client.send(get_item(4242, 2))
            # Its hedge waits for the other address's one connection (placeOrder's).
            wait_until(lambda: hedges(sidecar, "getItem")[0] == 1, message="the hedge started")
            assert pool_state(sidecar, closing.address) == (1, 0, 1)
            hold_other.release()
            assert decode_reply("placeOrder", neighbour.read(1)[0]).orderId == 1
            wait_until(
                lambda: _attempts(sidecar, "connection_closed") == 1,
                message="the hedge failed: connection closed",
            )
            assert client.nothing_pending()  # the hedge's failure is not the call's answer
            assert hold_first.held == 1
            hold_first.release()
            check_item(client.read(1)[0], 4242, 2)
            assert client.nothing_pending()
            assert neighbour.nothing_pending()
        finally:
            client.close()
            neighbour.close()
            hold_other.release()
        m = sidecar.metrics()
        assert hedges(sidecar, "getItem") == (1, 0, 0)
        assert m.value("thrift_sidecar_requests_total", method="getItem", outcome="ok") == 2
        assert m.value("thrift_sidecar_requests_total", method="getItem") == 2
        assert m.value("thrift_sidecar_retries_total") == 0
        assert (
            m.value(
                "thrift_sidecar_upstream_attempts_total",
                method="getItem",
                upstream=closing.address,
            )
            == 1  # the hedge, closed
        )
        wait_until(
            lambda: pool_state(sidecar, closing.address)[0] == 0,
            message="the closed connection's slot freed",
        )
    assert first.calls["getItem"] == 2
    assert other.calls["getItem"] == 0  # the hedge never ran


def place_order(seqid: int) -> bytes:
    order = {"customer": "c", "lines": [{"itemId": 1, "quantity": 2}]}
    return encode_call("placeOrder", {"order": _order(order)}, seqid=seqid)
