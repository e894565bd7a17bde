"""requirements.lock: exactly the runtime dependencies of pyproject.toml, pinned with hashes.

The image installs the lock with ``--require-hashes`` (tests/deploy/test_image.py),
so the lock must name every package the sidecar needs at run time and nothing
else: the dependencies listed in pyproject.toml (markers evaluated for the
image's Python on Linux) and what they need in turn, each at one version that
meets pyproject's bounds, each with its sha256 hashes. It is regenerated with
the command written at its top (uv's ``pip compile``); this test cannot reach
the package index, so it checks the lock's own record of why each package is
there, and the requirements of the packages installed here at the locked version.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy.dockerfile import dockerfile_stages
from tests.support.sidecar import REPO_ROOT

LOCK = REPO_ROOT / "requirements.lock"
PYPROJECT = REPO_ROOT / "pyproject.toml"
PROJECT = "thrift-sidecar"
COMPILE_COMMAND = (
    "uv pip compile pyproject.toml --generate-hashes --python-version {python} "
    "--python-platform linux -o requirements.lock"
)


@dataclass
class Pin:
    version: str
    hashes: list[str] = field(default_factory=list)
    via: set[str] = field(default_factory=set)


def parse_lock(text: str) -> dict[str, Pin]:
    """Name → pin, with the hashes and the ``# via`` lines of each entry."""
    pins: dict[str, Pin] = {}
    current: Pin | None = None
    in_via = False
    for line in text.splitlines():
        entry = re.match(r"^([A-Za-z0-9._-]+)==(\S+)", line)
        if entry:
            current = pins[str(canonicalize_name(entry.group(1)))] = Pin(entry.group(2))
            in_via = False
        elif current is not None and (found := re.search(r"--hash=sha256:([0-9a-f]{64})", line)):
            current.hashes.append(found.group(1))
        elif current is not None and (via := re.match(r"^\s+# via( .*)?$", line)):
            in_via = True
            if via.group(1):
                current.via.add(via.group(1).strip())
        elif current is not None and in_via and (more := re.match(r"^\s+#\s+(\S.*)$", line)):
            current.via.add(more.group(1).strip())
    return pins


def image_environment() -> dict[str, str]:
    """Marker values of the image: its Python release (the base tag) on Linux."""
    base = dockerfile_stages()[-1].base
    found = re.match(r"python:(3\.\d+)\.(\d+)", base)
    assert found, base
    return {
        "python_version": found.group(1),
        "python_full_version": f"{found.group(1)}.{found.group(2)}",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "os_name": "posix",
        "platform_machine": "x86_64",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "extra": "",
    }


def runtime_requirements() -> list[Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    env = image_environment()
    requirements = [Requirement(r) for r in project["dependencies"]]
    return [r for r in requirements if r.marker is None or r.marker.evaluate(env)]


def lock_problems(pins: dict[str, Pin], direct: list[Requirement]) -> list[str]:
    """Where the lock differs from pyproject's runtime dependencies (empty: nowhere)."""
    problems = []
    wanted = {str(canonicalize_name(r.name)): r for r in direct}
    for name, requirement in wanted.items():
        if name not in pins:
            problems.append(f"{name} is a dependency but not in the lock")
        elif not requirement.specifier.contains(pins[name].version, prereleases=True):
            problems.append(f"{name}=={pins[name].version} is outside {requirement.specifier}")
    origin = f"{PROJECT} (pyproject.toml)"
    for name, pin in pins.items():
        if not pin.hashes:
            problems.append(f"{name} has no hash")
        if origin in pin.via and name not in wanted:
            problems.append(f"{name} is locked as a direct dependency but pyproject has none")
    # Everything else is there because a locked package needs it.
    reachable: set[str] = set(wanted) & set(pins)
    while True:
        more = {
            name
            for name, pin in pins.items()
            if name not in reachable and {str(canonicalize_name(v)) for v in pin.via} & reachable
        }
        if not more:
            break
        reachable |= more
    for name in sorted(set(pins) - reachable):
        problems.append(f"{name} is locked but nothing needs it")
    return problems


def test_lock_is_exactly_the_runtime_dependencies() -> None:
    pins = parse_lock(LOCK.read_text())
    assert len(pins) >= len(runtime_requirements())
    assert lock_problems(pins, runtime_requirements()) == []


def test_lock_header_names_the_command_that_made_it() -> None:
    python = image_environment()["python_full_version"]
    assert COMPILE_COMMAND.format(python=python) in LOCK.read_text().splitlines()[1]


def test_locked_packages_need_only_locked_packages() -> None:
    """Where this environment has a locked version installed, its requirements are locked."""
    pins = parse_lock(LOCK.read_text())
    env = image_environment()
    checked = 0
    for name, pin in pins.items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if dist.version != pin.version:
            continue
        checked += 1
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate(env):
                continue
            needed = str(canonicalize_name(requirement.name))
            assert needed in pins, f"{name} needs {needed}, which is not locked"
            assert requirement.specifier.contains(pins[needed].version, prereleases=True)
    assert checked, "no locked version is installed here: nothing was checked"


@pytest.mark.parametrize(
    ("mutate", "found"),
    [
        (lambda pins, direct: pins.pop("redis"), "not in the lock"),
        (lambda pins, direct: setattr(pins["click"], "version", "7.0"), "outside"),
        (lambda pins, direct: pins["h11"].hashes.clear(), "no hash"),
        (
            lambda pins, direct: pins.setdefault("stray", parse_lock("stray==1\n")["stray"]),
            "nothing needs it",
        ),
        (lambda pins, direct: direct.pop(), "pyproject has none"),
    ],
)
def test_lock_problems_finds_each_fault(
    mutate: Callable[[dict[str, Pin], list[Requirement]], object], found: str
) -> None:
    pins = parse_lock(LOCK.read_text())
    for pin in pins.values():
        pin.hashes = list(pin.hashes)
    direct = runtime_requirements()
    mutate(pins, direct)
    problems = lock_problems(pins, direct)
    assert any(found in p for p in problems), problems
