"""Session fixtures of the interop suite: certificates, upstreams, sidecars, clients.

Everything is started on first use and kept for the session: one upstream
and one sidecar per wire (protocol x transport x TLS), one build per client
language. Builds run two at a time in the background from the first request
on, so that the slow ones (C++, Java) overlap the first cells.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.interop.builds import build_client, client_command
from tests.interop.matrix import LANGUAGES, Language, Wire
from tests.interop.upstream import Certificates, WireUpstream, make_certificates
from tests.support.sidecar import SidecarProcess, run_sidecar


class Clients:
    """Client builds, started together in the background on first use."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="interop-build")
        self._builds: dict[Language, Future[Path]] = {}

    def command(self, language: Language) -> list[str]:
        """The argv prefix of ``language``'s client (raises `BuildError` if it cannot build)."""
        if not self._builds:
            # The requested language first, then the rest in table order.
            for lang in (language, *(x for x in LANGUAGES if x != language)):
                self._builds[lang] = self._pool.submit(build_client, lang)
        return client_command(language, self._builds[language].result())

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class Wires:
    """One upstream and one sidecar per wire, started on first use."""

    def __init__(self, certificates: Certificates) -> None:
        self.certificates = certificates
        self._stack = contextlib.ExitStack()
        self._upstreams: dict[Wire, WireUpstream] = {}
        self._sidecars: dict[Wire, SidecarProcess | Exception] = {}

    def upstream(self, wire: Wire) -> WireUpstream:
        found = self._upstreams.get(wire)
        if found is None:
            found = WireUpstream(wire, self.certificates)
            self._stack.enter_context(found)
            self._upstreams[wire] = found
        return found

    def sidecar(self, wire: Wire) -> SidecarProcess:
        """The sidecar in front of ``wire``'s upstream; a start that failed is raised again."""
        found = self._sidecars.get(wire)
        if found is None:
            upstream = self.upstream(wire)
            try:
                found = self._stack.enter_context(
                    run_sidecar([upstream.address], config=self._config(wire))
                )
            except Exception as exc:  # kept, and raised again for every cell of the wire
                found = exc
            self._sidecars[wire] = found
        if isinstance(found, Exception):
            raise found
        return found

    def _config(self, wire: Wire) -> dict[str, Any]:
        """The user's config for this wire: defaults, plus TLS on both sides when TLS is on."""
        if not wire.tls:
            return {}
        certs = self.certificates
        return {
            "tls": {"cert": str(certs.cert), "key": str(certs.key)},
            "upstream": {"tls": {"ca": str(certs.ca)}},
        }

    def close(self) -> None:
        """Stop everything; raise if a sidecar died early or logged a traceback."""
        started = {w: s for w, s in self._sidecars.items() if isinstance(s, SidecarProcess)}
        problems = [
            f"{w}: exited early with {s.proc.returncode}"
            for w, s in started.items()
            if s.proc.poll() is not None
        ]
        self._stack.close()
        problems += [
            f"{w}: a traceback in its log:\n{s.log()}"
            for w, s in started.items()
            if "Traceback" in s.log()
        ]
        if problems:
            raise AssertionError("sidecars of the interop suite: " + "\n".join(problems))


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("interop-tls"))


@pytest.fixture(scope="session")
def wires(certificates: Certificates) -> Iterator[Wires]:
    started = Wires(certificates)
    try:
        yield started
    finally:
        started.close()


@pytest.fixture(scope="session")
def clients() -> Iterator[Clients]:
    built = Clients()
    try:
        yield built
    finally:
        built.close()
