"""The fuzzer's mutation kinds, and `generate`: input ``index`` of ``seed``.

Each kind builds one `FuzzInput` from a ``random.Random`` seeded with
``f"{seed}:{index}"`` (string seeds hash with SHA-512: the same on every
machine and Python run). The seed messages are calls of the interop IDL
encoded by `tests.fuzz.wire`; ``sleepMs`` and ``crash`` are left out so that
whatever the upstream does comes from the bytes, not from a slow or failing
method.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from tests.fuzz.inputs import End, Expected, FuzzInput, Limits, Step
from tests.fuzz.wire import (
    CALL,
    I32,
    ONEWAY,
    REPLY,
    T_I32,
    T_STRUCT,
    Transport,
    Writer,
    encode_call,
    framed,
    nested_lists,
    on_wire,
)

Rng = random.Random
Made = tuple[list[Step], Expected, str]  # writes, expectation, oracle name
Maker = Callable[[Rng, Transport, Limits], Made]

FRAMED, BUFFERED = Transport.FRAMED, Transport.BUFFERED
TWO_WAY = ("ping", "add", "getItem", "listItems", "echoBinary", "placeOrder")


def valid_call(rng: Rng, *, mtype: int = CALL, strict: bool = True) -> tuple[Writer, str, bool]:
    """A well-formed call: (writer, method, whether a reply comes)."""
    method = rng.choice((*TWO_WAY, "notify"))
    seqid = rng.randrange(1, 1 << 31)
    args: dict[str, object] = {}
    if method == "add":
        args = {"a": rng.randrange(-(1 << 40), 1 << 40), "b": rng.randrange(-(1 << 40), 1 << 40)}
    elif method == "getItem":
        args = {"id": rng.randrange(1, 1 << 20)}
    elif method == "listItems":
        args = {"limit": rng.randrange(0, 20)}
    elif method == "echoBinary":
        args = {"data": rng.randbytes(rng.choice((0, 1, 16, 300, 4000)))}
    elif method == "notify":
        args = {"tag": b"fuzz-%d" % rng.randrange(1 << 30)}
    elif method == "placeOrder":
        lines = [(rng.randrange(1, 100), rng.randrange(1, 5)) for _ in range(rng.randrange(0, 4))]
        note = rng.randbytes(rng.randrange(0, 40)) if rng.random() < 0.5 else None
        args = {"customer": b"c%d" % rng.randrange(1000), "lines": lines, "note": note}
    if method == "notify" and mtype == CALL:
        mtype = ONEWAY
    w = encode_call(method, args, seqid, mtype=mtype, strict=strict)
    return w, method, mtype == CALL


def _seqid(w: Writer) -> int:
    return int(I32.unpack_from(w.buf, w.seqid_at)[0])


def _lie(rng: Rng, true: int, limits: Limits) -> int:
    """A length that is not ``true``: negative, huge, a little off, past the frame limit."""
    return rng.choice(
        (
            -1,
            -(1 << 31),
            (1 << 31) - 1,
            true + rng.randrange(1, 64),
            max(0, true - rng.randrange(1, 8)),
            limits.max_frame_size + rng.randrange(1, 1 << 16),
            rng.randrange(1 << 24),
        )
    )


# -- kinds -----------------------------------------------------------------------------


def k_valid(rng: Rng, t: Transport, limits: Limits) -> Made:
    w, method, answered = valid_call(rng, strict=rng.random() < 0.8)
    replies = ((_seqid(w), method),) if answered else ()
    return [Step(on_wire(w.buf, t))], Expected(replies=replies), "valid_answered"


def k_pipelined_burst(rng: Rng, t: Transport, limits: Limits) -> Made:
    calls = [valid_call(rng) for _ in range(rng.randrange(2, 33))]
    data = b"".join(on_wire(w.buf, t) for w, _, _ in calls)
    replies = tuple((_seqid(w), m) for w, m, answered in calls if answered)
    return [Step(data)], Expected(replies=replies), "burst_answered_in_order"


def k_non_strict(rng: Rng, t: Transport, limits: Limits) -> Made:
    calls = [valid_call(rng, strict=False) for _ in range(rng.randrange(1, 4))]
    data = b"".join(on_wire(w.buf, t) for w, _, _ in calls)
    replies = tuple((_seqid(w), m) for w, m, answered in calls if answered)
    return [Step(data)], Expected(replies=replies), "non_strict_answered"


def k_cut_body(rng: Rng, t: Transport, limits: Limits) -> Made:
    """A message cut short; framed, its frame length matches the cut (finding 3's input)."""
    w, _, _ = valid_call(rng)
    cut = bytes(w.buf[: rng.randrange(1, len(w.buf))])
    return [Step(on_wire(cut, t))], Expected(), ""


def k_half_frame(rng: Rng, t: Transport, limits: Limits) -> Made:
    """A frame announced with its true length, part of its body sent."""
    w, _, _ = valid_call(rng)
    whole = framed(w.buf)
    return [Step(whole[: rng.randrange(1, len(whole))])], Expected(), ""


def k_big_half_frame(rng: Rng, t: Transport, limits: Limits) -> Made:
    """A large echoBinary frame, all of it but its last byte (finding 1's input)."""
    size = rng.randrange(max(64, limits.big_frame_size // 2), limits.big_frame_size - 8)
    header = encode_call("echoBinary", {"data": b""}, rng.randrange(1, 1 << 31)).buf
    body_len = size - len(header)
    message = bytearray(header[:-5]) + I32.pack(body_len) + bytes(body_len) + b"\x00"
    data = framed(message) if t is FRAMED else bytes(message)
    return [Step(data[:-1])], Expected(), ""


def k_flipped_bytes(rng: Rng, t: Transport, limits: Limits) -> Made:
    w, _, _ = valid_call(rng)
    data = bytearray(on_wire(w.buf, t))
    for _ in range(rng.randrange(1, 5)):
        data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
    return [Step(bytes(data))], Expected(), ""


def k_frame_length_lie(rng: Rng, t: Transport, limits: Limits) -> Made:
    w, _, _ = valid_call(rng)
    return [Step(I32.pack(_lie(rng, len(w.buf), limits)) + bytes(w.buf))], Expected(), ""


def _lie_at(rng: Rng, t: Transport, limits: Limits, offsets: str) -> Made:
    for _ in range(8):  # bounded: find a call that has such a length field
        w, _, _ = valid_call(rng)
        where = getattr(w, offsets)
        if where:
            at = rng.choice(where)
            true = int(I32.unpack_from(w.buf, at)[0])
            I32.pack_into(w.buf, at, _lie(rng, true, limits))
            return [Step(on_wire(w.buf, t))], Expected(), ""
    return k_flipped_bytes(rng, t, limits)


def k_string_length_lie(rng: Rng, t: Transport, limits: Limits) -> Made:
    return _lie_at(rng, t, limits, "string_lengths")


def k_container_size_lie(rng: Rng, t: Transport, limits: Limits) -> Made:
    return _lie_at(rng, t, limits, "container_sizes")


def k_bad_version(rng: Rng, t: Transport, limits: Limits) -> Made:
    w, _, _ = valid_call(rng)
    version = rng.choice((b"\x80\x02", b"\x81\x01", b"\x80\x00", b"\xff\xff", b"\x7f\x01"))
    return [Step(on_wire(version + bytes(w.buf[2:]), t))], Expected(), ""


def k_bad_message_type(rng: Rng, t: Transport, limits: Limits) -> Made:
    """A strict envelope of type 0, EXCEPTION or 5-255: answered with an exception."""
    mtype = rng.choice((0, 3, *range(5, 256)))
    w, _, _ = valid_call(rng, mtype=mtype)
    expected = Expected(error_seqid=_seqid(w))
    return [Step(on_wire(w.buf, t))], expected, "bad_message_type_answered"


def k_reply_first(rng: Rng, t: Transport, limits: Limits) -> Made:
    """A REPLY as the first message, strict or not (finding 11)."""
    strict = rng.random() < 0.5
    w, _, _ = valid_call(rng, mtype=REPLY, strict=strict)
    oracle = "reply_first_answered_strict" if strict else "reply_first_answered_non_strict"
    return [Step(on_wire(w.buf, t))], Expected(error_seqid=_seqid(w)), oracle


def k_deep_nesting(rng: Rng, t: Transport, limits: Limits) -> Made:
    """Nested lists in an unknown field of ping's args, around and beyond max_depth."""
    innermost = rng.choice((T_I32, T_STRUCT))
    depth = rng.choice((-1, 0, 1, 1, 2, 3 * limits.max_depth)) + limits.max_depth
    levels = depth - (1 if innermost == T_I32 else 2)
    seqid = rng.randrange(1, 1 << 31)
    message = bytes(Writer().envelope("ping", CALL, seqid).buf) + nested_lists(levels, innermost)
    steps = [Step(on_wire(message, t))]
    if t is FRAMED:  # whether framed bodies are walked is the sidecar's choice
        return steps, Expected(), ""
    if depth > limits.max_depth:
        by_one = "by_one_" if depth == limits.max_depth + 1 else ""
        oracle = f"too_deep_{by_one}refused_" + ("fixed_size" if innermost == T_I32 else "struct")
        return steps, Expected(error_seqid=seqid), oracle
    return steps, Expected(replies=((seqid, "ping"),)), "deep_within_limit_answered"


def k_garbage(rng: Rng, t: Transport, limits: Limits) -> Made:
    size = rng.choice((1, 3, 7, 16, 100, 2048))
    variant = rng.randrange(4)
    if variant == 0:
        data = rng.randbytes(size)
    elif variant == 1:
        data = bytes([rng.choice((0x00, 0xFF, 0x80))]) * size
    elif variant == 2:  # a plausible frame of garbage
        data = framed(rng.randbytes(size))
    else:  # a real envelope, then garbage where the arguments should be
        w = Writer().envelope(rng.choice(TWO_WAY), CALL, rng.randrange(1, 1 << 31))
        data = on_wire(bytes(w.buf) + rng.randbytes(size), t)
    return [Step(data)], Expected(), ""


def k_http(rng: Rng, t: Transport, limits: Limits) -> Made:
    verb = rng.choice(("GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "CONNECT"))
    data = f"{verb} /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    return [Step(data)], Expected(http_400=True), "http_answered_400"


def k_foreign_protocol(rng: Rng, t: Transport, limits: Limits) -> Made:
    compact = b"\x82\x21\x01\x04ping\x00"
    theader = b"\x0f\xff\x00\x00\x00\x00\x00\x01\x00\x01\x00\x00" + b"\x00" * 8
    json = b'[1,"ping",1,1,{}]'
    body = rng.choice((compact, theader, json, b"\x80\x01\x00\x01" + json))
    data = framed(body) if rng.random() < 0.5 else body
    return [Step(data)], Expected(), ""


def k_oneway_two_way(rng: Rng, t: Transport, limits: Limits) -> Made:
    """A two-way method sent as ONEWAY (finding 2), maybe followed by a real call."""
    w, _, _ = valid_call(rng, mtype=ONEWAY)
    steps = [Step(on_wire(w.buf, t))]
    if rng.random() < 0.5:
        follow, _, _ = valid_call(rng)
        steps.append(Step(on_wire(follow.buf, t)))
    return steps, Expected(), ""


def k_slowloris(rng: Rng, t: Transport, limits: Limits) -> Made:
    """A message that never ends, a byte at a time, for twice the idle timeout and more."""
    header = encode_call("echoBinary", {"data": b""}, rng.randrange(1, 1 << 31)).buf
    message = bytes(header[:-5]) + I32.pack(100_000) + bytes(200)
    data = framed(message) if t is FRAMED else message
    gap = max(0.05, limits.idle_timeout / 4)
    count = int((2 * limits.idle_timeout + 2.0) / gap) + 1
    return [Step(data[i : i + 1], gap if i else 0.0) for i in range(count)], Expected(), ""


def k_connect_reset(rng: Rng, t: Transport, limits: Limits) -> Made:
    choice = rng.randrange(3)
    if choice == 0:
        return [], Expected(), ""
    calls = [valid_call(rng) for _ in range(1 if choice == 1 else rng.randrange(2, 8))]
    return [Step(b"".join(on_wire(w.buf, t) for w, _, _ in calls))], Expected(), ""


BAD_PARTS = ("flipped_bytes", "string_length_lie", "container_size_lie", "bad_message_type")


def k_shared_connection(rng: Rng, t: Transport, limits: Limits) -> Made:
    """Good calls, then a bad input, then more calls, in separate writes on one connection."""
    steps: list[Step] = []
    replies: list[tuple[int, str]] = []
    for _ in range(rng.randrange(1, 4)):
        w, method, answered = valid_call(rng)
        steps.append(Step(on_wire(w.buf, t)))
        if answered:
            replies.append((_seqid(w), method))
    bad, _, _ = KINDS[rng.choice(BAD_PARTS)][1](rng, t, limits)
    steps += bad
    for _ in range(rng.randrange(0, 3)):
        steps.append(Step(on_wire(valid_call(rng)[0].buf, t)))
    return steps, Expected(replies=tuple(replies)), "shared_good_calls_answered_first"


def k_empty(rng: Rng, t: Transport, limits: Limits) -> Made:
    return [], Expected(), ""


# name: (weight in the mix, maker)
KINDS: dict[str, tuple[int, Maker]] = {
    "valid": (6, k_valid),
    "pipelined_burst": (4, k_pipelined_burst),
    "non_strict": (3, k_non_strict),
    "cut_body": (5, k_cut_body),
    "half_frame": (5, k_half_frame),
    "big_half_frame": (1, k_big_half_frame),
    "flipped_bytes": (8, k_flipped_bytes),
    "frame_length_lie": (5, k_frame_length_lie),
    "string_length_lie": (5, k_string_length_lie),
    "container_size_lie": (5, k_container_size_lie),
    "bad_version": (3, k_bad_version),
    "bad_message_type": (4, k_bad_message_type),
    "reply_first": (3, k_reply_first),
    "deep_nesting": (3, k_deep_nesting),
    "garbage": (5, k_garbage),
    "http": (2, k_http),
    "foreign_protocol": (3, k_foreign_protocol),
    "oneway_two_way": (3, k_oneway_two_way),
    "slowloris": (1, k_slowloris),
    "connect_reset": (3, k_connect_reset),
    "shared_connection": (4, k_shared_connection),
    "empty": (1, k_empty),
}


def generate(seed: int, index: int, limits: Limits, kinds: tuple[str, ...] = ()) -> FuzzInput:
    """Input ``index`` of ``seed``, drawn from ``kinds`` (all kinds when empty)."""
    names = list(kinds or KINDS)
    unknown = [n for n in names if n not in KINDS]
    if unknown:
        raise ValueError(f"unknown mutation kinds {unknown}; known: {sorted(KINDS)}")
    rng = random.Random(f"{seed}:{index}")
    kind = rng.choices(names, weights=[KINDS[n][0] for n in names])[0]
    transport = FRAMED if rng.random() < 0.6 else BUFFERED
    steps, expected, oracle = KINDS[kind][1](rng, transport, limits)
    end: End
    if kind == "connect_reset":
        end = "reset"
    elif kind == "slowloris":
        end = "hold"
    else:
        end = rng.choices(("half_close", "hold", "reset"), weights=(75, 15, 10))[0]
        if end == "reset" and not expected.anything:
            end = "half_close"
    return FuzzInput(
        index, kind, transport, tuple(steps), end, expected, oracle, drip=kind == "slowloris"
    )
