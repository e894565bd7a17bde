"""Oneway calls whatever their message type, and replies nobody waits for.

- A oneway method sent as CALL (Apache Thrift before 0.9.3, the Go library):
  the upstream sends nothing back. The sidecar must not wait for a reply,
  must not write the client one it is not waiting for, and must not hold the
  connection's next call behind it. Without an IDL it learns the method from
  the wire (the next call's reply comes first, or, when no next call comes,
  the reply to a probe the sidecar sends behind it); with one, it knows.
- A two-way method sent as ONEWAY: the upstream answers anyway. That reply
  must never be read as the answer to another client's call on the same
  pooled upstream connection (issue 13, finding 2).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

import pytest
import thriftpy2.protocol
import thriftpy2.thrift
import thriftpy2.transport

from sidecar.app.state import state_document
from sidecar.protocol.appexc import ApplicationExceptionType
from sidecar.protocol.framing import Transport, decoder_for, encode_frame, frame
from sidecar.protocol.theader import SUPPORT_OUT_OF_ORDER, THeaderFrame, encode_theader
from tests.integration import framed_replies, raw_connection, reply_parts
from tests.interop.matrix import Wire
from tests.interop.upstream import WireUpstream
from tests.support.clients import thriftpy2_client
from tests.support.idl import INTEROP_IDL, load_thriftpy2_interop
from tests.support.raw import decode_reply, encode_call, raw_calls
from tests.support.servers import Library, TransportName, thriftpy2_server, upstream_server
from tests.support.sidecar import SidecarThread, base_config, run_sidecar
from tests.support.wait import wait_until

CALL = thriftpy2.thrift.TMessageType.CALL
ONEWAY = thriftpy2.thrift.TMessageType.ONEWAY
# Long enough that waiting for a reply that never comes would show.
SLOW = {"retry": {"per_try_timeout": "20s", "deadline": "30s"}}


def message(
    method: str, args: dict[str, Any], seqid: int, mtype: int, name: str | None = None
) -> bytes:
    """A call of the interop IDL with the message type given, whatever the method is
    (``name``: the name on the wire, ``Interop:notify`` for a multiplexed server)."""
    service = load_thriftpy2_interop().Interop
    buf = thriftpy2.transport.TCyMemoryBuffer()
    proto = thriftpy2.protocol.TCyBinaryProtocol(buf)
    proto.write_message_begin(name or method, mtype, seqid)
    proto.write_struct(getattr(service, method + "_args")(**args))
    proto.write_message_end()
    return bytes(buf.getvalue())


def raw_replies(sock: socket.socket, transport: Transport | str, count: int) -> list[bytes]:
    """``count`` replies read off ``sock`` in ``transport`` (each message without framing),
    within the socket's timeout for each read and 10 s in all."""
    decoder = decoder_for(Transport(transport), max_size=1 << 20)
    deadline = time.monotonic() + 10.0
    out: list[bytes] = []
    while len(out) < count and time.monotonic() < deadline:
        chunk = sock.recv(1 << 16)
        assert chunk, f"connection closed after {len(out)} of {count} replies"
        out.extend(bytes(m.payload()) for m in decoder.receive_data(chunk))
    assert len(out) >= count, f"{len(out)} of {count} replies within 10 s"
    return out


def attempt_results(sc: SidecarThread) -> list[tuple[str, str, float]]:
    """``upstream_attempts_total`` as (method, result, count), sorted."""
    attempts = sc.metrics().matching("thrift_sidecar_upstream_attempts_total")
    return sorted((dict(k)["method"], dict(k)["result"], v) for k, v in attempts.items())


def test_a_oneway_sent_as_call_is_learned_from_the_next_call() -> None:
    with (
        thriftpy2_server("framed") as upstream,
        SidecarThread(base_config([upstream.address], **SLOW)) as sc,
    ):
        started = time.monotonic()
        # As the Go library does: notify as CALL, then at once the next call.
        replies = raw_calls(
            sc.address,
            [message("notify", {"tag": "first"}, 7, CALL), encode_call("add", {"a": 1, "b": 2})],
            "framed",
            replies=1,
            timeout=10.0,
        )
        assert time.monotonic() - started < 10.0  # not the 20 s per-try timeout
        assert len(replies) == 1
        assert reply_parts(replies[0]).header.seqid == 1  # add's, not an answer to notify
        assert decode_reply("add", replies[0]) == 3
        wait_until(lambda: upstream.notifications == ["first"], message="delivered")
        assert sc.call(lambda: state_document(sc.sidecar))["oneway"]["learned_oneway"] == ["notify"]
        # Learned: a lone notify as CALL is sent without waiting, and nothing comes back
        # in front of the next call's reply.
        replies = raw_calls(
            sc.address,
            [
                message("notify", {"tag": "second"}, 8, CALL),
                encode_call("add", {"a": 2, "b": 2}, seqid=9),
                encode_call("add", {"a": 3, "b": 2}, seqid=10),
            ],
            "framed",
            replies=2,
            timeout=10.0,
        )
        assert [reply_parts(r).header.seqid for r in replies] == [9, 10]
        assert [decode_reply("add", r) for r in replies] == [4, 5]
        wait_until(lambda: upstream.notifications == ["first", "second"], message="delivered")


