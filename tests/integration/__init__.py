"""Integration tests: real upstream servers, a real sidecar process, real clients.

Every test here goes through ``python -m sidecar run`` (`run_sidecar`) on
loopback ports, with the upstream servers of `tests.support.servers` behind
it. Sidecars are expensive to start (about a second each on this machine), so
`Deployments` starts one per upstream configuration on first use and keeps it
for the whole session; tests that share a deployment must not depend on each
other's leftovers (they read metrics as before/after differences).

Helpers shared by the modules:

- `Deployments` / `Deployment`: an upstream and the sidecar in front of it,
  with checks made when the session ends (clean exit, no tracebacks in the
  log, no protocol errors where only well-behaved clients talked).
- `FORWARDING_CORE`: retries off and the breaker effectively off, so that what
  a test sees is the behaviour of the forwarding core, not a retry hiding it.
- Raw-socket helpers for replies and bad input: `read_until_closed`,
  `split_replies`, `reply_parts`.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from sidecar.protocol.appexc import parse_application_exception
from sidecar.protocol.envelope import MessageHeader, parse_header
from sidecar.protocol.framing import Transport, make_decoder
from tests.support.clients import split_address
from tests.support.servers import Library, TransportName, UpstreamServer, upstream_server
from tests.support.sidecar import SidecarProcess, free_port, merged, run_sidecar

LIBRARIES: tuple[Library, ...] = ("thriftpy2", "apache")
TRANSPORTS: tuple[TransportName, ...] = ("framed", "buffered")

# Retries off and a breaker that never opens: a failure reaches the client as
# the forwarding core answers it. Per-try timeouts are generous because two
# cores are shared with other test runs; nothing here tests a timeout.
FORWARDING_CORE: dict[str, Any] = {
    "retry": {"max_attempts": 1, "per_try_timeout": "10s", "deadline": "20s"},
    "breaker": {"fail_max": 1000},
}

# Replies of up to 64 MiB: above every payload sent here.
_MAX_REPLY = 64 << 20


@dataclass
class Deployment:
    """An upstream (None when nothing listens) and the sidecar in front of it.

    Attributes:
        name: the key it was started under.
        upstream: the server, or None for an address where nothing listens.
        upstream_address: ``host:port`` the sidecar forwards to.
        sidecar: the sidecar process.
        protocol_errors_expected: False when only well-behaved clients talk to
            it, so any protocol error it counts is a bug (checked at the end).
    """

    name: str
    upstream: UpstreamServer | None
    upstream_address: str
    sidecar: SidecarProcess
    protocol_errors_expected: bool = False

    @property
    def address(self) -> str:
        """The sidecar's Thrift address."""
        return self.sidecar.address

    @property
    def server(self) -> UpstreamServer:
        """The upstream server (for deployments that have one)."""
        assert self.upstream is not None, f"{self.name} has no upstream server"
        return self.upstream

    def metric(self, name: str, **labels: str) -> float:
        """One value (summed over labels not given) from a fresh scrape."""
        return self.sidecar.metrics().value(name, **labels)

    def protocol_errors(self, kind: str) -> float:
        return self.metric("thrift_sidecar_protocol_errors_total", kind=kind)

    def alive(self) -> bool:
        return self.sidecar.proc.poll() is None


