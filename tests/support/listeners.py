"""Listeners that misbehave at the TCP level, for tests of what a connect does."""

from __future__ import annotations

import socket
from typing import Self


class NotAccepting:
    """A listener on ``port`` whose accept queue is full: connecting to it hangs.

    Nothing accepts, and one connection fills a queue of length 0; the kernel
    then drops each new SYN, so a client's connect stays pending (it retries,
    and is dropped again) until it gives up. An upstream that accepts slowly.
    """

    def __init__(self, port: int) -> None:
        self.address = f"127.0.0.1:{port}"
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen(0)
        self._filler = socket.create_connection(("127.0.0.1", port), timeout=5)
        # The queue is full once a connect no longer completes.
        probe = socket.socket()
        probe.settimeout(0.3)
        try:
            probe.connect(("127.0.0.1", port))
        except TimeoutError:
            pass
        else:
            self.close()
            raise RuntimeError(f"127.0.0.1:{port} still accepts connections")
        finally:
            probe.close()

    def close(self) -> None:
        self._filler.close()
        self._listener.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
