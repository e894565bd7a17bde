"""Both libraries, both transports, through a real sidecar.

The matrix: upstream library {thriftpy2, apache} x client library
{thriftpy2, apache} x transport {framed, buffered}. One sidecar per upstream,
with ``transport: auto`` (it detects the client's transport) and
``upstream.transport: same``. Each cell checks one kind of call: every type
of the IDL, declared exceptions, void, oneway, an 8 MiB payload, an undeclared
server error, non-strict envelopes, and ``Service:method`` names to a
multiplexed upstream.

Then the cross-transport sidecars: a framed client to a buffered upstream and
back, and a client transport forced by config.
"""

from __future__ import annotations

import itertools
import random
import uuid
from dataclasses import dataclass
from typing import Any

import pytest

from sidecar.protocol.envelope import MessageType, parse_header
from tests.integration import (
    FORWARDING_CORE,
    LIBRARIES,
    TRANSPORTS,
    Deployment,
    Deployments,
    merged,
    plain,
    raw_connection,
    read_until_closed,
    split_replies,
)
from tests.support.clients import application_exception_class, client, types_of
from tests.support.handler import BUSY_ITEM_ID
from tests.support.idl import canonical, sample_all_types
from tests.support.raw import decode_reply, encode_call, raw_calls
from tests.support.servers import Library, TransportName, upstream_server
from tests.support.wait import wait_until

LARGE = random.Random(8).randbytes(8 << 20)


@dataclass(frozen=True)
class Cell:
    """One cell of the interop matrix."""

    upstream: Library
    client: Library
    transport: TransportName

    def __str__(self) -> str:
        return f"{self.upstream}-upstream/{self.client}-client/{self.transport}"


CELLS = [Cell(up, cl, t) for t, up, cl in itertools.product(TRANSPORTS, LIBRARIES, LIBRARIES)]


@pytest.fixture(params=CELLS, ids=str)
def cell(request: pytest.FixtureRequest) -> Cell:
    return request.param  # type: ignore[no-any-return]


def _plain(deployments: Deployments, cell: Cell) -> Deployment:
    return plain(deployments, cell.upstream, cell.transport)


def _multiplexed(deployments: Deployments, cell: Cell) -> Deployment:
    return deployments.get(
        f"multiplexed-{cell.upstream}-{cell.transport}",
        upstream=lambda: upstream_server(cell.upstream, cell.transport, multiplexed=True),
        config=merged(FORWARDING_CORE),
    )


# -- what every client must see, whatever the path ----------------------------------


def check_echo_all(c: Any, library: Library) -> None:
    sent = sample_all_types(types_of(library))
    got = c.echoAll(sent)
    assert canonical(got) == canonical(sent)


def check_declared_exceptions(c: Any, library: Library) -> None:
    ns = types_of(library)
    with pytest.raises(ns.NotFound) as not_found:
        c.getItem(-7)
    assert (not_found.value.id, not_found.value.message) == (-7, "no item -7")
    with pytest.raises(ns.ServiceBusy) as busy:
        c.getItem(BUSY_ITEM_ID)
    assert (busy.value.message, busy.value.retryAfterMs) == ("busy, try later", 50)
    with pytest.raises(ns.InvalidOrder) as invalid:
        c.placeOrder(ns.Order(customer="x", lines=[]))
    assert invalid.value.reason == "an order needs at least one line"
    # The connection still answers normally after exceptions.
    item = c.getItem(4)
    assert (item.id, item.name, item.price) == (4, "item-4", 6.0)


def check_void(c: Any, upstream: Deployment) -> None:
    before = upstream.server.calls["ping"]
    assert c.ping() is None
    assert upstream.server.calls["ping"] == before + 1


def check_oneway(c: Any) -> None:
    tag = f"oneway-{uuid.uuid4().hex}"
    assert c.notify(tag) is None
    # The next call on the same connection still gets its own answer.
    assert c.add(40, 2) == 42
    wait_until(lambda: tag in c.notifications(), timeout=10.0, interval=0.02, message=tag)


def check_large_binary(c: Any) -> None:
    got = c.echoBinary(LARGE)
    assert len(got) == len(LARGE)
    assert got == LARGE


