"""Binding a TCP address for listening: `bind_address`, shared by the TLS
listener and the supervisor of ``workers: N`` (which binds without listening)."""

from __future__ import annotations

import socket


def bind_address(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A stream socket bound to ``host:port`` (port 0: any free one), with
    SO_REUSEADDR, and SO_REUSEPORT when ``reuse_port``; not listening yet.

    Raises:
        OSError: the address cannot be bound; the socket is closed.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock
