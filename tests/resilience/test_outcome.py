"""Outcome classification from real reply bytes: every row of the table in outcome.py.

Replies are encoded by thriftpy2 from a small IDL written here (success values
of several types, void, declared exceptions at field ids 1, 2 and 300), and
``TApplicationException`` of every type by both `sidecar.protocol.appexc` and
thriftpy2. The rows that come from I/O rather than bytes (connect_error,
connection_closed, timeout) are checked against the table and the config
defaults that follow it.
"""

from __future__ import annotations

import ast
import io
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import thriftpy2
from hypothesis import given, settings
from hypothesis import strategies as st
from thriftpy2.protocol.binary import TBinaryProtocol
from thriftpy2.thrift import TApplicationException, TMessageType
from thriftpy2.transport.memory import TMemoryBuffer

import sidecar.resilience.outcome as outcome_module
from sidecar.config import BreakerConfig, RetryConfig, SidecarConfig
from sidecar.protocol.appexc import (
    ApplicationExceptionType,
    encode_application_exception,
    encode_exception_struct,
)
from sidecar.protocol.envelope import MessageType, Protocol, parse_header
from sidecar.protocol.skip import TType
from sidecar.resilience.outcome import Outcome, classify_reply
from tests.support.source import parse_source

IDL = """
exception NotFound { 1: string what }
exception Busy { 1: i32 retry_after }
exception Far { 1: string why }
struct Item { 1: i64 id, 2: string name }

service Shop {
    Item getItem(1: i64 id) throws (1: NotFound nf, 2: Busy busy, 300: Far far),
    void ping(),
    void touch(1: i64 id) throws (1: NotFound nf),
    i32 count(),
    bool flag(),
    string label(),
    list<Item> listItems(),
    map<string, i64> tally(),
    double ratio(),
}
"""


@pytest.fixture(scope="module")
def shop() -> ModuleType:
    return thriftpy2.load_fp(io.StringIO(IDL), module_name="resilience_outcome_thrift")


def encode_reply(
    module: ModuleType, method: str, *, strict: bool = True, seqid: int = 7, **fields: Any
) -> bytes:
    """A whole REPLY message of ``Shop.method`` with the given result fields, by thriftpy2."""
    result = getattr(module.Shop, method + "_result")(**fields)
    proto = TBinaryProtocol(TMemoryBuffer(), strict_write=strict)
    proto.write_message_begin(method, TMessageType.REPLY, seqid)
    proto.write_struct(result)
    proto.write_message_end()
    return bytes(proto.trans.getvalue())


def encode_thriftpy2_exception(exc_type: int, message: str, *, strict: bool = True) -> bytes:
    """A whole EXCEPTION message, encoded by thriftpy2's own TApplicationException."""
    proto = TBinaryProtocol(TMemoryBuffer(), strict_write=strict)
    proto.write_message_begin("getItem", TMessageType.EXCEPTION, 9)
    proto.write_struct(TApplicationException(exc_type, message))
    proto.write_message_end()
    return bytes(proto.trans.getvalue())


def classify_message(data: bytes) -> Outcome:
    """Classify a whole message the way the pipeline does: envelope, then the struct."""
    header = parse_header(data)
    assert header is not None, "the test built an incomplete message"
    return classify_reply(header.type, memoryview(data)[header.body_offset :])


def success_values(module: ModuleType) -> list[tuple[str, Any]]:
    return [
        ("getItem", module.Item(id=1, name="one")),
        ("getItem", module.Item()),
        ("count", 0),
        ("count", -(2**31)),
        ("flag", False),
        ("flag", True),
        ("label", ""),
        ("label", "x" * 70_000),
        ("listItems", []),
        ("listItems", [module.Item(id=i) for i in range(50)]),
        ("tally", {}),
        ("tally", {"a": 1}),
        ("ratio", 0.0),
    ]


# ok


