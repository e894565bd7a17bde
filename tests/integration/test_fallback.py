"""Fallback replies through a real sidecar in front of a real upstream.

    client ──► sidecar ──► thriftpy2 upstream (stopped, hung or never started)

Most tests run the sidecar in a thread (`SidecarThread`) so they can open
its breaker directly and flush its store; the ones about what an operator
sees (a restart on an SQLite file, static replies written in YAML, a bad
config) run the ``sidecar`` process. Cached replies are compared byte for
byte with the upstream's original over a bare socket (`tests.support.raw`):
only the seqid may differ. Figures worth reporting are printed (``pytest -s``).
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import thriftpy2.thrift
import yaml

from sidecar.config import load_config
from sidecar.fallback.static import load_idl_parts
from sidecar.protocol.appexc import ApplicationExceptionType
from sidecar.protocol.envelope import MessageType, parse_header
from tests.support.clients import application_exception_class, client, types_of
from tests.support.idl import canonical
from tests.support.raw import decode_reply, encode_call, raw_call
from tests.support.servers import TransportName, thriftpy2_server
from tests.support.sidecar import REPO_ROOT, SidecarThread, base_config, free_port, run_sidecar
from tests.support.wait import wait_until

TAE = thriftpy2.thrift.TApplicationException
INTERNAL_ERROR = int(ApplicationExceptionType.INTERNAL_ERROR)
INTEROP_IDL = str(REPO_ROOT / "idl" / "interop.thrift")
FALLBACKS = "thrift_sidecar_fallback_replies_total"
# Open breakers stay open for the whole test.
STAYS_OPEN = {"breaker": {"reset_timeout": "10m"}}


# -- helpers ------------------------------------------------------------------------


def seqid_of(message: bytes) -> int:
    header = parse_header(message)
    assert header is not None
    return header.seqid


def without_seqid(message: bytes) -> bytes:
    """The message with its four seqid bytes cut out."""
    header = parse_header(message)
    assert header is not None
    return message[: header.seqid_offset] + message[header.seqid_offset + 4 :]


def assert_same_reply(served: bytes, original: bytes, seqid: int) -> None:
    """Byte-identical except for the seqid, which is the client's."""
    assert seqid_of(served) == seqid
    assert without_seqid(served) == without_seqid(original)


def app_exception(reply: bytes, method: str = "getItem", service: str = "Interop") -> Any:
    """The TApplicationException a reply carries (fails if it carries anything else)."""
    header = parse_header(reply)
    assert header is not None
    assert header.type == MessageType.EXCEPTION, f"not an exception: {reply!r}"
    with pytest.raises(TAE) as raised:
        decode_reply(method, reply, service=service)
    return raised.value


