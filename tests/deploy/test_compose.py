"""docker-compose.yml, checked without a Docker engine.

- It is valid against the Compose Specification's JSON schema (the copy that
  the check-jsonschema package vendors, read offline).
- Every path it names exists; each sidecar's effective config (the image's
  files, the mounted files and the environment, loaded by the sidecar's own
  loader) agrees with the ports, the upstream, Prometheus's targets and
  rule files, and Grafana's provisioning.
- Every ``python -m sidecar...`` it (or the Kubernetes pod) runs takes the
  flags it is given.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from sidecar.config import split_address
from tests.deploy.compose_file import (
    load_compose,
    published,
    runs_sidecar,
    sidecar_config,
    volumes,
)
from tests.deploy.container import clean_env, config_ports, option
from tests.deploy.pod import Pod, load_pod
from tests.support.sidecar import REPO_ROOT

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "thrift-sidecar.json"
PROMETHEUS_PORT = 9090  # the prom/prometheus image's port
REDIS_PORT = 6379


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


def compose_schema() -> dict[str, Any]:
    """The Compose Specification's schema, as check-jsonschema ships it."""
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads((vendor / "compose-spec.json").read_text())
    assert schema["title"] == "Compose Specification"
    return dict(schema)


def schema_errors(document: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(compose_schema())
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(document)
    ]


def test_compose_file_is_valid_against_the_compose_specification(
    compose: dict[str, Any],
) -> None:
    assert schema_errors(compose) == []
    # The schema catches a misspelt key and a wrong type (so the check can fail).
    broken = copy.deepcopy(compose)
    broken["services"]["sidecar"]["enviroment"] = broken["services"]["sidecar"].pop("environment")
    broken["services"]["traffic"]["depends_on"] = "sidecar"
    errors = schema_errors(broken)
    assert any(e.startswith("services/sidecar") for e in errors), errors
    assert any(e.startswith("services/traffic/depends_on") for e in errors), errors


def test_compose_names_only_paths_that_exist(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"upstream", "sidecar", "traffic", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        build = service.get("build")
        if build is not None:
            context = REPO_ROOT / build["context"]
            assert context.is_dir(), name
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
        for host, container in volumes(service):
            assert host.exists(), f"{name}: {host} does not exist"
            assert container.startswith("/"), name
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        if build is not None and not runs_sidecar(service):
            # The image's HEALTHCHECK asks the sidecar's /healthz: others need their own.
            assert "healthcheck" in service, f"{name} would be reported unhealthy"


def test_compose_sidecars_agree_with_their_configs(compose: dict[str, Any], tmp_path: Path) -> None:
    services = compose["services"]
    sidecars = {n: s for n, s in services.items() if runs_sidecar(s)}
    assert {"sidecar", "fleet-a", "fleet-b"} <= set(sidecars)
    upstream_argv = services["upstream"]["entrypoint"]
    assert upstream_argv[:3] == ["python", "-m", "sidecar.testing.upstream"]
    upstream_port = int(option(upstream_argv, "--port")[0])
    for name, service in sidecars.items():
        config, _ = sidecar_config(name, service, tmp_path)
        listen, admin = config_ports(config)
        assert set(published(service)) == {listen, admin}, name
        assert split_address(config.listen)[0] == "0.0.0.0", f"{name} must listen on all"
        for address in config.upstream.addresses:
            host, port = split_address(address)
            assert host == "upstream", name
            assert port == upstream_port, name
        fleet = "fleet" in service.get("profiles", [])
        if fleet:
            assert config.state.redis_url is not None, name
            assert config.fallback.cache.backend == "redis", name
            redis = re.match(r"redis://([\w.-]+):(\d+)/", config.state.redis_url)
            assert redis, config.state.redis_url
            assert redis.group(1) in services
            assert int(redis.group(2)) == REDIS_PORT
            assert "fleet" in services[redis.group(1)].get("profiles", [])
        else:
            assert config.state.redis_url is None, name
    host_ports = [p for s in services.values() for p in published(s).values()]
    assert len(host_ports) == len(set(host_ports)), "two services publish one host port"


def test_compose_traffic_calls_the_sidecars(compose: dict[str, Any], tmp_path: Path) -> None:
    services = compose["services"]
    generators = [s for s in services.values() if "sidecar.demo.traffic" in s.get("entrypoint", [])]
    assert len(generators) == 2  # one for the sidecar, one for the fleet
    for service in generators:
        targets = option(service["entrypoint"], "--target")
        assert targets
        for target in targets:
            host, port = split_address(target)
            assert runs_sidecar(services[host])
            config, _ = sidecar_config(host, services[host], tmp_path)
            assert port == config_ports(config)[0]


def test_prometheus_scrapes_every_sidecar_and_loads_the_rules(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    services = compose["services"]
    prometheus = services["prometheus"]
    [(host_dir, container_dir)] = volumes(prometheus)
    assert f"--config.file={container_dir}/prometheus.yml" in prometheus["command"]
    scrape = yaml.safe_load((host_dir / "prometheus.yml").read_text())
    for rule_file in scrape["rule_files"]:
        assert (host_dir / rule_file).is_file(), rule_file
    assert {"alerts.yml", "recording.yml"} <= set(scrape["rule_files"])
    targets = [
        (job, target)
        for job in scrape["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    ]
    scraped = set()
    for job, target in targets:
        host, port = split_address(target)
        config, _ = sidecar_config(host, services[host], tmp_path)
        assert port == config_ports(config)[1], target
        assert job.get("metrics_path", "/metrics") == "/metrics"
        scraped.add(host)
    assert scraped == {n for n, s in services.items() if runs_sidecar(s)}


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = {container: host for host, container in volumes(grafana)}
    provisioning = Path(mounts["/etc/grafana/provisioning"])
    sources = [
        source
        for file in sorted((provisioning / "datasources").glob("*.yml"))
        for source in yaml.safe_load(file.read_text())["datasources"]
    ]
    [prometheus] = [s for s in sources if s["type"] == "prometheus"]
    host, port = split_address(prometheus["url"].removeprefix("http://"))
    assert host in compose["services"]
    assert port == PROMETHEUS_PORT
    providers = [
        provider
        for file in sorted((provisioning / "dashboards").glob("*.yml"))
        for provider in yaml.safe_load(file.read_text())["providers"]
    ]
    [provider] = providers
    dashboards = Path(mounts[provider["options"]["path"]])
    assert (dashboards / DASHBOARD.name).samefile(DASHBOARD)
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"


def test_python_modules_run_by_compose_and_kubernetes_take_their_flags(
    compose: dict[str, Any],
) -> None:
    """Every ``python -m sidecar...`` the files run exists, and knows every flag it is given."""
    pod: Pod = load_pod()
    argvs = [s["entrypoint"] for s in compose["services"].values() if "entrypoint" in s]
    argvs += [c["command"] for c in pod.all_containers() if "command" in c]
    programs = [argv for argv in argvs if argv[:2] == ["python", "-m"]]
    assert {argv[2] for argv in programs} == {"sidecar.testing.upstream", "sidecar.demo.traffic"}
    env = clean_env(PYTHONPATH=str(REPO_ROOT))
    for argv in programs:
        result = subprocess.run(
            [sys.executable, "-m", argv[2], "--help"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert result.returncode == 0, f"{argv}: {result.stderr}"
        for flag in (arg for arg in argv[3:] if arg.startswith("--")):
            assert re.search(rf"^\s+{re.escape(flag)}\b", result.stdout, re.M), (flag, argv)