@pytest.mark.parametrize("strict", [True, False])
def test_reply_with_a_success_value_is_ok(shop: ModuleType, strict: bool) -> None:
    for method, value in success_values(shop):
        data = encode_reply(shop, method, strict=strict, success=value)
        assert classify_message(data) is Outcome.OK, (method, value)


@pytest.mark.parametrize("method", ["ping", "touch"])
@pytest.mark.parametrize("strict", [True, False])
def test_void_reply_is_ok(shop: ModuleType, method: str, strict: bool) -> None:
    data = encode_reply(shop, method, strict=strict)
    header = parse_header(data)
    assert header is not None
    assert bytes(data[header.body_offset :]) == b"\x00"  # the empty result struct
    assert classify_message(data) is Outcome.OK


# declared_exception


@pytest.mark.parametrize(
    ("field", "make"),
    [
        ("nf", lambda m: m.NotFound(what="no such item")),
        ("busy", lambda m: m.Busy(retry_after=3)),
        ("far", lambda m: m.Far(why="field id 300 needs both bytes of the i16")),
        ("nf", lambda m: m.NotFound()),
    ],
)
@pytest.mark.parametrize("strict", [True, False])
def test_reply_with_a_declared_exception_is_declared_exception(
    shop: ModuleType, field: str, make: Any, strict: bool
) -> None:
    data = encode_reply(shop, "getItem", strict=strict, **{field: make(shop)})
    assert classify_message(data) is Outcome.DECLARED_EXCEPTION


def test_void_method_with_a_declared_exception_is_declared_exception(shop: ModuleType) -> None:
    data = encode_reply(shop, "touch", nf=shop.NotFound(what="gone"))
    assert classify_message(data) is Outcome.DECLARED_EXCEPTION


@given(field_id=st.integers(min_value=1, max_value=2**15 - 1), ftype=st.sampled_from([8, 11, 12]))
@settings(max_examples=60, deadline=None)
def test_any_positive_first_field_id_is_a_declared_exception(field_id: int, ftype: int) -> None:
    values = {8: b"\x00\x00\x00\x05", 11: b"\x00\x00\x00\x01x", 12: b"\x00"}
    body = bytes((ftype,)) + field_id.to_bytes(2, "big") + values[ftype] + b"\x00"
    assert classify_reply(MessageType.REPLY, body) is Outcome.DECLARED_EXCEPTION


@given(
    field_id=st.integers(min_value=-(2**15), max_value=2**15 - 1),
    ftype=st.sampled_from([8, 11, 12]),
    at=st.integers(min_value=0, max_value=5),
)
@settings(max_examples=300, deadline=None)
def test_only_field_id_zero_is_ok_whatever_its_bytes_and_offset(
    field_id: int, ftype: int, at: int
) -> None:
    """The field id read as its two bytes: negative ids and ids with one zero byte
    (256, 1, -256) are declared exceptions like any other but 0, read in place too."""
    values = {8: b"\x00\x00\x00\x05", 11: b"\x00\x00\x00\x01x", 12: b"\x00"}
    body = bytes((ftype,)) + field_id.to_bytes(2, "big", signed=True) + values[ftype] + b"\x00"
    want = Outcome.OK if field_id == 0 else Outcome.DECLARED_EXCEPTION
    for data in (body, bytearray(body), memoryview(body)):
        assert classify_reply(MessageType.REPLY, data) is want
        padded = bytearray(b"\xff" * at) + body
        assert classify_reply(MessageType.REPLY, padded, at=at) is want


# app_exception and internal_error


@pytest.mark.parametrize("exc_type", list(ApplicationExceptionType))
@pytest.mark.parametrize("strict", [True, False])
def test_application_exception_of_every_type(
    exc_type: ApplicationExceptionType, strict: bool
) -> None:
    expected = (
        Outcome.INTERNAL_ERROR
        if exc_type == ApplicationExceptionType.INTERNAL_ERROR
        else Outcome.APP_EXCEPTION
    )
    ours = encode_application_exception("getItem", 5, exc_type, f"type {exc_type.name}", strict)
    assert classify_message(ours) is expected
    theirs = encode_thriftpy2_exception(int(exc_type), "from thriftpy2", strict=strict)
    assert classify_message(theirs) is expected


