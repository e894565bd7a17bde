"""Static fallback replies: checked against the IDL, encoded once, decodable by thriftpy2.

Every accepted value is decoded back with thriftpy2 from the encoded result
struct and compared with what the config said; every rejected one must name
the key path of the bad value.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from thriftpy2.protocol import TBinaryProtocolFactory
from thriftpy2.utils import deserialize

from sidecar.config import SidecarConfig, load_config
from sidecar.errors import ConfigError
from sidecar.fallback.idl import load_idl
from sidecar.fallback.static import StaticReply, load_idl_parts
from sidecar.protocol.skip import TType
from tests.support.idl import canonical, load_thriftpy2_interop

INTEROP_IDL = Path(__file__).resolve().parents[2] / "idl" / "interop.thrift"
idl = load_thriftpy2_interop()


def parts(methods: dict[str, Any], *, with_idl: bool = True) -> dict[str, Any]:
    data: dict[str, Any] = {"methods": methods}
    if with_idl:
        data["idl"] = str(INTEROP_IDL)
    return load_idl_parts(SidecarConfig.model_validate(data))


def static(name: str, value: Any) -> dict[str, Any]:
    return {name: {"fallback": {"static": value}}}


def static_exception(name: str, exc: str, value: dict[str, Any]) -> dict[str, Any]:
    return {name: {"fallback": {"static_exception": {"name": exc, "value": value}}}}


def decode(service: Any, method: str, reply: StaticReply) -> Any:
    result = getattr(service, method + "_result")()
    return deserialize(result, reply.body, TBinaryProtocolFactory())  # type: ignore[no-untyped-call]


def rejected(methods: dict[str, Any], **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as raised:
        parts(methods, **kwargs)
    return str(raised.value)


def test_struct_value_decodes_to_the_configured_item() -> None:
    value = {
        "id": 0,
        "name": "unavailable",
        "price": 2,
        "tags": ["cached", "static"],
        "attributes": {"source": "sidecar"},
        "status": "DISCONTINUED",
    }
    reply = parts(static("getItem", value))["static_replies"]["getItem"]
    result = decode(idl.Interop, "getItem", reply)
    expected = idl.Item(
        id=0,
        name="unavailable",
        price=2.0,
        tags={"cached", "static"},
        attributes={"source": "sidecar"},
        status=idl.Status.DISCONTINUED,
    )
    assert canonical(result.success, "Item") == canonical(expected, "Item")
    assert result.notFound is None
    assert result.busy is None


def test_enum_by_number_and_unset_optional_fields() -> None:
    reply = parts(static("getItem", {"id": 3, "status": 100}))["static_replies"]["getItem"]
    item = decode(idl.Interop, "getItem", reply).success
    assert (item.id, item.status, item.name, item.description) == (
        3,
        idl.Status.ARCHIVED,
        None,
        None,
    )


def test_null_field_is_left_unset() -> None:
    reply = parts(static("getItem", {"id": 3, "description": None}))["static_replies"]
    item = decode(idl.Interop, "getItem", reply["getItem"]).success
    assert (item.id, item.description) == (3, None)


def test_list_of_structs() -> None:
    reply = parts(static("listItems", [{"id": 1}, {"id": 2, "name": "two"}]))["static_replies"]
    items = decode(idl.Interop, "listItems", reply["listItems"]).success
    assert [(i.id, i.name) for i in items] == [(1, None), (2, "two")]


def test_void_method_takes_an_empty_mapping() -> None:
    reply = parts(static("crash", {}))["static_replies"]["crash"]
    assert reply.body == b"\x00"  # an empty result struct: void success


def test_void_method_rejects_a_value() -> None:
    text = rejected(static("crash", {"x": 1}))
    assert text.startswith("methods.crash.fallback.static: the method returns void")


def test_service_method_key_for_a_name_two_services_share() -> None:
    replies = parts({**static("Echo:echo", "offline"), **static("Interop:ping", {})})
    assert decode(idl.Echo, "echo", replies["static_replies"]["Echo:echo"]).success == "offline"
    assert replies["static_replies"]["Interop:ping"].body == b"\x00"
    assert {"ping", "Interop:ping", "Echo:ping", "getItem"} <= set(replies["known_methods"])


def test_ambiguous_bare_name_is_rejected_with_the_choices() -> None:
    text = rejected(static("ping", {}))
    assert text.startswith("methods.ping: several services define ping")
    assert "Interop:ping" in text
    assert "Echo:ping" in text


def test_declared_exception() -> None:
    methods = static_exception("getItem", "NotFound", {"id": 5, "message": "gone"})
    reply = parts(methods)["static_replies"]["getItem"]
    result = decode(idl.Interop, "getItem", reply)
    assert result.success is None
    assert (result.notFound.id, result.notFound.message) == (5, "gone")


def test_exception_the_method_does_not_declare_is_rejected() -> None:
    text = rejected(static_exception("getItem", "InvalidOrder", {"reason": "x"}))
    assert text.startswith("methods.getItem.fallback.static_exception.name: 'InvalidOrder'")
    assert "busy" not in text
    assert "NotFound" in text
    assert "ServiceBusy" in text


def test_mistyped_exception_field_names_the_key_path() -> None:
    text = rejected(static_exception("placeOrder", "InvalidOrder", {"reason": 7}))
    assert text == (
        "methods.placeOrder.fallback.static_exception.value.reason: expected a string, got 7"
    )


@pytest.mark.parametrize(
    ("method", "value", "path", "expected"),
    [
        ("getItem", {"id": "seven"}, "static.id", "an integer that fits i64"),
        ("getItem", {"id": True}, "static.id", "an integer that fits i64"),
        ("getItem", {"price": "cheap"}, "static.price", "a number (double)"),
        ("getItem", {"price": math.inf}, "static.price", "a finite number"),
        ("getItem", {"tags": "a,b"}, "static.tags", "a sequence (set)"),
        ("getItem", {"tags": ["a", 1]}, "static.tags[1]", "a string"),
        ("getItem", {"attributes": {"k": 1}}, "static.attributes['k']", "a string"),
        ("getItem", {"status": "GONE"}, "static.status", "one of AVAILABLE"),
        ("getItem", "item", "static", "a mapping of the fields of Item"),
        ("listItems", [{"id": 1}, {"id": 2**63}], "static[1].id", "an integer that fits i64"),
        ("sleepMs", 2**31, "static", "an integer that fits i32"),
        ("add", 1.5, "static", "an integer that fits i64"),
    ],
)
def test_mistyped_value_names_the_key_path(
    method: str, value: Any, path: str, expected: str
) -> None:
    text = rejected(static(method, value))
    assert text.startswith(f"methods.{method}.fallback.{path}: expected {expected}"), text


def test_unknown_field_names_the_key_path() -> None:
    text = rejected(static("getItem", {"id": 1, "colour": "red"}))
    assert text.startswith("methods.getItem.fallback.static.colour: Item has no such field")


def test_method_not_in_the_idl() -> None:
    text = rejected(static("getItems", {}))
    assert text.startswith("methods.getItems: no such method in")
    assert "Interop.getItem" in text


def test_static_reply_without_an_idl() -> None:
    text = rejected(static("getItem", {"id": 1}), with_idl=False)
    assert text.startswith("methods.getItem.fallback: a static reply needs the service's IDL")


def test_every_type_nested() -> None:
    value = {
        "aBool": True,
        "aByte": -128,
        "anI16": 32767,
        "anI32": -(2**31),
        "anI64": 2**63 - 1,
        "aDouble": -0.5,
        "aString": "héllo",
        "aBinary": "bytes",
        "aList": [1, 2, 3],
        "aSet": ["x", "y"],
        "aMap": {"a": 1},
        "itemsByGroup": {"g": [{"id": 1, "tags": ["t"]}]},
        "inner": {"name": "in", "leaf": {"label": "l", "weight": 2}, "leaves": [{"label": "m"}]},
        "status": "BACKORDERED",
        "aUnion": {"leafValue": {"label": "u"}},
        "deep": [{1: [2, 3]}],
        "binariesByStatus": {"AVAILABLE": ["b1", "b2"]},
        "smallNumbers": [1, -1],
        "flags": [True, False],
        "byteToDouble": {1: 1.5},
        "matrix": [["a"], []],
    }
    reply = parts(static("echoAll", value))["static_replies"]["echoAll"]
    got = decode(idl.Interop, "echoAll", reply).success
    assert got.aBinary == b"bytes"
    assert got.aString == "héllo"
    assert got.aUnion == idl.Value(leafValue=idl.Leaf(label="u"))
    assert [{k: set(v) for k, v in m.items()} for m in got.deep] == [{1: {2, 3}}]
    assert got.binariesByStatus == {idl.Status.AVAILABLE: [b"b1", b"b2"]}
    assert list(got.itemsByGroup["g"][0].tags) == ["t"]
    assert got.inner.leaves == [idl.Leaf(label="m")]
    assert (got.aByte, got.anI16, got.anI32, got.anI64) == (-128, 32767, -(2**31), 2**63 - 1)
    assert got.withDefault == 42  # the IDL's default fills what the config leaves out


def test_union_needs_exactly_one_field() -> None:
    value = {"aUnion": {"intValue": 1, "stringValue": "x"}}
    text = rejected(static("echoAll", value))
    assert text.startswith("methods.echoAll.fallback.static.aUnion: union Value needs exactly one")


# -- IDLs other tools accept ---------------------------------------------------------------

# The constructs of Apache Thrift's own test IDL (test/ThriftTest.thrift) that
# thriftpy2's grammar refuses, written here: namespaces with annotations.
ANNOTATED_NAMESPACES = """
namespace c_glib TTest
namespace xsd test (uri = 'http://thrift.apache.org/ns/ThriftTest')
namespace py ThriftTest
typedef i64 UserId
enum Numberz { ONE = 1, TWO, FIVE = 5 }
struct Xtruct { 1: string string_thing, 4: i64 i64_thing }
exception Xception { 1: i32 errorCode, 2: string message }
service ThriftTest {
  void testVoid(),
  Xtruct testStruct(1: Xtruct thing),
  oneway void testOneway(1: i32 secondsToSleep),
  Numberz testEnum(1: Numberz thing) throws (1: Xception err)
}
"""


def test_an_idl_with_annotated_namespaces_loads(tmp_path: Path) -> None:
    idl = tmp_path / "ThriftTest.thrift"
    idl.write_text(ANNOTATED_NAMESPACES)
    config = load_config(None, environ={}, overrides={("idl",): str(idl)})
    parts = load_idl_parts(config)
    assert "testStruct" in parts["known_methods"]
    assert "ThriftTest:testOneway" in parts["known_methods"]
    assert set(parts["oneway_methods"]) == {"testOneway", "ThriftTest:testOneway"}


def test_an_idl_thriftpy2_cannot_parse_is_a_config_error_that_says_what_to_do(
    tmp_path: Path,
) -> None:
    idl = tmp_path / "odd.thrift"
    idl.write_text('service S { void f() }\nstruct T { 1: string s = "a" "b" }\n')
    with pytest.raises(ConfigError) as raised:
        load_idl(str(idl))
    message = str(raised.value)
    assert f"idl: cannot load {idl}" in message
    assert "line 2" in message  # thriftpy2's own words name the place
    assert "give idl: a copy without the construct at that line" in message


def test_argument_types_by_method_from_the_idl() -> None:
    """What a failed call's arguments are compared with (`Call`): each method's, by
    ``Service:method`` and by bare name; none without an IDL."""
    found = parts({})["argument_types"]
    for name in ("getItem", "Interop:getItem"):
        assert found[name].types == {1: TType.I64}
        assert found[name].names == {1: "id"}
    assert found["Echo:echo"].types == {1: TType.STRING}
    assert found["ping"].types == {}  # in both services, without arguments
    assert parts({}, with_idl=False)["argument_types"] == {}


def test_a_bare_name_whose_services_declare_different_arguments_has_none(
    tmp_path: Path,
) -> None:
    idl = tmp_path / "two.thrift"
    idl.write_text("service A { void put(1: i64 key) }\nservice B { void put(1: string key) }\n")
    found = load_idl_parts(SidecarConfig.model_validate({"idl": str(idl)}))["argument_types"]
    assert found["A:put"].types == {1: TType.I64}
    assert found["B:put"].types == {1: TType.STRING}
    assert "put" not in found
