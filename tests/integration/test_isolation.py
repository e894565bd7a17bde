"""One client's malformed calls cost that client alone: never the breaker, never a retry.

Issue 13, finding 3: a framed getItem whose last argument is cut short, with
a frame length that matches, makes the upstream wait for bytes that never
come; the sidecar counted an upstream timeout, retried it, and six such
connections opened the breaker for everyone. Now the failed call's request is
checked, found malformed, answered with PROTOCOL_ERROR and counted against
the client; a connection that keeps sending such calls is closed.
"""

from __future__ import annotations

import gc
import signal
import socket
import struct

import pytest
import thriftpy2.protocol
import thriftpy2.thrift
import thriftpy2.transport

from sidecar.protocol.appexc import ApplicationExceptionType
from sidecar.protocol.envelope import MessageType, encode_header
from sidecar.protocol.framing import BufferedDecoder
from sidecar.proxy.call import CHECK_STEPS
from sidecar.proxy.client import CALLS_PER_TURN, ClientConnection
from tests.integration import framed_replies, reply_parts
from tests.protocol.test_walk_budget import empty_structs_call
from tests.support.clients import split_address, thriftpy2_client
from tests.support.idl import INTEROP_IDL
from tests.support.raw import encode_call, raw_calls
from tests.support.redis import SilentServer
from tests.support.servers import thriftpy2_server
from tests.support.sidecar import SidecarThread, base_config, run_sidecar
from tests.support.wait import wait_until

CONFIG = {
    "breaker": {"fail_max": 3, "reset_timeout": "1h"},
    "retry": {"max_attempts": 3, "per_try_timeout": "300ms", "deadline": "5s"},
}


def cut_short(seqid: int) -> bytes:
    """getItem(7) with the last 4 bytes of its i64 missing, in a frame of the right length."""
    body = encode_call("getItem", {"id": 7}, seqid=seqid)[:-5]  # 4 bytes of the value + STOP
    return struct.pack(">i", len(body)) + body


@pytest.mark.parametrize("validate", [True, False], ids=["checked-before", "checked-after"])
def test_malformed_calls_never_open_the_breaker_nor_get_retried(validate: bool) -> None:
    """Checked before sending (the default) they never reach the upstream; checked only
    after failing there (limits.validate_framed_calls: false) they still cost it nothing."""
    config = {**CONFIG, "limits": {"validate_framed_calls": validate}}
    with (
        thriftpy2_server("framed") as upstream,
        run_sidecar([upstream.address], config=config) as sc,
        thriftpy2_client(sc.address, "framed") as bystander,
    ):
        assert bystander.add(1, 1) == 2
        for i in range(6):
            with socket.create_connection(split_address(sc.address)) as sock:
                sock.sendall(cut_short(100 + i))
                [reply] = framed_replies(sock, 1)
            parts = reply_parts(reply)
            assert parts.header.seqid == 100 + i
            assert parts.exc_type == ApplicationExceptionType.PROTOCOL_ERROR
            assert "malformed" in (parts.exc_message or "")
            said = "it was not sent upstream" if validate else "it was not retried"
            assert said in (parts.exc_message or "")
            assert bystander.add(i, 1) == i + 1  # served all along
        m = sc.metrics()
        assert m.value("thrift_sidecar_breaker_state", breaker=upstream.address) == 0
        assert m.value("thrift_sidecar_retries_total", method="getItem", reason="timeout") == 0
        assert (
            m.value(
                "thrift_sidecar_requests_total", service="", method="getItem", outcome="bad_request"
            )
            == 6
        )
        assert upstream.calls["getItem"] == 0  # never a whole call there, never retried


def test_a_connection_that_keeps_sending_malformed_calls_is_closed() -> None:
    with (
        thriftpy2_server("framed") as upstream,
        run_sidecar([upstream.address], config=CONFIG) as sc,
        socket.create_connection(split_address(sc.address)) as sock,
    ):
        for i in range(3):
            sock.sendall(cut_short(200 + i))
            [reply] = framed_replies(sock, 1)
            assert reply_parts(reply).exc_type == ApplicationExceptionType.PROTOCOL_ERROR
        sock.settimeout(10.0)
        assert sock.recv(1) == b""  # closed after the third
        wait_until(
            lambda: (
                sc.metrics().value("thrift_sidecar_protocol_errors_total", kind="malformed") == 1
            ),
            message="counted",
        )