@dataclass
class Deployments:
    """Sidecars started on first use, one per configuration, stopped at the end."""

    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _started: dict[str, Deployment] = field(default_factory=dict)

    def get(
        self,
        name: str,
        *,
        upstream: Callable[[], AbstractContextManager[UpstreamServer]] | None,
        config: dict[str, Any] | None = None,
        protocol_errors_expected: bool = False,
    ) -> Deployment:
        """The deployment called ``name``, started now if it is not running yet.

        Args:
            name: a key that names the whole configuration.
            upstream: makes the upstream server; None for an address where
                nothing listens.
            config: sidecar config merged into `base_config`.
            protocol_errors_expected: see `Deployment`.
        """
        found = self._started.get(name)
        if found is not None:
            return found
        server = None if upstream is None else self._stack.enter_context(upstream())
        address = f"127.0.0.1:{free_port()}" if server is None else server.address
        sidecar = self._stack.enter_context(run_sidecar([address], config=config or {}))
        deployment = Deployment(name, server, address, sidecar, protocol_errors_expected)
        # Runs before run_sidecar's own exit (LIFO): the stop status is ours to check.
        self._stack.callback(self._check_at_exit, deployment)
        self._started[name] = deployment
        return deployment

    @staticmethod
    def _check_at_exit(deployment: Deployment) -> None:
        problems = []
        if not deployment.alive():
            problems.append(f"exited early with {deployment.sidecar.proc.returncode}")
        elif not deployment.protocol_errors_expected:
            counted = deployment.metric("thrift_sidecar_protocol_errors_total")
            if counted:
                problems.append(f"counted {counted:g} protocol errors from well-behaved clients")
        status = deployment.sidecar.stop()
        if status != 0:
            problems.append(f"SIGTERM gave exit status {status}")
        log = deployment.sidecar.log()
        if "Traceback" in log:
            problems.append("a traceback in its log")
        if problems:
            raise AssertionError(
                f"sidecar {deployment.name}: " + "; ".join(problems) + f"\n--- log ---\n{log}"
            )

    def close(self) -> None:
        self._stack.close()


def plain(deployments: Deployments, library: Library, transport: TransportName) -> Deployment:
    """A non-multiplexed upstream of ``library`` speaking ``transport``, behind a sidecar
    in the forwarding-core configuration with ``transport: auto`` and ``upstream.transport: same``.
    """
    return deployments.get(
        f"plain-{library}-{transport}",
        upstream=lambda: upstream_server(library, transport),
        config=merged(FORWARDING_CORE),
    )


# -- raw bytes ------------------------------------------------------------------


@contextlib.contextmanager
def raw_connection(address: str, timeout: float = 5.0) -> Iterator[socket.socket]:
    """A plain TCP connection to ``address``, closed on exit."""
    sock = socket.create_connection(split_address(address), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        yield sock
    finally:
        sock.close()


def read_until_closed(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Every byte the peer sends until it closes the connection.

    A reset counts as closing (the bytes before it are returned).

    Raises:
        TimeoutError: the peer kept the connection open for ``timeout`` s.
    """
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(
                f"connection still open after {timeout}s ({sum(map(len, chunks))} bytes read)"
            )
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(1 << 16)
        except ConnectionResetError:
            return b"".join(chunks)
        except TimeoutError:
            continue
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def split_replies(data: bytes, transport: TransportName | Transport) -> list[bytes]:
    """Whole messages (without frame prefix) in ``data``; every byte must belong to one."""
    decoder = make_decoder(Transport(transport), _MAX_REPLY)
    messages = [bytes(m.payload()) for m in decoder.receive_data(data)]
    decoder.receive_data(b"")  # raises when bytes are left over
    return messages


def framed_replies(sock: socket.socket, count: int, timeout: float = 10.0) -> list[bytes]:
    """Read ``count`` framed replies from ``sock`` (fewer if it ends first), without
    their frame prefix."""
    sock.settimeout(timeout)
    decoder = make_decoder(Transport.FRAMED, _MAX_REPLY)
    out: list[bytes] = []
    while len(out) < count:
        data = sock.recv(1 << 20)
        if not data:
            break
        out.extend(bytes(m.payload()) for m in decoder.receive_data(data))
    return out


@dataclass(frozen=True)
class ReplyParts:
    """What a raw reply says: its header and, for EXCEPTION messages, type and text."""

    header: MessageHeader
    exc_type: int | None
    exc_message: str | None


def reply_parts(message: bytes) -> ReplyParts:
    """Read a reply message (no frame prefix)."""
    header = parse_header(message)
    assert header is not None, f"not a whole envelope: {message[:64]!r}"
    if header.type != 3:  # EXCEPTION
        return ReplyParts(header, None, None)
    exc_type, text = parse_application_exception(memoryview(message)[header.body_offset :])
    return ReplyParts(header, exc_type, text)
