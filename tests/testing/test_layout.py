"""Which way the test tooling and the demo are imported: product → testing ← demo, never back.

`sidecar.testing` may not import `sidecar.demo`; nothing outside the demo and
the ``demo`` command imports `sidecar.demo`; and ``sidecar`` on its own
(``sidecar run``) loads neither.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.support.sidecar import REPO_ROOT
from tests.support.source import parse_source

PACKAGE = REPO_ROOT / "sidecar"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth of its code (lazy imports included)."""
    names: set[str] = set()
    for node in ast.walk(parse_source(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def importers_of(prefix: str) -> set[str]:
    """Files under sidecar/ (relative paths) that import ``prefix`` or a module below it."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        if any(m == prefix or m.startswith(prefix + ".") for m in imported_modules(path)):
            found.add(str(path.relative_to(REPO_ROOT)))
    return found


def test_testing_does_not_import_the_demo() -> None:
    assert not {p for p in importers_of("sidecar.demo") if p.startswith("sidecar/testing/")}


def test_only_the_demo_and_its_command_import_the_demo() -> None:
    outside = {p for p in importers_of("sidecar.demo") if not p.startswith("sidecar/demo/")}
    assert outside == {"sidecar/cli/tools.py"}


def test_the_product_imports_testing_only_in_the_demo() -> None:
    users = {p for p in importers_of("sidecar.testing") if not p.startswith("sidecar/testing/")}
    assert users
    assert all(p.startswith("sidecar/demo/") for p in users), users


def test_the_cli_loads_the_demo_only_when_asked() -> None:
    code = (
        "import sys, sidecar.cli\n"
        "prefixes = ('sidecar.demo', 'sidecar.testing')\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(prefixes))\n"
        "print(loaded)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
