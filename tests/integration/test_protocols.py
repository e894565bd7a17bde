"""Compact and THeader clients through a real sidecar; transcoding; clients of other protocols.

Apache Thrift's own Python clients (compact, THeader) against Apache Python
upstreams speaking what each test needs (`tests.interop.upstream.WireUpstream`):

- ``upstream.protocol``: a compact client in front of a binary upstream, and
  a binary client in front of a compact one, get the same values as straight
  to an upstream of their own protocol;
- THeader: the client's info headers reach the upstream and the upstream's
  come back; the sidecar adds the attempt number and the time left; a
  client's ``client_timeout`` header shortens the call's deadline;
- a cached fallback reply is served to a compact client in compact;
- a JSON client gets a TApplicationException its library decodes, saying the
  protocol is not supported, instead of a closed connection.
"""

from __future__ import annotations

import contextlib
import re
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from thrift.protocol.TBinaryProtocol import TBinaryProtocolAccelerated
from thrift.protocol.TCompactProtocol import TCompactProtocolAccelerated
from thrift.protocol.THeaderProtocol import THeaderProtocol
from thrift.protocol.TJSONProtocol import TJSONProtocol
from thrift.Thrift import TApplicationException
from thrift.transport import TSocket, TTransport
from thrift.transport.THeaderTransport import THeaderClientType, THeaderSubprotocolID

from sidecar.protocol.appexc import ApplicationExceptionType
from sidecar.proxy.translate import ATTEMPT_HEADER, DEADLINE_HEADER
from tests.interop.matrix import Wire
from tests.interop.upstream import WireUpstream
from tests.protocol.apache_wire import call_wire, read_exception
from tests.support.apache_gen import load_apache_interop
from tests.support.clients import split_address
from tests.support.hold import Hold
from tests.support.idl import INTEROP_IDL, canonical, sample_all_types
from tests.support.raw import raw_send
from tests.support.sidecar import SidecarThread, base_config, run_sidecar
from tests.support.wait import wait_until


@contextlib.contextmanager
def upstream(protocol: str, transport: str) -> Iterator[WireUpstream]:
    server = WireUpstream(Wire(protocol, transport, False))  # type: ignore[arg-type]
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def apache(address: str, protocol: str, transport: str, timeout: float = 10.0) -> Iterator[Any]:
    """An Apache ``Interop.Client`` speaking ``protocol`` over ``transport``: (client, proto)."""
    gen = load_apache_interop()
    host, port = split_address(address)
    sock = TSocket.TSocket(host, port)
    sock.setTimeout(timeout * 1000)
    proto: Any
    if transport in ("header", "header-in-a-frame"):
        default = (
            THeaderSubprotocolID.COMPACT if protocol == "compact" else THeaderSubprotocolID.BINARY
        )
        # In a frame: each THeader frame inside a frame length of its own.
        under = sock if transport == "header" else TTransport.TFramedTransport(sock)
        proto = THeaderProtocol(under, [THeaderClientType.HEADERS], default)
        trans: Any = proto.trans
    else:
        trans = (
            TTransport.TFramedTransport(sock)
            if transport == "framed"
            else TTransport.TBufferedTransport(sock)
        )
        if protocol == "compact":
            proto = TCompactProtocolAccelerated(trans)
        elif protocol == "json":
            proto = TJSONProtocol(trans)
        else:
            proto = TBinaryProtocolAccelerated(trans)
    sock.open()
    try:
        yield gen.Interop.Client(proto), proto
    finally:
        sock.close()


# -- transcoding between protocols ---------------------------------------------------


@pytest.mark.parametrize(
    ("client_protocol", "upstream_protocol"), [("compact", "binary"), ("binary", "compact")]
)
@pytest.mark.parametrize("transport", ["framed", "buffered"])
def test_a_client_of_one_protocol_in_front_of_an_upstream_of_the_other(
    client_protocol: str, upstream_protocol: str, transport: str
) -> None:
    gen = load_apache_interop()
    value = sample_all_types(gen.ttypes)
    with (
        upstream(client_protocol, transport) as same,
        apache(same.address, client_protocol, transport) as (direct, _),
    ):
        expected = [direct.echoAll(value), direct.listItems(3), direct.add(2, 3)]
        with pytest.raises(gen.ttypes.NotFound):
            direct.getItem(-1)
    with (
        upstream(upstream_protocol, transport) as other,
        SidecarThread(base_config([other.address], upstream={"protocol": upstream_protocol})) as sc,
        apache(sc.address, client_protocol, transport) as (client, _),
    ):
        got = [client.echoAll(value), client.listItems(3), client.add(2, 3)]
        with pytest.raises(gen.ttypes.NotFound):
            client.getItem(-1)
        with pytest.raises(TApplicationException) as raised:
            client.crash()
        assert raised.value.type == ApplicationExceptionType.INTERNAL_ERROR
        assert client.add(4, 5) == 9  # the connection goes on
        assert other.calls["echoAll"] == 1
    assert canonical(got[0]) == canonical(expected[0]) == canonical(value)
    assert got[1:] == expected[1:]


