"""What `Fallbacks` remembers and serves: exact-argument serving and no re-store of a fresh key.

The key's hash (xxh3-128) is fast, not collision resistant: these tests make
every key collide and check that a reply is still served only to the call it
answered, on real stores (memory and an SQLite file). They count the puts a
hot call makes: one per `FRESH_FOR`, not one per call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import xxhash

from sidecar.fallback.key import cache_key
from sidecar.fallback.service import (
    BREAKER_OPEN,
    COPY_ARGS_BYTES,
    FRESH_FOR,
    Fallbacks,
    RecentKeys,
)
from sidecar.fallback.sqlite import SqliteStore
from sidecar.fallback.static import StaticReply
from sidecar.fallback.store import CachedReply, FallbackStore, MemoryStore
from sidecar.protocol.envelope import MessageType, encode_header, parse_header
from sidecar.protocol.message import Message
from sidecar.resilience.outcome import Outcome

T0 = 1_700_000_000.0
NAME = "Interop:getItem"


class FakeClock:
    """Unix time that moves only when told."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Policy:
    """A cacheable method without a static reply (`MethodFallback`)."""

    name: str = NAME
    method: str = "getItem"
    cacheable: bool = True
    static_reply: StaticReply | None = None
    display_name: str = "Interop.getItem"


def message(mtype: MessageType, seqid: int, body: bytes) -> Message:
    buf = bytearray(encode_header("getItem", mtype, seqid) + body)
    header = parse_header(buf)
    assert header is not None
    return Message(header, buf, 0)


def call(item: int, seqid: int = 1) -> Message:
    """A getItem(item) call: one i64 field, then STOP."""
    return message(MessageType.CALL, seqid, b"\x0a\x00\x01" + item.to_bytes(8, "big") + b"\x00")


def reply(text: bytes, seqid: int = 1) -> Message:
    """A reply whose success field is the string ``text``."""
    body = b"\x0b\x00\x00" + len(text).to_bytes(4, "big") + text + b"\x00"
    return message(MessageType.REPLY, seqid, body)


class CountingStore(MemoryStore):
    """A MemoryStore that counts its puts."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(ttl=600.0, max_entries=1000, max_bytes=1 << 20, clock=clock)
        self.puts = 0

    def put(self, key: str, reply: CachedReply) -> None:
        self.puts += 1
        super().put(key, reply)


@pytest.fixture(params=["memory", "sqlite"])
def store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[FallbackStore, FakeClock]]:
    clock = FakeClock()
    made: FallbackStore
    if request.param == "memory":
        made = MemoryStore(ttl=600.0, max_entries=1000, max_bytes=1 << 20, clock=clock)
    else:
        made = SqliteStore(
            tmp_path / "fallback.db", ttl=600.0, max_entries=1000, max_bytes=1 << 20, clock=clock
        )
    yield made, clock
    asyncio.run(made.close())


def fallbacks(store: FallbackStore, clock: FakeClock) -> Fallbacks:
    return Fallbacks(
        store, serve_on=frozenset({BREAKER_OPEN}), cache_declared_exceptions=False, clock=clock
    )


def find(fb: Fallbacks, c: Message) -> bytes | None:
    async def go() -> bytes | None:
        if fb.store is not None:
            await fb.store.flush()
        served = await fb.find(Policy(), c, BREAKER_OPEN)
        return None if served is None else bytes(served.message)

    return asyncio.run(go())


def test_a_colliding_key_never_serves_another_calls_reply(
    store: tuple[FallbackStore, FakeClock], monkeypatch: pytest.MonkeyPatch
) -> None:
    # On the library itself: the compiled key module binds its import of xxhash.
    monkeypatch.setattr(xxhash, "xxh3_128_hexdigest", lambda data: "0" * 32)
    assert cache_key(NAME, call(1).body()) == cache_key(NAME, call(2).body())  # every key collides
    s, clock = store
    fb = fallbacks(s, clock)

    fb.remember(NAME, call(1), reply(b"item one"), Outcome.OK)
    assert find(fb, call(2, seqid=9)) is None  # same key, other arguments: not served
    assert find(fb, call(1, seqid=9)) == bytes(reply(b"item one", seqid=9).buf)

    clock.now += FRESH_FOR  # call 2's reply now takes the key; call 1 is not served it
    fb.remember(NAME, call(2), reply(b"item two"), Outcome.OK)
    assert find(fb, call(1, seqid=7)) is None
    assert find(fb, call(2, seqid=7)) == bytes(reply(b"item two", seqid=7).buf)


def test_a_colliding_call_within_the_fresh_window_is_never_served_the_others_reply(
    store: tuple[FallbackStore, FakeClock], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Freshness goes by the call's own arguments (`RecentKeys`), not by its key: a
    call whose key collides with a fresh one is stored, and the key then answers it
    and no longer the first call."""
    # On the library itself: the compiled key module binds its import of xxhash.
    monkeypatch.setattr(xxhash, "xxh3_128_hexdigest", lambda data: "f" * 32)
    s, clock = store
    fb = fallbacks(s, clock)
    fb.remember(NAME, call(1), reply(b"item one"), Outcome.OK)
    fb.remember(NAME, call(2), reply(b"item two"), Outcome.OK)  # same key, other call
    assert find(fb, call(1)) is None
    assert find(fb, call(2)) == bytes(reply(b"item two").buf)