def check_undeclared_error(c: Any, library: Library) -> None:
    tae = application_exception_class(library)
    with pytest.raises(tae) as info:
        c.crash()
    assert info.value.type == tae.INTERNAL_ERROR
    assert c.add(1, 2) == 3  # not a dropped connection


# -- the matrix --------------------------------------------------------------------


def test_echo_all_types(deployments: Deployments, cell: Cell) -> None:
    with client(cell.client, _plain(deployments, cell).address, cell.transport) as c:
        check_echo_all(c, cell.client)


def test_declared_exceptions_arrive_as_declared_types(deployments: Deployments, cell: Cell) -> None:
    with client(cell.client, _plain(deployments, cell).address, cell.transport) as c:
        check_declared_exceptions(c, cell.client)


def test_void(deployments: Deployments, cell: Cell) -> None:
    d = _plain(deployments, cell)
    with client(cell.client, d.address, cell.transport) as c:
        check_void(c, d)


def test_oneway_is_delivered(deployments: Deployments, cell: Cell) -> None:
    with client(cell.client, _plain(deployments, cell).address, cell.transport) as c:
        check_oneway(c)


def test_8mib_binary_round_trips(deployments: Deployments, cell: Cell) -> None:
    with client(cell.client, _plain(deployments, cell).address, cell.transport) as c:
        check_large_binary(c)


def test_undeclared_server_error_is_internal_error(deployments: Deployments, cell: Cell) -> None:
    d = _plain(deployments, cell)
    before = d.server.calls["crash"]
    with client(cell.client, d.address, cell.transport) as c:
        check_undeclared_error(c, cell.client)
    assert d.server.calls["crash"] == before + 1  # answered, not retried


def test_non_strict_client(deployments: Deployments, cell: Cell) -> None:
    d = _plain(deployments, cell)
    with client(cell.client, d.address, cell.transport, strict=False) as c:
        assert c.add(20, 22) == 42
        check_echo_all(c, cell.client)
        check_declared_exceptions(c, cell.client)
        check_undeclared_error(c, cell.client)
        assert c.ping() is None


def test_multiplexed_service_names(deployments: Deployments, cell: Cell) -> None:
    d = _multiplexed(deployments, cell)
    echo_before = d.metric("thrift_sidecar_requests_total", service="Echo", method="echo")
    interop_before = d.metric("thrift_sidecar_requests_total", service="Interop", method="add")
    with client(cell.client, d.address, cell.transport, "Interop") as interop:
        assert interop.serviceName() == "Interop"
        assert interop.add(-5, 8) == 3
        check_declared_exceptions(interop, cell.client)
        with client(cell.client, d.address, cell.transport, "Echo") as echo:
            assert echo.serviceName() == "Echo"
            assert echo.echo("héllo ✓") == "héllo ✓"
            assert echo.ping() is None
            # Both services on one sidecar, calls interleaved on two connections.
            assert interop.serviceName() == "Interop"
    assert d.server.calls["Echo:echo"] >= 1
    # Metrics name both parts of Service:method.
    echo_after = d.metric("thrift_sidecar_requests_total", service="Echo", method="echo")
    interop_after = d.metric("thrift_sidecar_requests_total", service="Interop", method="add")
    assert (echo_after - echo_before, interop_after - interop_before) == (1, 1)


def test_multiplexed_non_strict_client(deployments: Deployments, cell: Cell) -> None:
    d = _multiplexed(deployments, cell)
    with client(cell.client, d.address, cell.transport, "Echo", strict=False) as echo:
        assert echo.serviceName() == "Echo"
        assert echo.echo("plain") == "plain"


# -- across transports -------------------------------------------------------------


@dataclass(frozen=True)
class Crossing:
    """A sidecar that changes transport between client and upstream."""

    name: str
    client_transport: TransportName
    upstream_library: Library
    upstream_transport: TransportName
    config: dict[str, Any]

    def __str__(self) -> str:
        return self.name


CROSSINGS = [
    Crossing(
        "framed-clients-to-buffered-upstream",
        "framed",
        "thriftpy2",
        "buffered",
        {"upstream": {"transport": "buffered"}},
    ),
    Crossing(
        "buffered-clients-to-framed-upstream",
        "buffered",
        "apache",
        "framed",
        {"upstream": {"transport": "framed"}},
    ),
    Crossing(
        "forced-framed-clients-to-buffered-upstream",
        "framed",
        "apache",
        "buffered",
        {"transport": "framed", "upstream": {"transport": "buffered"}},
    ),
]


