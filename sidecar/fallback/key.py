"""The fallback cache's key of a call: its method name and a hash of its argument bytes.

Made on every call of a cacheable method, so it is compiled with the per-call
modules (sidecar/native.py); the stores (store.py) take it as text.
"""

from __future__ import annotations

import xxhash

from sidecar.protocol.envelope import shown_name


def cache_key(name: str, args: bytes | bytearray | memoryview) -> str:
    """The key of a call: its full method name and the xxh3-128 of its argument bytes.

    Unseeded, so a key is the same in every process and after a restart (the
    SQLite file and a fleet's Redis hold keys made elsewhere). Not collision
    resistant: a stored reply is served only when `CachedReply.answers` the call.

    A key is text every backend can store (SQLite, Redis and the workers' wire
    take UTF-8). A name that was not UTF-8 on the wire goes in as `shown_name`
    writes it, and the key ends in ``|raw``: no two such names share a key, and
    none shares one with a UTF-8 name (whose keys end in the hash).
    """
    if name.isascii():  # the usual name: one flag read more than the plain f-string
        return f"{name}|{xxhash.xxh3_128_hexdigest(args)}"
    digest = xxhash.xxh3_128_hexdigest(args)
    shown = shown_name(name)
    return f"{name}|{digest}" if shown is name else f"{shown}|{digest}|raw"
