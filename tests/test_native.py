"""The compiled build: which modules it compiles, and that a sidecar says which build it runs.

CI runs the whole suite twice (scripts/test): against this checkout, pure
Python, and against the copy scripts/build-compiled makes, with
``THRIFT_SIDECAR_EXPECT_BUILD`` set to the build each run must be testing, so that
a compiled run that silently fell back to Python fails here rather than
passing as the compiled build's test.
"""

from __future__ import annotations

import ast
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import sidecar
from sidecar import native
from tests.conftest import skipped_here, suites_run
from tests.support.sidecar import REPO_ROOT, free_port, http_get, run_sidecar
from tests.support.source import parse_source

# The packages every call runs through: a module added to them is compiled
# unless it is named here with the reason it is not.
PER_CALL_PACKAGES = ("sidecar.protocol", "sidecar.resilience", "sidecar.metrics")
NOT_COMPILED = {
    "sidecar.protocol": set(),
    "sidecar.resilience": set(),
    "sidecar.metrics": set(),
}


def expected_build() -> str:
    """The build this run is testing: THRIFT_SIDECAR_EXPECT_BUILD, else whichever is loaded."""
    return os.environ.get("THRIFT_SIDECAR_EXPECT_BUILD") or native.build()


def test_this_run_tests_the_build_it_was_asked_to_and_no_mix_of_two() -> None:
    build = native.build()
    assert build == expected_build()
    assert build in ("mypyc", "python")  # a partial build is a broken install
    compiled = native.compiled_modules()
    assert compiled == (list(native.COMPILED) if build == "mypyc" else [])


def test_every_listed_module_exists_once_and_the_list_leaves_out_what_cannot_be_compiled() -> None:
    root = Path(sidecar.__file__).resolve().parent.parent
    assert len(set(native.COMPILED)) == len(native.COMPILED)
    for name in native.COMPILED:
        assert (root / Path(*name.split("."))).with_suffix(".py").is_file(), name
    # Interpreted classes subclass sidecar.errors' exceptions; uvloop's server
    # sockets are a list where sidecar.proxy.server's declared type is a tuple.
    assert "sidecar.errors" not in native.COMPILED
    assert "sidecar.proxy.server" not in native.COMPILED


def test_the_per_call_packages_are_compiled_whole() -> None:
    for package in PER_CALL_PACKAGES:
        path = Path(sidecar.__file__).resolve().parent / package.split(".")[1]
        modules = {f"{package}.{m.name}" for m in pkgutil.iter_modules([str(path)])}
        assert modules, package
        assert modules - NOT_COMPILED[package] <= set(native.COMPILED), package


def allows_interpreted_subclasses(node: ast.ClassDef) -> bool:
    """Decorated ``@mypyc_attr(allow_interpreted_subclasses=True)``."""
    for decorator in node.decorator_list:
        if (
            isinstance(decorator, ast.Call)
            and isinstance(decorator.func, ast.Name)
            and decorator.func.id == "mypyc_attr"
        ):
            for keyword in decorator.keywords:
                if (
                    keyword.arg == "allow_interpreted_subclasses"
                    and isinstance(keyword.value, ast.Constant)
                    and keyword.value.value is True
                ):
                    return True
    return False


def compiled_classes() -> dict[tuple[str, str], str]:
    """(module, class name) of every class a compiled module defines at its top level,
    but those that allow interpreted subclasses."""
    found = {}
    for name in native.COMPILED:
        path = (REPO_ROOT / Path(*name.split("."))).with_suffix(".py")
        for node in parse_source(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and not allows_interpreted_subclasses(node):
                found[(name, node.name)] = f"{path.relative_to(REPO_ROOT)}:{node.lineno}"
    return found


def interpreted_subclasses_of_compiled_classes(
    paths: list[Path], compiled: dict[tuple[str, str], str]
) -> list[str]:
    """Classes in ``paths`` whose base is imported from a compiled module's class.

    mypyc refuses them at import time ("interpreted classes cannot inherit
    from compiled"). Bases are resolved through each file's ``from X import
    Y [as Z]`` and ``import X`` lines.
    """
    problems = []
    for path in paths:
        shown = path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path
        module = ".".join(shown.with_suffix("").parts)
        if module in native.COMPILED:
            continue
        tree = parse_source(path.read_text())
        names: dict[str, tuple[str, str]] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    names[alias.asname or alias.name] = (node.module, alias.name)
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            for base in node.bases:
                if isinstance(base, ast.Name) and base.id in names:
                    origin = names[base.id]
                elif isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name):
                    origin = (base.value.id, base.attr)  # `import a.b as x`: not used here
                else:
                    continue
                if origin in compiled:
                    where = f"{shown}:{node.lineno}"
                    problems.append(f"{where} {node.name} subclasses {compiled[origin]}")
    return problems


