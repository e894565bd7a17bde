"""The supervisor's end of the shared fallback store: the configured store served on a Unix socket.

`StoreHost` listens on a socket file (mode 0600, removed on close) and serves
any number of `sidecar.fallback.shared.SharedStore` connections: puts go to
``store.put`` in the order they arrive, gets are answered from
``await store.get`` (each in a task of its own, at most `MAX_GETS` at once
per connection), stats from ``store.stats()``, and a flush once earlier puts
are applied and ``await store.flush()`` has returned. A frame that breaks the
wire format (`sidecar.fallback.shared_wire`) closes its connection only. The host
never closes the store: its owner does. Why: docs/fallback-stores.md
("Shared by workers").
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import time

from sidecar.fallback.shared_wire import (
    FLUSH,
    GET,
    HEADER,
    MAX_KEY_BYTES,
    PUT,
    PUT_HEAD,
    READ_WHOLE_BYTES,
    REPLY_HEAD,
    STATS,
    WireError,
    read_header,
    stats_body,
)
from sidecar.fallback.store import CachedReply, FallbackStore

log = logging.getLogger("sidecar.fallback")

# Gets of one connection being answered at once; more are answered "none" at
# once (the worker bounds its own at `shared.MAX_PENDING_READS`, the same figure).
MAX_GETS = 1000
# Bytes of answers a connection may leave unread before it is closed (a worker
# that does not read is stuck; its answers would pile up here).
MAX_UNREAD_BYTES = 64 << 20
# Seconds `close` waits for the connections to end, then for the server.
CLOSE_TIMEOUT = 5.0
# Least seconds between two warnings about bad frames.
WARNING_INTERVAL = 60.0


class StoreHost:
    """Serves ``store`` to the workers on the Unix socket at ``path``.

    Args:
        store: the configured store; used, never closed, by the host.
        path: the socket file to create (an existing socket file no one
            listens on is replaced).
    """

    def __init__(self, store: FallbackStore, path: str | os.PathLike[str]) -> None:
        self.store = store
        self.path = os.fspath(path)
        self._server: asyncio.Server | None = None
        self._inode: tuple[int, int] | None = None
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._last_warning = -WARNING_INTERVAL
        self.bad_frames = 0  # connections closed for a frame that broke the format
        self.served = 0  # connections accepted so far

    async def start(self) -> None:
        """Listen on ``path``.

        Raises:
            OSError: the path is taken (by a live host, or by something else
                than a socket) or cannot be created.
        """
        _remove_stale_socket(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            # Before listen(): nobody can connect while the mode is the umask's.
            os.chmod(self.path, 0o600)
            info = os.stat(self.path)
            self._inode = (info.st_dev, info.st_ino)
            self._server = await asyncio.start_unix_server(self._serve, sock=sock)
        except BaseException:
            sock.close()
            self._unlink()
            raise

    async def close(self) -> None:
        """Stop listening, close every connection, remove the socket file."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in self._connections.values():
            # abort, not close: close() would wait for unsent answers to be read,
            # which a stuck worker never does (and uvloop's wait_closed waits for it).
            writer.transport.abort()
        if self._connections:  # each ends on its own, seeing the connection lost
            await asyncio.wait(list(self._connections), timeout=CLOSE_TIMEOUT)
        for task in self._connections:
            task.cancel()
        if server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), CLOSE_TIMEOUT)
        self._unlink()

    # -- one connection --------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        self.served += 1
        answering: set[asyncio.Task[None]] = set()
        try:
            while True:
                length, op, request_id = await read_header(reader)
                if op == PUT:
                    key, reply = await _read_put(reader, length)
                    self.store.put(key, reply)
                elif op == GET:
                    if length > MAX_KEY_BYTES:
                        raise WireError(f"key of {length} bytes")
                    key = _decode(await reader.readexactly(length))
                    if len(answering) >= MAX_GETS:
                        _answer(writer, GET, request_id)
                        continue
                    answer = asyncio.get_running_loop().create_task(
                        self._get(writer, key, request_id)
                    )
                    answering.add(answer)
                    answer.add_done_callback(answering.discard)
                elif length:
                    raise WireError(f"op {op} with a body")
                elif op == STATS:
                    _answer(writer, STATS, request_id, stats_body(self.store.stats()))
                else:  # FLUSH: every earlier put of this connection has been put
                    answer = asyncio.get_running_loop().create_task(self._flush(writer, request_id))
                    answering.add(answer)
                    answer.add_done_callback(answering.discard)
                if writer.transport.get_write_buffer_size() > MAX_UNREAD_BYTES:
                    raise WireError("the worker does not read its answers")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the worker went away
        except WireError as exc:
            self.bad_frames += 1
            self._warn("fallback cache: closing a worker connection: %s", exc)
        except Exception:  # a bug: this connection ends, the host carries on
            log.exception("fallback cache: a worker connection failed")
        finally:
            del self._connections[task]
            for answer in list(answering):
                answer.cancel()
            writer.transport.abort()  # unsent answers are of no use to a worker that is gone

    async def _get(self, writer: asyncio.StreamWriter, key: str, request_id: int) -> None:
        try:
            reply = await self.store.get(key)
        except Exception:  # a store's bug: this get is a miss, the host carries on
            log.exception("fallback cache: the store failed a get")
            reply = None
        if reply is None:
            _answer(writer, GET, request_id)
            return
        head = REPLY_HEAD.pack(
            reply.seqid_offset, reply.stored_at, len(reply.message), len(reply.args)
        )
        _answer(writer, GET, request_id, head, reply.message, reply.args)

    async def _flush(self, writer: asyncio.StreamWriter, request_id: int) -> None:
        await self.store.flush()
        _answer(writer, FLUSH, request_id, stats_body(self.store.stats()))

    def _warn(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last_warning >= WARNING_INTERVAL:
            self._last_warning = now
            log.warning(message, *args)

    def _unlink(self) -> None:
        """Remove the socket file if it is still the one this host made."""
        inode, self._inode = self._inode, None
        if inode is None:
            return
        with contextlib.suppress(OSError):
            info = os.stat(self.path)
            if (info.st_dev, info.st_ino) == inode:
                os.unlink(self.path)


def _answer(writer: asyncio.StreamWriter, op: int, request_id: int, *pieces: bytes) -> None:
    """Write one answer frame, unless the connection is gone.

    One ``writelines``: one system call (uvloop writes the pieces with one
    ``writev``, without copying a message; asyncio's loop joins them first).
    """
    if writer.is_closing():
        return
    head = HEADER.pack(sum(map(len, pieces)), op, request_id)
    if len(pieces) == 1 and len(pieces[0]) <= 256:
        writer.write(head + pieces[0])
    else:
        writer.writelines((head, *pieces))


async def _read_put(reader: asyncio.StreamReader, length: int) -> tuple[str, CachedReply]:
    """A PUT body of ``length`` bytes: read whole when small, else field by field."""
    if length < PUT_HEAD.size:
        raise WireError("short put")
    if length <= READ_WHOLE_BYTES:
        body = await reader.readexactly(length)
        key_len, offset, stored_at, message_len, args_len = PUT_HEAD.unpack_from(body)
        if PUT_HEAD.size + key_len + message_len + args_len != length:
            raise WireError("put fields do not add up to the frame")
        end_key = PUT_HEAD.size + key_len
        end_message = end_key + message_len
        key = _decode(body[PUT_HEAD.size : end_key])
        return key, CachedReply(body[end_key:end_message], offset, stored_at, body[end_message:])
    key_len, offset, stored_at, message_len, args_len = PUT_HEAD.unpack(
        await reader.readexactly(PUT_HEAD.size)
    )
    if PUT_HEAD.size + key_len + message_len + args_len != length:
        raise WireError("put fields do not add up to the frame")
    key = _decode(await reader.readexactly(key_len))
    message = await reader.readexactly(message_len)
    args = await reader.readexactly(args_len) if args_len else b""
    return key, CachedReply(message, offset, stored_at, args)


def _decode(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        raise WireError("a key that is not UTF-8") from exc


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a host that is gone; leave anything else.

    Raises:
        OSError: a host answers on it (``EADDRINUSE``).
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        return  # bind() reports it
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens
    else:
        raise OSError(errno.EADDRINUSE, f"a store host already listens on {path}")
    finally:
        probe.close()
