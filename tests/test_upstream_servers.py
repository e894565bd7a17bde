"""The test upstreams themselves, with no sidecar in between.

Every server (thriftpy2, Apache) is called by every client (thriftpy2,
Apache) on both transports, plain and multiplexed, so that a sidecar test
that fails is known to fail because of the sidecar.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from typing import Any, cast

import pytest
import thriftpy2.transport
from thrift.transport.TTransport import TTransportException as ApacheTransportError

from sidecar.protocol.appexc import parse_application_exception
from sidecar.protocol.envelope import MessageType, parse_header
from sidecar.protocol.framing import Transport, frame
from tests.support.apache_gen import GENERATED_DIR, generate_apache_interop
from tests.support.clients import (
    apache_client,
    application_exception_class,
    client,
    thriftpy2_client,
    types_of,
)
from tests.support.handler import BUSY_ITEM_ID
from tests.support.idl import canonical, sample_all_types
from tests.support.raw import (
    ConnectionClosed,
    decode_reply,
    encode_call,
    raw_call,
    raw_calls,
    raw_send,
)
from tests.support.servers import (
    Library,
    TransportName,
    UpstreamServer,
    thriftpy2_server,
    upstream_server,
)
from tests.support.wait import wait_until

LIBRARIES = ("thriftpy2", "apache")
TRANSPORTS = ("framed", "buffered")
INTERNAL_ERROR = 6
UNKNOWN_METHOD = 1
EIGHT_MIB = 8 * 1024 * 1024
TRANSPORT_ERRORS = (thriftpy2.transport.TTransportException, ApacheTransportError, OSError)

# (server library, client library, transport): every pairing.
COMBOS = list(itertools.product(LIBRARIES, LIBRARIES, TRANSPORTS))
COMBO_IDS = [f"{s}-server-{c}-client-{t}" for s, c, t in COMBOS]


@pytest.fixture(params=COMBOS, ids=COMBO_IDS)
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[UpstreamServer, Any, Library]]:
    """A fresh plain server, a client of it, and the client's library."""
    server_lib, client_lib, transport = request.param
    with (
        upstream_server(server_lib, transport) as server,
        client(client_lib, server.address, transport) as c,
    ):
        yield server, c, client_lib


@pytest.fixture(params=COMBOS, ids=COMBO_IDS)
def mux(request: pytest.FixtureRequest) -> Iterator[tuple[UpstreamServer, Any, Any, Library]]:
    """A fresh multiplexed server and two clients of it: Interop and Echo."""
    server_lib, client_lib, transport = request.param
    with (
        upstream_server(server_lib, transport, multiplexed=True) as server,
        client(client_lib, server.address, transport, "Interop") as interop,
        client(client_lib, server.address, transport, "Echo") as echo,
    ):
        yield server, interop, echo, client_lib


def _order(ns: Any, *lines: tuple[int, int]) -> Any:
    return ns.Order(
        customer="ada",
        lines=[ns.OrderLine(itemId=i, quantity=q) for i, q in lines],
    )


# -- every method, every pair ----------------------------------------------------


def test_every_method_round_trips(pair: tuple[UpstreamServer, Any, Library]) -> None:
    _, c, lib = pair
    ns = types_of(lib)
    assert c.ping() is None
    sample = sample_all_types(ns)
    assert canonical(c.echoAll(sample)) == canonical(sample)
    empty = c.echoAll(ns.AllTypes())
    assert empty.withDefault == 42
    assert empty.stringWithDefault == "hello"
    assert empty.anOptional is None
    assert canonical(empty) == canonical(ns.AllTypes())
    assert c.echoBinary(b"\x00\x80\x01\xff") == b"\x00\x80\x01\xff"
    item = c.getItem(4)
    assert (item.id, item.name, item.price, item.status) == (4, "item-4", 6.0, ns.Status.AVAILABLE)
    assert set(item.tags) == {"even"}
    assert item.description == "the item numbered 4"
    assert c.getItem(7).description is None
    assert [i.id for i in c.listItems(3)] == [1, 2, 3]
    assert c.listItems(0) == []
    receipt = c.placeOrder(_order(ns, (2, 3), (10, 1)))
    assert (receipt.orderId, receipt.customer, receipt.total, receipt.itemCount) == (
        1,
        "ada",
        3 * 3.0 + 15.0,
        4,
    )
    assert c.add(2**40, -7) == 2**40 - 7
    assert c.add(-(2**62), -(2**62)) == -(2**63)
    assert c.sleepMs(1) == 1
    assert c.serviceName() == "Interop"
    assert c.callCount("getItem") == 2
    assert c.callCount("callCount") == 2
    assert c.callCount("never") == 0


