"""The Kubernetes manifests read as data: the Deployment's pod, its ConfigMap and Service.

`Pod` finds a container among the init containers too (the sidecar is a
native sidecar: an init container with ``restartPolicy: Always``) and lays
out the sidecar container's files (the image's, and the ConfigMap at its mount).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.container import ContainerFiles
from tests.support.sidecar import REPO_ROOT

KUBERNETES = REPO_ROOT / "deploy" / "kubernetes"
LEGACY_DEPLOYMENT = KUBERNETES / "pre-1.29" / "deployment.yaml"


def manifest_files() -> list[Path]:
    return sorted(KUBERNETES.rglob("*.yaml"))


def load_manifests(files: list[Path]) -> dict[str, list[dict[str, Any]]]:
    """Kind → documents."""
    found: dict[str, list[dict[str, Any]]] = {}
    for file in files:
        for document in yaml.safe_load_all(file.read_text()):
            if document:
                found.setdefault(document["kind"], []).append(document)
    return found


@dataclass
class Pod:
    deployment: dict[str, Any]
    configmap: dict[str, Any]
    service: dict[str, Any]

    @property
    def spec(self) -> dict[str, Any]:
        return dict(self.deployment["spec"]["template"]["spec"])

    def all_containers(self) -> list[dict[str, Any]]:
        return [*self.spec.get("initContainers", []), *self.spec["containers"]]

    def container(self, name: str) -> dict[str, Any]:
        [found] = [c for c in self.all_containers() if c["name"] == name]
        return dict(found)

    def port(self, container: dict[str, Any], name_or_number: str | int) -> int:
        if isinstance(name_or_number, int):
            return name_or_number
        [found] = [p for p in container["ports"] if p["name"] == name_or_number]
        return int(found["containerPort"])

    def files(self, root: Path) -> ContainerFiles:
        """The sidecar container's files: the image's, and the ConfigMap at its mount."""
        files = ContainerFiles(root)
        files.add_image_files()
        sidecar = self.container("sidecar")
        volumes = {v["name"]: v for v in self.spec["volumes"]}
        for mount in sidecar["volumeMounts"]:
            source = volumes[mount["name"]]["configMap"]["name"]
            assert source == self.configmap["metadata"]["name"]
            for key, text in self.configmap["data"].items():
                files.add(f"{mount['mountPath']}/{key}", text)
        return files


def load_pod(deployment_file: Path = KUBERNETES / "deployment.yaml") -> Pod:
    """The pod of one Deployment file, with the ConfigMap and Service beside it."""
    [deployment] = load_manifests([deployment_file])["Deployment"]
    others = load_manifests(sorted(KUBERNETES.glob("*.yaml")))
    [configmap] = others["ConfigMap"]
    [service] = others["Service"]
    return Pod(deployment, configmap, service)


def pre_stop_pause(container: dict[str, Any]) -> int:
    """Seconds of a container's ``preStop: exec: sleep N`` (0 without one)."""
    pre_stop = container.get("lifecycle", {}).get("preStop")
    if pre_stop is None:
        return 0
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep", command
    return int(command[1])