def test_no_interpreted_class_subclasses_a_compiled_one() -> None:
    compiled = compiled_classes()
    paths = [
        path
        for top in ("sidecar", "tests", "bench")
        for path in sorted((REPO_ROOT / top).rglob("*.py"))
        if "_generated" not in path.parts
    ]
    assert interpreted_subclasses_of_compiled_classes(paths, compiled) == []


def test_the_subclass_check_finds_one(tmp_path: Path) -> None:
    compiled = compiled_classes()
    assert ("sidecar.proxy.call", "Call") in compiled
    assert ("sidecar.proxy.call", "ProxiedCall") not in compiled  # it allows them
    probe = tmp_path / "probe.py"
    probe.write_text("from sidecar.proxy.call import Call as C\n\nclass Mine(C):\n    pass\n")
    found = interpreted_subclasses_of_compiled_classes([probe], compiled)
    assert len(found) == 1
    assert "Mine subclasses sidecar/proxy/call.py:" in found[0]


# Module constants that tests replace (monkeypatch): a Final one could not be.
REPLACEABLE = {
    ("sidecar.proxy.client", "MAX_QUEUED_BYTES"),
    ("sidecar.proxy.policy", "MAX_CACHED_NAMES"),
}


def is_type_alias(value: ast.expr) -> bool:
    """``X = Callable[...]``, ``X = A | B``, ``X = SomeClass``, ``T = TypeVar(...)``.

    A union counts only when each side is a type (``frozenset(A) | {b}`` is a value).
    """
    if isinstance(value, ast.Subscript):
        return True
    if isinstance(value, ast.BinOp):
        return isinstance(value.op, ast.BitOr) and _is_type(value.left) and _is_type(value.right)
    if isinstance(value, ast.Name):
        return value.id[:1].isupper() and not value.id.isupper()
    return (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Name)
        and value.func.id in {"TypeVar", "ParamSpec"}
    )


def _is_type(node: ast.expr) -> bool:
    """One side of a union type: ``int``, ``None``, ``list[int]``, ``mod.Class``, ``A | B``."""
    if isinstance(node, ast.Constant):
        return node.value is None
    if isinstance(node, ast.BinOp):
        return isinstance(node.op, ast.BitOr) and _is_type(node.left) and _is_type(node.right)
    return isinstance(node, ast.Name | ast.Attribute | ast.Subscript)