@contextlib.contextmanager
def thread_sidecar(config: dict[str, Any]) -> Iterator[SidecarThread]:
    """A `SidecarThread` from a config dict, with the static replies of its IDL (if any)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(config, f)
    loaded = load_config(f.name, environ={})
    Path(f.name).unlink()
    with SidecarThread(loaded, **load_idl_parts(loaded)) as st:
        yield st


def open_breakers(st: SidecarThread) -> None:
    assert st.sidecar is not None
    breakers = st.sidecar.breakers
    assert breakers is not None

    def force_open() -> None:
        for breaker in breakers.all():
            breaker.force_open()

    st.call(force_open)


def flush(st: SidecarThread) -> None:
    assert st.sidecar is not None
    st.run(st.sidecar.store.flush())


def entries(st: SidecarThread) -> int:
    assert st.sidecar is not None
    store = st.sidecar.store
    return st.call(lambda: store.stats().entries)


def cache_config(backend: str, tmp_path: Path, **cache: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {"backend": backend, **cache}
    if backend == "sqlite":
        settings["path"] = str(tmp_path / "fallback.db")
    return {"fallback": {"cache": settings}}


# -- the cache while the breaker is open ----------------------------------------------------


@pytest.mark.parametrize("transport", ["framed", "buffered"])
def test_cached_replies_are_byte_identical_while_the_breaker_is_open(
    transport: TransportName,
) -> None:
    calls = {"getItem": {"id": 7}, "listItems": {"limit": 3}}
    with (
        thriftpy2_server(transport) as upstream,
        thread_sidecar(base_config([upstream.address], **STAYS_OPEN)) as st,
    ):
        originals = {
            name: raw_call(st.address, encode_call(name, args, seqid=11), transport)
            for name, args in calls.items()
        }
        assert decode_reply("getItem", originals["getItem"]).name == "item-7"
        assert len(decode_reply("listItems", originals["listItems"])) == 3
        flush(st)
        upstream.stop()
        open_breakers(st)

        served = 0
        for seqid in (99, -5, 2**31 - 1):
            for name, args in calls.items():
                reply = raw_call(st.address, encode_call(name, args, seqid=seqid), transport)
                assert_same_reply(reply, originals[name], seqid)
                served += 1
        # The non-strict envelope asks for the same call: the same cached reply.
        reply = raw_call(st.address, encode_call("getItem", {"id": 7}, strict=False), transport)
        assert_same_reply(reply, originals["getItem"], 1)
        served += 1
        # A real client decodes it.
        with client("thriftpy2", st.address, transport) as c:
            assert c.getItem(7).name == "item-7"
        served += 1

        # Other arguments: nothing cached, so the client hears why, with its seqid.
        reply = raw_call(st.address, encode_call("getItem", {"id": 8}, seqid=5), transport)
        assert seqid_of(reply) == 5
        exc = app_exception(reply)
        assert exc.type == INTERNAL_ERROR
        assert "circuit open" in exc.message
        assert "no fallback for getItem" in exc.message

        metrics = st.metrics()
        assert metrics.value(FALLBACKS, source="cache") == served
        assert metrics.value(FALLBACKS, source="static") == 0
        assert metrics.value(FALLBACKS, method="getItem", source="cache") == 5
        assert metrics.value("thrift_sidecar_requests_total", outcome="fallback") == served
        assert metrics.value("thrift_sidecar_requests_total", outcome="circuit_open") == 1
        assert upstream.calls["getItem"] == 1
        assert upstream.calls["listItems"] == 1


class HoldingStore:
    """The sidecar's store behind a `put` that waits until the test has its reply (at most
    `HOLD` seconds; the event loop waits with it)."""

    HOLD = 3.0

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.reply_seen = threading.Event()
        self.waited_out = False
        self.puts = 0

    def put(self, key: str, reply: Any) -> None:
        self.waited_out = not self.reply_seen.wait(self.HOLD)
        self.inner.put(key, reply)
        self.puts += 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_reply_is_written_before_it_is_remembered() -> None:
    """The client does not wait for the cache: its reply goes out, then a copy is stored."""
    with (
        thriftpy2_server("framed") as upstream,
        thread_sidecar(base_config([upstream.address])) as st,
    ):
        assert st.sidecar is not None
        assert st.sidecar.parts is not None
        fallbacks = st.sidecar.parts.server.context.fallbacks
        holding = HoldingStore(fallbacks.store)
        st.call(lambda: setattr(fallbacks, "store", holding))
        with client("thriftpy2", st.address, "framed") as c:
            assert c.getItem(7).name == "item-7"  # while the store's put still waits
        holding.reply_seen.set()
        wait_until(lambda: holding.puts == 1, timeout=10.0, message="the reply stored")
        assert not holding.waited_out
        flush(st)
        assert entries(st) == 1


def test_cache_keys_tell_multiplexed_services_apart_and_static_replies_fit_them() -> None:
    """Interop:serviceName and Echo:serviceName share arguments (none) but not replies."""
    config = base_config(
        [],
        idl=INTEROP_IDL,
        retry={"idempotent": ["get*", "list*", "ping", "serviceName"]},
        methods={
            "Echo:echo": {"fallback": {"static": "offline"}},
            "Interop:ping": {"fallback": {"static": {}}},
        },
        **STAYS_OPEN,
    )
    with thriftpy2_server("framed", multiplexed=True) as upstream:
        config["upstream"]["addresses"] = [upstream.address]
        with thread_sidecar(config) as st:
            originals = {
                service: raw_call(
                    st.address,
                    encode_call("serviceName", service=service, multiplexed=True, seqid=3),
                    "framed",
                )
                for service in ("Interop", "Echo")
            }
            assert decode_reply("serviceName", originals["Echo"], service="Echo") == "Echo"
            flush(st)
            assert entries(st) == 2
            upstream.stop()
            open_breakers(st)

            for service in ("Interop", "Echo"):
                message = encode_call("serviceName", service=service, multiplexed=True, seqid=8)
                reply = raw_call(st.address, message, "framed")
                assert_same_reply(reply, originals[service], 8)
                assert decode_reply("serviceName", reply, service=service) == service

            # Static replies keyed Service:method; the envelope carries the bare name.
            message = encode_call("echo", {"message": "x"}, service="Echo", multiplexed=True)
            reply = raw_call(st.address, message, "framed")
            assert parse_header(reply) is not None
            assert parse_header(reply).name == "echo"  # type: ignore[union-attr]
            assert decode_reply("echo", reply, service="Echo") == "offline"
            reply = raw_call(st.address, encode_call("ping", multiplexed=True), "framed")
            assert decode_reply("ping", reply) is None  # void, from the static {}
            # Echo:ping has no static reply of its own.
            message = encode_call("ping", service="Echo", multiplexed=True)
            exc = app_exception(raw_call(st.address, message, "framed"), "ping", "Echo")
            assert "no fallback for Echo.ping" in exc.message

            metrics = st.metrics()
            assert metrics.value(FALLBACKS, source="cache") == 2
            assert metrics.value(FALLBACKS, source="static") == 2
            assert metrics.value(FALLBACKS, method="Echo:echo", source="static") == 1


# -- retries exhausted -------------------------------------------------------------------


@pytest.mark.parametrize(
    "serve_on", [["breaker_open", "retries_exhausted"], ["breaker_open"]], ids=["both", "open"]
)
def test_retries_exhausted_serves_the_cache_only_when_configured(serve_on: list[str]) -> None:
    config = base_config(
        [],
        breaker={"fail_max": 1_000_000},
        retry={"max_attempts": 2, "initial_backoff": "1ms"},
        fallback={"serve_on": serve_on},
    )
    with thriftpy2_server("framed") as upstream:
        config["upstream"]["addresses"] = [upstream.address]
        with thread_sidecar(config) as st:
            original = raw_call(st.address, encode_call("getItem", {"id": 7}), "framed")
            flush(st)
            upstream.stop()

            reply = raw_call(st.address, encode_call("getItem", {"id": 7}, seqid=42), "framed")
            other = raw_call(st.address, encode_call("getItem", {"id": 8}, seqid=43), "framed")
            metrics = st.metrics()
            assert st.sidecar is not None
            assert st.sidecar.breakers is not None
            assert [b.state for b in st.sidecar.breakers.all()] == ["closed"]
            attempts = metrics.value(
                "thrift_sidecar_upstream_attempts_total", result="connect_error"
            )
            assert attempts == 4  # both calls really tried, twice each
            exc = app_exception(other)
            assert exc.type == INTERNAL_ERROR
            if "retries_exhausted" in serve_on:
                assert_same_reply(reply, original, 42)
                assert metrics.value(FALLBACKS, source="cache") == 1
                # Nothing to serve: the message says why and that no fallback exists.
                assert "no fallback for getItem" in exc.message, exc.message
            else:
                exc = app_exception(reply)
                assert exc.type == INTERNAL_ERROR
                assert "2 attempts" in exc.message
                assert metrics.value(FALLBACKS) == 0


# -- ttl ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_entry_past_its_ttl_is_not_served(backend: str, tmp_path: Path) -> None:
    ttl = 2.0
    config = base_config([], **STAYS_OPEN, **cache_config(backend, tmp_path, ttl=f"{ttl}s"))
    with thriftpy2_server("framed") as upstream:
        config["upstream"]["addresses"] = [upstream.address]
        with thread_sidecar(config) as st:
            before_warm = time.time()
            original = raw_call(st.address, encode_call("getItem", {"id": 7}), "framed")
            warmed = time.time()  # the entry was stored between before_warm and now
            flush(st)
            upstream.stop()
            open_breakers(st)

            served_ages: list[float] = []

            def expired() -> float | None:
                """One call: None while the cached reply is served, else when it stopped."""
                sent = time.time()
                reply = raw_call(st.address, encode_call("getItem", {"id": 7}, seqid=9), "framed")
                header = parse_header(reply)
                assert header is not None
                if header.type == MessageType.REPLY:
                    assert_same_reply(reply, original, 9)
                    # Served only while younger than the ttl (its age is at least this).
                    assert sent - warmed <= ttl
                    served_ages.append(sent - warmed)
                    return None
                assert "no fallback for getItem" in app_exception(reply).message
                return time.time()

            expired_at = wait_until(
                expired, timeout=ttl + 10, interval=0.05, message="the cached reply expiring"
            )
            assert served_ages, "never served while fresh"
            assert expired_at - before_warm >= ttl  # not forgotten early either
            wait_until(lambda: entries(st) == 0, timeout=5.0, message="expired entry removed")
            print(
                f"\n{backend}: served {len(served_ages)} times up to {max(served_ages):.2f}s "
                f"old; refused at {expired_at - warmed:.2f}s (ttl {ttl}s)"
            )


# -- what is (not) cached ---------------------------------------------------------------------


@pytest.mark.parametrize("cache_declared", [False, True], ids=["default", "declared"])
def test_non_idempotent_never_cached_declared_exceptions_only_when_configured(
    cache_declared: bool,
) -> None:
    config = base_config(
        [],
        fallback={"methods": ["*"], "cache_declared_exceptions": cache_declared},
        # Trying hard to cache placeOrder: it still is not idempotent.
        methods={"placeOrder": {"fallback": {"cache": True}}},
        **STAYS_OPEN,
    )
    ns = types_of("thriftpy2")
    order = {"order": ns.Order(customer="c", lines=[ns.OrderLine(itemId=1, quantity=2)])}
    with thriftpy2_server("framed") as upstream:
        config["upstream"]["addresses"] = [upstream.address]
        with thread_sidecar(config) as st:
            receipt = raw_call(st.address, encode_call("placeOrder", order), "framed")
            assert decode_reply("placeOrder", receipt).orderId == 1
            not_found = raw_call(st.address, encode_call("getItem", {"id": -1}), "framed")
            with pytest.raises(ns.NotFound):
                decode_reply("getItem", not_found)
            flush(st)
            assert entries(st) == (1 if cache_declared else 0)
            upstream.stop()
            open_breakers(st)

            reply = raw_call(st.address, encode_call("placeOrder", order, seqid=6), "framed")
            exc = app_exception(reply, "placeOrder")
            assert "no fallback for placeOrder" in exc.message
            reply = raw_call(st.address, encode_call("getItem", {"id": -1}, seqid=7), "framed")
            if cache_declared:
                assert_same_reply(reply, not_found, 7)
                with pytest.raises(ns.NotFound):
                    decode_reply("getItem", reply)
            else:
                assert "no fallback for getItem" in app_exception(reply).message
            assert upstream.calls["placeOrder"] == 1
            assert st.metrics().value(FALLBACKS, method="placeOrder") == 0


# -- many clients during an outage ---------------------------------------------------------------


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_fifty_concurrent_clients_get_their_fallback_or_error_promptly(
    backend: str, tmp_path: Path
) -> None:
    """The upstream hangs (every call would wait per_try_timeout); the breaker is open."""
    per_try = 2.0
    config = base_config(
        [],
        retry={"per_try_timeout": f"{per_try}s", "deadline": "5s"},
        **STAYS_OPEN,
        **cache_config(backend, tmp_path),
    )
    clients, cached = 50, 25
    with thriftpy2_server("framed") as upstream:
        config["upstream"]["addresses"] = [upstream.address]
        with thread_sidecar(config) as st:
            for n in range(cached):
                raw_call(st.address, encode_call("getItem", {"id": n}), "framed")
            flush(st)

            def hang(name: str) -> None:  # the upstream accepts calls and never answers
                upstream.state.stopping.wait(30)

            upstream.hook = hang
            open_breakers(st)
            start = threading.Barrier(clients)

            def one(n: int) -> tuple[float, bytes]:
                start.wait(10)
                began = time.perf_counter()
                reply = raw_call(
                    st.address, encode_call("getItem", {"id": n}, seqid=n), "framed", timeout=10
                )
                return time.perf_counter() - began, reply

            with ThreadPoolExecutor(clients) as pool:
                results = list(pool.map(one, range(clients)))
            durations = [d for d, _ in results]
            for n, (_, reply) in enumerate(results):
                assert seqid_of(reply) == n
                if n < cached:
                    assert decode_reply("getItem", reply).id == n
                else:
                    assert "circuit open" in app_exception(reply).message
            print(
                f"\n{backend}: {clients} concurrent calls while open: max "
                f"{max(durations) * 1e3:.0f} ms, median {statistics.median(durations) * 1e3:.0f} ms"
                f" (per_try_timeout {per_try:g}s)"
            )
            assert max(durations) < per_try / 2  # nobody waited for the hung upstream
            assert upstream.calls["getItem"] == cached
            assert st.metrics().value(FALLBACKS, source="cache") == cached


# -- the sidecar process: SQLite across a restart, static replies in YAML, bad configs ---


def test_sqlite_cache_survives_a_restart_with_the_upstream_down(tmp_path: Path) -> None:
    path = tmp_path / "fallback.db"
    config = {
        "fallback": {"cache": {"backend": "sqlite", "path": str(path)}},
        "retry": {"max_attempts": 1},
        "breaker": {"fail_max": 1, "reset_timeout": "10m"},
    }
    calls = {"getItem": {"id": 7}, "listItems": {"limit": 3}}
    with thriftpy2_server("framed") as upstream:
        address = upstream.address
        with run_sidecar([address], config=config) as first:
            originals = {
                name: raw_call(first.address, encode_call(name, args, seqid=1), "framed")
                for name, args in calls.items()
            }
            assert first.stop() == 0  # SIGTERM: the queued writes are flushed on the way out
    # The upstream is gone; a new sidecar starts on the same file.
    with run_sidecar([address], config=config) as second:
        store = second.state()["fallback_store"]
        assert store == {
            "backend": "sqlite",
            "entries": 2,
            "bytes": store["bytes"],
            "healthy": True,
        }
        # First call: attempted (connect error), retries exhausted -> cache; the breaker opens.
        # Second call: the breaker is open -> cache.
        for seqid, (name, args) in enumerate(calls.items(), start=20):
            reply = raw_call(second.address, encode_call(name, args, seqid=seqid), "framed")
            assert_same_reply(reply, originals[name], seqid)
        metrics = second.metrics()
        assert metrics.value(FALLBACKS, source="cache") == 2
        assert metrics.value("thrift_sidecar_breaker_state") == 2
        assert metrics.value("thrift_sidecar_fallback_cache_entries") == 2


def test_damaged_sqlite_file_degrades_to_memory_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "fallback.db"
    path.write_bytes(b"not a database" * 100)
    config = {"fallback": {"cache": {"backend": "sqlite", "path": str(path)}}, **STAYS_OPEN}
    with (
        thriftpy2_server("framed") as upstream,
        run_sidecar([upstream.address], config=config) as sc,
    ):
        original = raw_call(sc.address, encode_call("getItem", {"id": 7}), "framed")
        state = wait_until(lambda: sc.state()["fallback_store"]["entries"] == 1 and sc.state())
        assert state["fallback_store"]["backend"] == "sqlite"
        assert state["fallback_store"]["healthy"] is False
        upstream.stop()
        # The in-memory cache still serves (retries exhausted, then the breaker is open).
        reply = raw_call(sc.address, encode_call("getItem", {"id": 7}, seqid=3), "framed")
        assert_same_reply(reply, original, 3)
        log = sc.log()
        assert log.count("is not a usable fallback cache") == 1
        assert "fallback.cache.path" in log
        assert "keeping fallback replies in memory" in log


ITEM = {
    "id": 0,
    "name": "unavailable",
    "price": 0.5,
    "tags": ["static"],
    "attributes": {"source": "sidecar"},
    "status": "DISCONTINUED",
}


def test_static_replies_from_yaml_decode_on_both_libraries() -> None:
    config = {
        "idl": INTEROP_IDL,
        "retry": {"max_attempts": 1},
        "breaker": {"fail_max": 1, "reset_timeout": "10m"},
        "fallback": {"serve_on": ["breaker_open"]},
        "methods": {
            "getItem": {"fallback": {"static": ITEM}},
            "placeOrder": {
                "fallback": {
                    "static_exception": {"name": "InvalidOrder", "value": {"reason": "maintenance"}}
                }
            },
            "crash": {"fallback": {"static": {}}},
            "Echo:echo": {"fallback": {"static": "offline"}},
        },
    }
    nobody = f"127.0.0.1:{free_port()}"  # no upstream at all
    with run_sidecar([nobody], config=config) as sc:
        # The first call fails (connect error; serve_on excludes retries_exhausted) and opens it.
        with client("thriftpy2", sc.address) as c, pytest.raises(TAE):
            c.getItem(1)
        wait_until(lambda: sc.metrics().value("thrift_sidecar_breaker_state") == 2)
        served = 0
        for library in ("thriftpy2", "apache"):
            ns = types_of(library)
            for transport in ("framed", "buffered"):
                with client(library, sc.address, transport) as c:
                    expected = ns.Item(
                        id=0,
                        name="unavailable",
                        price=0.5,
                        tags={"static"},
                        attributes={"source": "sidecar"},
                        status=ns.Status.DISCONTINUED,
                    )
                    assert canonical(c.getItem(123), "Item") == canonical(expected, "Item")
                    with pytest.raises(ns.InvalidOrder) as raised:
                        c.placeOrder(ns.Order(customer="c", lines=[]))
                    assert raised.value.reason == "maintenance"
                    assert c.crash() is None
                    # No static reply and nothing cached: the error says so.
                    with pytest.raises(application_exception_class(library)) as error:
                        c.listItems(2)
                    # The IDL has one service with listItems, so the message names it.
                    assert "no fallback for Interop.listItems" in str(error.value.message)
                with client(library, sc.address, transport, multiplexed_service="Echo") as echo:
                    assert echo.echo("hello") == "offline"
                served += 4
        assert sc.metrics().value(FALLBACKS, source="static") == served


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"idl": INTEROP_IDL, "methods": {"getItem": {"fallback": {"static": {"id": "seven"}}}}},
            "methods.getItem.fallback.static.id: expected an integer that fits i64, got 'seven'",
        ),
        (
            {
                "idl": INTEROP_IDL,
                "methods": {"getItem": {"fallback": {"static": {"id": 1, "colour": "red"}}}},
            },
            "methods.getItem.fallback.static.colour: Item has no such field",
        ),
        (
            {"methods": {"getItem": {"fallback": {"static": {"id": 1}}}}},
            "methods.getItem.fallback: a static reply needs the service's IDL",
        ),
        (
            {"fallback": {"cache": {"backend": "sqlite", "path": "/nonexistent/dir/fallback.db"}}},
            "fallback.cache.path: directory /nonexistent/dir",
        ),
    ],
    ids=["mistyped", "unknown-field", "no-idl", "sqlite-unwritable"],
)
def test_bad_fallback_config_is_refused_at_start_up(extra: dict[str, Any], message: str) -> None:
    with run_sidecar([f"127.0.0.1:{free_port()}"], config=extra, wait_ready=False) as sc:
        assert sc.proc.wait(20) == 2
        assert message in sc.log()
