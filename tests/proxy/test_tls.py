"""TLS: contexts from the config, handshakes on both sides, reasons counted, certificates reloaded.

The first part drives `sidecar.proxy.tls` on real sockets on 127.0.0.1, on
asyncio's loop and on uvloop, with certificates the tests make (trustme).
The second part runs the real sidecar process: a TLS client, the sidecar, a
TLS upstream (thriftpy2 behind ``ssl``), metrics read over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import signal
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import thriftpy2.protocol
import thriftpy2.thrift
import thriftpy2.transport
import uvloop

from sidecar.config import SidecarConfig, load_config
from sidecar.errors import ConfigError
from sidecar.metrics import SidecarMetrics
from sidecar.proxy.tls import (
    ClientTls,
    TlsListener,
    UpstreamTls,
    reload_certificates,
    server_context,
    upstream_context,
)
from tests.config.files import write
from tests.config.test_tls import Certs
from tests.support.idl import load_thriftpy2_interop
from tests.support.servers import Thriftpy2Server
from tests.support.sidecar import run_sidecar
from tests.support.wait import wait_until

UTC = datetime.UTC
REASONS = (
    "plaintext",
    "no_client_certificate",
    "bad_certificate",
    "unknown_ca",
    "expired",
    "version",
    "other",
)
# A framed binary Thrift call, as a plaintext client sends it.
THRIFT_CALL = b"\x00\x00\x00\x15\x80\x01\x00\x01\x00\x00\x00\x07getItem\x00\x00\x00\x01\x00"


@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop() if request.param == "asyncio" else uvloop.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path)


@pytest.fixture
def stranger(tmp_path: Path) -> Certs:
    """Certificates of a CA of their own, which nothing here trusts."""
    other = Certs(tmp_path / "other")
    other.root.mkdir()
    return other


@pytest.fixture
def server_config(certs: Certs, tmp_path: Path) -> SidecarConfig:
    """A ``tls`` section with a server certificate for localhost (no client CA)."""
    certs.issue("server", "localhost")
    return config_of(tmp_path, {"tls": {"cert": "server.crt", "key": "server.key"}})


def errors(metrics: SidecarMetrics, side: str) -> dict[str, float]:
    """The handshake error counts of one side, by reason (every reason's series exists)."""
    found = {}
    for reason in REASONS:
        value = metrics.registry.get_sample_value(
            "thrift_sidecar_tls_handshake_errors_total", {"side": side, "reason": reason}
        )
        assert value is not None, f"series side={side} reason={reason} missing"
        found[reason] = value
    return found


async def until(condition: Callable[[], object], timeout: float = 5.0) -> None:
    """Poll ``condition`` on the loop until it is true, for at most ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.005)


def config_of(tmp_path: Path, data: dict[str, Any]) -> SidecarConfig:
    return load_config(write(tmp_path, data), environ={})


class Echo(asyncio.Protocol):
    """The protocol behind the TLS layer: echoes, and remembers its transports."""

    def __init__(self, made: list[asyncio.BaseTransport]) -> None:
        self._made = made
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._made.append(transport)
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class Listener:
    """A `ClientTls` listener on 127.0.0.1 around `Echo`."""

    def __init__(self, config: SidecarConfig, **options: Any) -> None:
        self.config = config
        self.metrics = SidecarMetrics()
        self.made: list[asyncio.BaseTransport] = []
        self.tls: ClientTls | None = None
        self.options = options
        self.port = 0
        self._server: TlsListener | None = None

    async def __aenter__(self) -> Listener:
        loop = asyncio.get_running_loop()
        context = server_context(self.config)
        assert context is not None
        self.tls = ClientTls(context, self.metrics, loop, **self.options)
        self._server = await self.tls.listen(lambda: Echo(self.made), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        assert self.tls is not None
        self._server.close()
        await self._server.wait_closed()
        self.tls.close()
        for transport in self.made:
            transport.abort()  # type: ignore[attr-defined]

    def errors(self) -> dict[str, float]:
        return errors(self.metrics, "client")


def client_context(
    certs: Certs, cert: tuple[Path, Path] | None = None, **options: Any
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.ca_file()))
    if cert is not None:
        context.load_cert_chain(*cert)
    for name, value in options.items():
        setattr(context, name, value)
    return context


async def echo(
    port: int, context: ssl.SSLContext | None, data: bytes = b"ping"
) -> tuple[bytes, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="localhost" if context else None
    )
    writer.write(data)
    return await asyncio.wait_for(reader.readexactly(len(data)), 5), writer


def served_serial(writer: asyncio.StreamWriter) -> int:
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return int.from_bytes(der[15:35], "big")  # only compared, never decoded


def run(loop: asyncio.AbstractEventLoop, scenario: Callable[[], Awaitable[None]]) -> None:
    loop.run_until_complete(asyncio.wait_for(scenario(), 30))


# contexts


def test_no_sections_no_contexts(tmp_path: Path) -> None:
    config = config_of(tmp_path, {})
    assert server_context(config) is None
    assert upstream_context(config) is None


def test_contexts_follow_the_config(certs: Certs, tmp_path: Path) -> None:
    certs.issue("server", "localhost")
    certs.ca_file()
    config = config_of(
        tmp_path,
        {
            "tls": {"cert": "server.crt", "key": "server.key", "client_ca": "ca.crt"},
            "upstream": {"tls": {"verify": False, "server_name": "up.internal"}},
        },
    )
    server = server_context(config)
    assert server is not None
    assert server.verify_mode == ssl.CERT_REQUIRED
    assert server.minimum_version == ssl.TLSVersion.TLSv1_2
    upstream = upstream_context(config)
    assert upstream is not None
    assert upstream.verify_mode == ssl.CERT_NONE
    assert not upstream.check_hostname
    plain = config_of(tmp_path, {"tls": {"cert": "server.crt", "key": "server.key"}})
    assert server_context(plain).verify_mode == ssl.CERT_NONE  # type: ignore[union-attr]


# the listener


def test_a_tls_client_reaches_the_protocol_behind_the_handshake(
    loop: asyncio.AbstractEventLoop, certs: Certs, server_config: SidecarConfig
) -> None:

    async def scenario() -> None:
        async with Listener(server_config) as listener:
            data, writer = await echo(listener.port, client_context(certs), b"x" * 100_000)
            assert data == b"x" * 100_000
            (transport,) = listener.made
            assert transport.get_extra_info("ssl_object") is not None
            peer = transport.get_extra_info("peername")
            assert peer[0] == "127.0.0.1"
            writer.close()
            assert set(listener.errors().values()) == {0.0}

    run(loop, scenario)


CASES = ["plaintext", "http", "no_client_certificate", "unknown_ca", "expired", "version"]


@pytest.mark.parametrize("case", CASES)
def test_failed_client_handshakes_are_logged_and_counted_by_reason(
    loop: asyncio.AbstractEventLoop,
    certs: Certs,
    tmp_path: Path,
    stranger: Certs,
    case: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    certs.issue("server", "localhost")
    ca = certs.ca_file()
    section: dict[str, Any] = {"cert": "server.crt", "key": "server.key"}
    if case in ("no_client_certificate", "unknown_ca", "expired"):
        section["client_ca"] = ca.name
    if case == "version":
        section["min_version"] = "1.3"
    config = config_of(tmp_path, {"tls": section})
    past = datetime.datetime(2020, 1, 1, tzinfo=UTC)

    async def attempt(port: int) -> None:
        if case in ("plaintext", "http"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(THRIFT_CALL if case == "plaintext" else b"GET / HTTP/1.1\r\n\r\n")
            assert await asyncio.wait_for(reader.read(100), 5) == b""
            writer.close()
            return
        if case == "no_client_certificate":
            context = client_context(certs)
        elif case == "unknown_ca":
            context = client_context(certs, stranger.issue("client"))
        elif case == "expired":
            cert = certs.issue("client", not_before=past.replace(year=2019), not_after=past)
            context = client_context(certs, cert)
        else:
            context = client_context(certs, maximum_version=ssl.TLSVersion.TLSv1_2)
        with contextlib.suppress(ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
            _, writer = await echo(port, context)
            writer.close()

    async def scenario() -> None:
        async with Listener(config) as listener:
            await attempt(listener.port)
            reason = "plaintext" if case == "http" else case
            await until(lambda: listener.errors()[reason] == 1)
            assert listener.made == [], "the protocol never hears of a failed handshake"
            assert sum(listener.errors().values()) == 1
            upstream_series = listener.metrics.registry.get_sample_value(
                "thrift_sidecar_tls_handshake_errors_total", {"side": "upstream", "reason": "other"}
            )
            assert upstream_series is None, "no upstream series without upstream TLS"

    with caplog.at_level(logging.WARNING, logger="sidecar.tls"):
        run(loop, scenario)
    lines = [r.getMessage() for r in caplog.records if r.name == "sidecar.tls"]
    assert len(lines) == 1
    assert lines[0].startswith("TLS handshake with client 127.0.0.1:")
    assert "failed (" in lines[0]


def test_a_connection_closed_before_any_handshake_is_not_an_error(
    loop: asyncio.AbstractEventLoop, certs: Certs, server_config: SidecarConfig
) -> None:

    async def scenario() -> None:
        async with Listener(server_config) as listener:
            assert listener.tls is not None
            for _ in range(3):  # TCP health checks: connect, close
                _, writer = await asyncio.open_connection("127.0.0.1", listener.port)
                writer.close()
                await writer.wait_closed()
            await until(lambda: not listener.tls.handshakes)  # type: ignore[union-attr]
            # Then a real client still gets through.
            data, writer = await echo(listener.port, client_context(certs))
            assert data == b"ping"
            writer.close()
            assert sum(listener.errors().values()) == 0

    run(loop, scenario)


def test_a_silent_client_is_cut_at_the_handshake_timeout_and_counted(
    loop: asyncio.AbstractEventLoop, server_config: SidecarConfig
) -> None:

    async def scenario() -> None:
        async with Listener(server_config, timeout=0.2) as listener:
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            assert await asyncio.wait_for(reader.read(10), 5) == b""
            await until(lambda: listener.errors()["other"] == 1)
            writer.close()

    run(loop, scenario)


def test_connections_beyond_max_handshakes_wait_in_the_backlog(
    loop: asyncio.AbstractEventLoop, certs: Certs, server_config: SidecarConfig
) -> None:

    async def scenario() -> None:
        async with Listener(server_config, max_handshakes=1) as listener:
            tls = listener.tls
            assert tls is not None
            _, silent = await asyncio.open_connection("127.0.0.1", listener.port)
            await until(lambda: len(tls.handshakes) == 1)
            second = asyncio.ensure_future(echo(listener.port, client_context(certs)))
            done, _ = await asyncio.wait({second}, timeout=0.3)
            assert not done, "no second handshake while the first holds the only slot"
            assert len(tls.handshakes) == 1
            silent.close()  # the slot frees: the waiting client is accepted and served
            data, writer = await asyncio.wait_for(second, 10)
            assert data == b"ping"
            writer.close()
            assert sum(listener.errors().values()) == 0

    run(loop, scenario)


def test_reload_gives_new_connections_the_new_certificate_and_keeps_open_ones(
    loop: asyncio.AbstractEventLoop, certs: Certs, tmp_path: Path, server_config: SidecarConfig
) -> None:

    async def scenario() -> None:
        async with Listener(server_config) as listener:
            assert listener.tls is not None
            context = client_context(certs)
            _, old = await echo(listener.port, context)
            first = served_serial(old)
            certs.issue("server", "localhost")  # the same files, a new certificate
            before = listener.tls.context
            reload_certificates(server_config, listener.tls, None)
            assert listener.tls.context is not before
            _, new = await echo(listener.port, context)
            assert served_serial(new) != first
            # The connection opened before the reload still works, on its certificate.
            old.write(b"still here")
            reader = old.transport.get_protocol()._stream_reader  # type: ignore[attr-defined]
            assert await asyncio.wait_for(reader.readexactly(10), 5) == b"still here"
            assert served_serial(old) == first
            old.close()
            new.close()
            # A file broken since: the reload is refused and the running context stays.
            (tmp_path / "server.key").write_text("broken\n")
            current = listener.tls.context
            with pytest.raises(ConfigError, match=r"tls\.key"):
                reload_certificates(server_config, listener.tls, None)
            assert listener.tls.context is current

    run(loop, scenario)


# the upstream side


class TlsEchoServer:
    """An asyncio TLS echo server; remembers each client's certificate and SNI."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.peers: list[dict[str, Any] | None] = []
        self.names: list[str | None] = []
        context.sni_callback = lambda _obj, name, _ctx: self.names.append(name)
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> TlsEchoServer:
        server = self

        class Serve(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.t = transport
                server.peers.append(transport.get_extra_info("peercert"))

            def data_received(self, data: bytes) -> None:
                self.t.write(data)  # type: ignore[attr-defined]

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(Serve, "127.0.0.1", 0, ssl=self.context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()


def server_side(certs: Certs, *hosts: str, client_ca: bool = False) -> ssl.SSLContext:
    cert, key = certs.issue("upstream", *(hosts or ("localhost", "127.0.0.1")))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    if client_ca:
        context.load_verify_locations(cafile=str(certs.ca_file()))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def upstream_side(config: SidecarConfig) -> tuple[UpstreamTls, SidecarMetrics]:
    metrics = SidecarMetrics()
    context = upstream_context(config)
    assert context is not None
    assert config.upstream.tls is not None
    return UpstreamTls(context, config.upstream.tls, metrics), metrics


async def connect(tls: UpstreamTls, port: int, host: str = "127.0.0.1") -> asyncio.BaseTransport:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(
        asyncio.Protocol, host, port, ssl=tls.context, server_hostname=tls.server_hostname(host)
    )
    return transport


def test_upstream_connections_verify_the_address_host_or_server_name(
    loop: asyncio.AbstractEventLoop, certs: Certs, tmp_path: Path
) -> None:
    certs.ca_file()
    by_address = config_of(tmp_path, {"upstream": {"tls": {"ca": "ca.crt"}}})
    by_name = config_of(
        tmp_path, {"upstream": {"tls": {"ca": "ca.crt", "server_name": "up.internal"}}}
    )

    async def scenario() -> None:
        async with TlsEchoServer(server_side(certs, "127.0.0.1", "up.internal")) as upstream:
            tls, metrics = upstream_side(by_address)
            assert tls.server_hostname("127.0.0.1") == "127.0.0.1"
            (await connect(tls, upstream.port)).close()
            tls, metrics = upstream_side(by_name)
            (await connect(tls, upstream.port)).close()
            assert upstream.names[-1] == "up.internal", "the server name is sent as SNI"
            assert set(errors(metrics, "upstream").values()) == {0.0}

    run(loop, scenario)


@pytest.mark.parametrize("case", ["unknown_ca", "bad_certificate", "plaintext_upstream"])
def test_failed_upstream_handshakes_are_counted_and_raise_an_oserror(
    loop: asyncio.AbstractEventLoop, certs: Certs, tmp_path: Path, stranger: Certs, case: str
) -> None:
    certs.ca_file()
    config = config_of(tmp_path, {"upstream": {"tls": {"ca": "ca.crt"}}})

    async def plaintext_server() -> asyncio.Server:
        class Closes(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.t = transport

            def data_received(self, data: bytes) -> None:
                self.t.close()  # a Thrift server reading a ClientHello as a frame

        return await asyncio.get_running_loop().create_server(Closes, "127.0.0.1", 0)

    async def scenario() -> None:
        tls, metrics = upstream_side(config)
        if case == "plaintext_upstream":
            server = await plaintext_server()
            port = server.sockets[0].getsockname()[1]
        else:
            wrong = server_side(stranger if case == "unknown_ca" else certs, "elsewhere.example")
            echo_server = TlsEchoServer(wrong)
            await echo_server.__aenter__()
            port = echo_server.port
        with pytest.raises(OSError) as info:  # noqa: PT011 (what UpstreamPool._connect catches)
            await connect(tls, port)
        expected = "other" if case == "plaintext_upstream" else case
        assert tls.handshake_failed(info.value, f"127.0.0.1:{port}") == expected
        assert errors(metrics, "upstream")[expected] == 1
        if case == "plaintext_upstream":
            server.close()
        else:
            await echo_server.__aexit__()

    run(loop, scenario)


def test_refused_connections_are_not_handshake_failures(
    loop: asyncio.AbstractEventLoop, certs: Certs, tmp_path: Path
) -> None:
    certs.ca_file()
    tls, metrics = upstream_side(config_of(tmp_path, {"upstream": {"tls": {"ca": "ca.crt"}}}))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: refused

    async def scenario() -> None:
        with pytest.raises(ConnectionRefusedError) as info:
            await connect(tls, port)
        assert tls.handshake_failed(info.value, f"127.0.0.1:{port}") is None

    run(loop, scenario)
    assert set(errors(metrics, "upstream").values()) == {0.0}


def test_verify_false_accepts_any_certificate(
    loop: asyncio.AbstractEventLoop, certs: Certs, tmp_path: Path, stranger: Certs
) -> None:
    tls, _ = upstream_side(config_of(tmp_path, {"upstream": {"tls": {"verify": False}}}))

    async def scenario() -> None:
        async with TlsEchoServer(server_side(stranger, "elsewhere.example")) as upstream:
            (await connect(tls, upstream.port)).close()

    run(loop, scenario)


def test_client_certificate_to_an_mtls_upstream_and_its_reload(
    loop: asyncio.AbstractEventLoop, certs: Certs, tmp_path: Path
) -> None:
    certs.ca_file()
    certs.issue("client", "sidecar-a")
    config = config_of(
        tmp_path,
        {"upstream": {"tls": {"ca": "ca.crt", "cert": "client.crt", "key": "client.key"}}},
    )

    async def scenario() -> None:
        tls, _ = upstream_side(config)
        async with TlsEchoServer(server_side(certs, client_ca=True)) as upstream:
            first = await connect(tls, upstream.port)
            certs.issue("client", "sidecar-b")
            reload_certificates(config, None, tls)
            second = await connect(tls, upstream.port)
            await until(lambda: len(upstream.peers) == 2)
            names = [dict(x[0] for x in p["subject"]).get("commonName") for p in upstream.peers]  # type: ignore[index]
            sans = [p["subjectAltName"] for p in upstream.peers]  # type: ignore[index]
            assert sans == [(("DNS", "sidecar-a"),), (("DNS", "sidecar-b"),)], names
            assert not first.is_closing(), "the connection made before the reload stays open"
            first.close()
            second.close()

    run(loop, scenario)


def test_tls13_mtls_upstream_rejects_a_missing_certificate_after_the_handshake(
    loop: asyncio.AbstractEventLoop, certs: Certs, tmp_path: Path
) -> None:
    """With TLS 1.3 the client's handshake ends before the server checks its certificate.

    So an upstream (here OpenSSL through Python's blocking ``ssl``, which sends
    its alert) that requires a client certificate the sidecar does not send
    is seen at the first read, as an SSLError in ``connection_lost``, not by
    ``create_connection``; its reason is still ``no_client_certificate``.
    """
    certs.ca_file()
    tls, metrics = upstream_side(config_of(tmp_path, {"upstream": {"tls": {"ca": "ca.crt"}}}))
    context = server_side(certs, client_ca=True)
    listener = socket.create_server(("127.0.0.1", 0))
    refused: list[str] = []

    def serve_one() -> None:
        conn, _ = listener.accept()
        try:
            context.wrap_socket(conn.dup(), server_side=True).close()
        except ssl.SSLError as exc:
            refused.append(str(exc.reason))
            # Read to the client's close: closing with its call unread would send a
            # reset that can overtake the alert.
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                while conn.recv(4096):
                    pass
        finally:
            conn.close()

    thread = threading.Thread(target=serve_one, daemon=True)
    thread.start()

    async def scenario() -> None:
        lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

        class Client(asyncio.Protocol):
            def connection_lost(self, exc: Exception | None) -> None:
                lost.set_result(exc)

        transport, _ = await asyncio.get_running_loop().create_connection(
            Client,
            "127.0.0.1",
            listener.getsockname()[1],
            ssl=tls.context,
            server_hostname=tls.server_hostname("127.0.0.1"),
        )
        transport.write(b"call")  # the handshake succeeded: the call would be written
        exc = await asyncio.wait_for(lost, 5)
        assert isinstance(exc, ssl.SSLError)
        assert tls.handshake_failed(exc, "upstream") == "no_client_certificate"
        assert errors(metrics, "upstream")["no_client_certificate"] == 1

    try:
        run(loop, scenario)
    finally:
        thread.join(5)
        listener.close()
    assert refused == ["PEER_DID_NOT_RETURN_A_CERTIFICATE"]


# the sidecar process: TLS client -> sidecar -> TLS upstream


class TlsUpstream(Thriftpy2Server):
    """The Interop service (thriftpy2, framed) behind TLS."""

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__("framed")
        self.context = context
        self.handshake_errors: list[str] = []

    def _serve_connection(self, sock: socket.socket) -> None:
        # A duplicate, so that the server's shutdown of ``sock`` still ends the TLS reads.
        try:
            secure = self.context.wrap_socket(sock.dup(), server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self.handshake_errors.append(type(exc).__name__)
            return
        with secure:
            super()._serve_connection(secure)


@contextlib.contextmanager
def tls_client(port: int, context: ssl.SSLContext) -> Iterator[Any]:
    """A thriftpy2 Interop client over TLS (framed, binary)."""
    sock = thriftpy2.transport.TSSLSocket(
        "127.0.0.1", port, ssl_context=context, socket_timeout=10_000, connect_timeout=10_000
    )
    trans = thriftpy2.transport.TCyFramedTransport(sock)
    proto = thriftpy2.protocol.TCyBinaryProtocolFactory().get_protocol(trans)
    trans.open()
    client = thriftpy2.thrift.TClient(load_thriftpy2_interop().Interop, proto)
    client.tls_socket = sock  # type: ignore[attr-defined]  # for `served_certificate`
    try:
        yield client
    finally:
        trans.close()


def served_certificate(client: Any) -> bytes:
    """The certificate (DER) the sidecar presented to a `tls_client`."""
    der: bytes = client.tls_socket.sock.getpeercert(binary_form=True)
    return der


def handshake_errors(sc: Any, side: str) -> dict[str, float]:
    metrics = sc.metrics()
    return {
        r: metrics.value("thrift_sidecar_tls_handshake_errors_total", side=side, reason=r)
        for r in REASONS
    }


@pytest.fixture
def pki(tmp_path: Path) -> Certs:
    certs = Certs(tmp_path)
    certs.ca_file()
    certs.issue("sidecar", "localhost", "127.0.0.1")
    certs.issue("client", "a-client")
    certs.issue("sidecar-client", "the-sidecar")
    return certs


def sidecar_tls(pki: Certs, **server: Any) -> dict[str, Any]:
    root = pki.root
    return {
        "tls": {"cert": str(root / "sidecar.crt"), "key": str(root / "sidecar.key"), **server},
        "upstream": {
            "tls": {
                "ca": str(root / "ca.crt"),
                "cert": str(root / "sidecar-client.crt"),
                "key": str(root / "sidecar-client.key"),
            }
        },
        "retry": {"max_attempts": 2, "per_try_timeout": "2s", "deadline": "5s"},
    }


@contextlib.contextmanager
def tls_sidecar(
    pki: Certs, upstream_tls: ssl.SSLContext | None = None, **server: Any
) -> Iterator[tuple[TlsUpstream, Any, int]]:
    """A `TlsUpstream` (by default one that requires the sidecar's client certificate) and
    the sidecar process in front of it (`sidecar_tls`); yields both and the sidecar's port."""
    context = server_side(pki, client_ca=True) if upstream_tls is None else upstream_tls
    with (
        TlsUpstream(context) as upstream,
        run_sidecar([upstream.address], config=sidecar_tls(pki, **server)) as sc,
    ):
        yield upstream, sc, int(sc.address.rsplit(":", 1)[1])


def test_tls_client_through_the_sidecar_to_a_tls_upstream_with_mtls(pki: Certs) -> None:
    with tls_sidecar(pki, client_ca=str(pki.root / "ca.crt")) as (upstream, sc, port):
        with tls_client(
            port, client_context(pki, (pki.root / "client.crt", pki.root / "client.key"))
        ) as c:
            assert c.getItem(7).id == 7
            assert c.getItem(8).id == 8
        assert upstream.calls["getItem"] == 2
        assert upstream.handshake_errors == []  # type: ignore[attr-defined]
        # Without a client certificate: refused, logged, counted.
        with (
            pytest.raises(thriftpy2.transport.TTransportException),
            tls_client(port, client_context(pki)) as c,
        ):
            c.getItem(9)
        wait_until(lambda: handshake_errors(sc, "client")["no_client_certificate"] == 1)
        assert "TLS handshake with client 127.0.0.1:" in sc.log()
        assert upstream.calls["getItem"] == 2


def test_plaintext_client_on_the_tls_port_is_closed_and_counted(pki: Certs) -> None:
    with tls_sidecar(pki) as (_, sc, port):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(THRIFT_CALL)
            assert sock.recv(100) == b""
        wait_until(lambda: handshake_errors(sc, "client")["plaintext"] == 1)
        assert "failed (plaintext)" in sc.log()


def test_failed_upstream_handshake_is_a_retried_connect_error(pki: Certs, stranger: Certs) -> None:
    with tls_sidecar(pki, server_side(stranger, "127.0.0.1")) as (upstream, sc, port):
        with (
            tls_client(port, client_context(pki)) as c,
            pytest.raises(thriftpy2.thrift.TApplicationException),
        ):
            c.getItem(1)
        metrics = sc.metrics()
        attempts = metrics.value("thrift_sidecar_upstream_attempts_total", result="connect_error")
        assert attempts == 2, "a connect error is retried whatever the method"
        assert handshake_errors(sc, "upstream")["unknown_ca"] == 2
        assert upstream.calls["getItem"] == 0


def test_sighup_serves_a_new_certificate_to_new_connections_and_keeps_open_ones(
    pki: Certs,
) -> None:
    with tls_sidecar(pki) as (_, sc, port):
        context = client_context(pki)
        with tls_client(port, context) as old:
            assert old.getItem(1).id == 1
            first = served_certificate(old)
            pki.issue("sidecar", "localhost", "127.0.0.1")  # the same files, a new certificate
            sc.signal(signal.SIGHUP)
            wait_until(
                lambda: sc.metrics().value("thrift_sidecar_config_reloads_total", result="ok") == 1
            )
            with tls_client(port, context) as new:
                assert new.getItem(2).id == 2
                assert served_certificate(new) != first
            assert old.getItem(3).id == 3, "the connection opened before the reload still works"
            assert served_certificate(old) == first
