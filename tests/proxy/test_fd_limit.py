"""A sidecar with few file descriptors: more clients than descriptors are refused and counted.

A real sidecar process is started with a low open-file limit (``RLIMIT_NOFILE``
set in the child) and ``max_connections`` far above it. It must keep
descriptors for its upstream connections and its admin port: client
connections beyond what fits are accepted and closed at once, counted under
``client_connections_rejected_total{reason="fd_limit"}`` and logged, ``/healthz``
keeps answering, and once the clients close, new connections are served.
"""

from __future__ import annotations

import socket

from tests.support.clients import split_address, thriftpy2_client
from tests.support.ops import PREFIX
from tests.support.servers import thriftpy2_server
from tests.support.sidecar import Metrics, SidecarProcess, http_get, run_sidecar
from tests.support.wait import wait_until

OPEN_FILES = 256  # the limit of the report: `ulimit -n 256`
CLIENTS = 400  # more connections than the sidecar has descriptors
POOL_SIZE = 4


def connections(metrics: Metrics) -> tuple[float, float]:
    """(client connections open, connections refused for the open-file limit)."""
    return (
        metrics.value(PREFIX + "client_connections"),
        metrics.value(PREFIX + "client_connections_rejected_total", reason="fd_limit"),
    )


def test_clients_beyond_the_open_file_limit_are_refused_counted_and_logged() -> None:
    config = {"max_connections": 10_000, "upstream": {"pool_size": POOL_SIZE}}
    with (
        thriftpy2_server() as upstream,
        run_sidecar([upstream.address], config=config, open_files=OPEN_FILES) as sidecar,
        thriftpy2_client(sidecar.address) as first,  # admitted before the flood
    ):
        assert first.getItem(1).id == 1
        host, port = split_address(sidecar.address)
        flood: list[socket.socket] = []
        try:
            for _ in range(CLIENTS - 1):
                flood.append(socket.create_connection((host, port), timeout=5.0))

            # Each connection was either admitted or refused: none was lost unseen.
            def all_seen() -> tuple[float, float] | None:
                open_now, refused = connections(sidecar.metrics())
                return (open_now, refused) if open_now + refused == CLIENTS else None

            admitted, refused = wait_until(all_seen, timeout=30.0, message="every client seen")
            assert refused >= CLIENTS - OPEN_FILES, (admitted, refused)
            assert 0 < admitted < OPEN_FILES - POOL_SIZE, (admitted, refused)
            # The admin port answers and an admitted client is served, at the limit.
            assert http_get(sidecar.admin + "/healthz")[0] == 200
            assert first.getItem(2).id == 2
        finally:
            for sock in flood:
                sock.close()
        wait_until(
            lambda: connections(sidecar.metrics())[0] == 1, timeout=15.0, message="flood gone"
        )
        with thriftpy2_client(sidecar.address) as late:
            assert late.getItem(7).id == 7
        assert_logged(sidecar, admitted)


def assert_logged(sidecar: SidecarProcess, admitted: float) -> None:
    log = sidecar.log()
    assert f"max_connections is 10000, but the open-file limit (RLIMIT_NOFILE) is {OPEN_FILES}" in (
        log
    ), log
    assert f"at most {int(admitted)} client connections are accepted" in log, log
    assert "as many as the open-file limit allows" in log, log