def test_eight_mib_binary(pair: tuple[UpstreamServer, Any, Library]) -> None:
    _, c, _ = pair
    data = bytes(range(256)) * (EIGHT_MIB // 256)
    assert c.echoBinary(data) == data


def test_declared_exceptions_arrive_as_declared_types(
    pair: tuple[UpstreamServer, Any, Library],
) -> None:
    server, c, lib = pair
    ns = types_of(lib)
    with pytest.raises(ns.NotFound) as not_found:
        c.getItem(-3)
    assert (not_found.value.id, not_found.value.message) == (-3, "no item -3")
    with pytest.raises(ns.ServiceBusy) as busy:
        c.getItem(BUSY_ITEM_ID)
    assert busy.value.retryAfterMs == 50
    with pytest.raises(ns.InvalidOrder):
        c.placeOrder(_order(ns))
    with pytest.raises(ns.InvalidOrder, match="quantity"):
        c.placeOrder(_order(ns, (1, 0)))
    # The connection is still good, and the failed calls executed.
    assert c.getItem(1).id == 1
    assert server.calls["getItem"] == 3
    assert server.calls["placeOrder"] == 2


def test_crash_arrives_as_internal_error(pair: tuple[UpstreamServer, Any, Library]) -> None:
    server, c, lib = pair
    with pytest.raises(application_exception_class(lib)) as exc:
        c.crash()
    assert exc.value.type == INTERNAL_ERROR
    assert c.add(1, 1) == 2
    assert server.calls["crash"] == 1


def test_oneway_is_delivered(pair: tuple[UpstreamServer, Any, Library]) -> None:
    server, c, _ = pair
    assert c.notify("first") is None
    c.notify("second")
    assert wait_until(lambda: c.notifications() == ["first", "second"], message="notifications")
    assert server.notifications == ["first", "second"]
    assert server.calls["notify"] == 2


def test_writes_count_every_execution(pair: tuple[UpstreamServer, Any, Library]) -> None:
    server, c, lib = pair
    ns = types_of(lib)
    ids = [c.placeOrder(_order(ns, (1, 1))).orderId for _ in range(3)]
    assert ids == [1, 2, 3]
    assert server.calls["placeOrder"] == 3
    assert c.callCount("placeOrder") == 3
    assert server.calls.snapshot() == {"placeOrder": 3, "callCount": 1}


# -- multiplexed -----------------------------------------------------------------


def test_multiplexed_services(mux: tuple[UpstreamServer, Any, Any, Library]) -> None:
    server, interop, echo, lib = mux
    ns = types_of(lib)
    assert interop.serviceName() == "Interop"
    assert echo.serviceName() == "Echo"
    assert echo.echo("héllo") == "héllo"
    echo.ping()
    interop.ping()
    sample = sample_all_types(ns)
    assert canonical(interop.echoAll(sample)) == canonical(sample)
    with pytest.raises(ns.NotFound):
        interop.getItem(-1)
    with pytest.raises(application_exception_class(lib)) as exc:
        interop.crash()
    assert exc.value.type == INTERNAL_ERROR
    interop.notify("mux")
    wait_until(lambda: interop.notifications() == ["mux"], message="multiplexed oneway")
    assert interop.callCount("Echo:echo") == 1
    assert server.calls["ping"] == 1
    assert server.calls["Echo:ping"] == 1
    assert server.calls["Echo:serviceName"] == 1


@pytest.mark.parametrize("server_lib", LIBRARIES)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_multiplexed_reply_names_the_bare_method(
    server_lib: Library, transport: TransportName
) -> None:
    with upstream_server(server_lib, transport, multiplexed=True) as server:
        call = encode_call("serviceName", seqid=41, service="Echo", multiplexed=True)
        reply = raw_call(server.address, call, transport)
    header = parse_header(reply)
    assert header is not None
    assert (header.name, header.type, header.seqid) == ("serviceName", MessageType.REPLY, 41)
    assert decode_reply("serviceName", reply, service="Echo") == "Echo"


@pytest.mark.parametrize("server_lib", LIBRARIES)
def test_plain_name_on_multiplexed_server_drops_the_connection(server_lib: Library) -> None:
    with upstream_server(server_lib, "framed", multiplexed=True) as server:
        with pytest.raises(ConnectionClosed):
            raw_call(server.address, encode_call("ping"), "framed")
        wait_until(lambda: server.errors, message="error recorded")


def test_unknown_service_apache_drops_thriftpy2_answers() -> None:
    call = encode_call("ping", name="Nope:ping", seqid=3)
    with (
        upstream_server("apache", "framed", multiplexed=True) as server,
        pytest.raises(ConnectionClosed),
    ):
        raw_call(server.address, call, "framed")
    with upstream_server("thriftpy2", "framed", multiplexed=True) as server:
        reply = raw_call(server.address, call, "framed")
    header = parse_header(reply)
    assert header is not None
    assert (header.type, header.seqid) == (MessageType.EXCEPTION, 3)
    assert parse_application_exception(reply[header.body_offset :])[0] == UNKNOWN_METHOD


@pytest.mark.parametrize("server_lib", LIBRARIES)
def test_unknown_method_of_known_service(server_lib: Library) -> None:
    call = encode_call("ping", name="Interop:nosuch", seqid=9)
    with upstream_server(server_lib, "buffered", multiplexed=True) as server:
        reply = raw_call(server.address, call, "buffered")
    header = parse_header(reply)
    assert header is not None
    assert (header.name, header.type, header.seqid) == ("nosuch", MessageType.EXCEPTION, 9)
    assert parse_application_exception(reply[header.body_offset :])[0] == UNKNOWN_METHOD


# -- envelopes, seqids, pipelining (raw sockets) --------------------------------


@pytest.mark.parametrize("server_lib", LIBRARIES)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_raw_pipelined_calls_keep_order_and_seqids(
    server_lib: Library, transport: TransportName
) -> None:
    calls = [
        encode_call("add", {"a": 1, "b": 2}, seqid=10),
        encode_call("notify", {"tag": "raw"}, seqid=11),  # oneway: no reply
        encode_call("getItem", {"id": -5}, seqid=12),
        encode_call("ping", name="nosuch", seqid=13),
        encode_call("add", {"a": 5, "b": 5}, seqid=-(2**31), strict=False),
    ]
    with upstream_server(server_lib, transport) as server:
        replies = raw_calls(server.address, calls, transport, replies=4)
        assert server.notifications == ["raw"]
    headers = [parse_header(r) for r in replies]
    assert [(h.name, h.type, h.seqid, h.strict) for h in headers if h] == [
        ("add", MessageType.REPLY, 10, True),
        ("getItem", MessageType.REPLY, 12, True),
        ("nosuch", MessageType.EXCEPTION, 13, True),
        ("add", MessageType.REPLY, -(2**31), True),
    ]
    assert decode_reply("add", replies[0]) == 3
    with pytest.raises(types_of("thriftpy2").NotFound):
        decode_reply("getItem", replies[1])
    unknown = headers[2]
    assert unknown is not None
    assert parse_application_exception(replies[2][unknown.body_offset :])[0] == UNKNOWN_METHOD
    assert decode_reply("add", replies[3]) == 10


@pytest.mark.parametrize("server_lib", LIBRARIES)
def test_server_can_write_non_strict_replies(server_lib: Library) -> None:
    with upstream_server(server_lib, "buffered", strict_write=False) as server:
        reply = raw_call(server.address, encode_call("add", {"a": 2, "b": 2}), "buffered")
    header = parse_header(reply)
    assert header is not None
    assert (header.strict, header.name, header.type) == (False, "add", MessageType.REPLY)
    assert decode_reply("add", reply) == 4


@pytest.mark.parametrize("server_lib", LIBRARIES)
@pytest.mark.parametrize("client_lib", LIBRARIES)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_non_strict_clients(
    server_lib: Library, client_lib: Library, transport: TransportName
) -> None:
    with (
        upstream_server(server_lib, transport) as server,
        client(client_lib, server.address, transport, strict=False) as c,
    ):
        assert c.add(20, 22) == 42
        with pytest.raises(types_of(client_lib).NotFound):
            c.getItem(-1)


def test_non_strict_multiplexed_client() -> None:
    with (
        upstream_server("apache", "framed", multiplexed=True) as server,
        thriftpy2_client(server.address, "framed", "Echo", strict=False) as c,
    ):
        assert c.echo("x") == "x"


@pytest.mark.parametrize("server_lib", LIBRARIES)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_garbage_closes_the_connection(server_lib: Library, transport: TransportName) -> None:
    bad_version = b"\x80\x02\x00\x01" + b"\x00" * 12
    data = frame(bad_version, Transport(transport))
    with upstream_server(server_lib, transport) as server:
        assert raw_send(server.address, data) == b""
        wait_until(lambda: server.errors, message="error recorded")
        assert server.calls.total() == 0


# -- server life cycle ------------------------------------------------------------


@pytest.mark.parametrize("server_lib", LIBRARIES)
def test_concurrent_connections_and_prompt_stop(server_lib: Library) -> None:
    outcome: list[object] = []
    with upstream_server(server_lib, "framed") as server:

        def sleeper() -> None:
            try:
                with client(server_lib, server.address, "framed", timeout=30) as c:
                    outcome.append(c.sleepMs(30_000))
            except Exception as exc:
                outcome.append(exc)

        thread = threading.Thread(target=sleeper, daemon=True)
        thread.start()
        wait_until(lambda: server.calls["sleepMs"] == 1, message="sleepMs started")
        # A second connection is served while the first one sleeps.
        with client(server_lib, server.address, "framed") as c:
            assert c.add(1, 2) == 3
        assert server.open_connections >= 1
    # stop() woke the sleeping handler and dropped its connection.
    thread.join(5)
    assert not thread.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], TRANSPORT_ERRORS)
    assert not [t for t in threading.enumerate() if str(server.port) in t.name]


