"""The Dockerfile, checked without a Docker engine: its shape, and its commands run for real.

- Its shape: a pinned base, the dependencies from requirements.lock with
  hashes, no pip in the final stage, OCI labels, a non-root user
  (`image_problems` lists what is wrong, and is shown to find each fault).
- Its entrypoint and healthcheck run for real: the wheel built from exactly
  what the build stage copies, installed in a fresh virtual environment
  without pip, started with the image's default config file laid out as the
  image would have it.

The fresh virtual environment gets the project from the built wheel and its
dependencies from the running interpreter's site-packages, through a ``.pth``
file (``--system-site-packages`` would give the base interpreter's, which
lacks them when the tests run in a venv). The wheel build itself needs
setuptools from the package index (pip's build isolation), as ``docker
build`` does.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import site
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

import sidecar
from tests.deploy.container import IMAGE_CONFIG, ContainerFiles, clean_env, config_ports
from tests.deploy.dockerfile import (
    DOCKERFILE,
    Stage,
    copy_pairs,
    dockerfile_stages,
    dockerignore_patterns,
    dockerignored,
    env_of,
    exec_form,
    healthcheck_command,
    labels_of,
    parse_dockerfile,
)
from tests.support.sidecar import REPO_ROOT, free_port, http_get
from tests.support.wait import wait_until

# An exact Python release on an exact Debian release, optionally with its digest.
PINNED_BASE = re.compile(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?")
OCI_LABELS = {
    f"org.opencontainers.image.{key}"
    for key in ("title", "description", "version", "licenses", "revision", "created", "base.name")
}
LOCK = "requirements.lock"
BUILD_LOCK = "requirements-build.lock"
# The compiled wheel takes 1-2 minutes to build on two cores.
WHEEL_BUILD_TIMEOUT = 420


def image_problems(stages: list[Stage]) -> list[str]:
    """What keeps the image from being reproducible and minimal (empty: nothing)."""
    problems = []
    if len(stages) < 2:
        return ["one stage: build in one stage, install the result in another"]
    build, final = stages[0], stages[-1]
    for stage in stages:
        if not PINNED_BASE.fullmatch(stage.base):
            problems.append(f"base {stage.base} is not an exact python:3.11.x-slim-bookworm")
    if len({s.base for s in stages}) != 1:
        problems.append("the stages use different bases (the venv's python would differ)")
    build_runs = build.all("RUN")
    if not any(LOCK in sources for sources, _ in copy_pairs(build)):
        problems.append(f"the build stage does not copy {LOCK}")
    locked = [r for r in build_runs if f"-r {LOCK}" in r]
    if not locked or not all("--require-hashes" in r for r in locked):
        problems.append(f"dependencies not installed from {LOCK} with --require-hashes")
    if not any("venv --without-pip" in r for r in build_runs):
        problems.append("the environment copied to the final stage may carry pip")
    for command in (c.strip() for run in build_runs for c in run.split("&&")):
        pip_install = re.search(r"\bpip\b.* install ", command)  # apt-get's are Debian's
        if pip_install and f"-r {LOCK}" not in command and "--no-deps" not in command:
            problems.append(f"an install that may resolve unlocked dependencies: {command}")
    final_runs = " && ".join(final.all("RUN"))
    if re.search(r"\bpip\b[^&]*\binstall\b", final_runs):
        problems.append("the final stage installs with pip")
    if not re.search(r"pip uninstall --yes pip\b", final_runs):
        problems.append("the final stage keeps the base image's pip")
    missing = OCI_LABELS - set(labels_of(final))
    if missing:
        problems.append(f"OCI labels missing: {sorted(missing)}")
    user = final.one("USER").split(":")[0] if final.all("USER") else "root"
    if user in ("root", "0"):
        problems.append("the image runs as root")
    return problems


def test_dockerfile_is_pinned_locked_without_pip_and_labelled() -> None:
    assert image_problems(dockerfile_stages()) == []
    labels = labels_of(dockerfile_stages()[-1])
    assert labels["org.opencontainers.image.version"] == sidecar.__version__
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    base = dockerfile_stages()[-1].base.split("@")[0]
    assert labels["org.opencontainers.image.base.name"].endswith(f"/library/{base}")


@pytest.mark.parametrize(
    ("change", "found"),
    [
        (("{base}", "python:3.11-slim"), "not an exact"),
        (("--require-hashes ", ""), "--require-hashes"),
        (("venv --without-pip", "venv"), "may carry pip"),
        (("pip uninstall --yes pip setuptools wheel", "true"), "keeps the base image's pip"),
        (("org.opencontainers.image.created=", "created="), "OCI labels missing"),
        (("USER 10001:10001", "USER root"), "runs as root"),
        (("--no-deps --no-index /wheels", "--no-index /wheels"), "unlocked dependencies"),
    ],
)
def test_image_problems_finds_each_fault(change: tuple[str, str], found: str) -> None:
    text = DOCKERFILE.read_text()
    before = change[0].format(base=dockerfile_stages()[0].base)
    assert before in text, change
    problems = image_problems(parse_dockerfile(text.replace(before, change[1])))
    assert any(found in p for p in problems), problems


def test_dockerfile_builds_a_wheel_and_runs_it_as_a_user() -> None:
    stages = dockerfile_stages()
    build, final = stages[0], stages[-1]
    assert any(re.search(r"\bpip\b.* wheel --no-deps", run) for run in build.all("RUN"))
    user = final.one("USER").split(":")[0]
    assert re.search(rf"useradd .*--uid {user}\b", " ".join(final.all("RUN")))
    assert exec_form(final.one("ENTRYPOINT")) == ["sidecar", "run", "--config", IMAGE_CONFIG]
    # The venv built in the first stage is the one on the final stage's PATH.
    [copied] = [c for c in final.all("COPY") if c.startswith("--from=")]
    venv = copied.split()[-1]
    assert env_of(final)["PATH"].startswith(f"{venv}/bin:")
    assert any(f"venv --without-pip {venv}" in run for run in build.all("RUN"))
    healthcheck_command(final)  # exec form, checked by running it below
    # Every file copied from the context exists and is not excluded by .dockerignore.
    patterns = dockerignore_patterns()
    for stage in stages:
        for sources, _ in copy_pairs(stage):
            for src in sources:
                assert (REPO_ROOT / src).exists(), src
                assert not dockerignored(src, patterns), f"{src} is in .dockerignore"
    assert dockerignored("tests/deploy/test_image.py", patterns)  # the check can say yes
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
    # As the build stage builds it: compiled when its ENV says so, then with the
    # build tools and dependencies of the environment at hand (this one has both).
    compile_flag = env_of(dockerfile_stages()[0]).get("THRIFT_SIDECAR_COMPILE", "0")
    env["THRIFT_SIDECAR_COMPILE"] = compile_flag
    isolation = ["--no-build-isolation"] if compile_flag == "1" else []
    built = subprocess.run(
        [*pip, "wheel", "--no-deps", *isolation, "-q", "-w", str(tmp / "wheels"), str(src)],
        capture_output=True,
        text=True,
        env=env,
        timeout=WHEEL_BUILD_TIMEOUT,
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


@pytest.mark.one_build("builds and installs the wheel the image would; the same from either suite")
@pytest.mark.slow
@pytest.mark.timeout(WHEEL_BUILD_TIMEOUT + 60)  # the first user of wheel_venv builds it
def test_wheel_ships_the_demo(wheel_venv: Path, tmp_path: Path) -> None:
    """From the installed wheel: the package is the wheel's, the demo's files load."""
    script = (
        "import sidecar, sidecar.demo.sidecar_process as r, sidecar.testing.catalog as u\n"
        "from sidecar.config import load_config\n"
        "from sidecar.fallback.static import load_idl_parts\n"
        "import pathlib, yaml\n"
        "import sidecar.native\n"
        "print(sidecar.__file__, sidecar.native.build())\n"
        "idl = u.load_catalog_idl()\n"
        "assert idl.Catalog.thrift_services\n"
        "with u.example_idl_path() as path, r.packaged_demo_settings() as settings:\n"
        "    assert path.is_file() and not path.is_symlink(), path\n"
        "    config = r.demo_config(settings, listen='127.0.0.1:1', admin='127.0.0.1:2',\n"
        "                           upstream='127.0.0.1:3', idl=path)\n"
        f"    file = pathlib.Path({str(tmp_path)!r}) / 'demo.yaml'\n"
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
    where, build, status = result.stdout.split()
    assert Path(where).is_relative_to(wheel_venv), f"sidecar imported from {where}"
    compiles = env_of(dockerfile_stages()[0]).get("THRIFT_SIDECAR_COMPILE") == "1"
    assert build == ("mypyc" if compiles else "python")
    assert status == "ok"


def test_the_image_compiles_with_the_mypy_ci_compiles_with() -> None:
    """requirements-build.lock's mypy (the image's mypyc) is this environment's (CI's)."""
    pins = dict(re.findall(r"^([a-z0-9-]+)==(\S+) ", (REPO_ROOT / BUILD_LOCK).read_text(), re.M))
    assert pins["mypy"] == version("mypy")
    assert int(pins["setuptools"].split(".")[0]) >= 77  # reads the license string
    build = dockerfile_stages()[0]
    assert any(BUILD_LOCK in sources for sources, _ in copy_pairs(build))
    installs = [r for r in build.all("RUN") if f"-r {BUILD_LOCK}" in r]
    assert installs
    assert all("--require-hashes" in r for r in installs)


@pytest.mark.one_build("builds and installs the wheel the image would; the same from either suite")
@pytest.mark.slow
@pytest.mark.timeout(WHEEL_BUILD_TIMEOUT + 60)
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
