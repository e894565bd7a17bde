"""deploy/kubernetes, checked without a cluster.

- Every manifest is valid against the Kubernetes API schema (kubernetes-validate,
  which ships the schemas and works offline), strictly: unknown fields fail.
- Both pods (deployment.yaml with a native sidecar, Kubernetes 1.29 and
  later; pre-1.29/deployment.yaml with two ordinary containers) agree with the
  ConfigMap's config, turn off service links, and order their shutdown so
  that the application outlives the sidecar's drain.
- The probe paths answer 200 on a live sidecar running the ConfigMap's config.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from sidecar.config import load_config, split_address
from sidecar.fallback.static import load_idl_parts
from tests.deploy.container import IMAGE_CONFIG, config_ports, option
from tests.deploy.dockerfile import dockerfile_stages
from tests.deploy.pod import (
    KUBERNETES,
    LEGACY_DEPLOYMENT,
    Pod,
    load_pod,
    manifest_files,
    pre_stop_pause,
)
from tests.support.sidecar import SidecarThread, free_port, http_get

NATIVE_SIDECARS = "1.29.0"  # the first release with native sidecar containers on by default
ENDPOINT_PROPAGATION = 5  # seconds for a pod's removal from endpoints to reach clients
DEPLOYMENTS = [KUBERNETES / "deployment.yaml", LEGACY_DEPLOYMENT]


def kubernetes_versions(file: Path) -> list[str]:
    """The legacy pod must also pass an older API; all must pass the newest shipped."""
    oldest = "1.27.0" if file == LEGACY_DEPLOYMENT else NATIVE_SIDECARS
    return [oldest, kubernetes_validate.latest_version()]


@pytest.mark.parametrize("file", manifest_files(), ids=lambda f: str(f.relative_to(KUBERNETES)))
def test_manifests_are_valid_kubernetes_objects(file: Path) -> None:
    documents = [d for d in yaml.safe_load_all(file.read_text()) if d]
    assert documents
    for document in documents:
        for version in kubernetes_versions(file):
            kubernetes_validate.validate(document, version, strict=True)


def test_schema_validation_rejects_a_misspelt_field() -> None:
    [document] = yaml.safe_load_all((KUBERNETES / "deployment.yaml").read_text())
    broken = copy.deepcopy(document)
    spec = broken["spec"]["template"]["spec"]
    spec["enableServiceLink"] = spec.pop("enableServiceLinks")
    with pytest.raises(kubernetes_validate.ValidationError, match="enableServiceLink"):
        kubernetes_validate.validate(broken, NATIVE_SIDECARS, strict=True)


@pytest.fixture(params=DEPLOYMENTS, ids=["native", "pre-1.29"])
def pod(request: pytest.FixtureRequest) -> Pod:
    return load_pod(request.param)


def test_kubernetes_pod_agrees_with_the_sidecar_config(pod: Pod, tmp_path: Path) -> None:
    sidecar = pod.container("sidecar")
    assert "command" not in sidecar, "the image's entrypoint runs the sidecar"
    assert "args" not in sidecar
    config, parts = pod.files(tmp_path).load(IMAGE_CONFIG, environ={})
    assert parts["static_replies"]
    listen, admin = config_ports(config)
    assert pod.port(sidecar, "thrift") == listen
    assert pod.port(sidecar, "admin") == admin
    # Probes on the admin port, at the sidecar's health paths.
    liveness, readiness = sidecar["livenessProbe"]["httpGet"], sidecar["readinessProbe"]["httpGet"]
    assert pod.port(sidecar, liveness["port"]) == admin
    assert pod.port(sidecar, readiness["port"]) == admin
    assert (liveness["path"], readiness["path"]) == ("/healthz", "/readyz")
    annotations = pod.deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == admin
    assert annotations["prometheus.io/path"] == "/metrics"
    for container in pod.all_containers():
        assert set(container["resources"]) == {"requests", "limits"}, container["name"]
    # The application is the upstream, on the pod's loopback.
    app = pod.container("catalog")
    [upstream] = config.upstream.addresses
    host, port = split_address(upstream)
    assert host == "127.0.0.1"
    assert option(app["command"], "--port") == [str(port)]
    # Clients reach the sidecar through the Service.
    service_ports = {p["name"]: p for p in pod.service["spec"]["ports"]}
    assert pod.port(sidecar, service_ports["thrift"]["targetPort"]) == listen
    selector = pod.service["spec"]["selector"]
    labels = pod.deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    # Kubernetes' service-link variables (CATALOG_SERVICE_HOST, ...) stay out.
    assert pod.spec["enableServiceLinks"] is False
    # Non-root, as the image's USER.
    user = dockerfile_stages()[-1].one("USER").split(":")[0]
    assert str(pod.spec["securityContext"]["runAsUser"]) == user


def drain_timeout(pod: Pod, tmp_path: Path) -> float:
    config, _ = pod.files(tmp_path).load(IMAGE_CONFIG, environ={})
    return config.drain_timeout


def test_native_sidecar_starts_first_and_stops_last(tmp_path: Path) -> None:
    pod = load_pod(KUBERNETES / "deployment.yaml")
    [sidecar] = pod.spec["initContainers"]
    assert sidecar["name"] == "sidecar"
    assert sidecar["restartPolicy"] == "Always", "without it, an init container must exit"
    assert "sidecar" not in {c["name"] for c in pod.spec["containers"]}
    # The application starts once the sidecar is ready (its startup probe passed).
    startup = sidecar["startupProbe"]["httpGet"]
    assert startup["path"] == "/readyz"
    assert pod.port(sidecar, startup["port"]) == pod.port(sidecar, "admin")
    # The kubelet stops the sidecar after the application: the application
    # pauses while the endpoint removal spreads, then the sidecar drains, all
    # within the grace period.
    app_pause = pre_stop_pause(pod.container("catalog"))
    assert app_pause >= ENDPOINT_PROPAGATION
    assert pre_stop_pause(sidecar) == 0, "a pause here would only delay the pod's end"
    grace = pod.spec["terminationGracePeriodSeconds"]
    assert app_pause + drain_timeout(pod, tmp_path) < grace


def test_pre_1_29_application_waits_out_the_sidecars_drain(tmp_path: Path) -> None:
    pod = load_pod(LEGACY_DEPLOYMENT)
    assert "initContainers" not in pod.spec
    sidecar_pause = pre_stop_pause(pod.container("sidecar"))
    app_pause = pre_stop_pause(pod.container("catalog"))
    assert sidecar_pause >= ENDPOINT_PROPAGATION
    # Both get SIGTERM after their own pause: the application's ends after the drain.
    assert app_pause >= sidecar_pause + drain_timeout(pod, tmp_path)
    assert app_pause < pod.spec["terminationGracePeriodSeconds"]


def test_the_two_pods_differ_only_in_how_the_sidecar_runs() -> None:
    native, legacy = (load_pod(f) for f in DEPLOYMENTS)

    def essentials(pod: Pod) -> dict[str, Any]:
        containers = {}
        for container in pod.all_containers():
            kept = {k: v for k, v in container.items() if k not in ("restartPolicy", "lifecycle")}
            kept.pop("startupProbe", None)
            containers[container["name"]] = kept
        spec = {k: v for k, v in pod.spec.items() if k not in ("initContainers", "containers")}
        deployment = {k: v for k, v in pod.deployment["spec"].items() if k != "template"}
        return {
            "spec": spec,
            "containers": containers,
            "metadata": pod.deployment["metadata"],
            "deployment": deployment,
            "template": pod.deployment["spec"]["template"]["metadata"],
        }

    assert essentials(native) == essentials(legacy)


def test_kubernetes_probe_paths_answer_on_a_live_sidecar(tmp_path: Path) -> None:
    pod = load_pod()
    files = pod.files(tmp_path)
    config = load_config(
        files.path(IMAGE_CONFIG),
        environ={},
        overrides={
            ("listen",): f"127.0.0.1:{free_port()}",
            ("metrics", "listen"): f"127.0.0.1:{free_port()}",
        },
    )
    sidecar = pod.container("sidecar")
    probes = ("startupProbe", "livenessProbe", "readinessProbe")
    paths = [sidecar[p]["httpGet"]["path"] for p in probes]
    with SidecarThread(config, **load_idl_parts(config)) as live:
        for path in paths:
            status, body = http_get(live.admin + path)
            assert status == 200, (path, body)
        assert http_get(live.admin + "/not-a-probe")[0] == 404  # a wrong path would fail
