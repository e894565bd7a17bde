"""Method names that are not UTF-8, through a real sidecar to a real upstream and back.

Thrift names are bytes. Apache's C++, Java and Go servers read a name without
checking it and answer one they do not know with UNKNOWN_METHOD, echoing the
name (the C++ server puts the same bytes in the message, ``Invalid method
name: '...'``). The upstream here is a bare socket server that does just that,
in the binary and the compact protocol (thriftpy2 and Apache's Python library
fail to decode such a name, so neither can play the part), and answers a few
names of its own:

- ``ping``, and any name starting with ``get``: a void REPLY, name echoed;
- ``swapName``: a void REPLY named ``b"\\xfe\\xff"`` (a mismatched name that
  is not UTF-8), ``swapNameText``: one named ``other`` (a mismatched name as
  text). The sidecar matches replies by seqid, never by name: both reach the
  client as the upstream wrote them.

The client is a bare socket too, on one connection for every call, so each
reply is compared byte for byte and the connection's health is seen.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from thrift.protocol.TBinaryProtocol import TBinaryProtocol
from thrift.protocol.TCompactProtocol import TCompactProtocol
from thrift.Thrift import TApplicationException, TMessageType
from thrift.transport.TTransport import TMemoryBuffer

from sidecar.protocol.compact import encode_varint, read_varint
from sidecar.testing.thrift_server import ThreadedServer
from tests.support.clients import split_address
from tests.support.redis import redis_server
from tests.support.sidecar import Metrics, free_port, http_get, run_sidecar
from tests.support.wait import wait_until

# Not UTF-8; UTF-8 cut short; valid UTF-8 that is not ASCII (not an identifier either).
NAMES = [b"\xff\xfe", b"caf\xc3", b"caf\xc3\xa9"]
UNKNOWN_METHOD = 1
VOID = b"\x00"  # an empty result struct, in both protocols
ARGS = VOID  # calls without arguments
ONE_TRY = {"retry": {"max_attempts": 1}}
_I32 = struct.Struct(">i")


# ----------------------------------------------------------------------------- wire


def envelope(protocol: str, name: bytes, mtype: int, seqid: int) -> bytes:
    """A strict binary or a compact envelope, written by hand."""
    if protocol == "compact":
        return (
            bytes((0x82, (mtype << 5) | 1))
            + encode_varint(seqid & 0xFFFFFFFF)
            + encode_varint(len(name))
            + name
        )
    return _I32.pack(-0x7FFF0000 | mtype) + _I32.pack(len(name)) + name + _I32.pack(seqid)


def unknown_method(protocol: str, name: bytes, seqid: int) -> bytes:
    """The EXCEPTION an Apache C++ server answers: the name, raw, in envelope and message."""
    text = b"Invalid method name: '" + name + b"'"
    if protocol == "compact":
        body = b"\x18" + encode_varint(len(text)) + text + b"\x15" + encode_varint(2) + b"\x00"
    else:
        body = (
            b"\x0b\x00\x01"
            + _I32.pack(len(text))
            + text
            + b"\x08\x00\x02"
            + _I32.pack(UNKNOWN_METHOD)
            + b"\x00"
        )
    return envelope(protocol, name, 3, seqid) + body


def read_envelope(message: bytes) -> tuple[str, bytes, int, int]:
    """(protocol, name, type, seqid) of a message, read by hand."""
    if message[0] == 0x82:
        read = read_varint(message, 2, len(message), 5)
        assert read is not None
        seqid, at = read
        read = read_varint(message, at, len(message), 5)
        assert read is not None
        length, at = read
        return "compact", message[at : at + length], message[1] >> 5, seqid
    length = _I32.unpack_from(message, 4)[0]
    name = message[8 : 8 + length]
    return "binary", name, message[3], _I32.unpack_from(message, 8 + length)[0]


def read_frame(sock: socket.socket) -> bytes | None:
    """One framed message; None at EOF."""
    head = _read_exactly(sock, 4)
    if head is None:
        return None
    body = _read_exactly(sock, _I32.unpack(head)[0])
    if body is None:
        raise ConnectionError("EOF inside a frame")
    return body


def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


# ----------------------------------------------------------------------------- upstream


class RawNameUpstream(ThreadedServer):
    """A framed Thrift server on a bare socket that reads names as bytes (module docstring)."""

    name = "raw-names"

    def __init__(self) -> None:
        super().__init__()
        self.received: list[bytes] = []  # names of the calls, as they arrived
        self.sent: list[bytes] = []  # each reply, as written
        self._seen = threading.Lock()

    def answer(self, protocol: str, name: bytes, seqid: int) -> bytes:
        if name == b"swapName":
            return envelope(protocol, b"\xfe\xff", 2, seqid) + VOID
        if name == b"swapNameText":
            return envelope(protocol, b"other", 2, seqid) + VOID
        if name == b"ping" or name.startswith(b"get"):
            return envelope(protocol, name, 2, seqid) + VOID
        return unknown_method(protocol, name, seqid)

    def _serve_connection(self, sock: socket.socket) -> None:
        while not self._closing.is_set():
            message = read_frame(sock)
            if message is None:
                return
            protocol, name, _, seqid = read_envelope(message)
            reply = self.answer(protocol, name, seqid)
            with self._seen:
                self.received.append(name)
                self.sent.append(reply)
            sock.sendall(_I32.pack(len(reply)) + reply)


@contextlib.contextmanager
def raw_upstream() -> Iterator[RawNameUpstream]:
    server = RawNameUpstream()
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Client:
    """One framed client connection; `call` sends a message and returns the reply's bytes."""

    def __init__(self, address: str) -> None:
        self.sock = socket.create_connection(split_address(address), timeout=10)

    def call(self, message: bytes) -> bytes:
        self.sock.sendall(_I32.pack(len(message)) + message)
        reply = read_frame(self.sock)
        assert reply is not None, "the sidecar closed the client's connection"
        return reply

    def close(self) -> None:
        self.sock.close()


