"""The guard of every way into a `Call` or a `ClientConnection`: a bug stops where it came in.

What a bug costs each of them is tested with a running sidecar, one planted
bug per entry point (tests/proxy/test_call.py, tests/proxy/test_client.py).
Here, the form: each method a module lists in ``ENTRY_POINTS`` runs its whole
body inside ``try: ... except Exception: self._crashed()``, and every method
the class hands out as a callback (``self.method`` used as a value, not
called) is listed, so a new callback cannot go unguarded.
"""

from __future__ import annotations

import ast
from pathlib import Path
from types import ModuleType

import pytest

from sidecar.proxy import call, client
from tests.support.source import parse_source

CLASSES = [(call, "Call"), (client, "ClientConnection")]
ROOT = Path(__file__).resolve().parents[2]


def methods_of(module: ModuleType, name: str) -> dict[str, ast.FunctionDef]:
    # Read from the checkout: a compiled module has no source for inspect to find.
    source = ROOT.joinpath(*module.__name__.split(".")).with_suffix(".py").read_text()
    tree = parse_source(source)
    [cls] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name]
    return {n.name: n for n in cls.body if isinstance(n, ast.FunctionDef)}


def is_guard(handler: ast.ExceptHandler) -> bool:
    """``except Exception:`` whose body calls ``self._crashed()`` (and at most returns None)."""
    if not (isinstance(handler.type, ast.Name) and handler.type.id == "Exception"):
        return False
    first, *rest = handler.body
    calls_crashed = (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Call)
        and ast.unparse(first.value) == "self._crashed()"
    )
    returns_none = all(
        isinstance(s, ast.Return) and (s.value is None or ast.unparse(s.value) == "None")
        for s in rest
    )
    return calls_crashed and returns_none


def unguarded_reason(function: ast.FunctionDef) -> str | None:
    """Why ``function`` is not guarded, or None when its whole body is."""
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    if len(body) != 1 or not isinstance(body[0], ast.Try):
        return "its body is not one try statement"
    statement = body[0]
    if statement.finalbody or statement.orelse:
        return "its try has else or finally"
    if not any(is_guard(h) for h in statement.handlers):
        return "no `except Exception: self._crashed()`"
    if not is_guard(statement.handlers[-1]):
        return "the guard is not its last handler"
    return None


@pytest.mark.parametrize(("module", "name"), CLASSES, ids=[n for _, n in CLASSES])
def test_every_entry_point_runs_its_body_inside_the_guard(module: ModuleType, name: str) -> None:
    methods = methods_of(module, name)
    assert module.ENTRY_POINTS, "no entry points listed"
    problems = {}
    for entry in module.ENTRY_POINTS:
        assert entry in methods, f"{name}.{entry} is listed but not defined"
        reason = unguarded_reason(methods[entry])
        if reason is not None:
            problems[entry] = reason
    assert problems == {}


@pytest.mark.parametrize(("module", "name"), CLASSES, ids=[n for _, n in CLASSES])
def test_every_method_handed_out_as_a_callback_is_an_entry_point(
    module: ModuleType, name: str
) -> None:
    methods = methods_of(module, name)
    called = set()
    for node in ast.walk(ast.Module(body=list(methods.values()), type_ignores=[])):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            called.add(id(node.func))
    handed_out = {
        node.attr
        for node in ast.walk(ast.Module(body=list(methods.values()), type_ignores=[]))
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
        and node.attr in methods
        and isinstance(node.ctx, ast.Load)
        and id(node) not in called
    }
    assert handed_out, "found no callbacks: the walk is broken"
    assert handed_out <= set(module.ENTRY_POINTS), handed_out - set(module.ENTRY_POINTS)


def test_the_form_check_tells_an_unguarded_method() -> None:
    """The check itself: each way of getting the guard wrong is reported."""
    source = '''
class C:
    def plain(self):
        self.x = 1
    def swallowed(self):
        try:
            self.x = 1
        except Exception:
            pass
    def narrow(self):
        try:
            self.x = 1
        except ValueError:
            self._crashed()
    def half(self):
        self.y = 2
        try:
            self.x = 1
        except Exception:
            self._crashed()
    def good(self):
        """Doc."""
        try:
            self.x = 1
        except OSError:
            return None
        except Exception:
            self._crashed()
            return None
'''
    [cls] = parse_source(source).body
    assert isinstance(cls, ast.ClassDef)
    found = {f.name: unguarded_reason(f) for f in cls.body if isinstance(f, ast.FunctionDef)}
    assert found == {
        "plain": "its body is not one try statement",
        "swallowed": "no `except Exception: self._crashed()`",
        "narrow": "no `except Exception: self._crashed()`",
        "half": "its body is not one try statement",
        "good": None,
    }