def test_a_non_strict_client_whose_first_message_is_a_reply_is_answered() -> None:
    """Issue 13, finding 11: it was closed without an error reply; a strict one was answered."""
    buf = thriftpy2.transport.TCyMemoryBuffer()
    proto = thriftpy2.protocol.TCyBinaryProtocol(buf, strict_write=False)
    proto.write_message_begin("add", thriftpy2.thrift.TMessageType.REPLY, 42)
    buf.write(b"\x00")  # an empty struct
    reply_first = bytes(buf.getvalue())
    with (
        thriftpy2_server("framed") as upstream,
        run_sidecar([upstream.address], config=CONFIG) as sc,
        socket.create_connection(split_address(sc.address)) as sock,
    ):
        sock.sendall(reply_first)
        sock.settimeout(10.0)
        decoder = BufferedDecoder(1 << 20)
        replies: list[bytes] = []
        for _ in range(100):  # until the answer is whole; bounded by count and the timeout
            chunk = sock.recv(65536)
            assert chunk, "closed without an answer"
            replies += [bytes(m.payload()) for m in decoder.receive_data(chunk)]
            if replies:
                break
        parts = reply_parts(replies[0])
    assert parts.header.seqid == 42
    assert not parts.header.strict  # answered in the client's own form
    assert parts.exc_type == ApplicationExceptionType.INVALID_MESSAGE_TYPE


def test_a_failed_call_too_costly_to_check_is_neither_retried_nor_counted() -> None:
    """A framed call whose check would take over `CHECK_STEPS` steps is not shown well formed.

    Its failure (here: an upstream that never answers) then counts against
    neither the breaker nor the address, and it is not retried; a small call
    that fails the same way still opens the breaker.
    """
    config = {
        "breaker": {"fail_max": 1, "reset_timeout": "1h"},
        "retry": {
            "max_attempts": 3,
            "per_try_timeout": "300ms",
            "deadline": "5s",
            "idempotent": ["ping"],
        },
    }
    big = empty_structs_call(CHECK_STEPS * 2, seqid=5)  # a step an element, and one for its STOP
    with (
        SilentServer() as silent,
        run_sidecar([f"127.0.0.1:{silent.port}"], config=config) as sc,
        socket.create_connection(split_address(sc.address)) as sock,
    ):
        breaker = f"127.0.0.1:{silent.port}"
        sock.sendall(struct.pack(">i", len(big)) + big)
        [reply] = framed_replies(sock, 1)
        parts = reply_parts(reply)
        assert parts.header.seqid == 5
        assert parts.exc_type == ApplicationExceptionType.INTERNAL_ERROR
        assert "did not reply within 0.3s" in (parts.exc_message or "")
        m = sc.metrics()
        assert m.value("thrift_sidecar_breaker_state", breaker=breaker) == 0
        assert m.value("thrift_sidecar_retries_total", method="ping", reason="timeout") == 0
        assert len(silent.accepted) == 1  # one attempt, no retry on another connection

        small = empty_structs_call(0, seqid=6)
        sock.sendall(struct.pack(">i", len(small)) + small)
        [reply] = framed_replies(sock, 1)
        assert reply_parts(reply).header.seqid == 6
        assert sc.metrics().value("thrift_sidecar_breaker_state", breaker=breaker) == 2


def test_a_message_hidden_in_a_frame_never_fails_another_clients_call() -> None:
    """A frame holding a ping and, behind it, a slow second call with a seqid of its own.

    The upstream answers both; the second answer reaches the sidecar while the
    bystander's call waits on the same (only) upstream connection. It is a
    reply to no call of the sidecar's: dropped, counted, the bystander
    answered, and the connection closed after.
    """
    hidden = encode_call("sleepMs", {"ms": 300}, seqid=-5)
    first = encode_call("ping", seqid=41)
    # Checked before sending, such a frame is refused (the next test); here it is not.
    config = {
        **CONFIG,
        "upstream": {"pool_size": 1},
        "limits": {"validate_framed_calls": False},
        # The bystander's call waits behind the hidden one's 300 ms at the upstream.
        "retry": {**CONFIG["retry"], "per_try_timeout": "5s", "deadline": "10s"},
    }
    with (
        thriftpy2_server("framed") as upstream,
        run_sidecar([upstream.address], config=config) as sc,
        thriftpy2_client(sc.address, "framed") as bystander,
        socket.create_connection(split_address(sc.address)) as sock,
    ):
        sock.sendall(struct.pack(">i", len(first) + len(hidden)) + first + hidden)
        [reply] = framed_replies(sock, 1)
        assert reply_parts(reply).header.seqid == 41
        wait_until(lambda: upstream.calls["sleepMs"] == 1, message="the hidden call runs")
        assert bystander.add(2, 3) == 5  # sent on the connection the stray comes back on
        m = sc.metrics()
        assert (
            m.value("thrift_sidecar_upstream_stray_replies_total", upstream=upstream.address) == 1
        )
        assert m.value("thrift_sidecar_breaker_state", breaker=upstream.address) == 0
        assert bystander.add(3, 4) == 7  # on a new connection


