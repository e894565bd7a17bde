"""A well-behaved client calling the sidecar for the whole fuzz run, checking every reply.

Each connection (one framed, one buffered by default) is a thread making
calls one after the other: ``ping``, ``add``, ``getItem`` and ``echoBinary``
with arguments whose answer is known, each with a seqid of its own. Calls
are encoded and replies decoded by thriftpy2 (`tests.support.raw`), not by
the sidecar's codec. A reply must carry the call's seqid and name and the
right value; anything else is a *wrong reply*. The connection closing under
the client is a *drop*; no reply within ``call_deadline`` is a *hang*. After
any of the three the client reconnects (the stream can no longer be trusted).
An exception reply is an error, counted by kind (``circuit_open`` ...).
"""

from __future__ import annotations

import random
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tests.fuzz.wire import EXCEPTION, Transport, read_envelope, split_messages
from tests.support.clients import split_address
from tests.support.idl import load_thriftpy2_interop
from tests.support.raw import decode_reply, encode_call

_MAX_EXAMPLES = 10
_MAX_LATENCIES = 200_000
# TApplicationException types, by number (from the Thrift specification).
_APP_EXCEPTION_TYPES = (
    "UNKNOWN",
    "UNKNOWN_METHOD",
    "INVALID_MESSAGE_TYPE",
    "WRONG_METHOD_NAME",
    "BAD_SEQUENCE_ID",
    "MISSING_RESULT",
    "INTERNAL_ERROR",
    "PROTOCOL_ERROR",
    "INVALID_TRANSFORM",
    "INVALID_PROTOCOL",
    "UNSUPPORTED_CLIENT_TYPE",
)


@dataclass
class GoodStats:
    """What the good client saw, all connections together."""

    calls: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    dropped: int = 0
    wrong_replies: int = 0
    hangs: int = 0
    examples: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    def note(self, text: str) -> None:
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(text)

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _Broken(Exception):
    """The connection can no longer be used: dropped, hung, or out of step."""


def error_kind(exc: BaseException) -> str:
    """A short, bounded label for an exception reply (numbers and addresses removed)."""
    message = str(getattr(exc, "message", "") or exc)
    if "circuit open" in message:
        return "circuit_open"
    kind = getattr(exc, "type", None)
    if kind is None:
        name = type(exc).__name__
    elif 0 <= int(kind) < len(_APP_EXCEPTION_TYPES):
        name = _APP_EXCEPTION_TYPES[int(kind)]
    else:
        name = f"type_{kind}"
    text = re.sub(r"\d+(\.\d+)*(:\d+)?", "N", message)[:70]
    return f"{name}: {text}"