def json_log_lines(log: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


def _all_text(value: Any) -> None:
    """Every string in a decoded JSON value is valid text (no lone surrogates)."""
    if isinstance(value, str):
        value.encode("utf-8")
    elif isinstance(value, dict):
        for key, item in value.items():
            _all_text(key)
            _all_text(item)
    elif isinstance(value, list):
        for item in value:
            _all_text(item)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("protocol", ["binary", "compact"])
def test_unknown_names_that_are_not_utf8_get_the_upstreams_answer_byte_for_byte(
    protocol: str,
) -> None:
    config = {**ONE_TRY, "log": {"format": "json", "access": {"sample_rate": 1}}}
    with raw_upstream() as upstream, run_sidecar([upstream.address], config=config) as sc:
        client = Client(sc.address)
        try:
            for seqid, name in enumerate(NAMES, start=10):
                reply = client.call(envelope(protocol, name, 1, seqid) + ARGS)
                assert reply == unknown_method(protocol, name, seqid)
            # The same connection goes on serving.
            reply = client.call(envelope(protocol, b"ping", 1, 99) + ARGS)
            assert reply == envelope(protocol, b"ping", 2, 99) + VOID
        finally:
            client.close()
        assert upstream.received == [*NAMES, b"ping"]

        # /metrics still parses (prometheus_client's parser) and counts the calls:
        # a name that is not an identifier is labelled `other`.
        status, text = http_get(sc.admin + "/metrics")
        assert status == 200
        metrics = Metrics(text)
        requests = "thrift_sidecar_requests_total"
        assert metrics.value(requests, method="other", outcome="app_exception") == len(NAMES)
        assert metrics.value(requests, method="ping", outcome="ok") == 1
        assert metrics.value("thrift_sidecar_protocol_errors_total") == 0

        status, body = http_get(sc.admin + "/state")
        assert status == 200
        _all_text(json.loads(body))

        def access_lines() -> list[dict[str, Any]]:
            lines = json_log_lines(sc.log())
            return [line for line in lines if line.get("logger") == "sidecar.access"]

        lines = wait_until(lambda: len(access_lines()) == 4 and access_lines())
        for line in json_log_lines(sc.log()):
            _all_text(line)
        assert [line["method"] for line in lines] == ["\\xff\\xfe", "caf\\xc3", "café", "ping"]


@pytest.mark.parametrize("protocol", ["binary", "compact"])
def test_a_reply_whose_name_is_not_utf8_is_passed_on_like_any_mismatched_name(
    protocol: str,
) -> None:
    """The sidecar matches a reply to its call by seqid; a reply with another name
    (as text or not) goes to the client as the upstream wrote it, and the
    upstream connection stays in use."""
    with (
        raw_upstream() as upstream,
        run_sidecar([upstream.address], config=ONE_TRY) as sc,
    ):
        client = Client(sc.address)
        try:
            for seqid, name, replied in [
                (5, b"swapNameText", b"other"),
                (6, b"swapName", b"\xfe\xff"),
                (7, b"ping", b"ping"),
            ]:
                reply = client.call(envelope(protocol, name, 1, seqid) + ARGS)
                assert reply == envelope(protocol, replied, 2, seqid) + VOID
        finally:
            client.close()
        metrics = Metrics(http_get(sc.admin + "/metrics")[1])
        attempts = "thrift_sidecar_upstream_attempts_total"
        assert metrics.value(attempts, result="ok") == 3
        assert metrics.value(attempts, result="protocol_error") == 0
        assert upstream.connections_accepted == 1  # never discarded for a reply's name


@pytest.mark.parametrize(
    ("protocol", "store"),
    [("binary", "sqlite"), ("compact", "sqlite"), ("binary", "workers"), ("binary", "redis")],
)
def test_a_cached_reply_to_a_name_that_is_not_utf8_is_served_byte_for_byte(
    protocol: str, store: str, tmp_path: Path
) -> None:
    """``get\\xff`` is idempotent (``get*``) and cacheable: its reply is stored and
    served, the same bytes, once the upstream is gone. Stores that take keys as
    UTF-8 text: SQLite, Redis, and the supervisor's store that ``workers: 2``
    share over their wire (sidecar/fallback/shared_wire.py)."""
    cache: dict[str, Any] = {"backend": "sqlite", "path": str(tmp_path / "cache.sqlite")}
    config: dict[str, Any] = {
        **ONE_TRY,
        "fallback": {
            "serve_on": ["breaker_open", "retries_exhausted"],
            "cache": cache if store == "sqlite" else {"backend": "memory"},
        },
    }
    if store == "workers":
        config["workers"] = 2
    with contextlib.ExitStack() as stack:
        if store == "redis":
            redis = stack.enter_context(redis_server())
            config["fallback"]["cache"] = {"backend": "redis"}
            config["state"] = {"redis_url": redis.url}
        _cache_round_trip(protocol, config)


def _cache_round_trip(protocol: str, config: dict[str, Any]) -> None:
    name = b"get\xff"
    upstream = RawNameUpstream()
    upstream.start()
    try:
        with run_sidecar([upstream.address], config=config) as sc:
            client = Client(sc.address)
            try:
                first = client.call(envelope(protocol, name, 1, 1) + ARGS)
                assert first == envelope(protocol, name, 2, 1) + VOID

                def stored() -> bool:
                    state = json.loads(http_get(sc.admin + "/state")[1])
                    return bool(state["fallback_store"]["entries"] >= 1)

                wait_until(stored, message="the reply in the store")
                upstream.stop()
                served = client.call(envelope(protocol, name, 1, 2) + ARGS)
                assert served == envelope(protocol, name, 2, 2) + VOID
            finally:
                client.close()
            metrics = Metrics(http_get(sc.admin + "/metrics")[1])
            assert metrics.value("thrift_sidecar_fallback_replies_total", source="cache") == 1
            assert metrics.value("thrift_sidecar_fallback_store_errors_total") == 0
    finally:
        upstream.stop()


def test_the_upstream_here_answers_like_apache() -> None:
    """The hand-written answers are what Apache's Python library writes for a UTF-8 name."""
    for protocol, factory in (("binary", TBinaryProtocol), ("compact", TCompactProtocol)):
        buf = TMemoryBuffer()
        proto = factory(buf)
        proto.writeMessageBegin("nope", TMessageType.EXCEPTION, 3)
        TApplicationException(
            TApplicationException.UNKNOWN_METHOD, "Invalid method name: 'nope'"
        ).write(proto)
        proto.writeMessageEnd()
        assert buf.getvalue() == unknown_method(protocol, b"nope", 3)


def test_a_name_that_is_not_utf8_survives_transcoding_both_ways() -> None:
    """A compact client before a binary upstream (``upstream.protocol: binary``): the
    envelope is rewritten in each protocol, and the name's bytes stay the same."""
    config = {**ONE_TRY, "upstream": {"protocol": "binary"}}
    with raw_upstream() as upstream, run_sidecar([upstream.address], config=config) as sc:
        client = Client(sc.address)
        try:
            for seqid, name in enumerate(NAMES, start=1):
                reply = client.call(envelope("compact", name, 1, seqid) + ARGS)
                assert reply == unknown_method("compact", name, seqid)
        finally:
            client.close()
        assert upstream.received == NAMES
        assert all(read_envelope(sent)[0] == "binary" for sent in upstream.sent)


def test_the_sidecars_own_answer_echoes_the_name_and_shows_it_as_text() -> None:
    """With the circuit open and no fallback, the sidecar answers itself: the
    envelope carries the name's bytes (clients check it), the message is text."""
    config = {**ONE_TRY, "breaker": {"fail_max": 1, "reset_timeout": "60s"}}
    with run_sidecar([f"127.0.0.1:{free_port()}"], config=config) as sc:  # nothing listens
        client = Client(sc.address)
        try:
            client.call(envelope("binary", b"ping", 1, 1) + ARGS)  # connect_error: opens it
            reply = client.call(envelope("binary", b"\xff\xfe", 1, 2) + ARGS)
        finally:
            client.close()
    _, name, mtype, seqid = read_envelope(reply)
    assert (name, mtype, seqid) == (b"\xff\xfe", 3, 2)
    at = 8 + len(name) + 4
    assert reply[at : at + 3] == b"\x0b\x00\x01"  # field 1, the message
    length = _I32.unpack_from(reply, at + 3)[0]
    message = reply[at + 7 : at + 7 + length].decode("utf-8")
    assert message.startswith("circuit open for ")
    assert message.endswith("no fallback for \\xff\\xfe")