def test_a_frame_with_a_hidden_message_is_refused_before_it_reaches_the_upstream() -> None:
    hidden = encode_call("sleepMs", {"ms": 300}, seqid=-5)
    first = encode_call("ping", seqid=41)
    with (
        thriftpy2_server("framed") as upstream,
        run_sidecar([upstream.address], config=CONFIG) as sc,
        socket.create_connection(split_address(sc.address)) as sock,
    ):
        sock.sendall(struct.pack(">i", len(first) + len(hidden)) + first + hidden)
        [reply] = framed_replies(sock, 1)
        parts = reply_parts(reply)
        assert parts.header.seqid == 41
        assert parts.exc_type == ApplicationExceptionType.PROTOCOL_ERROR
        assert "bytes follow the arguments inside the frame" in (parts.exc_message or "")
        assert "not sent upstream" in (parts.exc_message or "")
        assert upstream.calls["ping"] == 0
        assert upstream.calls["sleepMs"] == 0


def test_a_closed_connection_is_freed_at_once_without_a_collection() -> None:
    """A closed connection, its decoder's buffer and its queue go as soon as the
    server forgets it: nothing holds it in a reference cycle, which only the cyclic
    collector would free, at a time of its own (long after, for an old connection)."""
    with (
        thriftpy2_server("framed") as upstream,
        SidecarThread(base_config([upstream.address])) as st,
    ):
        assert st.sidecar is not None
        server = st.sidecar.server
        gc.collect()
        gc.disable()
        try:
            for i in range(5):
                with thriftpy2_client(st.address, "framed") as client:
                    assert client.add(i, 1) == i + 1
            wait_until(
                lambda: st.call(lambda: not server.connections and not server.finishing),
                message="every connection closed and forgotten",
            )
            alive = [o for o in gc.get_objects() if isinstance(o, ClientConnection)]
            assert alive == []
        finally:
            gc.enable()


