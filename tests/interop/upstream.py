"""The upstream of the interop suite: the Apache Python server in every wire form.

`tests.support.servers.ApacheServer` speaks the binary protocol, framed or
buffered, in plaintext. `WireUpstream` is the same server (same generated
processor, same `tests.support.handler`) with the wire chosen per instance:
binary or compact protocol, framed, buffered or THeader transport, TLS on or
off. A THeader upstream accepts THeader clients only, so a client that falls
back to another transport fails the direct run instead of passing unnoticed.

`make_certificates` writes a throw-away CA and a server certificate for
127.0.0.1 with the ``openssl`` command.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thrift.protocol.TBinaryProtocol import TBinaryProtocolAccelerated
from thrift.protocol.TCompactProtocol import TCompactProtocolAccelerated
from thrift.protocol.THeaderProtocol import THeaderProtocol
from thrift.transport import TSocket as ApacheTSocket
from thrift.transport import TTransport as ApacheTTransport
from thrift.transport.THeaderTransport import THeaderClientType, THeaderSubprotocolID

from tests.interop.matrix import Wire
from tests.support.servers import ApacheServer

_OPENSSL_TIMEOUT_SECONDS = 60


@dataclass(frozen=True)
class Certificates:
    """PEM files: the CA that signed the server's certificate, and the server's pair."""

    ca: Path
    cert: Path
    key: Path


def make_certificates(directory: Path) -> Certificates:
    """A CA and a server certificate for 127.0.0.1 / localhost, valid for a day."""
    certs = Certificates(directory / "ca.crt", directory / "server.crt", directory / "server.key")
    ca_key = directory / "ca.key"
    csr = directory / "server.csr"
    ext = directory / "server.ext"
    ext.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "basicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
    )
    steps = [
        [
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            ca_key,
            "-out",
            certs.ca,
            "-days",
            "1",
            "-subj",
            "/CN=thrift-sidecar interop test CA",
        ],
        [
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            certs.key,
            "-out",
            csr,
            "-subj",
            "/CN=127.0.0.1",
        ],
        [
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            certs.ca,
            "-CAkey",
            ca_key,
            "-CAcreateserial",
            "-out",
            certs.cert,
            "-days",
            "1",
            "-extfile",
            ext,
        ],
    ]
    for step in steps:
        subprocess.run(
            ["openssl", *map(str, step)],
            check=True,
            capture_output=True,
            timeout=_OPENSSL_TIMEOUT_SECONDS,
        )
    return certs


class WireUpstream(ApacheServer):
    """`ApacheServer` speaking ``wire`` (protocol, transport, TLS).

    Args:
        wire: what goes over the connection.
        certificates: the server's certificate and key; required when
            ``wire.tls``.
    """

    def __init__(self, wire: Wire, certificates: Certificates | None = None) -> None:
        # The base class knows framed and buffered; THeader frames itself.
        super().__init__("buffered" if wire.transport == "header" else wire.transport)
        if wire.tls and certificates is None:
            raise ValueError("a TLS upstream needs certificates")
        self.wire = wire
        self._tls: ssl.SSLContext | None = None
        if wire.tls and certificates is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(certificates.cert, certificates.key)
            self._tls = context

    def _serve_connection(self, sock: socket.socket) -> None:
        if self._tls is None:
            self._serve(sock)
            return
        # wrap_socket detaches the socket it wraps: wrap a duplicate, so that the
        # base class can still shut the connection down (stop() wakes this thread).
        tls_sock = self._tls.wrap_socket(sock.dup(), server_side=True)
        try:
            self._serve(tls_sock)
        finally:
            tls_sock.close()

    def _serve(self, sock: socket.socket) -> None:
        tsock = ApacheTSocket.TSocket()
        tsock.setHandle(sock)
        proto = self._protocol(tsock)
        processor = self._processor
        closing = self._closing
        while not closing.is_set():
            processor.process(proto, proto)

    def _protocol(self, tsock: Any) -> Any:
        wire = self.wire
        if wire.transport == "header":
            default = (
                THeaderSubprotocolID.COMPACT
                if wire.protocol == "compact"
                else THeaderSubprotocolID.BINARY
            )
            return THeaderProtocol(tsock, [THeaderClientType.HEADERS], default)
        if wire.transport == "framed":
            trans = ApacheTTransport.TFramedTransport(tsock)
        else:
            trans = ApacheTTransport.TBufferedTransport(tsock)
        if wire.protocol == "compact":
            return TCompactProtocolAccelerated(trans)
        return TBinaryProtocolAccelerated(trans, strictRead=False)

    def __repr__(self) -> str:
        port = self._port or "-"
        return f"<WireUpstream 127.0.0.1:{port} {self.wire}>"
