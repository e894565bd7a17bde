"""The example Catalog service: what it answers, how it stops, and its program's command line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import thriftpy2.rpc
from click.testing import CliRunner
from thriftpy2.protocol import TCyBinaryProtocolFactory
from thriftpy2.transport import TCyBufferedTransportFactory, TCyFramedTransportFactory

from sidecar.testing import upstream as upstream_program
from sidecar.testing.catalog import (
    MAX_LIST,
    CatalogServer,
    example_idl_path,
    load_catalog_idl,
    make_item,
)
from tests.support.apache_gen import thrift_compiler
from tests.support.sidecar import REPO_ROOT, free_port
from tests.support.wait import wait_until


def catalog_client(address: str, transport: str = "framed") -> Any:
    """A connected thriftpy2 Catalog client (close it when done)."""
    host, _, port = address.rpartition(":")
    factory = (
        TCyFramedTransportFactory() if transport == "framed" else TCyBufferedTransportFactory()
    )
    return thriftpy2.rpc.make_client(
        load_catalog_idl().Catalog,
        host,
        int(port),
        proto_factory=TCyBinaryProtocolFactory(),
        trans_factory=factory,
        timeout=5000,
    )


@pytest.fixture
def client_of() -> Iterator[Any]:
    clients: list[Any] = []

    def connect(address: str, transport: str = "framed") -> Any:
        clients.append(catalog_client(address, transport))
        return clients[-1]

    yield connect
    for client in clients:
        client.close()


@pytest.mark.parametrize("transport", ["framed", "buffered"])
def test_catalog_answers_like_a_service(transport: str, client_of: Any) -> None:
    idl = load_catalog_idl()
    with CatalogServer(transport=transport) as server:
        client = client_of(server.address, transport)
        assert client.getItem(7) == make_item(idl, 7)
        assert [i.id for i in client.listItems(3)] == [1, 2, 3]
        assert len(client.listItems(5000)) == MAX_LIST
        with pytest.raises(idl.ItemNotFound):
            client.getItem(10_000)
        order = idl.Order("c", [idl.OrderLine(itemId=2, quantity=3)], idempotencyKey="k")
        first, again = client.placeOrder(order), client.placeOrder(order)
        assert first == again
        assert first.totalCents == 3 * make_item(idl, 2).priceCents
        with pytest.raises(idl.InvalidOrder):
            client.placeOrder(idl.Order("c", []))
        client.ping()
        # Every execution counted; the order sent twice with one key placed once.
        assert server.calls.snapshot() == {
            "getItem": 2,
            "listItems": 2,
            "placeOrder": 3,
            "placeOrder:placed": 1,
            "ping": 1,
        }


def test_packaged_idl_is_the_repository_one_and_valid_for_both_libraries(tmp_path: Path) -> None:
    catalog = load_catalog_idl()
    assert catalog.Catalog.thrift_services == ["ping", "getItem", "listItems", "placeOrder"]
    assert catalog.Item().status == catalog.ItemStatus.IN_STOCK
    with example_idl_path() as path:
        assert path.read_bytes() == (REPO_ROOT / "idl" / "example.thrift").read_bytes()
        subprocess.run(
            [thrift_compiler(), "--gen", "py", "-out", str(tmp_path), str(path)],
            check=True,
            capture_output=True,
            timeout=60,
        )
    assert (tmp_path / "catalog" / "Catalog.py").is_file()


def test_catalog_rejects_an_unknown_transport() -> None:
    with pytest.raises(ValueError, match="framed or buffered"):
        CatalogServer(transport="zlib")


def test_stop_drops_open_connections_and_returns_promptly(client_of: Any) -> None:
    server = CatalogServer().start()
    try:
        client = client_of(server.address)
        client.ping()
        wait_until(lambda: server.open_connections == 1, timeout=5, message="one connection")
    finally:
        started = time.monotonic()
        server.stop()
    # The accept thread is woken and the connection thread's read is interrupted:
    # no waiting for a poll interval or for the idle timeout.
    assert time.monotonic() - started < 2.0
    assert server.open_connections == 0
    assert server.connections_accepted == 1
    assert server.errors == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()


def test_upstream_program_checks_its_options() -> None:
    runner = CliRunner()
    result = runner.invoke(upstream_program.main, ["--faults", "cycle", "--transport", "buffered"])
    assert result.exit_code == 2
    assert "--faults cycle needs --transport framed" in result.output
    result = runner.invoke(upstream_program.main, ["--faults", "sometimes"])
    assert result.exit_code == 2
    assert "'sometimes' is not one of 'none', 'cycle'" in result.output
    result = runner.invoke(upstream_program.main, ["--help"])
    assert result.exit_code == 0
    assert "--faults [none|cycle]" in result.output


def program_env() -> dict[str, str]:
    """The environment of an upstream program: this checkout, no sidecar settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env