def test_a_key_stored_twice_within_a_second_is_written_once() -> None:
    clock = FakeClock()
    s = CountingStore(clock)
    fb = fallbacks(s, clock)
    for seqid in range(1, 101):  # a hot call: 100 replies in 0.99 s
        clock.now = T0 + (seqid - 1) * 0.01
        fb.remember(NAME, call(1, seqid), reply(b"item one", seqid), Outcome.OK)
    assert s.puts == 1
    fb.remember(NAME, call(2), reply(b"item two"), Outcome.OK)  # another key: stored
    assert s.puts == 2
    clock.now = T0 + FRESH_FOR  # a second after the first store: stored again
    fb.remember(NAME, call(1, 200), reply(b"item one, later", 200), Outcome.OK)
    assert s.puts == 3
    got = s.get_now(cache_key(NAME, call(1).body()))
    assert got is not None
    assert (got.stored_at, got.args) == (T0 + FRESH_FOR, bytes(call(1).body()))
    fb.remember(NAME, call(1, 201), reply(b"item one", 201), Outcome.APP_EXCEPTION)
    assert s.puts == 3  # not a cached outcome


def test_the_fresh_window_is_at_most_a_tenth_of_the_ttl() -> None:
    clock = FakeClock()
    s = CountingStore(clock)
    s.ttl = 2.0
    fb = fallbacks(s, clock)
    fb.remember(NAME, call(1), reply(b"a"), Outcome.OK)
    clock.now += 0.2
    fb.remember(NAME, call(1), reply(b"b"), Outcome.OK)
    assert s.puts == 2


def test_recent_keys_stay_bounded_and_forget_the_oldest_first() -> None:
    recent = RecentKeys(1.0, limit=3)
    a, _, c, _ = calls = [bytes([n]) * 8 for n in range(4)]
    assert [recent.claim(NAME, args, T0) for args in calls] == [True] * 4
    assert len(recent) == 3
    assert recent.claim(NAME, a, T0 + 0.1)  # forgotten: stored again
    assert not recent.claim(NAME, c, T0 + 0.1)  # still fresh
    assert not recent.claim(NAME, memoryview(bytearray(c)), T0 + 0.1)  # the same bytes
    assert recent.claim("Other:method", c, T0 + 0.1)  # another method's call
    assert recent.claim(NAME, c, T0 + 1.0)
    assert not recent.claim(NAME, c, T0 + 1.5)
    assert recent.claim(NAME, c, T0 + 0.5)  # a clock that stepped back does not pin a call
    assert len(recent) == 3


def test_recent_keys_hash_with_a_seed_of_their_own() -> None:
    """Seeded at random per process: a client cannot craft arguments whose hash
    collides with another call's and so keep its reply from being stored."""
    seeds = {RecentKeys(1.0).seed for _ in range(8)}
    assert len(seeds) == 8


def test_the_same_arguments_of_two_methods_are_two_fresh_keys() -> None:
    """Freshness is asked by (method, digest): another method's store of the same
    bytes does not make a call's key look stored."""
    clock = FakeClock()
    s = CountingStore(clock)
    fb = fallbacks(s, clock)
    fb.remember(NAME, call(1), reply(b"item one"), Outcome.OK)
    fb.remember("Store:other", call(1), reply(b"item one"), Outcome.OK)
    assert s.puts == 2
    assert s.get_now(cache_key("Store:other", call(1).body())) is not None


@pytest.mark.parametrize("size", [0, COPY_ARGS_BYTES - 20, COPY_ARGS_BYTES + 1, 5 << 12])
def test_arguments_small_and_large_are_remembered_alike(size: int) -> None:
    """Small arguments are copied to be hashed, large ones viewed: the same key and entry."""
    clock = FakeClock()
    counted = CountingStore(clock)
    fb = fallbacks(counted, clock)
    text = b"s" * size
    body = b"\x0b\x00\x01" + len(text).to_bytes(4, "big") + text + b"\x00"
    made = message(MessageType.CALL, 1, body)
    fb.remember(NAME, made, reply(b"answer"), Outcome.OK)
    assert counted.puts == 1
    assert find(fb, message(MessageType.CALL, 5, body)) == bytes(reply(b"answer", seqid=5).buf)
    stored = asyncio.run(counted.get(cache_key(NAME, body)))
    assert stored is not None
    assert stored.args == body