# -- THeader ----------------------------------------------------------------------------


class HeaderEcho(WireUpstream):
    """A THeader upstream that records each call's info headers and answers with its own."""

    def __init__(self, protocol: str) -> None:
        super().__init__(Wire(protocol, "header", False))  # type: ignore[arg-type]
        self.seen: list[dict[bytes, bytes]] = []
        self.lock = threading.Lock()

    def _serve(self, sock: Any) -> None:
        tsock = TSocket.TSocket()
        tsock.setHandle(sock)
        proto = self._protocol(tsock)
        processor = self._processor
        while not self._closing.is_set():
            # The request's headers are read with it; answer with one of ours.
            proto.trans.set_header(b"upstream-says", b"hello")
            processor.process(proto, proto)
            with self.lock:
                self.seen.append(dict(proto.trans.get_headers()))


@pytest.mark.parametrize("protocol", ["binary", "compact"])
def test_theader_headers_travel_both_ways_and_the_sidecar_adds_its_own(protocol: str) -> None:
    up = HeaderEcho(protocol)
    up.start()
    try:
        with (
            SidecarThread(base_config([up.address], retry={"deadline": "4s"})) as sc,
            apache(sc.address, protocol, "header") as (client, proto),
        ):
            proto.trans.set_header(b"trace-id", b"abc-123")
            assert client.add(1, 2) == 3
            assert proto.trans.get_headers().get(b"upstream-says") == b"hello"
            wait_until(lambda: len(up.seen) == 1, timeout=5.0, message="the upstream's record")
    finally:
        up.stop()
    headers = up.seen[0]
    assert headers[b"trace-id"] == b"abc-123"
    assert headers[ATTEMPT_HEADER.encode()] == b"1"
    left = int(headers[DEADLINE_HEADER.encode()])
    assert 3000 < left <= 4000


def test_each_copy_of_a_hedged_theader_call_carries_its_own_attempt_number() -> None:
    """The hedge is the call's second copy: it says 2, not the first copy's 1."""
    up = HeaderEcho("binary")
    hold = Hold()
    up.state.hook = hold
    up.start()
    config = base_config(
        [up.address],
        retry={
            "idempotent": ["add"],
            "max_attempts": 1,
            "per_try_timeout": "15s",
            "deadline": "20s",
        },
        hedge={"delay": "20ms", "budget": {"min_hedges_per_second": 100}},
    )
    try:
        with SidecarThread(config) as sc, apache(sc.address, "binary", "header") as (client, _):
            assert client.add(0, 0) == 0  # answered once: known to be two-way, so hedged
            hold.arm("add")  # the first copy waits; the hedge answers
            assert client.add(1, 2) == 3
            hold.release()
            wait_until(lambda: len(up.seen) == 3, timeout=10.0, message="both copies recorded")
    finally:
        hold.release()
        up.stop()
    numbers = sorted(headers[ATTEMPT_HEADER.encode()] for headers in up.seen[1:])
    assert numbers == [b"1", b"2"]


@pytest.mark.parametrize("protocol", ["binary", "compact"])
def test_a_theader_client_in_a_frame_is_answered_in_a_frame_by_way_of_a_plain_theader_upstream(
    protocol: str,
) -> None:
    """A client whose THeader frames come inside a frame length of their own (Apache's
    THeader protocol over a framed transport) gets its replies in that form; the upstream,
    which reads plain THeader frames only (Apache's THeader server), gets plain ones."""
    up = HeaderEcho(protocol)
    up.start()
    try:
        with (
            apache(up.address, protocol, "header-in-a-frame", timeout=2.0) as (direct, _),
            pytest.raises(TTransport.TTransportException),  # it does not read this form
        ):
            direct.add(1, 2)
        with (
            SidecarThread(base_config([up.address], retry={"max_attempts": 1})) as sc,
            apache(sc.address, protocol, "header-in-a-frame") as (client, proto),
        ):
            for n in range(3):  # on the same upstream connection
                proto.trans.set_header(b"trace-id", b"abc-%d" % n)
                assert client.add(n, 2) == n + 2
                assert proto.trans.get_headers().get(b"upstream-says") == b"hello"
            assert client.getItem(9).id == 9
            wait_until(lambda: len(up.seen) == 4, timeout=5.0, message="the upstream's record")
    finally:
        up.stop()
    assert [seen.get(b"trace-id") for seen in up.seen] == [b"abc-0", b"abc-1", b"abc-2", None]