@pytest.mark.parametrize("server_lib", LIBRARIES)
def test_restart_on_same_port_and_close_connections(server_lib: Library) -> None:
    with upstream_server(server_lib, "buffered") as first:
        port = first.port
        with client(server_lib, first.address, "buffered") as c:
            assert c.add(1, 1) == 2
            assert first.close_connections() == 1
            with pytest.raises(TRANSPORT_ERRORS):
                c.add(1, 1)
    with pytest.raises(ConnectionRefusedError):
        raw_call(f"127.0.0.1:{port}", encode_call("ping"), "buffered", timeout=1)
    with upstream_server(server_lib, "buffered", port=port) as second:
        assert second.port == port
        with client(server_lib, second.address, "buffered") as c:
            assert c.add(2, 2) == 4
        assert second.calls.snapshot() == {"add": 1}
        assert second.connections_accepted == 1


def test_thriftpy2_library_errors_drop_the_connection() -> None:
    with (
        thriftpy2_server("framed", library_errors=True) as server,
        thriftpy2_client(server.address, "framed") as c,
    ):
        with pytest.raises(TRANSPORT_ERRORS):
            c.crash()
        assert "RuntimeError" in wait_until(lambda: server.errors, message="error recorded")[0]


@pytest.mark.parametrize("server_lib", LIBRARIES)
def test_hook_injects_faults(server_lib: Library) -> None:
    with (
        upstream_server(server_lib, "framed") as server,
        client(server_lib, server.address, "framed") as c,
    ):
        ns = types_of(server_lib)

        def hook(name: str) -> None:
            if name == "getItem":
                raise ns.ServiceBusy(message="injected", retryAfterMs=1)
            if name == "add":
                raise RuntimeError("injected")

        server.hook = hook
        with pytest.raises(ns.ServiceBusy, match="injected"):
            c.getItem(1)
        with pytest.raises(application_exception_class(server_lib)) as exc:
            c.add(1, 2)
        assert exc.value.type == INTERNAL_ERROR
        server.hook = None
        assert c.add(1, 2) == 3
        assert server.calls["add"] == 2


# -- generated code -------------------------------------------------------


def test_apache_code_is_generated_once() -> None:
    package = generate_apache_interop()
    assert package.parent == GENERATED_DIR
    before = (package / "ttypes.py").stat().st_mtime_ns
    assert generate_apache_interop() == package
    assert (package / "ttypes.py").stat().st_mtime_ns == before


def test_apache_client_rejects_bad_transport() -> None:
    with (
        pytest.raises(ValueError, match="transport"),
        apache_client("127.0.0.1:1", cast(Any, "http")),
    ):
        pass
