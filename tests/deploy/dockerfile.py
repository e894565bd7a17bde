"""The Dockerfile and .dockerignore read as data: stages, instructions, copies, labels.

A small parser for what the tests check (no Docker engine here): continuation
lines joined, comment lines dropped, one `Stage` per ``FROM``.
"""

from __future__ import annotations

import fnmatch
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.sidecar import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def one(self, keyword: str) -> str:
        found = self.all(keyword)
        assert len(found) == 1, f"{keyword}: {found}"
        return found[0]


def parse_dockerfile(text: str) -> list[Stage]:
    """The stages of a Dockerfile's text."""
    stages: list[Stage] = []
    logical = ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#"):
            continue
        line = raw.rstrip()
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        if logical.strip():
            keyword, _, rest = logical.strip().partition(" ")
            keyword = keyword.upper()
            if keyword == "FROM":
                parts = rest.split()
                name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
                stages.append(Stage(parts[0], name))
            elif stages:
                stages[-1].instructions.append((keyword, " ".join(rest.split())))
        logical = ""
    return stages


def dockerfile_stages(path: Path = DOCKERFILE) -> list[Stage]:
    return parse_dockerfile(path.read_text())


def copy_pairs(stage: Stage) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY from the build context (not ``--from``)."""
    pairs = []
    for rest in stage.all("COPY"):
        args = rest.split()
        if any(a.startswith("--from") for a in args):
            continue
        args = [a for a in args if not a.startswith("--")]
        pairs.append((args[:-1], args[-1]))
    return pairs


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in stage.all("ENV"):
        for item in rest.split():
            key, _, value = item.partition("=")
            env[key] = value
    return env


def labels_of(stage: Stage) -> dict[str, str]:
    labels: dict[str, str] = {}
    for rest in stage.all("LABEL"):
        for item in shlex.split(rest):
            key, _, value = item.partition("=")
            labels[key] = value
    return labels


def exec_form(text: str) -> list[str]:
    value = json.loads(text)
    assert isinstance(value, list), f"not exec form: {text}"
    assert all(isinstance(v, str) for v in value)
    return list(value)


def healthcheck_command(stage: Stage) -> list[str]:
    text = stage.one("HEALTHCHECK")
    assert " CMD " in f" {text} ", text
    return exec_form(text.split("CMD", 1)[1].strip())


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps ``path`` (or a parent of it) out of the build context."""
    parts = Path(path).parts
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if fnmatch.fnmatch(prefix, pattern) or (
                pattern.startswith("**/") and fnmatch.fnmatch(parts[i - 1], pattern[3:])
            ):
                ignored = not negate
    return ignored


def dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text().splitlines()
    return [x.strip() for x in lines if x.strip() and not x.strip().startswith("#")]