class GoodClient:
    """Well-behaved connections calling ``address`` until `stop`.

    Args:
        address: the sidecar's Thrift address.
        transports: one connection (thread) per entry.
        seed: seeds the arguments (the interleaving with the fuzzer is not repeatable).
        call_deadline: seconds a call may take before it counts as a hang.
        pause: seconds between one connection's calls.
        max_seconds: a hard bound on the client's life, whatever happens.
        idle_timeout: the sidecar's; a connection left unused that long (the
            client thread starved of CPU) may be closed, and that is no drop.
    """

    def __init__(
        self,
        address: str,
        transports: tuple[Transport, ...] = (Transport.FRAMED, Transport.BUFFERED),
        *,
        seed: int = 0,
        call_deadline: float = 10.0,
        pause: float = 0.002,
        max_seconds: float = 24 * 3600.0,
        idle_timeout: float = 300.0,
    ) -> None:
        self.address = split_address(address)
        self.stats = GoodStats()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._deadline = call_deadline
        self._pause = pause
        self._idle_timeout = idle_timeout
        self._until = time.monotonic() + max_seconds
        self._threads = [
            threading.Thread(target=self._run, args=(t, seed * 100 + i), daemon=True)
            for i, t in enumerate(transports)
        ]
        self._idl = load_thriftpy2_interop()

    @staticmethod
    def default_transports(connections: int) -> tuple[Transport, ...]:
        """``connections`` transports, alternating framed and buffered."""
        both = (Transport.FRAMED, Transport.BUFFERED)
        return tuple(both[i % 2] for i in range(connections))

    def __enter__(self) -> GoodClient:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> GoodStats:
        self._stop.set()
        for thread in self._threads:
            thread.join(self._deadline + 5.0)
        return self.stats

    # one connection

    def _run(self, transport: Transport, seed: int) -> None:
        rng = random.Random(f"good:{seed}")
        seqid = rng.randrange(1, 1 << 30)
        sock: socket.socket | None = None
        last_reply = time.monotonic()
        while not self._stop.is_set() and time.monotonic() < self._until:
            seqid += 1
            try:
                if sock is None:
                    sock = socket.create_connection(self.address, timeout=self._deadline)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    last_reply = time.monotonic()
                last_reply = self._call(sock, transport, rng, seqid, last_reply)
            except _Broken:
                if sock is not None:
                    sock.close()
                sock = None
            except OSError as exc:  # could not connect
                with self._lock:
                    self.stats.errors[f"connect: {type(exc).__name__}"] += 1
                self._stop.wait(0.05)
                sock = None
            self._stop.wait(self._pause)
        if sock is not None:
            sock.close()

    def _call(
        self,
        sock: socket.socket,
        transport: Transport,
        rng: random.Random,
        seqid: int,
        last_reply: float,
    ) -> float:
        """One call on ``sock``; returns when its reply came (raises `_Broken` when none did)."""
        method, args, expected = self._pick(rng)
        message = encode_call(method, args, seqid=seqid)
        data = message if transport is Transport.BUFFERED else len(message).to_bytes(4) + message
        started = time.monotonic()
        outcome = "ok"
        try:
            sock.settimeout(self._deadline)
            sock.sendall(data)
            try:
                reply = self._read_reply(sock, transport, started)
            except _OutOfStep as exc:
                outcome = "wrong"
                self._record("wrong", f"{method} seqid {seqid}: {exc}")
                raise _Broken from exc
            env = read_envelope(reply)
            if env is None or env.seqid != seqid or env.name != method:
                outcome = "wrong"
                self._record("wrong", f"{method} seqid {seqid}: got envelope {env}")
                raise _Broken
            try:
                value = decode_reply(method, reply)
            except Exception as exc:
                if env.mtype != EXCEPTION:
                    raise
                outcome = "error"
                self._record("error", error_kind(exc))
                return time.monotonic()
            if not _same(value, expected):
                outcome = "wrong"
                self._record("wrong", f"{method}{args} seqid {seqid}: {value!r} != {expected!r}")
                raise _Broken
            return time.monotonic()
        except (ConnectionError, _Eof) as exc:
            if started - last_reply >= 0.8 * self._idle_timeout:
                outcome = "error"
                self._record("error", "closed after the connection was idle")
            else:
                outcome = "dropped"
                self._record("dropped", f"{method} seqid {seqid}: {type(exc).__name__}")
            raise _Broken from exc
        except TimeoutError as exc:
            outcome = "hang"
            self._record("hang", f"{method} seqid {seqid}: no reply in {self._deadline}s")
            raise _Broken from exc
        finally:
            with self._lock:
                self.stats.calls += 1
                if outcome == "ok":
                    self.stats.ok += 1
                if len(self.stats.latencies) < _MAX_LATENCIES:
                    self.stats.latencies.append(time.monotonic() - started)

    def _record(self, what: str, text: str) -> None:
        with self._lock:
            if what == "error":
                self.stats.errors[text] += 1
                return
            if what == "wrong":
                self.stats.wrong_replies += 1
            elif what == "dropped":
                self.stats.dropped += 1
            else:
                self.stats.hangs += 1
            self.stats.errors[what] += 1
            self.stats.note(f"{what}: {text}")

    def _read_reply(self, sock: socket.socket, transport: Transport, started: float) -> bytes:
        data = b""
        for _ in range(100_000):  # bounded; the deadline ends it sooner
            remaining = self._deadline - (time.monotonic() - started)
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise _Eof
            data += chunk
            messages = split_messages(data, transport)
            if len(messages) > 1 or (
                messages and len(messages[0]) + _prefix(transport) < len(data)
            ):
                raise _OutOfStep(f"{len(messages)} replies (and more bytes) to one call")
            if messages:
                return messages[0]
        raise TimeoutError

    def _pick(self, rng: random.Random) -> tuple[str, dict[str, Any], Any]:
        roll = rng.randrange(4)
        if roll == 0:
            return "ping", {}, None
        if roll == 1:
            a, b = rng.randrange(-(1 << 40), 1 << 40), rng.randrange(-(1 << 40), 1 << 40)
            return "add", {"a": a, "b": b}, a + b
        if roll == 2:
            item_id = rng.randrange(1, 500)
            return "getItem", {"id": item_id}, ("item", item_id, f"item-{item_id}")
        data = rng.randbytes(rng.randrange(0, 2048))
        return "echoBinary", {"data": data}, data


class _Eof(ConnectionError):
    """The sidecar closed the connection."""


class _OutOfStep(Exception):
    """More came back than one reply: the stream no longer matches the calls."""


def _prefix(transport: Transport) -> int:
    return 4 if transport is Transport.FRAMED else 0


def _same(value: Any, expected: Any) -> bool:
    if isinstance(expected, tuple) and expected[:1] == ("item",):
        return bool(getattr(value, "id", None) == expected[1] and value.name == expected[2])
    return bool(value == expected)
