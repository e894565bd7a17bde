"""`Sidecar.start` and `Sidecar.stop` on a real sidecar, upstream and sockets.

- A client that pipelines calls to a slow upstream and then resets its
  connection: `Sidecar.stop` waits for those calls and reports a clean drain
  only once they finished (issue 13, finding 10).
- A start that fails half-way (the admin port is taken) raises and leaves
  nothing listening: the Thrift port refuses connections, and a later start
  can bind it again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.app import Sidecar
from sidecar.config import load_config
from sidecar.protocol.framing import Transport, frame
from tests.support.clients import split_address
from tests.support.raw import encode_call
from tests.support.servers import Thriftpy2Server, thriftpy2_server
from tests.support.sidecar import SidecarThread, base_config, free_port
from tests.support.wait import wait_until

SLOW_CALLS: dict[str, Any] = {"retry": {"per_try_timeout": "30s", "deadline": "60s"}}


class HoldFirst:
    """Upstream hook: the first ``sleepMs`` call waits until `release` (10 s at most)."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self._seen = 0
        self._lock = threading.Lock()

    def release(self) -> None:
        self.released.set()

    def __call__(self, name: str) -> None:
        if name != "sleepMs":
            return
        with self._lock:
            self._seen += 1
            first = self._seen == 1
        if first:
            self.released.wait(10)


@pytest.fixture
def upstream() -> Iterator[Thriftpy2Server]:
    hold = HoldFirst()
    with thriftpy2_server("framed") as server:
        server.hook = hold
        yield server
        hold.release()


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset rather than a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_stop_waits_for_the_calls_of_a_client_that_reset_its_connection(
    upstream: Thriftpy2Server,
) -> None:
    hold = upstream.hook
    assert isinstance(hold, HoldFirst)
    with SidecarThread(base_config([upstream.address], **SLOW_CALLS)) as sc:
        assert sc.sidecar is not None
        client = socket.create_connection(split_address(sc.address), timeout=5)
        calls = [encode_call("sleepMs", {"ms": 1}, seqid=s) for s in (1, 2)]
        client.sendall(b"".join(frame(c, Transport.FRAMED) for c in calls))
        wait_until(lambda: upstream.calls["sleepMs"] == 1, message="call 1 at the upstream")
        _reset(client)
        wait_until(
            lambda: sc.metrics().value("thrift_sidecar_client_connections") == 0,
            message="the sidecar saw the reset",
        )

        stopping = asyncio.run_coroutine_threadsafe(sc.sidecar.stop(drain_timeout=10), sc.loop)
        done, _ = concurrent.futures.wait([stopping], timeout=0.5)
        assert not done, (
            f"stop() returned {stopping.result()} while call 1 of the reset connection "
            "was still at the upstream"
        )
        hold.release()
        assert stopping.result(timeout=15) is True
        # Both calls the client sent before the reset were executed, in order.
        assert upstream.calls["sleepMs"] == 2


def _config(tmp_path: Path, raw: dict[str, Any]) -> Any:
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(str(path), environ={})


async def _refused(address: tuple[str, int]) -> bool:
    try:
        _, writer = await asyncio.open_connection(*address)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


def test_a_failed_start_leaves_the_thrift_port_closed(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    admin_port = taken.getsockname()[1]
    raw = base_config([f"127.0.0.1:{free_port()}"], metrics={"listen": f"127.0.0.1:{admin_port}"})
    thrift = split_address(raw["listen"])
    sidecar = Sidecar(_config(tmp_path, raw))

    async def scenario() -> None:
        with pytest.raises(OSError, match="in use"):
            await sidecar.start()
        assert await _refused(thrift), "the Thrift listener still accepts after a failed start"
        assert not sidecar.ready
        # The port is free again: once the admin port is, the same sidecar starts.
        taken.close()
        await sidecar.start()
        try:
            assert sidecar.ready
            assert sidecar.listen_address == thrift
            assert not await _refused(thrift)
        finally:
            assert await sidecar.stop(drain_timeout=1) is True
        assert await _refused(thrift)

    try:
        asyncio.run(scenario())
    finally:
        taken.close()


def test_stop_of_a_sidecar_never_started_is_clean(tmp_path: Path) -> None:
    sidecar = Sidecar(_config(tmp_path, base_config([f"127.0.0.1:{free_port()}"])))
    assert asyncio.run(sidecar.stop()) is True