def answers(proc: subprocess.Popen[bytes], port: int) -> bool:
    """Whether the upstream program on ``port`` answers a getItem call now."""
    assert proc.poll() is None, "the upstream exited"
    try:
        client = catalog_client(f"127.0.0.1:{port}")
    except Exception:
        return False
    try:
        return bool(client.getItem(3) == make_item(load_catalog_idl(), 3))
    except Exception:
        return False
    finally:
        client.close()


def stop_program(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    """SIGTERM the upstream program; its exit status and output."""
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
        raise
    return code, proc.stdout.read().decode() if proc.stdout else ""


def test_upstream_program_serves_until_sigterm() -> None:
    """``python -m sidecar.testing.upstream`` (what the Kubernetes example runs)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar.testing.upstream", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=program_env(),
    )
    try:
        wait_until(
            lambda: answers(proc, port), timeout=30, interval=0.05, message="the upstream's answer"
        )
    finally:
        code, log = stop_program(proc)
    assert code == 0, log
    assert f"Catalog service on 127.0.0.1:{port} (framed)" in log
    assert "signal 15: stopping" in log


# The upstream program's open-file limit in the test below: its imports and
# listener take about a dozen descriptors, the rest go to connections.
FD_LIMIT = 48
# More connections than that at once, so that accepting one fails (EMFILE).
CROWD = 80


def test_upstream_program_serves_again_after_running_out_of_file_descriptors(
    tmp_path: Path,
) -> None:
    """A client crowd beyond the open-file limit makes ``accept`` fail (EMFILE);
    once it leaves, the same process serves again: the listener must not be closed
    for a failure that passes."""
    port = free_port()
    # The program under a lower open-file limit, set in its own process first.
    program = (
        "import resource, runpy, sys\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({FD_LIMIT}, {FD_LIMIT}))\n"
        f"sys.argv = ['upstream', '--port', '{port}']\n"
        "runpy.run_module('sidecar.testing.upstream', run_name='__main__')\n"
    )
    # Its log in a file, read while it runs: the crowd stays until accept has failed.
    output = tmp_path / "upstream.log"
    with output.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", program], stdout=out, stderr=subprocess.STDOUT, env=program_env()
        )
    try:
        wait_until(
            lambda: answers(proc, port), timeout=30, interval=0.05, message="the first answer"
        )
        crowd: list[socket.socket] = []
        try:
            for _ in range(CROWD):
                try:
                    crowd.append(socket.create_connection(("127.0.0.1", port), timeout=2))
                except OSError:
                    break  # the backlog is full: enough
            # Every descriptor the process may have is in use: accept() fails now.
            wait_until(
                lambda: "cannot accept a connection" in output.read_text(errors="replace"),
                timeout=20,
                message="the upstream out of file descriptors, saying so",
            )
            assert len(os.listdir(f"/proc/{proc.pid}/fd")) >= FD_LIMIT - 1
        finally:
            for sock in crowd:
                sock.close()
        wait_until(
            lambda: answers(proc, port),
            timeout=30,
            interval=0.1,
            message="an answer after the crowd left",
        )
    finally:
        code, _ = stop_program(proc)
    log = output.read_text(errors="replace")
    assert code == 0, log
    assert "accepting connections again" in log, log
