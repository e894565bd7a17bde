"""The sans-I/O packages import no event loop, socket, clock, random source or threads."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import sidecar
from tests.support.source import parse_source

SIDECAR = Path(sidecar.__file__).resolve().parent
SANS_IO_DIRS = ["protocol", "resilience"]
FORBIDDEN = frozenset({"asyncio", "socket", "time", "random", "threading", "selectors"})


def forbidden_imports(source: str, filename: str = "<test>") -> list[tuple[int, str]]:
    """(line, module) of every forbidden import in ``source``, however it is spelled."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(parse_source(source, filename)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
        ):
            names = [node.args[0].value]
        found += [(node.lineno, n) for n in names if n.split(".")[0] in FORBIDDEN]
    return found


def sans_io_files() -> list[Path]:
    return sorted(
        p for d in SANS_IO_DIRS if (SIDECAR / d).is_dir() for p in (SIDECAR / d).rglob("*.py")
    )


def test_the_protocol_package_is_there() -> None:
    names = {p.name for p in sans_io_files()}
    assert {"envelope.py", "framing.py", "skip.py", "appexc.py"} <= names


@pytest.mark.parametrize("path", sans_io_files(), ids=lambda p: str(p.relative_to(SIDECAR)))
def test_no_io_imports(path: Path) -> None:
    assert forbidden_imports(path.read_text("utf-8"), str(path)) == []


@pytest.mark.parametrize(
    "source",
    [
        "import asyncio",
        "import os, socket",
        "import time as clock",
        "from random import Random",
        "from threading import Lock",
        "import selectors",
        "from asyncio.events import AbstractEventLoop",
        "import asyncio.events",
        "def f():\n    import time\n",
        "if True:\n    from socket import socket\n",
        "try:\n    import uvloop\nexcept ImportError:\n    import asyncio\n",
        "__import__('socket')",
        "importlib.import_module('random')",
    ],
)
def test_the_check_sees_every_spelling(source: str) -> None:
    assert forbidden_imports(source)


@pytest.mark.parametrize(
    "source",
    [
        "import struct",
        "from sidecar.protocol import time_utils",
        "from . import time",  # a sibling module, not the stdlib
        "import timeit",
        "import randomness",
        "x = 'import asyncio'",
    ],
)
def test_the_check_allows_the_rest(source: str) -> None:
    assert forbidden_imports(source) == []
