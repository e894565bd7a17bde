"""Deciding what to remember and what to serve when the upstream cannot answer.

Remembered: the reply of every ``ok`` call (and, when configured, every
declared-exception reply) of a cacheable method, under `cache_key`, with the
call's argument bytes; a key stored less than `FRESH_FOR` seconds ago is not
stored again (`RecentKeys`), so a hot call costs a hash, not a copy and a
write, per call.

Served, when the reason is listed in ``serve_on`` (``breaker_open``,
``retries_exhausted``, ``shed``): the cached reply for the same method and arguments if
one younger than the TTL exists, else the method's static reply, else
nothing. A cached reply is the upstream's own message with the client's seqid
patched in; a static reply gets a fresh REPLY envelope with the bare method
name (what Apache Thrift servers write, and what Go clients check) and the
client's seqid and envelope style.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

import xxhash

from sidecar.fallback.key import cache_key
from sidecar.fallback.static import StaticReply
from sidecar.fallback.store import CachedReply, FallbackStore
from sidecar.protocol.compact import PROTOCOL_ID, parse_compact_header
from sidecar.protocol.envelope import MessageType, encode_header, write_seqid
from sidecar.protocol.envelope import Protocol as WireProtocol
from sidecar.protocol.framing import Message
from sidecar.protocol.transcode import transcode_message
from sidecar.resilience.outcome import Outcome

log: Final = logging.getLogger("sidecar.fallback")

_COMPACT_ID: Final = bytes((PROTOCOL_ID,))

# Seconds during which a key just stored is not stored again (at most a tenth
# of the store's TTL): the stored reply is then at most this much older than
# the upstream's latest, and expires that much sooner.
FRESH_FOR: Final = 1.0
# Keys `RecentKeys` remembers; the oldest is forgotten first (and is then
# merely stored again).
RECENT_KEYS: Final = 4096
# Arguments up to this size are copied to be hashed, larger ones viewed in place
# (cachegrind, CPython 3.11: a copy of 4 KiB is about 1,500 instructions, of 16 KiB
# 17,000; a view of any size about 2,000).
COPY_ARGS_BYTES: Final = 4096

BREAKER_OPEN: Final = "breaker_open"
RETRIES_EXHAUSTED: Final = "retries_exhausted"
# The call was shed over upstream.max_in_flight (`sidecar.resilience.limits`).
SHED: Final = "shed"


class MethodFallback(Protocol):
    """What the fallbacks need to know of a method (`sidecar.proxy.policy.MethodPolicy`)."""

    @property
    def name(self) -> str:
        """The wire name, ``Service:method`` or bare: part of the cache key."""

    @property
    def method(self) -> str:
        """The bare method name, for a static reply's envelope."""

    @property
    def cacheable(self) -> bool:
        """Whether its replies may be remembered and served."""

    @property
    def static_reply(self) -> StaticReply | None:
        """Its configured static reply."""

    @property
    def display_name(self) -> str:
        """``Service.method``, for log lines."""


@dataclass(frozen=True, slots=True)
class Served:
    """A fallback reply: unframed message bytes with the client's seqid, and its source."""

    message: bytes | bytearray
    source: str


_MASK_62: Final = (1 << 62) - 1


class RecentKeys:
    """The calls whose reply was stored in the last ``fresh_for`` seconds, at most
    ``limit`` of them.

    A call is known by one 64-bit number: the xxh3-64 of its argument bytes,
    seeded by its method name's hash and a random number of this process. Not by
    its `cache_key`: a fresh call, the usual one, costs half of what its key
    would (the 128-bit hex digest, the key's text and its hash), and the key is
    made only to store. Two calls' numbers collide with a chance of about 2⁻⁶⁴ a
    pair, and the random seed keeps a client from crafting a collision; one would
    only skip a store for ``fresh_for``. The seed is worked out in 62 bits: the
    compiled build keeps such an `int` unboxed, where 64-bit arithmetic goes
    through Python's.

    Args:
        fresh_for: seconds after a store during which the call counts as fresh.
        limit: most calls held; the one stored longest ago goes first.
    """

    def __init__(self, fresh_for: float, limit: int = RECENT_KEYS) -> None:
        self.fresh_for = fresh_for
        self.limit = limit
        # Kept here: the compiled build reads a module's attribute by name on every use.
        self._hash: Callable[[bytes | bytearray | memoryview, int], int] = xxhash.xxh3_64_intdigest
        self.seed = random.getrandbits(62)
        # A call's number -> when stored, in the order of their last store.
        self._stored_at: dict[int, float] = {}

    def __len__(self) -> int:
        return len(self._stored_at)

    def claim(self, name: str, args: bytes | bytearray | memoryview, now: float) -> bool:
        """Whether to store the reply to a call of ``name`` with ``args`` at ``now``:
        False when one was stored within ``fresh_for``.

        On True, the call counts as stored at ``now``.
        """
        key = self._hash(args, (hash(name) & _MASK_62) ^ self.seed)
        stored = self._stored_at
        last = stored.get(key)
        if last is not None:
            if 0 <= now - last < self.fresh_for:
                return False
            del stored[key]  # re-inserted last: the dict stays in store order
        stored[key] = now
        if len(stored) > self.limit:
            del stored[next(iter(stored))]
        return True


