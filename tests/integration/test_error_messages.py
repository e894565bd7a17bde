"""Errors that point somewhere: what a client and an operator are told when the set-up is wrong.

- An upstream that answers in HTTP: the message says so and shows the text,
  not "frame of 1008813135 bytes exceeds the limit" (that number is "<!DO").
- A transport mismatch (a buffered client, a framed upstream, upstream.transport
  same): the message asks whether the upstream speaks what was sent.
- A listen address in use: the error names the listener, its key and address.
"""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
from collections.abc import Iterator

import pytest
import thriftpy2.thrift

from tests.support.clients import thriftpy2_client
from tests.support.servers import thriftpy2_server
from tests.support.sidecar import run_sidecar
from tests.support.wait import wait_until

TAE = thriftpy2.thrift.TApplicationException
ONE_TRY = {"retry": {"max_attempts": 1}}


@contextlib.contextmanager
def http_upstream() -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 answering every request with an HTML page."""

    class Page(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = b"<!DOCTYPE html><html><body>not thrift</body></html>"
            self.send_response(400)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_an_upstream_answering_in_http_is_named_so() -> None:
    with (
        http_upstream() as address,
        run_sidecar([address], config=ONE_TRY) as sc,
        thriftpy2_client(sc.address, "framed") as client,
        pytest.raises(TAE) as raised,
    ):
        client.add(1, 2)
    message = raised.value.message
    assert "answered in HTTP, not Thrift" in message
    assert "<!DOCTYPE" in message or "HTTP/1." in message  # what it sent, shown as text
    assert "does upstream.addresses name the Thrift port?" in message
    assert "exceeds the limit" not in message


def test_a_transport_mismatch_asks_what_the_upstream_speaks() -> None:
    with (
        thriftpy2_server("framed") as upstream,
        run_sidecar([upstream.address], config=ONE_TRY) as sc,
        thriftpy2_client(sc.address, "buffered") as client,
        pytest.raises(TAE) as raised,
    ):
        client.add(1, 2)
    assert "does it speak buffered binary? (upstream.transport, upstream.protocol)" in (
        raised.value.message
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_a_listen_address_in_use_names_the_listener(workers: int) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = {"listen": f"127.0.0.1:{port}", "workers": workers}
        with run_sidecar(["127.0.0.1:1"], config=config, wait_ready=False) as sc:
            assert sc.proc.wait(20) == 1
            wait_until(lambda: "cannot start" in sc.log(), timeout=5.0, message="the error")
    assert f"cannot listen for Thrift clients on 127.0.0.1:{port} (listen)" in sc.log()
