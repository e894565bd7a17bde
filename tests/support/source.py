"""Parsing the project's own source in tests, clear of a CPython 3.11 bug in `ast.parse`."""

from __future__ import annotations

import ast
import gc


def parse_source(source: str, filename: str = "<unknown>") -> ast.Module:
    """``ast.parse`` with the cyclic garbage collector off while it runs.

    CPython 3.11 keeps the depth of the tree it is building in state shared by
    the whole interpreter. A collection during the build runs finalizers, and a
    finalizer can parse too (an asyncio task's unretrieved exception is logged
    with a traceback, and 3.11's traceback formatting parses the failing line):
    the outer parse then fails with "SystemError: AST constructor recursion
    depth mismatch" (python/cpython#106905). Seen here now and then when
    tests/test_layout.py ran after tests/proxy.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(source, filename)
    finally:
        if enabled:
            gc.enable()
