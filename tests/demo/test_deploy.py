"""The container and deployment files, checked without a Docker engine or a cluster.

- Dockerfile: its shape (stages, user, ports, entrypoint, healthcheck), and
  its entrypoint and healthcheck commands run for real: the wheel built from
  exactly what the build stage copies, installed in a fresh virtual
  environment, started with the image's default config file laid out as the
  image would have it.
- docker-compose.yml: every path it names exists; each sidecar's effective
  config (the image's files, the mounted files and the environment, loaded by
  the sidecar's own loader) agrees with the ports, the upstream, Prometheus's
  targets and Grafana's provisioning.
- The Grafana dashboard: every metric it queries is one a live sidecar exports.
- Kubernetes: the manifests agree with the ConfigMap's config, and the probe
  paths answer 200 on a live sidecar running that config.

The fresh virtual environment gets the project from the built wheel and its
dependencies from the running interpreter's site-packages, through a ``.pth``
file (``--system-site-packages`` would give the base interpreter's, which
lacks them when the tests run in a venv). The wheel build itself needs
setuptools from the package index (pip's build isolation), as ``docker
build`` does.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import signal
import site
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.config import SidecarConfig, load_config, split_address
from sidecar.demo.traffic import Traffic
from sidecar.fallback.static import load_idl_parts
from sidecar.testing.catalog import CatalogServer
from sidecar.testing.faults import FaultProxyThread
from tests.support.sidecar import REPO_ROOT, SidecarThread, free_port, http_get
from tests.support.wait import wait_until

COMPOSE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "thrift-sidecar.json"
KUBERNETES = REPO_ROOT / "deploy" / "kubernetes"
PROMETHEUS_PORT = 9090  # the prom/prometheus image's port
REDIS_PORT = 6379
IMAGE_CONFIG = "/etc/sidecar/sidecar.yaml"


# -- the Dockerfile ---------------------------------------------------------------------


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


def dockerfile_stages(path: Path = DOCKERFILE) -> list[Stage]:
    """The stages of a Dockerfile: continuation lines joined, comments dropped."""
    stages: list[Stage] = []
    logical = ""
    for raw in path.read_text().splitlines():
        if raw.lstrip().startswith("#") and not logical:
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
            else:
                stages[-1].instructions.append((keyword, rest.strip()))
        logical = ""
    return stages


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


def config_ports(config: SidecarConfig) -> tuple[int, int]:
    assert config.metrics.listen is not None
    return split_address(config.listen)[1], split_address(config.metrics.listen)[1]


class ContainerFiles:
    """A container's filesystem as far as the sidecar reads it: the image's files
    (the final stage's COPY lines) and mounted files, laid out under a directory."""

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

    def load(self, config_path: str, environ: dict[str, str]) -> tuple[SidecarConfig, dict]:
        """The config as the sidecar in that container loads it (with the IDL checks)."""
        config = load_config(self.path(config_path), environ=environ)
        return config, load_idl_parts(config)


def test_dockerfile_builds_a_wheel_and_runs_it_as_a_user() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: build the wheel in one stage, install it in another"
    assert all(s.base == "python:3.11-slim" for s in stages)
    build, final = stages[0], stages[-1]
    assert any("pip wheel" in run for run in build.all("RUN"))
    assert any("pip install" in run and "--no-index" in run for run in final.all("RUN"))
    user = final.one("USER").split(":")[0]
    assert user not in ("root", "0"), "the image must not run as root"
    assert re.search(rf"useradd .*--uid {user}\b", " ".join(final.all("RUN")))
    assert exec_form(final.one("ENTRYPOINT")) == ["sidecar", "run", "--config", IMAGE_CONFIG]
    healthcheck_command(final)  # exec form, checked by running it below
    # Every file copied from the context exists and is not excluded by .dockerignore.
    patterns = dockerignore_patterns()
    for stage in stages:
        for sources, _ in copy_pairs(stage):
            for src in sources:
                assert (REPO_ROOT / src).exists(), src
                assert not dockerignored(src, patterns), f"{src} is in .dockerignore"
    assert dockerignored("tests/demo/test_deploy.py", patterns)  # the check can say yes
    assert dockerignored("sidecar/__pycache__/x.pyc", patterns)
    # The package's data files are symlinks into idl/ and config/: both must be copied.
    build_sources = {src for sources, _ in copy_pairs(build) for src in sources}
    for link in ("sidecar/testing/example.thrift", "sidecar/demo/demo.yaml"):
        target = (REPO_ROOT / link).resolve().relative_to(REPO_ROOT)
        assert target.parts[0] in build_sources, f"{link} points into {target.parts[0]}/"


def test_image_default_config_is_valid_and_matches_expose(tmp_path: Path) -> None:
    final = dockerfile_stages()[-1]
    files = ContainerFiles(tmp_path)
    files.add_image_files()
    config, parts = files.load(IMAGE_CONFIG, environ={})
    assert parts["static_replies"], "the example config's static replies need the IDL"
    exposed = {int(p) for rest in final.all("EXPOSE") for p in rest.split()}
    assert exposed == set(config_ports(config))
    health_url = env_of(final)["HEALTHCHECK_URL"]
    assert health_url.endswith("/healthz")
    assert f":{config_ports(config)[1]}/" in health_url
    # The upstream can be set from the environment alone (docker run -e SIDECAR_UPSTREAM=...).
    config, _ = files.load(IMAGE_CONFIG, environ={"SIDECAR_UPSTREAM": "10.1.2.3:9999"})
    assert config.upstream.addresses == ("10.1.2.3:9999",)


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel built from what the Dockerfile's build stage copies."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for sources, dest in copy_pairs(dockerfile_stages()[0]):
        for source in sources:
            target = src / dest / Path(source).name if dest.endswith("/") else src / dest
            if (REPO_ROOT / source).is_dir():
                ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
                shutil.copytree(REPO_ROOT / source, target, symlinks=True, ignore=ignore)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(REPO_ROOT / source, target)
    env = clean_env()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    built = subprocess.run(
        [*pip, "wheel", "--no-deps", "-q", "-w", str(tmp / "wheels"), str(src)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    wheels = list((tmp / "wheels").glob("thrift_sidecar-*.whl"))
    assert len(wheels) == 1, wheels
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['purelib'])",
        ],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.strip()
    # The dependencies: this interpreter's site-packages, after the venv's own.
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (Path(purelib) / "_test_dependencies.pth").write_text("\n".join(deps) + "\n")
    installed = subprocess.run(
        [
            *pip,
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            str(wheels[0]),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return venv


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without this checkout on the path or SIDECAR_* settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SIDECAR_") and k not in ("PYTHONPATH", "PYTHONHOME")
    }
    env.update(extra)
    return env


@pytest.mark.slow
def test_wheel_ships_the_demo(wheel_venv: Path, tmp_path: Path) -> None:
    """From the installed wheel: the package is the wheel's, the demo's files load."""
    script = (
        "import sidecar, sidecar.demo.sidecar_process as r, sidecar.testing.catalog as u\n"
        "from sidecar.config import load_config\n"
        "from sidecar.fallback.static import load_idl_parts\n"
        "import pathlib, tempfile, yaml\n"
        "print(sidecar.__file__)\n"
        "idl = u.load_catalog_idl()\n"
        "assert idl.Catalog.thrift_services\n"
        "with u.example_idl_path() as path, r.packaged_demo_settings() as settings:\n"
        "    assert path.is_file() and not path.is_symlink(), path\n"
        "    config = r.demo_config(settings, listen='127.0.0.1:1', admin='127.0.0.1:2',\n"
        "                           upstream='127.0.0.1:3', idl=path)\n"
        "    file = pathlib.Path(tempfile.mkdtemp()) / 'demo.yaml'\n"
        "    file.write_text(yaml.safe_dump(config))\n"
        "    parts = load_idl_parts(load_config(file, environ={}))\n"
        "    assert 'listItems' in parts['static_replies']\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [str(wheel_venv / "bin" / "python"), "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=clean_env(),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    where, status = result.stdout.split()
    assert Path(where).is_relative_to(wheel_venv), f"sidecar imported from {where}"
    assert status == "ok"


@pytest.mark.slow
def test_entrypoint_and_healthcheck_run_from_the_wheel(wheel_venv: Path, tmp_path: Path) -> None:
    final = dockerfile_stages()[-1]
    files = ContainerFiles(tmp_path / "root")
    files.add_image_files()
    entrypoint = exec_form(final.one("ENTRYPOINT"))
    argv = [str(files.path(a)) if a.startswith("/etc/") else a for a in entrypoint]
    admin = f"127.0.0.1:{free_port()}"
    env = clean_env(**env_of(final))
    env.update(
        PATH=f"{wheel_venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
        # The image listens on 0.0.0.0:9090 and :9464; here, free loopback ports.
        SIDECAR_LISTEN=f"127.0.0.1:{free_port()}",
        SIDECAR_METRICS_LISTEN=admin,
        HEALTHCHECK_URL=f"http://{admin}/healthz",
    )
    assert shutil.which(argv[0], path=env["PATH"]) == str(wheel_venv / "bin" / argv[0])
    log_path = tmp_path / "sidecar.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:

        def healthy() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                return http_get(f"http://{admin}/healthz", timeout=1.0)[0] == 200
            except OSError:
                return False

        wait_until(healthy, timeout=30, interval=0.05, message="/healthz from the wheel")
        check = healthcheck_command(final)
        assert check[0] == "python"
        ok = subprocess.run(check, env=env, capture_output=True, text=True, timeout=30)
        assert ok.returncode == 0, ok.stderr
        env_bad = {**env, "HEALTHCHECK_URL": f"http://{admin}/no-such-page"}
        bad = subprocess.run(check, env=env_bad, capture_output=True, text=True, timeout=30)
        assert bad.returncode != 0  # the check can fail
        # Exec form: SIGTERM reaches the sidecar, which drains and exits 0.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert str(files.path(IMAGE_CONFIG)) in argv


# -- docker-compose.yml ---------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
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
) -> tuple[SidecarConfig, dict]:
    files = ContainerFiles(tmp_path / name)
    files.add_image_files()
    for host, container in volumes(service):
        files.add(container, host)
    environment = {k: str(v) for k, v in (service.get("environment") or {}).items()}
    return files.load(IMAGE_CONFIG, environ=environment)


def option(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]


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


def test_prometheus_scrapes_every_sidecars_admin_port(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    services = compose["services"]
    prometheus = services["prometheus"]
    [(host_file, container_file)] = volumes(prometheus)
    assert f"--config.file={container_file}" in prometheus["command"]
    scrape = yaml.safe_load(host_file.read_text())
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


# -- the Grafana dashboard against a live sidecar -----------------------------------


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    queries = []

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard["panels"]):
        queries += [t["expr"] for t in panel.get("targets", []) if "expr" in t]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            queries.append(query.get("query", ""))
        elif variable.get("type") == "query":
            queries.append(str(query))
    return queries


def test_dashboard_queries_only_metrics_the_sidecar_exports() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = dashboard_queries(dashboard)
    used = {name for q in queries for name in re.findall(r"\bthrift_sidecar_\w+", q)}
    # What the issue asks the dashboard to show.
    assert {
        "thrift_sidecar_requests_total",
        "thrift_sidecar_retries_total",
        "thrift_sidecar_breaker_state",
        "thrift_sidecar_fallback_replies_total",
        "thrift_sidecar_request_duration_seconds_bucket",
        "thrift_sidecar_retry_budget_tokens",
    } <= used
    assert any("histogram_quantile" in q and "_bucket" in q for q in queries)
    assert any("by (outcome)" in q for q in queries)
    upstream = CatalogServer().start()
    proxy = FaultProxyThread(upstream.address, "framed").start()
    config = {
        "listen": f"127.0.0.1:{free_port()}",
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        "upstream": {"addresses": [proxy.address]},
        # One retry allowed, then the budget is empty: every retry series appears.
        "retry": {"budget": {"ratio": 0.0, "min_retries_per_second": 1, "window": "1s"}},
        "breaker": {"fail_max": 1, "reset_timeout": "60s"},
    }
    try:
        with SidecarThread(config) as sidecar:
            traffic = Traffic([sidecar.address], clients=1, rate=1)
            client = traffic.client()
            try:
                client.getItem(1)  # ok, and cached
                proxy.set_down(True)
                client.getItem(1)  # retried once, refused by the budget, served from the cache
                client.getItem(1)  # the breaker is open: the cache again
            finally:
                client.close()
            exported = _names(sidecar.metrics().text)
    finally:
        proxy.stop()
        upstream.stop()
    assert "thrift_sidecar_retry_budget_exhausted_total" in exported
    assert "thrift_sidecar_fallback_replies_total" in exported
    missing = used - exported
    assert not missing, f"the dashboard queries metrics the sidecar does not export: {missing}"


def _names(text: str) -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


# -- Kubernetes ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for file in sorted(KUBERNETES.glob("*.yaml")):
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

    def container(self, name: str) -> dict[str, Any]:
        [found] = [c for c in self.spec["containers"] if c["name"] == name]
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


@pytest.fixture(scope="module")
def pod(manifests: dict[str, list[dict[str, Any]]]) -> Pod:
    [deployment] = manifests["Deployment"]
    [configmap] = manifests["ConfigMap"]
    [service] = manifests["Service"]
    return Pod(deployment, configmap, service)


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
    for container in pod.spec["containers"]:
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
    # The drain fits in the grace period, after the preStop pause.
    pause = int(sidecar["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pause + config.drain_timeout < pod.spec["terminationGracePeriodSeconds"]
    # Non-root, as the image's USER.
    user = dockerfile_stages()[-1].one("USER").split(":")[0]
    assert str(pod.spec["securityContext"]["runAsUser"]) == user


def test_kubernetes_probe_paths_answer_on_a_live_sidecar(pod: Pod, tmp_path: Path) -> None:
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
    paths = [sidecar[p]["httpGet"]["path"] for p in ("livenessProbe", "readinessProbe")]
    with SidecarThread(config, **load_idl_parts(config)) as live:
        for path in paths:
            status, body = http_get(live.admin + path)
            assert status == 200, (path, body)
        assert http_get(live.admin + "/not-a-probe")[0] == 404  # a wrong path would fail


def test_python_modules_run_by_compose_and_kubernetes_take_their_flags(
    compose: dict[str, Any], pod: Pod
) -> None:
    """Every ``python -m sidecar...`` the files run exists, and knows every flag it is given."""
    argvs = [s["entrypoint"] for s in compose["services"].values() if "entrypoint" in s]
    argvs += [c["command"] for c in pod.spec["containers"] if "command" in c]
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
