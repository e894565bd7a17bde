"""A container's files as the sidecar reads them, laid out under a directory.

`ContainerFiles` puts the image's files (the final stage's COPY lines) and
mounted files (compose volumes, a ConfigMap) where the container has them, so
the sidecar's own loader reads the config the container would run with.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from sidecar.config import SidecarConfig, load_config, split_address
from sidecar.fallback.static import load_idl_parts
from tests.deploy.dockerfile import copy_pairs, dockerfile_stages
from tests.support.sidecar import REPO_ROOT

IMAGE_CONFIG = "/etc/sidecar/sidecar.yaml"


class ContainerFiles:
    def __init__(self, root: Path) -> None:
        self.root = root

    def add(self, container_path: str, source: Path | str) -> None:
        target = self.path(container_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, str):
            target.write_text(source)
        elif source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            shutil.copyfile(source, target)

    def add_image_files(self) -> None:
        for sources, dest in copy_pairs(dockerfile_stages()[-1]):
            for src in sources:
                self.add(dest if not dest.endswith("/") else dest + Path(src).name, REPO_ROOT / src)

    def path(self, container_path: str) -> Path:
        assert container_path.startswith("/"), container_path
        return self.root / container_path.lstrip("/")

    def load(
        self, config_path: str, environ: dict[str, str]
    ) -> tuple[SidecarConfig, dict[str, Any]]:
        """The config as the sidecar in that container loads it (with the IDL checks)."""
        config = load_config(self.path(config_path), environ=environ)
        return config, load_idl_parts(config)


def config_ports(config: SidecarConfig) -> tuple[int, int]:
    assert config.metrics.listen is not None
    return split_address(config.listen)[1], split_address(config.metrics.listen)[1]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without this checkout on the path or SIDECAR_* settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SIDECAR_") and k not in ("PYTHONPATH", "PYTHONHOME")
    }
    env.update(extra)
    return env


def option(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]
