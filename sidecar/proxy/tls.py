"""TLS on both sides: SSL contexts from the config, handshakes counted, certificates reloaded.

- The listener: `ClientTls.listen` accepts connections itself and runs each
  handshake with ``loop.connect_accepted_socket(ssl=...)``; the client
  connection's protocol is made and connected only when it succeeded. A
  listener made by ``create_server(ssl=...)`` would drop a failed handshake
  unseen (asyncio and uvloop treat it as an OSError: at most a debug line,
  no callback), so this is where it is seen, logged (rate-limited) and counted.
- The upstream: `UpstreamTls.context` and `UpstreamTls.server_hostname` are
  ``ssl=`` and ``server_hostname=`` of ``loop.create_connection``; a failed handshake
  raises `ssl.SSLError` (or `ConnectionResetError` when the upstream closes
  during it), which the pool turns into a connect error after
  `UpstreamTls.handshake_failed` has counted it.
- `reload_certificates` (SIGHUP) builds new contexts from the files and swaps
  them in: new connections use them, open ones keep the one they started with.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable

from sidecar.config import ServerTlsConfig, SidecarConfig, UpstreamTlsConfig
from sidecar.errors import ConfigError
from sidecar.logs import RateLimitedLog
from sidecar.metrics import SidecarMetrics
from sidecar.proxy.bind import bind_address

log = logging.getLogger("sidecar.tls")

# Time a client has to finish its handshake (a task and a socket are held meanwhile).
HANDSHAKE_TIMEOUT = 10.0
# Wait after an accept that failed for want of resources (asyncio waits as long).
ACCEPT_RETRY_DELAY = 1.0

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}

# OpenSSL reason codes (upper case, as in ssl.SSLError.reason) -> the metric's reason.
_REASONS: dict[str, str] = {
    "WRONG_VERSION_NUMBER": "plaintext",
    "HTTP_REQUEST": "plaintext",
    "HTTPS_PROXY_REQUEST": "plaintext",
    "UNKNOWN_PROTOCOL": "plaintext",
    "PACKET_LENGTH_TOO_LONG": "plaintext",
    "RECORD_LAYER_FAILURE": "plaintext",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no_client_certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "no_client_certificate",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "other",
    "SSLV3_ALERT_BAD_CERTIFICATE": "bad_certificate",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "bad_certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "bad_certificate",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "bad_certificate",
    "TLSV1_ALERT_DECRYPT_ERROR": "bad_certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "unknown_ca",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "expired",
    "UNSUPPORTED_PROTOCOL": "version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "version",
    "NO_PROTOCOLS_AVAILABLE": "version",
    "NO_SHARED_CIPHER": "version",
    "VERSION_TOO_LOW": "version",
    "WRONG_SSL_VERSION": "version",
}
# X509_V_ERR_* codes of a certificate that failed verification here.
_VERIFY_CODES: dict[int, str] = {
    2: "unknown_ca",  # unable to get issuer certificate
    9: "expired",  # not yet valid
    10: "expired",  # has expired
    18: "unknown_ca",  # self-signed leaf
    19: "unknown_ca",  # self-signed certificate in chain
    20: "unknown_ca",  # unable to get local issuer certificate
    21: "unknown_ca",  # unable to verify the first certificate
}


def handshake_reason(exc: BaseException) -> str:
    """The metric's ``reason`` for a failed handshake (one of TLS_HANDSHAKE_REASONS)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_CODES.get(exc.verify_code, "bad_certificate")
    if isinstance(exc, ssl.SSLError):
        return _REASONS.get(str(exc.reason or "").upper(), "other")
    return "other"


def server_context(config: SidecarConfig) -> ssl.SSLContext | None:
    """The listener's context (None: plaintext).

    Raises:
        ConfigError: a file cannot be used (checked at load; read again here).
    """
    section = config.tls
    return None if section is None else _server_context(section)


