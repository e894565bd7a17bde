"""Which modules a compiled build compiles, and whether this process runs them compiled.

A compiled build (``THRIFT_SIDECAR_COMPILE=1``, see setup.py) turns the modules in
`COMPILED` into C extensions with mypyc; every other module, and every
module of a default install, stays Python. The source is the same either
way, and CI runs the whole test suite against both builds. Why these
modules and not others: docs/compiled.md.

This module imports nothing of the sidecar's, so that setup.py can read the
list without importing the package.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util

# The per-call path: the wire (protocol), the decisions (resilience), the
# call itself (proxy) and what it records (metrics, fallback). Not here:
# sidecar.errors (an interpreted class may not subclass a compiled one unless
# it allows it, as `ProxiedCall` does, and errors are subclassed outside the
# hot path), sidecar.fallback.store (the Redis store's near cache subclasses
# its MemoryStore), sidecar.proxy.server
# (it reads uvloop's server sockets, a list where typeshed says tuple, which
# mypyc checks at run time), and everything that runs once per start,
# reload or scrape.
COMPILED: tuple[str, ...] = (
    "sidecar.protocol.appexc",
    "sidecar.protocol.auto",
    "sidecar.protocol.compact",
    "sidecar.protocol.compact_skip",
    "sidecar.protocol.decoders",
    "sidecar.protocol.detect",
    "sidecar.protocol.envelope",
    "sidecar.protocol.fields",
    "sidecar.protocol.framing",
    "sidecar.protocol.message",
    "sidecar.protocol.skip",
    "sidecar.protocol.theader",
    "sidecar.protocol.theader_decoder",
    "sidecar.protocol.tjson",
    "sidecar.protocol.transcode",
    "sidecar.protocol.transcode_read",
    "sidecar.protocol.validate",
    "sidecar.resilience.backoff",
    "sidecar.resilience.breaker",
    "sidecar.resilience.breakers",
    "sidecar.resilience.budget",
    "sidecar.resilience.ejection",
    "sidecar.resilience.gradient",
    "sidecar.resilience.health",
    "sidecar.resilience.latency",
    "sidecar.resilience.limits",
    "sidecar.resilience.outcome",
    "sidecar.resilience.retry",
    "sidecar.resilience.window",
    "sidecar.metrics.calls",
    "sidecar.metrics.labels",
    "sidecar.metrics.registry",
    "sidecar.proxy.balancer",
    "sidecar.proxy.call",
    "sidecar.proxy.client",
    "sidecar.proxy.context",
    "sidecar.proxy.forward",
    "sidecar.proxy.hedge",
    "sidecar.proxy.hedger",
    "sidecar.proxy.oneway",
    "sidecar.proxy.policy",
    "sidecar.proxy.timeouts",
    "sidecar.proxy.translate",
    "sidecar.proxy.upstream",
    "sidecar.fallback.key",
    "sidecar.fallback.service",
    "sidecar.fallback.idl",
    "sidecar.fallback.idl_values",
    "sidecar.fallback.static",
)


def compiled_modules() -> list[str]:
    """The modules of `COMPILED` this process loads from an extension, in its order.

    Found without running them (their import specs), so that a low-level
    module may ask.
    """
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    found = []
    for name in COMPILED:
        spec = importlib.util.find_spec(name)
        if spec is not None and (spec.origin or "").endswith(suffixes):
            found.append(name)
    return found


@functools.cache
def build() -> str:
    """``mypyc`` when every module of `COMPILED` runs compiled, ``python`` when none does.

    ``partial`` otherwise: a build that lost some of its extensions (a
    mixed install), which runs correctly but not at the compiled build's
    speed, and which the metrics and ``--version`` show as such.
    """
    count = len(compiled_modules())
    if count == len(COMPILED):
        return "mypyc"
    return "python" if count == 0 else "partial"
