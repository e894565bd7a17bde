"""The whole exception tree of the sidecar.

Programmer errors use Python's builtins; these classes are for conditions a
running sidecar meets and must answer: a peer that breaks the protocol, an
upstream that fails, an open circuit, a bad config. Each carries what the
caller needs to answer the client as attributes, not in its message.
"""

from __future__ import annotations


class SidecarError(Exception):
    """Root of every error the sidecar raises on purpose."""


class ProtocolError(SidecarError):
    """Bytes that are not valid Thrift binary protocol.

    Attributes:
        kind: a short, bounded label for metrics and logs (``garbage``,
            ``oversized``, ``truncated``, ``compact``, ``too_deep``, ...).
        seqid: the sequence id of the message being read, when its envelope
            was readable; the answer to the client can then carry it.
        name: the method name of that message, when readable.
        strict: the envelope form of that message (the answer uses the same).
    """

    def __init__(
        self,
        message: str,
        *,
        kind: str = "garbage",
        seqid: int | None = None,
        name: str | None = None,
        strict: bool = True,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.seqid = seqid
        self.name = name
        self.strict = strict


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes we cannot accept."""


class UpstreamError(SidecarError):
    """A call to the upstream failed.

    Attributes:
        address: ``host:port`` of the upstream that failed.
        sent: whether any byte of the call may have reached the upstream.
            A call with ``sent=False`` provably never executed there.

    Which outcome a failure comes to is `sidecar.resilience.outcome.classify_error`.
    """

    def __init__(self, message: str, *, address: str, sent: bool) -> None:
        super().__init__(message)
        self.address = address
        self.sent = sent

    def told_as(self, upstream: str | None) -> str:
        """The message with the upstream called ``upstream`` instead of by its address.

        For error replies to clients, which should not learn the upstream's
        host and port; None keeps the address. Every message here names the
        upstream as ``upstream <address>``; any other mention of the address
        or its host (an OS error's text) is replaced too.
        """
        text = str(self)
        if upstream is None:
            return text
        host = self.address.rpartition(":")[0]
        text = text.replace(f"upstream {self.address}", upstream).replace(self.address, upstream)
        return text.replace(host, upstream) if host else text


class UpstreamUnavailable(UpstreamError):
    """No connection to the upstream could be had; nothing was sent."""

    def __init__(self, message: str, *, address: str) -> None:
        super().__init__(message, address=address, sent=False)


class UpstreamClosed(UpstreamError):
    """The upstream closed or reset the connection before the whole reply arrived."""


class UpstreamTimeout(UpstreamError):
    """The per-try timeout expired before the reply arrived."""


class UpstreamProtocolError(UpstreamError):
    """The upstream answered with bytes that are not a valid reply to the call."""


class ConfigError(SidecarError):
    """The configuration is invalid. The message names the key path and the bad value."""
