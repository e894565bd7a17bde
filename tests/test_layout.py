"""The house plan holds: imports run one way between rooms, and no module imports in a circle.

docs/architecture.md draws the rooms; `FLOORS` below is the same plan as
data. A room may import rooms on lower floors only; inside a room, modules
may import each other but never in a circle. Imports under
``if TYPE_CHECKING:`` are annotations, not dependencies, and are left out.
Imports inside functions count: a lazy import still ties two rooms.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

import sidecar
from tests.support.source import parse_source

SIDECAR = Path(sidecar.__file__).resolve().parent

# Rooms by floor, lowest first. "sidecar" is the package face (__version__).
FLOORS: list[set[str]] = [
    {"sidecar", "errors", "native"},
    {"protocol", "config"},
    {"resilience", "logs", "metrics"},
    {"fleet", "workers", "testing", "top"},
    {"fallback"},
    {"proxy", "admin"},
    {"app", "demo"},
    {"cli", "docs"},
    {"__main__"},
]
FLOOR_OF = {room: floor for floor, rooms in enumerate(FLOORS) for room in rooms}


def module_name(path: Path) -> str:
    parts = path.relative_to(SIDECAR.parent).with_suffix("").parts
    name = ".".join(parts)
    return name.removesuffix(".__init__")


def room_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "sidecar"
    return parts[1]


def imports_of(path: Path, *, annotations: bool = False) -> set[str]:
    """The sidecar modules ``path`` imports (under ``if TYPE_CHECKING:`` too if ``annotations``)."""
    tree = parse_source(path.read_text(), str(path))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if not annotations and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            skipped.update(id(n) for n in ast.walk(node))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "sidecar" or node.module.startswith("sidecar."):
                found.add(node.module)
                # ``from sidecar.app import build`` imports the module sidecar.app.build
                for alias in node.names:
                    candidate = f"{node.module}.{alias.name}"
                    if (SIDECAR.parent / candidate.replace(".", "/")).with_suffix(".py").exists():
                        found.add(candidate)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "sidecar")
    return found


def graph(*, annotations: bool = False) -> dict[str, set[str]]:
    return {
        module_name(p): imports_of(p, annotations=annotations)
        for p in sorted(SIDECAR.rglob("*.py"))
    }


def test_every_room_has_a_floor() -> None:
    rooms = {room_of(m) for m in graph()}
    assert rooms <= set(FLOOR_OF), f"rooms missing from FLOORS: {sorted(rooms - set(FLOOR_OF))}"


def test_imports_run_down_the_floors() -> None:
    upward = [
        f"{module} ({room_of(module)}, floor {FLOOR_OF[room_of(module)]}) imports "
        f"{target} ({room_of(target)}, floor {FLOOR_OF[room_of(target)]})"
        for module, targets in graph().items()
        for target in sorted(targets)
        if room_of(target) != room_of(module)
        and FLOOR_OF[room_of(target)] >= FLOOR_OF[room_of(module)]
    ]
    assert upward == []


def find_circle(edges: dict[str, set[str]]) -> list[str] | None:
    """One circle in the graph, as a path that ends where it starts, or None."""
    state: dict[str, int] = defaultdict(int)  # 0 new, 1 on the path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state[nxt] == 1:
                return [*path[path.index(nxt) :], nxt]
            if state[nxt] == 0:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if state[node] == 0:
            found = visit(node)
            if found:
                return found
    return None


def test_no_module_imports_in_a_circle() -> None:
    edges = graph(annotations=True)
    # A package's __init__ re-exporting its modules is not a circle of design.
    packages = {m for m in edges if (SIDECAR.parent / m.replace(".", "/")).is_dir()}
    module_edges = {
        m: {t for t in targets if t in edges and t not in packages and t != m}
        for m, targets in edges.items()
        if m not in packages
    }
    assert find_circle(module_edges) is None


@pytest.mark.parametrize(
    ("edges", "circle"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
        ({"a": {"b"}, "b": {"c"}, "c": {"b"}}, ["b", "c", "b"]),
    ],
)
def test_the_circle_finder_finds_circles(
    edges: dict[str, set[str]], circle: list[str] | None
) -> None:
    assert find_circle(edges) == circle


def test_an_upward_import_is_caught(tmp_path: Path) -> None:
    """The checker itself: a protocol module importing the proxy is flagged."""
    module = tmp_path / "bad.py"
    module.write_text("from sidecar.proxy.call import Call\n")
    targets = imports_of(module)
    assert targets == {"sidecar.proxy.call"}
    assert FLOOR_OF[room_of("sidecar.proxy.call")] > FLOOR_OF["protocol"]


def test_type_checking_imports_are_not_dependencies(tmp_path: Path) -> None:
    module = tmp_path / "annotated.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from sidecar.app.lifecycle import Sidecar\n"
        "def f() -> None:\n"
        "    from sidecar.metrics import SidecarMetrics\n"
    )
    assert imports_of(module) == {"sidecar.metrics"}
    assert imports_of(module, annotations=True) == {"sidecar.metrics", "sidecar.app.lifecycle"}
