"""Oneway calls whatever their message type, and replies nobody waits for.

- A oneway method sent as CALL (Apache Thrift before 0.9.3, the Go library):
  the upstream sends nothing back. The sidecar must not wait for a reply,
  must not write the client one it is not waiting for, and must not hold the
  connection's next call behind it. Without an IDL it learns the method from
  the wire (the next call's reply comes first); with one, it knows.
- A two-way method sent as ONEWAY: the upstream answers anyway. That reply
  must never be read as the answer to another client's call on the same
  pooled upstream connection (issue 13, finding 2).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import thriftpy2.protocol
import thriftpy2.thrift
import thriftpy2.transport

from sidecar.app.state import state_document
from tests.integration import reply_parts
from tests.support.clients import thriftpy2_client
from tests.support.idl import INTEROP_IDL, load_thriftpy2_interop
from tests.support.raw import decode_reply, encode_call, raw_calls
from tests.support.servers import thriftpy2_server
from tests.support.sidecar import SidecarThread, base_config, run_sidecar
from tests.support.wait import wait_until

CALL = thriftpy2.thrift.TMessageType.CALL
ONEWAY = thriftpy2.thrift.TMessageType.ONEWAY
# Long enough that waiting for a reply that never comes would show.
SLOW = {"retry": {"per_try_timeout": "20s", "deadline": "30s"}}


def message(method: str, args: dict[str, Any], seqid: int, mtype: int) -> bytes:
    """A call of the interop IDL with the message type given, whatever the method is."""
    service = load_thriftpy2_interop().Interop
    buf = thriftpy2.transport.TCyMemoryBuffer()
    proto = thriftpy2.protocol.TCyBinaryProtocol(buf)
    proto.write_message_begin(method, mtype, seqid)
    proto.write_struct(getattr(service, method + "_args")(**args))
    proto.write_message_end()
    return bytes(buf.getvalue())


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
