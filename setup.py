"""Build hook: ``THRIFT_SIDECAR_COMPILE=1`` compiles the per-call modules with mypyc.

Without it (the default, and what ``pip install -e .`` does) the package is
pure Python. The modules compiled are listed in sidecar/native.py; the
reasoning is in docs/compiled.md. A compiled build needs mypy (which ships
mypyc), a C compiler and the runtime dependencies installed where mypy can
see them (``pip wheel --no-build-isolation``), since it type-checks the code
it compiles. Everything else about the package is in pyproject.toml.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent


def compiled_sources() -> list[str]:
    """The source files of sidecar.native.COMPILED, read without importing the package."""
    namespace: dict[str, object] = {}
    exec((HERE / "sidecar" / "native.py").read_text(), namespace)
    names = namespace["COMPILED"]
    assert isinstance(names, tuple)
    return [str(Path(*name.split(".")).with_suffix(".py")) for name in names]


def ext_modules() -> list[object]:
    if os.environ.get("THRIFT_SIDECAR_COMPILE", "0") in ("", "0"):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError as exc:
        raise SystemExit(
            "THRIFT_SIDECAR_COMPILE=1 needs mypy (which ships mypyc) where the build runs, "
            "with the runtime dependencies beside it: install them (requirements.lock, "
            "requirements-build.lock) and build with `pip wheel --no-build-isolation .` "
            f"(docs/compiled.md); here: {exc}"
        ) from exc

    # Module names from the paths as given (not from any __init__.py above the
    # checkout); one C file per module, so that `build_ext -j N` compiles them
    # in parallel.
    options = ["--explicit-package-bases"]
    return list(mypycify(options + compiled_sources(), opt_level="3", multi_file=True))


class ParallelBuildExt(build_ext):  # type: ignore[misc]
    """build_ext compiling on every CPU unless told otherwise (``-j N``): pip passes no ``-j``."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if not self.parallel:
            self.parallel = os.cpu_count() or 1


setup(ext_modules=ext_modules(), cmdclass={"build_ext": ParallelBuildExt})