def test_a_client_timeout_header_shortens_the_deadline() -> None:
    with (
        upstream("binary", "header") as up,
        SidecarThread(
            base_config([up.address], retry={"deadline": "20s", "per_try_timeout": "20s"})
        ) as sc,
        apache(sc.address, "binary", "header", timeout=20.0) as (client, proto),
    ):
        proto.trans.set_header(b"client_timeout", b"300")
        started = time.monotonic()
        with pytest.raises(TApplicationException) as raised:
            client.sleepMs(3000)
        took = time.monotonic() - started
        assert raised.value.type == ApplicationExceptionType.INTERNAL_ERROR
        # What was left of the 300 ms when the attempt went out: 0.3s, or a millisecond
        # or so less on a busy machine (CI once saw 0.299s).
        within = re.search(r"did not reply within ([0-9.]+)s", raised.value.message)
        assert within is not None, raised.value.message
        assert 0.25 <= float(within.group(1)) <= 0.3
        assert took < 2.5  # the 300 ms deadline, not the 20 s one (slack for a busy machine)


# -- fallbacks in the client's protocol ----------------------------------------------------


def test_a_cached_reply_is_served_to_a_compact_client_in_compact() -> None:
    load_apache_interop()  # generated once, before the upstream starts
    with upstream("compact", "framed") as up:
        config = base_config(
            [up.address],
            breaker={"fail_max": 1, "reset_timeout": "1h"},
            retry={"max_attempts": 1},
        )
        with SidecarThread(config) as sc:
            with apache(sc.address, "compact", "framed") as (client, _):
                first = client.getItem(41)
            up.stop()
            with apache(sc.address, "compact", "framed") as (client, _):
                for _ in range(3):  # retries exhausted (cache), then the breaker is open (cache)
                    assert client.getItem(41) == first
                with pytest.raises(TApplicationException) as raised:
                    client.getItem(42)  # never cached
                assert "no fallback" in raised.value.message
            assert (
                sc.metrics().value(
                    "thrift_sidecar_fallback_replies_total", method="getItem", source="cache"
                )
                == 3
            )
    assert (first.id, first.name, first.price) == (41, "item-41", 61.5)


# -- protocols the sidecar does not proxy --------------------------------------------------


@pytest.mark.parametrize("transport", ["framed", "buffered"])
def test_a_json_client_is_told_the_protocol_is_not_supported(transport: str) -> None:
    with (
        upstream("binary", transport) as up,
        SidecarThread(base_config([up.address])) as sc,
        apache(sc.address, "json", transport) as (client, _),
    ):
        with pytest.raises(TApplicationException) as raised:
            client.add(1, 2)
        assert raised.value.type == ApplicationExceptionType.INVALID_PROTOCOL
        assert "binary and compact" in raised.value.message
        assert "admin port" in raised.value.message
        assert sc.metrics().value("thrift_sidecar_protocol_errors_total", kind="json") == 1
        assert up.calls["add"] == 0


def test_a_static_reply_is_served_to_a_compact_client_in_compact() -> None:
    """Static replies are encoded once (binary, from the IDL) and sent in the client's protocol."""
    with upstream("compact", "framed") as up:
        config = base_config(
            [up.address],
            idl=str(INTEROP_IDL),
            breaker={"fail_max": 1, "reset_timeout": "1h"},
            retry={"max_attempts": 1},
            methods={"listItems": {"fallback": {"static": []}}},
        )
        address = up.address
        up.stop()
        with run_sidecar([address], config=config) as sc:
            with apache(sc.address, "compact", "framed") as (client, _):
                for _ in range(2):  # retries exhausted, then the breaker open: static both times
                    assert client.listItems(3) == []
            assert (
                sc.metrics().value(
                    "thrift_sidecar_fallback_replies_total",
                    method="Interop:listItems",
                    source="static",
                )
                == 2
            )


@pytest.mark.parametrize("outer_framed", [False, True], ids=["theader", "theader-in-a-frame"])
def test_a_theader_frame_refused_as_it_is_read_is_answered_the_way_it_came(
    outer_framed: bool,
) -> None:
    """A THeader frame naming a transform the sidecar does not support (3) is refused
    while it is decoded; the PROTOCOL_ERROR answer carries the call's seqid in a THeader
    frame, inside a frame length when the client's came inside one."""
    payload = call_wire("binary", "buffered", seqid=41)
    head = b"\x0f\xff\x00\x00" + struct.pack(">iH", 41, 1) + b"\x00\x01\x03\x00"
    frame = struct.pack(">i", len(head) + len(payload)) + head + payload
    wire = struct.pack(">i", len(frame)) + frame if outer_framed else frame
    with SidecarThread(base_config(["127.0.0.1:1"])) as sc:
        answer = raw_send(sc.address, wire)
    transport = "framed" if outer_framed else "buffered"
    _, mtype, seqid, kind, text = read_exception(answer, "header-binary", transport)
    assert (mtype, seqid, kind) == (3, 41, ApplicationExceptionType.PROTOCOL_ERROR)
    assert text == "sidecar: THeader transform 3 is not supported"