def _server_context(section: ServerTlsConfig) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[section.min_version]
    _load(context, "tls", section.cert, section.key)
    if section.client_ca is not None:
        _trust(context, "tls.client_ca", section.client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def upstream_context(config: SidecarConfig) -> ssl.SSLContext | None:
    """The context of the connections to the upstream (None: plaintext).

    Raises:
        ConfigError: a file cannot be used.
    """
    section = config.upstream.tls
    return None if section is None else _upstream_context(section)


def _upstream_context(section: UpstreamTlsConfig) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if section.ca is not None:
        _trust(context, "upstream.tls.ca", section.ca)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if not section.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if section.cert is not None and section.key is not None:
        _load(context, "upstream.tls", section.cert, section.key)
    return context


def server_hostname(section: UpstreamTlsConfig, host: str) -> str:
    """The name sent as SNI and verified for an upstream address on ``host``."""
    return section.server_name or host


def _load(context: ssl.SSLContext, at: str, cert: str, key: str) -> None:
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{at}.key: cannot use {cert} with {key}: {exc}") from None


def _trust(context: ssl.SSLContext, key: str, cafile: str) -> None:
    try:
        context.load_verify_locations(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{key}: cannot use {cafile}: {exc}") from None


class _Side:
    """What both sides share: the current context, the counter, the rate-limited log."""

    side = ""

    def __init__(self, context: ssl.SSLContext, metrics: SidecarMetrics) -> None:
        self.context = context
        self._metrics = metrics
        self._log = RateLimitedLog(log, what=f"{self.side} TLS handshake lines")
        metrics.init_tls(self.side)

    def count(self, exc: BaseException, peer: str) -> str:
        """Count and log one failed handshake; returns its reason."""
        reason = handshake_reason(exc)
        self._metrics.tls_handshake_errors.labels(self.side, reason).inc()
        self._log.warning(
            "TLS handshake with %s %s failed (%s): %s",
            self.side,
            peer,
            reason,
            _describe(exc),
            extra={"peer": peer, "side": self.side, "reason": reason},
        )
        return reason

    def flush(self) -> None:
        """Write the summary of suppressed lines now (at shutdown)."""
        self._log.flush()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc).lower().replace("_", " ")
    return str(exc) or type(exc).__name__


class ClientTls(_Side):
    """TLS on the listener: `listen` accepts, shakes hands, then hands over.

    Args:
        context: from `server_context`.
        metrics: where failed handshakes are counted.
        loop: the server's loop.
        max_handshakes: handshakes in progress at once; further connections
            wait in the kernel's backlog (a handshake holds a task until it ends).
        timeout: seconds a client has to complete its handshake.
    """

    side = "client"

    def __init__(
        self,
        context: ssl.SSLContext,
        metrics: SidecarMetrics,
        loop: asyncio.AbstractEventLoop,
        *,
        max_handshakes: int = 1024,
        timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        super().__init__(context, metrics)
        self.loop = loop
        self.timeout = timeout
        self.handshakes: set[asyncio.Task[None]] = set()
        self._room = asyncio.Semaphore(max_handshakes)
        self._accept_log = RateLimitedLog(log, what="accept error lines")

    async def listen(
        self,
        protocol_factory: Callable[[], asyncio.Protocol],
        host: str,
        port: int,
        *,
        backlog: int = 1024,
        reuse_port: bool = False,
    ) -> TlsListener:
        """Listen on ``host:port``; each connection's protocol is made after its handshake.

        ``reuse_port``: share the port with other processes' listeners (SO_REUSEPORT).

        Raises:
            OSError: the address cannot be bound.
        """
        sock = bind_address(host, port, reuse_port=reuse_port)
        try:
            sock.listen(backlog)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return TlsListener(self, protocol_factory, sock)

    async def handshake(
        self, conn: socket.socket, protocol_factory: Callable[[], asyncio.Protocol]
    ) -> None:
        """One accepted connection: the protocol gets it after a good handshake, else it is
        closed, logged and counted."""
        peer = _peer_of(conn)
        # From here the loop owns ``conn``: it closes it when the handshake fails.
        try:
            await self.loop.connect_accepted_socket(
                protocol_factory, conn, ssl=self.context, ssl_handshake_timeout=self.timeout
            )
        except ConnectionResetError as exc:
            # Closed before or during the handshake without a TLS error: a TCP health
            # check, or a client that gave up. Nothing is wrong with TLS.
            log.debug("client %s closed during the TLS handshake: %s", peer, exc)
        except Exception as exc:  # ssl.SSLError, the handshake timeout
            self.count(exc, peer)
        finally:
            self._room.release()

    def close(self) -> None:
        """Stop the handshakes in progress (their connections close)."""
        for task in list(self.handshakes):
            task.cancel()
        self.flush()
        self._accept_log.flush()


class TlsListener:
    """A listening socket whose connections reach their protocol only after a TLS handshake.

    asyncio and uvloop, given ``ssl=`` by ``create_server``, drop a failed
    handshake without telling anyone; accepting here and calling
    ``loop.connect_accepted_socket(ssl=...)`` per connection raises it where
    it can be counted. Has what `sidecar.proxy.server.Server` uses of an
    `asyncio.Server`: ``sockets``, ``close``, ``wait_closed``.
    """

    def __init__(
        self,
        tls: ClientTls,
        protocol_factory: Callable[[], asyncio.Protocol],
        sock: socket.socket,
    ) -> None:
        self._tls = tls
        self._factory = protocol_factory
        self.sockets = [sock]
        self._task = tls.loop.create_task(self._accept_loop(sock))

    async def _accept_loop(self, sock: socket.socket) -> None:
        tls = self._tls
        loop = tls.loop
        while True:
            await tls._room.acquire()  # released when the handshake ends
            try:
                conn, _ = await loop.sock_accept(sock)
            except (ConnectionAbortedError, InterruptedError, BlockingIOError):
                tls._room.release()
                continue
            except OSError as exc:  # out of file descriptors, buffers: wait, as asyncio does
                tls._room.release()
                tls._accept_log.warning("accepting a client connection failed: %s", exc)
                await asyncio.sleep(ACCEPT_RETRY_DELAY)
                continue
            except BaseException:
                tls._room.release()
                raise
            task = loop.create_task(tls.handshake(conn, self._factory))
            tls.handshakes.add(task)
            task.add_done_callback(tls.handshakes.discard)

    def close(self) -> None:
        """Stop accepting; handshakes in progress go on (see `ClientTls.close`)."""
        self._task.cancel()
        for sock in self.sockets:
            sock.close()

    async def wait_closed(self) -> None:
        await asyncio.gather(self._task, return_exceptions=True)


def _peer_of(conn: socket.socket) -> str:
    try:
        peer = conn.getpeername()
    except OSError:
        return "?"
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "?"


class UpstreamTls(_Side):
    """TLS on the connections to the upstream.

    Args:
        context: from `upstream_context`.
        section: the ``upstream.tls`` section (for ``server_name``).
        metrics: where failed handshakes are counted.
    """

    side = "upstream"

    def __init__(
        self, context: ssl.SSLContext, section: UpstreamTlsConfig, metrics: SidecarMetrics
    ) -> None:
        super().__init__(context, metrics)
        self.section = section

    def server_hostname(self, host: str) -> str:
        """``server_hostname=`` for ``loop.create_connection`` to an address on ``host``."""
        return server_hostname(self.section, host)

    def handshake_failed(self, exc: BaseException, address: str) -> str | None:
        """Count and log ``exc`` when it is a failed handshake; its reason, or None.

        ``exc`` is what ``create_connection`` raised with this side's context:
        `ssl.SSLError` is a handshake failure; so is `ConnectionResetError`
        (the upstream closed during the handshake: often an upstream that does
        not speak TLS). Refused, unreachable and timeouts are not.
        """
        if isinstance(exc, ssl.SSLError | ConnectionResetError | ConnectionAbortedError):
            return self.count(exc, address)
        return None


def reload_certificates(
    config: SidecarConfig, client: ClientTls | None, upstream: UpstreamTls | None
) -> None:
    """Read the certificates, keys and CAs again (SIGHUP), for new connections.

    Both new contexts are built before either is swapped in, so a file that
    cannot be used changes nothing.

    Raises:
        ConfigError: a file cannot be used; the running contexts stay.
    """
    new_client = _server_context(config.tls) if client and config.tls else None
    section = config.upstream.tls
    new_upstream = _upstream_context(section) if upstream and section else None
    if client is not None and new_client is not None:
        client.context = new_client
    if upstream is not None and new_upstream is not None and section is not None:
        upstream.context = new_upstream
        upstream.section = section
