"""docker-compose.yml read as data: services, bind mounts, published ports, sidecar configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from sidecar.config import SidecarConfig
from tests.deploy.container import IMAGE_CONFIG, ContainerFiles
from tests.support.sidecar import REPO_ROOT

COMPOSE = REPO_ROOT / "docker-compose.yml"


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def volumes(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(host path, container path) of each bind mount."""
    found = []
    for volume in service.get("volumes", []):
        host, container = volume.split(":")[:2]
        assert host.startswith("./"), f"not a path in the repository: {volume}"
        found.append((REPO_ROOT / host, container))
    return found


def published(service: dict[str, Any]) -> dict[int, int]:
    """Container port → host port."""
    ports = {}
    for spec in service.get("ports", []):
        host, container = str(spec).split(":")[-2:]
        ports[int(container)] = int(host)
    return ports


def runs_sidecar(service: dict[str, Any]) -> bool:
    """Built from the Dockerfile and running its entrypoint (the sidecar)."""
    return "build" in service and "entrypoint" not in service


def sidecar_config(
    name: str, service: dict[str, Any], tmp_path: Path
) -> tuple[SidecarConfig, dict[str, Any]]:
    files = ContainerFiles(tmp_path / name)
    files.add_image_files()
    for host, container in volumes(service):
        files.add(container, host)
    environment = {k: str(v) for k, v in (service.get("environment") or {}).items()}
    return files.load(IMAGE_CONFIG, environ=environment)