def test_a_flood_of_calls_answered_at_once_takes_turns_with_other_clients() -> None:
    """A client that pipelines thousands of oneway calls gets a turn of the loop like any
    other, not the loop: another client's call ready at the same time goes upstream
    after at most a turn's worth of the flood. Before, a connection ran every call of a
    read (thousands: each finishes at once) and read on, up to 32 reads a turn on
    uvloop; the rest of the process, other clients and the admin port, waited.

    The sidecar is stopped (SIGSTOP) while the flood fills its socket buffer and the
    other client's call follows, then continued: both connections are ready in the
    same turn, the flood's first."""
    notify = encode_call("notify", {"tag": "x"})
    framed_notify = struct.pack(">i", len(notify)) + notify
    add = encode_call("add", {"a": 2, "b": 3}, seqid=7)
    seen_at_add: list[int] = []
    with thriftpy2_server("framed") as upstream:

        def hook(name: str) -> None:
            if name == "add":
                seen_at_add.append(upstream.calls["notify"])

        upstream.state.hook = hook
        with (
            # One upstream connection: the upstream sees the calls in the order they
            # were sent (one thread each connection, side by side, would blur it).
            run_sidecar([upstream.address], config={"upstream": {"pool_size": 1}}) as sc,
            socket.create_connection(split_address(sc.address)) as bystander,
            socket.create_connection(split_address(sc.address)) as flooder,
        ):
            bystander.sendall(struct.pack(">i", len(add)) + add)
            assert len(framed_replies(bystander, 1)) == 1  # an upstream connection is open
            seen_at_add.clear()
            sc.proc.send_signal(signal.SIGSTOP)
            try:
                flooder.setblocking(False)
                chunk = framed_notify * 1000
                sent = 0
                for _ in range(10_000):  # until the socket buffers are full
                    try:
                        sent += flooder.send(chunk)
                    except BlockingIOError:
                        break
                bystander.sendall(struct.pack(">i", len(add)) + add)
            finally:
                sc.proc.send_signal(signal.SIGCONT)
            assert len(framed_replies(bystander, 1)) == 1
            flooder.setblocking(True)
            rest = sent % len(framed_notify)  # a message the last send cut
            if rest:
                flooder.sendall(framed_notify[rest:])
            flood = -(-sent // len(framed_notify))
            wait_until(
                lambda: upstream.calls["notify"] == flood, timeout=60, message="the whole flood"
            )
    [at_add] = seen_at_add
    assert flood > 1000
    assert at_add <= 4 * CALLS_PER_TURN, f"the other call went upstream after {at_add} of {flood}"


def test_a_call_whose_arguments_do_not_match_the_idl_never_opens_the_breaker() -> None:
    """getItem with its i64 argument sent as a string is well formed: it went upstream,
    the upstream's handler failed on it (INTERNAL_ERROR) and three such calls opened the
    breaker for every client. With an IDL, a failed call's arguments are compared with
    the types it declares: a mismatch is the client's doing, answered PROTOCOL_ERROR,
    neither retried nor counted against the upstream."""
    config = {**CONFIG, "idl": str(INTEROP_IDL)}
    with (
        thriftpy2_server("framed") as upstream,
        run_sidecar([upstream.address], config=config) as sc,
        thriftpy2_client(sc.address, "framed") as bystander,
    ):
        assert bystander.getItem(1).id == 1
        for i in range(6):
            body = (
                encode_header("getItem", MessageType.CALL, 300 + i)
                + b"\x0b\x00\x01\x00\x00\x00\x03abc\x00"
            )
            with socket.create_connection(split_address(sc.address)) as sock:
                sock.sendall(struct.pack(">i", len(body)) + body)
                [reply] = framed_replies(sock, 1)
            parts = reply_parts(reply)
            assert parts.header.seqid == 300 + i
            assert parts.exc_type == ApplicationExceptionType.PROTOCOL_ERROR
            said = parts.exc_message or ""
            assert "does not match the IDL" in said
            assert "argument 1 (id) of Interop.getItem has type string" in said
            assert "the IDL declares i64" in said
            assert bystander.getItem(2).id == 2  # served all along
        assert sc.metrics().value("thrift_sidecar_breaker_state") == 0  # closed


def test_invented_method_names_never_leave_real_methods_sharing_a_breaker() -> None:
    """With breaker.scope: method and no IDL, a client calling invented names (the
    upstream answers UNKNOWN_METHOD) used to fill metrics.max_method_labels; real
    methods met after them were all `other`, one breaker, so one failing method
    cut off the rest. Now unanswered names hold at most half the labels, and a
    real method gets its own label and breaker once the upstream has answered it."""
    config = {
        "metrics": {"max_method_labels": 6},
        "breaker": {"scope": "method", "fail_max": 2, "reset_timeout": "1h"},
        "retry": {"max_attempts": 1, "per_try_timeout": "5s", "deadline": "10s"},
    }
    invented = [encode_call("ping", seqid=i, name=f"madeUp{i}") for i in range(20)]
    with (
        thriftpy2_server("framed") as upstream,
        run_sidecar([upstream.address], config=config) as sc,
        thriftpy2_client(sc.address, "framed") as client,
    ):
        for reply in raw_calls(sc.address, invented, "framed", timeout=10):
            assert reply_parts(reply).exc_type == ApplicationExceptionType.UNKNOWN_METHOD
        # crash() fails in the upstream's handler (INTERNAL_ERROR): its breaker opens.
        for _ in range(4):
            with pytest.raises(thriftpy2.thrift.TApplicationException):
                client.crash()
        assert [client.add(1, i) for i in range(3)] == [1, 2, 3]
        metrics = sc.metrics()
    breaker = upstream.address
    assert metrics.value("thrift_sidecar_breaker_state", breaker=f"{breaker}/crash") == 2
    assert metrics.value("thrift_sidecar_breaker_state", breaker=f"{breaker}/add") == 0
    assert metrics.value("thrift_sidecar_requests_total", method="add", outcome="ok") >= 2
    # Three invented names took the unanswered half of the six labels; the rest got none.
    invented_labels = {
        dict(labels)["method"]
        for labels in metrics.matching("thrift_sidecar_requests_total")
        if dict(labels)["method"].startswith("madeUp")
    }
    assert len(invented_labels) == 3