@pytest.mark.parametrize(
    ("library", "transport", "multiplexed"),
    [
        ("thriftpy2", "framed", False),
        ("thriftpy2", "buffered", False),
        ("apache", "framed", False),
        ("apache", "framed", True),
    ],
)
def test_a_lone_oneway_sent_as_call_is_learned_from_a_probe(
    library: Library,
    transport: TransportName,
    multiplexed: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No next call follows it (a Go client notifying now and then): the probe's
    answer comes first, so the client never gets a reply it did not ask for."""
    caplog.set_level(logging.INFO, logger="sidecar.pipeline")
    service = "Interop:" if multiplexed else ""
    with (
        upstream_server(library, transport, multiplexed) as upstream,
        SidecarThread(base_config([upstream.address], **SLOW)) as sc,
        raw_connection(sc.address, timeout=10.0) as sock,
    ):
        notify = message("notify", {"tag": "alone"}, 7, CALL, name=service + "notify")
        sock.sendall(frame(notify, Transport(transport)))
        wait_until(
            lambda: sc.call(lambda: state_document(sc.sidecar))["oneway"]["learned_oneway"],
            message="notify learned to be oneway well before the 20 s per-try timeout",
        )
        assert upstream.notifications == ["alone"]
        add = encode_call("add", {"a": 1, "b": 2}, seqid=8, multiplexed=multiplexed)
        sock.sendall(frame(add, Transport(transport)))
        reply = raw_replies(sock, transport, 1)[0]
        assert reply_parts(reply).header.seqid == 8  # add's: nothing came before it
        assert decode_reply("add", reply) == 3
        # The probe is nobody's call: counted nowhere; notify's one attempt went well.
        assert attempt_results(sc) == [
            (service + "add", "ok", 1.0),
            (service + "notify", "ok", 1.0),
        ]
        assert sc.metrics().value("thrift_sidecar_breaker_state", breaker=upstream.address) == 0
    learned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("learned")]
    shown = "Interop.notify" if multiplexed else "notify"
    assert learned == [
        f"learned that {shown} is oneway: a call sent after it on its upstream connection "
        "(the client's next call, or the sidecar's probe) was answered first; its calls are "
        "sent without waiting for a reply from now on"
    ]


def test_two_oneways_sent_as_call_in_a_row_are_both_learned_from_one_probe() -> None:
    """The second goes behind the first; the probe goes behind the second, the last
    one sent, and its answer passes over both."""
    with (
        thriftpy2_server("framed") as upstream,
        SidecarThread(base_config([upstream.address], **SLOW)) as sc,
        raw_connection(sc.address, timeout=10.0) as sock,
    ):
        sock.sendall(
            encode_frame(message("notify", {"tag": "one"}, 1, CALL))
            + encode_frame(message("notify", {"tag": "two"}, 2, CALL))
        )
        wait_until(
            lambda: sc.call(lambda: state_document(sc.sidecar))["oneway"]["learned_oneway"],
            message="notify learned to be oneway well before the 20 s per-try timeout",
        )
        wait_until(lambda: upstream.notifications == ["one", "two"], message="both delivered")
        sock.sendall(encode_frame(encode_call("add", {"a": 1, "b": 1}, seqid=3)))
        (reply,) = framed_replies(sock, 1)
        assert reply_parts(reply).header.seqid == 3
        assert decode_reply("add", reply) == 2
        assert attempt_results(sc) == [("add", "ok", 1.0), ("notify", "ok", 2.0)]


def test_a_slow_two_way_call_is_not_taken_for_oneway_by_the_probe(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="sidecar.pipeline")
    with (
        thriftpy2_server("framed") as upstream,
        SidecarThread(base_config([upstream.address], **SLOW)) as sc,
        raw_connection(sc.address, timeout=10.0) as sock,
    ):
        # Four times the probe's delay: the probe goes behind it and waits its turn.
        sock.sendall(encode_frame(encode_call("sleepMs", {"ms": 200}, seqid=5)))
        (reply,) = framed_replies(sock, 1)
        assert reply_parts(reply).header.seqid == 5
        assert decode_reply("sleepMs", reply) == 200
        sock.sendall(encode_frame(encode_call("add", {"a": 2, "b": 2}, seqid=6)))
        (reply,) = framed_replies(sock, 1)
        assert decode_reply("add", reply) == 4
        state = sc.call(lambda: state_document(sc.sidecar))["oneway"]
        assert state["learned_oneway"] == []
        assert state["answered_methods"] == 2  # sleepMs and add: two-way for good
    probes = [r for r in caplog.records if r.getMessage().startswith("sent a oneway probe")]
    assert len(probes) == 1  # behind sleepMs; add was answered before its probe was due


@pytest.mark.parametrize("out_of_order", [False, True], ids=["in-order", "out-of-order"])
def test_a_theader_call_the_server_may_answer_out_of_order_gets_no_probe(
    out_of_order: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A THeader client that sets SUPPORT_OUT_OF_ORDER lets the server answer a probe
    before a slow two-way call: that would prove nothing, so none is sent."""
    caplog.set_level(logging.DEBUG, logger="sidecar.pipeline")
    with (
        WireUpstream(Wire("binary", "header", False)) as upstream,
        SidecarThread(base_config([upstream.address], **SLOW)) as sc,
        raw_connection(sc.address, timeout=10.0) as sock,
    ):
        flags = SUPPORT_OUT_OF_ORDER if out_of_order else 0
        call = encode_call("sleepMs", {"ms": 200}, seqid=5)
        sock.sendall(encode_theader(THeaderFrame(flags=flags, seqid=5), call))
        (reply,) = raw_replies(sock, Transport.THEADER, 1)
        assert decode_reply("sleepMs", reply) == 200
        # The reply came 150 ms after a probe would have been due.
        probes = [r for r in caplog.records if r.getMessage().startswith("sent a oneway probe")]
        assert len(probes) == (0 if out_of_order else 1)
        assert sc.call(lambda: state_document(sc.sidecar))["oneway"]["learned_oneway"] == []


def test_a_call_the_server_may_answer_out_of_order_has_no_call_sent_behind_it() -> None:
    """The client's next call is not sent right behind it either: answered first, it
    would prove nothing. So a oneway sent as CALL by such a client, with no IDL, is not
    learned and times out (README: name it in the config)."""
    config = base_config(
        [], retry={"per_try_timeout": "500ms", "deadline": "5s", "max_attempts": 1}
    )
    with WireUpstream(Wire("binary", "header", False)) as upstream:
        config["upstream"]["addresses"] = [upstream.address]
        with (
            SidecarThread(config) as sc,
            raw_connection(sc.address, timeout=10.0) as sock,
        ):
            out_of_order = THeaderFrame(flags=SUPPORT_OUT_OF_ORDER, seqid=1)
            notify = message("notify", {"tag": "ooo"}, 1, CALL)
            add = encode_call("add", {"a": 1, "b": 1}, seqid=2)
            sock.sendall(
                encode_theader(out_of_order, notify)
                + encode_theader(THeaderFrame(flags=SUPPORT_OUT_OF_ORDER, seqid=2), add)
            )
            timed_out, added = raw_replies(sock, Transport.THEADER, 2)
            assert reply_parts(timed_out).exc_type == ApplicationExceptionType.INTERNAL_ERROR
            assert decode_reply("add", added) == 2
            assert sc.call(lambda: state_document(sc.sidecar))["oneway"]["learned_oneway"] == []


def test_with_an_idl_a_oneway_sent_as_call_never_waits() -> None:
    with (
        thriftpy2_server("framed") as upstream,
        run_sidecar([upstream.address], config={"idl": str(INTEROP_IDL), **SLOW}) as sc,
        thriftpy2_client(sc.address, "framed") as client,
    ):
        replies = raw_calls(
            sc.address, [message("notify", {"tag": "idl"}, 3, CALL)], "framed", replies=0
        )
        assert replies == []
        wait_until(lambda: upstream.notifications == ["idl"], message="delivered")
        assert client.add(5, 5) == 10
        assert sc.state()["oneway"]["learned_oneway"] == []  # known, not learned


def test_a_two_way_call_sent_as_oneway_never_answers_another_clients_call() -> None:
    """40 ``ping`` marked ONEWAY beside 40 ``placeOrder`` on one pooled upstream connection."""
    calls = 40
    ns = load_thriftpy2_interop()
    with thriftpy2_server("framed") as upstream:
        config = base_config([upstream.address], upstream={"pool_size": 1})
        with SidecarThread(config) as sc:
            failures: list[BaseException] = []
            receipts: list[Any] = []

            def orders() -> None:
                with thriftpy2_client(sc.address, "framed") as client:
                    for i in range(calls):
                        order = ns.Order(
                            customer=f"c{i}", lines=[ns.OrderLine(itemId=i, quantity=1)]
                        )
                        try:
                            receipts.append(client.placeOrder(order))
                        except Exception as exc:  # counted, asserted below
                            failures.append(exc)

            writer = threading.Thread(target=orders)
            writer.start()
            pings = [message("ping", {}, i, ONEWAY) for i in range(calls)]
            raw_calls(sc.address, pings, "framed", replies=0)
            writer.join(60.0)
            assert not writer.is_alive()
            wait_until(lambda: upstream.calls["ping"] == calls, message="every ping executed")
    assert failures == []
    assert len(receipts) == calls
    assert upstream.calls["placeOrder"] == calls  # each executed once