def constants_not_final(source: str, module: str) -> list[str]:
    """Module-level names assigned once in ``source`` and not declared Final.

    mypyc reads a Final module constant from a C static; any other from the
    module's dict, by name, on every use in a compiled function.
    """
    found = []
    for node in parse_source(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value, annotation = node.targets[0], node.value, ""
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value, annotation = node.target, node.value, ast.unparse(node.annotation)
        else:
            continue
        if not isinstance(target, ast.Name) or target.id.startswith("__"):
            continue
        if "Final" in annotation or "TypeAlias" in annotation or (module, target.id) in REPLACEABLE:
            continue
        if not annotation and is_type_alias(value):
            continue
        found.append(f"{module}:{node.lineno} {target.id}")
    return found


def test_the_compiled_modules_constants_are_final() -> None:
    not_final = []
    for name in native.COMPILED:
        path = (REPO_ROOT / Path(*name.split("."))).with_suffix(".py")
        not_final += constants_not_final(path.read_text(), name)
    assert not_final == []


def test_the_final_check_finds_a_constant_that_is_not() -> None:
    source = (
        "from typing import Final\n"
        "A: Final = 1\n"
        "B = 2\n"
        "C: int = 3\n"
        "Alias = int | None\n"
        "T = TypeVar('T')\n"
        "__all__ = ['A']\n"
        "D = frozenset(A) | {4}\n"
        "E = A | 8\n"
        "Wide = int | list[str] | mod.Cls | None\n"
    )
    assert constants_not_final(source, "m") == ["m:3 B", "m:4 C", "m:8 D", "m:9 E"]


SUITES_BOTH = frozenset({"python", "mypyc"})
SUITES_PURE = frozenset({"python"})
SUITES_MYPYC = frozenset({"mypyc"})
TO_MYPYC = {"suite": "mypyc"}


@pytest.mark.parametrize(
    ("marks", "build", "suites", "skipped"),
    [
        ({}, "mypyc", SUITES_BOTH, None),
        ({"pure_python": ("patches a method", {})}, "python", SUITES_BOTH, None),
        ({"one_build": ("builds a wheel", {})}, "python", SUITES_BOTH, None),
        (
            {"pure_python": ("patches a method", {})},
            "mypyc",
            SUITES_BOTH,
            "pure Python only: patches a method",
        ),
        (
            {"one_build": ("builds a wheel", {})},
            "mypyc",
            SUITES_BOTH,
            "one build only (python suite): builds a wheel",
        ),
        (
            {"one_build": ("builds a wheel", {})},
            "partial",
            SUITES_BOTH,
            "one build only (python suite): builds a wheel",
        ),
        # Given to the compiled suite: run there when it runs, else in the pure one.
        ({"one_build": ("compiles", TO_MYPYC)}, "mypyc", SUITES_BOTH, None),
        (
            {"one_build": ("compiles", TO_MYPYC)},
            "python",
            SUITES_BOTH,
            "one build only (mypyc suite): compiles",
        ),
        ({"one_build": ("compiles", TO_MYPYC)}, "python", SUITES_PURE, None),
        ({"one_build": ("compiles", TO_MYPYC)}, "mypyc", SUITES_MYPYC, None),
        # The compiled suite alone: it takes every one of them.
        ({"one_build": ("builds a wheel", {})}, "mypyc", SUITES_MYPYC, None),
    ],
)
def test_each_suite_skips_what_another_suite_of_the_run_takes(
    marks: dict[str, tuple[str, dict[str, str]]],
    build: str,
    suites: frozenset[str],
    skipped: str | None,
) -> None:
    def marker(name: str) -> pytest.Mark | None:
        if name not in marks:
            return None
        reason, kwargs = marks[name]
        return pytest.mark.__getattr__(name)(reason, **kwargs).mark

    assert skipped_here(marker, build, suites) == skipped


def test_a_one_build_test_names_a_suite_there_is() -> None:
    misspelt = pytest.mark.one_build("compiles", suite="compiled").mark

    def marker(name: str) -> pytest.Mark | None:
        return misspelt if name == "one_build" else None

    with pytest.raises(ValueError, match="suite='compiled'"):
        skipped_here(marker, "python", SUITES_BOTH)


def test_a_suite_run_alone_assumes_the_pure_one_runs_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("THRIFT_SIDECAR_TEST_SUITES", raising=False)
    assert suites_run("python") == SUITES_PURE
    assert suites_run("mypyc") == SUITES_BOTH
    monkeypatch.setenv("THRIFT_SIDECAR_TEST_SUITES", "python mypyc")
    assert suites_run("python") == SUITES_BOTH
    monkeypatch.setenv("THRIFT_SIDECAR_TEST_SUITES", "mypyc")
    assert suites_run("mypyc") == SUITES_MYPYC


def test_scripts_test_tells_each_suite_which_suites_run() -> None:
    """The compiled suite takes some one_build tests only if scripts/test says it runs."""
    script = (REPO_ROOT / "scripts" / "test").read_text()
    assert 'THRIFT_SIDECAR_TEST_SUITES="$builds"' in script


def test_the_wheel_tests_run_in_one_suite_only() -> None:
    """They build the image's wheel (about 100 s of both cores); once per CI run is enough."""
    source = (REPO_ROOT / "tests" / "deploy" / "test_image.py").read_text()
    tree = parse_source(source)
    users = [
        node
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and "wheel_venv" in [a.arg for a in node.args.args]
    ]
    assert users
    for node in users:
        marks = [ast.unparse(d) for d in node.decorator_list]
        assert any(m.startswith("pytest.mark.one_build(") for m in marks), node.name


def test_the_store_bounds_test_runs_in_one_suite_only_while_no_store_is_compiled() -> None:
    """test_100k_distinct_keys_stay_within_bounds (every store's) runs in the pure suite
    only, since none of the code it tests is compiled; compiling a store would make
    its compiled form untested there."""
    from tests.fallback.test_stores import test_100k_distinct_keys_stay_within_bounds as test

    assert any(mark.name == "one_build" for mark in test.pytestmark)
    stores = [
        f"sidecar.fallback.{path.stem}"
        for path in (REPO_ROOT / "sidecar" / "fallback").glob("*.py")
        if path.stem in ("store", "shared", "shared_host", "shared_wire", "redis", "redis_writer")
        or path.stem.startswith("sqlite")
    ]
    assert len(stores) >= 8, stores
    assert not set(stores) & set(native.COMPILED)


def test_setup_py_compiles_exactly_the_listed_modules_and_nothing_by_default() -> None:
    # setup.py reads the list from sidecar/native.py's source; ask it directly.
    code = (
        "import runpy, sys; sys.argv = ['setup.py', '--name'];"
        "ns = runpy.run_path('setup.py', run_name='not_main');"
        "print('\\n'.join('src ' + path for path in ns['compiled_sources']()));"
        "print('ext', len(ns['ext_modules']()))"
    )
    env = {k: v for k, v in os.environ.items() if k != "THRIFT_SIDECAR_COMPILE"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.splitlines()
    assert out[-1] == "ext 0"  # pure Python unless THRIFT_SIDECAR_COMPILE=1
    wanted = [str(Path(*name.split(".")).with_suffix(".py")) for name in native.COMPILED]
    assert [line[4:] for line in out if line.startswith("src ")] == wanted


def test_setup_py_reads_the_list_without_importing_the_package() -> None:
    tree = parse_source((REPO_ROOT / "sidecar" / "native.py").read_text())
    imported = [
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    ]
    assert imported
    assert not [name for name in imported if name and name.startswith("sidecar")]


def test_a_running_sidecar_reports_its_build_in_its_metrics_and_version() -> None:
    with run_sidecar([f"127.0.0.1:{free_port()}"]) as running:  # no upstream needed
        status, text = http_get(running.admin + "/metrics")
    assert status == 200
    builds = [
        sample.labels
        for family in text_string_to_metric_families(text)
        if family.name == "thrift_sidecar_build_info"
        for sample in family.samples
    ]
    assert builds == [{"version": sidecar.__version__, "build": expected_build()}]

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    version = subprocess.run(
        [sys.executable, "-m", "sidecar", "--version"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert version.rstrip().endswith(f"build {expected_build()})")


def test_a_compiled_build_without_mypy_says_what_it_needs(tmp_path: Path) -> None:
    # setup.py run by an interpreter that cannot import mypyc (a build
    # environment of pip's own, say): it stops and says how to build instead.
    blocker = tmp_path / "mypyc"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('mypyc is not installed here')\n")
    env = {**os.environ, "THRIFT_SIDECAR_COMPILE": "1", "PYTHONPATH": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "setup.py", "--name"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "THRIFT_SIDECAR_COMPILE=1 needs mypy" in result.stderr
    assert "--no-build-isolation" in result.stderr
    assert "mypyc is not installed here" in result.stderr