class Fallbacks:
    """The fallback policy over one store.

    Args:
        store: where replies are remembered; None turns the cache off
            (static replies are still served).
        serve_on: the reasons a fallback is served for (`BREAKER_OPEN`,
            `RETRIES_EXHAUSTED`, `SHED`).
        cache_declared_exceptions: remember replies carrying a declared
            exception too, not only ``ok`` ones.
        clock: Unix time for ``stored_at`` (the store's TTL is measured on it).
    """

    def __init__(
        self,
        store: FallbackStore | None,
        *,
        serve_on: frozenset[str],
        cache_declared_exceptions: bool,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self._clock = clock
        self.recent = RecentKeys(min(FRESH_FOR, store.ttl / 10) if store is not None else 0.0)
        self.serve_on = serve_on
        self._cached_outcomes = (
            frozenset({Outcome.OK, Outcome.DECLARED_EXCEPTION})
            if cache_declared_exceptions
            else frozenset({Outcome.OK})
        )

    def remember(self, name: str, call: Message, reply: Message, outcome: Outcome) -> None:
        """Keep a good reply to a call of ``name`` for later, unless its key is fresh.

        The caller asks for a cacheable method's replies only (`MethodFallback.cacheable`):
        it reads that of its own policy directly, where this module would read it
        through a protocol, by name. Copies the reply and the arguments only when it
        stores them (an entry needs bytes of its own: a message's buffer is patched in
        place).
        """
        store = self.store
        if store is None or outcome not in self._cached_outcomes:
            return
        buf = call.buf
        at = call.start + call.header.body_offset
        # The arguments: small ones copied (cheaper than a view), large ones viewed.
        args = buf[at:] if len(buf) - at <= COPY_ARGS_BYTES else memoryview(buf)[at:]
        now = self._clock()
        if not self.recent.claim(name, args, now):
            return
        store.put(
            cache_key(name, args),
            CachedReply(bytes(reply.payload()), reply.header.seqid_offset, now, bytes(args)),
        )

    async def find(self, policy: MethodFallback, call: Message, reason: str) -> Served | None:
        """A fallback reply for this call, or None."""
        if reason not in self.serve_on:
            return None
        seqid = call.header.seqid
        if self.store is not None and policy.cacheable:
            args = call.body()
            cached = await self.store.get(cache_key(policy.name, args))
            if cached is not None and cached.answers(args):
                log.debug("serving cached reply for %s (%s)", policy.display_name, reason)
                return Served(_with_seqid(cached, seqid), "cache")
        static = policy.static_reply
        if static is not None:
            log.debug("serving static reply for %s (%s)", policy.display_name, reason)
            header = encode_header(policy.method, MessageType.REPLY, seqid, call.header.strict)
            message = header + static.body
            if call.header.protocol is WireProtocol.COMPACT:  # encoded once, in binary
                message = transcode_message(message, WireProtocol.BINARY, WireProtocol.COMPACT)
            return Served(message, "static")
        return None


def _with_seqid(cached: CachedReply, seqid: int) -> bytearray:
    """The cached reply (kept in the client's protocol) with the client's seqid."""
    message = bytearray(cached.message)
    if message[:1] != _COMPACT_ID:
        write_seqid(message, cached.seqid_offset, seqid)
        return message
    header = parse_compact_header(message)
    assert header is not None, "a cached reply has a whole envelope"
    reply = Message(header, message, 0)
    reply.set_seqid(seqid)  # a varint: its length may change
    return reply.owned()