@pytest.mark.parametrize("exc_type", [11, 99, 2**31 - 1, -1])
def test_application_exception_of_an_unknown_type_is_app_exception(exc_type: int) -> None:
    data = encode_application_exception("getItem", 5, exc_type, "what is this")
    assert classify_message(data) is Outcome.APP_EXCEPTION


def test_application_exception_fields_in_any_order_and_with_extras() -> None:
    internal = int(ApplicationExceptionType.INTERNAL_ERROR)
    type_first = (
        bytes((TType.I32,))
        + (2).to_bytes(2, "big")
        + internal.to_bytes(4, "big")
        + bytes((TType.STRING,))
        + (1).to_bytes(2, "big")
        + (2).to_bytes(4, "big")
        + b"hi"
        + bytes((TType.I64,))  # an unknown field the reader must skip
        + (9).to_bytes(2, "big")
        + (0).to_bytes(8, "big")
        + b"\x00"
    )
    assert classify_reply(MessageType.EXCEPTION, type_first) is Outcome.INTERNAL_ERROR
    # No type field at all reads as UNKNOWN: an application exception, not a failure.
    assert classify_reply(MessageType.EXCEPTION, b"\x00") is Outcome.APP_EXCEPTION
    message_only = encode_exception_struct(0, "x")[: -(3 + 4 + 1)] + b"\x00"
    assert classify_reply(MessageType.EXCEPTION, message_only) is Outcome.APP_EXCEPTION


# protocol_error


GARBAGE_EXCEPTION_BODIES = [
    b"",  # nothing at all
    b"\x0b\x00\x01\x00\x00\x00\x10abc",  # string longer than the body
    b"\x08\x00\x02\x00\x00",  # i32 cut short
    b"\x08\x00\x02\x00\x00\x00\x06",  # no STOP
    b"\x63\x00\x01\x00",  # unknown field type
    b"\x0f\x00\x03\x0b\xff\xff\xff\xff\x00",  # negative list size
    b"\xff" * 32,
]


@pytest.mark.parametrize("body", GARBAGE_EXCEPTION_BODIES)
def test_garbage_exception_body_is_protocol_error(body: bytes) -> None:
    assert classify_reply(MessageType.EXCEPTION, body) is Outcome.PROTOCOL_ERROR


GARBAGE_REPLY_BODIES = [
    b"",  # not even a STOP
    b"\x0c",  # a field header cut after its type
    b"\x0c\x00",  # ... and in the middle of its id
    b"\x63\x00\x00\x00",  # an unknown field type with id 0
    b"\x63\x00\x01\x00",  # an unknown field type with id 1
    b"\x01\x00\x00\x00",  # VOID is not a field type on the wire
    b"\xff\xff\xff\xff\xff",
    b"\x80\x01\x00\x02",  # a second envelope where the struct should be
]


@pytest.mark.parametrize("body", GARBAGE_REPLY_BODIES)
def test_garbage_reply_body_is_protocol_error(body: bytes) -> None:
    assert classify_reply(MessageType.REPLY, body) is Outcome.PROTOCOL_ERROR


@pytest.mark.parametrize("mtype", [MessageType.CALL, MessageType.ONEWAY, 0, 5, 127])
def test_a_message_that_is_not_a_reply_is_protocol_error(shop: ModuleType, mtype: int) -> None:
    data = encode_reply(shop, "count", success=1)
    header = parse_header(data)
    assert header is not None
    assert classify_reply(mtype, data[header.body_offset :]) is Outcome.PROTOCOL_ERROR