def _crossing(deployments: Deployments, crossing: Crossing) -> Deployment:
    return deployments.get(
        crossing.name,
        upstream=lambda: upstream_server(crossing.upstream_library, crossing.upstream_transport),
        config=merged(FORWARDING_CORE, crossing.config),
        # The forced sidecar is sent a buffered client on purpose (below).
        protocol_errors_expected=crossing.config.get("transport") == "framed",
    )


@pytest.mark.parametrize("client_library", LIBRARIES)
@pytest.mark.parametrize("crossing", CROSSINGS, ids=str)
def test_across_transports(
    deployments: Deployments, crossing: Crossing, client_library: Library
) -> None:
    d = _crossing(deployments, crossing)
    with client(client_library, d.address, crossing.client_transport) as c:
        assert c.add(2, 3) == 5
        check_echo_all(c, client_library)
        check_declared_exceptions(c, client_library)
        check_void(c, d)
        check_undeclared_error(c, client_library)
        check_oneway(c)
        check_large_binary(c)
    with client(client_library, d.address, crossing.client_transport, strict=False) as c:
        assert c.add(3, 4) == 7
        check_declared_exceptions(c, client_library)


@pytest.mark.parametrize("crossing", CROSSINGS, ids=str)
def test_across_transports_pipelined_seqids(deployments: Deployments, crossing: Crossing) -> None:
    d = _crossing(deployments, crossing)
    tag = f"crossing-{uuid.uuid4().hex}"
    messages = [
        encode_call("add", {"a": 1, "b": 2}, seqid=1000),
        encode_call("notify", {"tag": tag}, seqid=55),
        encode_call("getItem", {"id": -3}, seqid=7),
        encode_call("add", {"a": 10, "b": 20}, seqid=-5, strict=False),
    ]
    replies = raw_calls(d.address, messages, crossing.client_transport, replies=3)
    assert [(r[0], r[1]) for r in map(_seqid_and_type, replies)] == [
        (1000, MessageType.REPLY),
        (7, MessageType.REPLY),
        (-5, MessageType.REPLY),
    ]
    assert decode_reply("add", replies[0]) == 3
    with pytest.raises(types_of("thriftpy2").NotFound):
        decode_reply("getItem", replies[1])
    assert decode_reply("add", replies[2]) == 30
    wait_until(lambda: tag in d.server.notifications, timeout=10.0, message=tag)


def _seqid_and_type(message: bytes) -> tuple[int, MessageType]:
    header = parse_header(message)
    assert header is not None
    return header.seqid, header.type


def test_forced_framed_refuses_a_buffered_client(deployments: Deployments) -> None:
    """With ``transport: framed`` detection is off: a buffered call is a bad frame."""
    d = _crossing(deployments, CROSSINGS[2])
    before = d.protocol_errors("garbage")
    with raw_connection(d.address) as sock:
        sock.sendall(encode_call("add", {"a": 1, "b": 1}, seqid=3))
        # 0x80010001 read as a frame length is negative: nothing to answer, closed.
        assert read_until_closed(sock) == b""
    assert d.protocol_errors("garbage") == before + 1
    with client("apache", d.address, "framed") as c:
        assert c.add(1, 1) == 2


def test_buffered_client_reaches_framed_only_upstream_with_big_messages(
    deployments: Deployments,
) -> None:
    """Messages larger than one read, converted buffered -> framed and back."""
    d = _crossing(deployments, CROSSINGS[1])
    payloads = [bytes([i]) * (300_000 + i) for i in range(3)]
    messages = [
        encode_call("echoBinary", {"data": p}, seqid=90 + i) for i, p in enumerate(payloads)
    ]
    replies = raw_calls(d.address, messages, "buffered", timeout=15.0)
    assert [decode_reply("echoBinary", r) for r in replies] == payloads
    assert [_seqid_and_type(r)[0] for r in replies] == [90, 91, 92]
    assert split_replies(b"".join(replies), "buffered") == replies