@given(body=st.binary(max_size=40), mtype=st.integers(min_value=-5, max_value=10))
@settings(max_examples=300, deadline=None)
def test_any_bytes_classify_without_raising(body: bytes, mtype: int) -> None:
    result = classify_reply(mtype, body)
    assert result in {
        Outcome.OK,
        Outcome.DECLARED_EXCEPTION,
        Outcome.APP_EXCEPTION,
        Outcome.INTERNAL_ERROR,
        Outcome.PROTOCOL_ERROR,
    }
    if mtype not in (MessageType.REPLY, MessageType.EXCEPTION):
        assert result is Outcome.PROTOCOL_ERROR


@given(
    head=st.binary(max_size=8),
    body=st.binary(max_size=40),
    mtype=st.integers(min_value=0, max_value=5),
    compact=st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_a_struct_read_in_place_classifies_as_its_own_bytes(
    head: bytes, body: bytes, mtype: int, compact: bool
) -> None:
    """``at``: the struct read inside a larger buffer (a message's own) is the same answer."""
    protocol = Protocol.COMPACT if compact else Protocol.BINARY
    expected = classify_reply(mtype, body, protocol)
    assert classify_reply(mtype, bytearray(head + body), protocol, len(head)) is expected


@pytest.mark.parametrize("cut", [1, 2, 5, 9])
def test_reply_body_as_bytes_bytearray_or_memoryview(shop: ModuleType, cut: int) -> None:
    data = encode_reply(shop, "getItem", nf=shop.NotFound(what="w"))
    header = parse_header(data)
    assert header is not None
    body = data[header.body_offset :]
    for form in (bytes(body), bytearray(body), memoryview(body)):
        assert classify_reply(MessageType.REPLY, form) is Outcome.DECLARED_EXCEPTION
    # Trailing bytes after the struct do not matter; only the first field's id does.
    assert classify_reply(MessageType.REPLY, body + b"\x00" * cut) is Outcome.DECLARED_EXCEPTION


# The table itself


def table_rows() -> dict[str, bool]:
    """outcome → "breaker failure" column, read from outcome.py's docstring."""
    # From the source: a compiled module keeps no docstring.
    source = Path(outcome_module.__file__ or "").with_name("outcome.py")
    doc = ast.get_docstring(parse_source(source.read_text())) or ""
    rows = re.findall(r"^\|\s*([a-z_]+)\s*\|[^|]*\|\s*(yes|no)\s*\|$", doc, re.MULTILINE)
    return {name: flag == "yes" for name, flag in rows}


def test_the_table_lists_every_outcome_once() -> None:
    rows = table_rows()
    assert len(rows) == 8
    assert set(rows) == {o.value for o in Outcome}


def test_config_defaults_follow_the_table() -> None:
    rows = table_rows()
    failures = {name for name, failed in rows.items() if failed}
    assert set(BreakerConfig().trip_on) == failures
    # Answers (ok, declared and application exceptions) are never retried or tripped on:
    answers = {"ok", "declared_exception", "app_exception"}
    assert not answers & set(RetryConfig().retry_on)
    # Default retries are the I/O outcomes; internal_error only when listed.
    assert set(RetryConfig().retry_on) == {"connect_error", "connection_closed", "timeout"}
    for answer in answers:
        with pytest.raises(ValueError, match="retry_on"):
            SidecarConfig.model_validate({"retry": {"retry_on": [answer]}})
        with pytest.raises(ValueError, match="trip_on"):
            SidecarConfig.model_validate({"breaker": {"trip_on": [answer]}})


def test_every_outcome_value_is_accepted_by_the_config_where_it_may_appear() -> None:
    failures = [name for name, failed in table_rows().items() if failed]
    config = SidecarConfig.model_validate(
        {"retry": {"retry_on": failures}, "breaker": {"trip_on": failures}}
    )
    assert {Outcome(v) for v in config.retry.retry_on} == {Outcome(v) for v in failures}
