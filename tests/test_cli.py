"""The ``sidecar`` command as users run it: real subprocesses, exit codes, messages.

Every bad config goes through both ``sidecar check-config FILE`` and
``sidecar run --config FILE`` (four at a time) and must give exit status 2
and a one-paragraph message naming the key path and the bad value. Those 80
runs are forked from the suite's zygote (tests/support/zygote.py: the same
entry point as ``python -m sidecar``, with the run's arguments, environment
and directory), since each exits at once and a fresh interpreter would spend
0.6 s of CPU importing; every other test here starts ``python -m sidecar``.
Precedence is checked on a running sidecar by the port it listens on.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from sidecar.config import load_config
from tests.support.sidecar import FORK, free_port, http_get, run_sidecar, zygote

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_IDL = REPO / "idl" / "example.thrift"
# Seconds a failing command may take; generous for a loaded 2-core machine.
COMMAND_TIMEOUT = 60.0


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def start(
    args: list[str], env: dict[str, str] | None = None, cwd: Path = REPO
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sidecar", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(env),
        cwd=cwd,
        text=True,
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    """Wait for a command that must exit by itself; kill it (and fail) if it does not."""
    try:
        out, err = proc.communicate(timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=10)
        pytest.fail(f"{proc.args} did not exit within {COMMAND_TIMEOUT}s:\n{out}\n{err}")
    return proc.returncode, out, err


def sidecar(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    return finish(start(list(args), env))


@dataclass
class Bad:
    """A bad config and what the message must contain."""

    text: str
    expected: list[str]
    env: dict[str, str] = field(default_factory=dict)


# Text placeholders: {idl} is idl/example.thrift, {bad_idl} an IDL with a syntax error.
UP = "upstream: {addresses: [127.0.0.1:1]}\n"
BAD_CONFIGS: dict[str, Bad] = {
    "unknown top-level key": Bad(
        UP + "lisen: 0.0.0.0:9090\n", ["lisen: unknown key (did you mean 'listen'?)"]
    ),
    "typo in a nested key": Bad(
        UP + "retry:\n  max_atempts: 3\n",
        ["retry.max_atempts: unknown key (did you mean 'max_attempts'?)"],
    ),
    "typo in a per-method key": Bad(
        UP + "methods:\n  getItem:\n    retry: {per_try_timout: 1s}\n",
        ["methods.getItem.retry.per_try_timout", "did you mean 'per_try_timeout'?"],
    ),
    "negative duration": Bad(
        UP + "retry: {per_try_timeout: -1s}\n",
        ["retry.per_try_timeout: a duration cannot be negative (got '-1s')"],
    ),
    "zero timeout": Bad(
        UP + "retry: {deadline: 0ms}\n", ["retry.deadline: must be longer than zero"]
    ),
    "bad duration unit": Bad(
        UP + "breaker: {reset_timeout: 30 sec}\n",
        ["breaker.reset_timeout", "(units: ms, s, m, h)", "'30 sec'"],
    ),
    "bad size unit": Bad(
        UP + "max_frame_size: 16mb\n", ["max_frame_size", "KiB, MiB", "(got '16mb')"]
    ),
    "size out of range": Bad(
        UP + "max_frame_size: 8B\n", ["max_frame_size: must be between 64B and 2GiB - 1 (got '8B')"]
    ),
    "max_attempts 0": Bad(
        UP + "retry: {max_attempts: 0}\n", ["retry.max_attempts: must be at least 1 (got 0)"]
    ),
    "multiplier below 1": Bad(
        UP + "retry: {multiplier: 0.5}\n", ["retry.multiplier: must be at least 1", "(got 0.5)"]
    ),
    "not a number": Bad(
        UP + "max_connections: many\n", ["max_connections: expected a whole number (got 'many')"]
    ),
    "bad address": Bad(
        UP + "listen: localhost\n", ["listen: expected HOST:PORT", "(got 'localhost')"]
    ),
    "port out of range": Bad(
        "upstream: {addresses: ['127.0.0.1:65536']}\n",
        ["upstream.addresses[0]: port 65536 is out of range", "'127.0.0.1:65536'"],
    ),
    "bad enum": Bad(
        UP + "transport: foo\n", ["transport: must be one of auto, framed, buffered (got 'foo')"]
    ),
    "enum near miss": Bad(
        "upstream: {addresses: [127.0.0.1:1], transport: bufferd}\n",
        ["upstream.transport", "(did you mean 'buffered'?)", "'bufferd'"],
    ),
    "retry_on with an unknown outcome": Bad(
        UP + "retry: {retry_on: [timeout, server_busy]}\n",
        ["retry.retry_on[1]: must be one of internal_error", "(got 'server_busy')"],
    ),
    "list written as a string": Bad(
        "upstream: {addresses: 127.0.0.1:1}\n", ["upstream.addresses: expected a list"]
    ),
    "section that is not a mapping": Bad(
        UP + "retry: 3\n", ["retry: expected a mapping of keys", "(got 3)"]
    ),
    "unreachable IDL path": Bad(
        UP + "idl: no/such.thrift\n", ["idl: file not found: 'no/such.thrift'", "looked at"]
    ),
    "IDL that does not parse": Bad(
        UP + "idl: {bad_idl}\n", ["idl: cannot load", "bad.thrift", "at line 3"]
    ),
    "static reply of the wrong type": Bad(
        UP + "idl: {idl}\nmethods:\n  getItem:\n    fallback: {static: unavailable}\n",
        [
            "methods.getItem.fallback.static: expected a mapping of the fields of Item",
            "unavailable",
        ],
    ),
    "static reply with a bad nested value": Bad(
        UP + "idl: {idl}\nmethods:\n  listItems:\n    fallback:\n"
        "      static: [{id: 1, tags: [new, 5]}]\n",
        ["methods.listItems.fallback.static[0].tags[1]: expected a string, got 5"],
    ),
    "static reply with a bad enum": Bad(
        UP + "idl: {idl}\nmethods:\n  getItem:\n    fallback: {static: {id: 1, status: GONE}}\n",
        ["methods.getItem.fallback.static.status", "IN_STOCK", "'GONE'"],
    ),
    "static reply for a method not in the IDL": Bad(
        UP + "idl: {idl}\nmethods:\n  getItems:\n    fallback: {static: []}\n",
        ["methods.getItems: no such method", "Catalog.getItem"],
    ),
    "static reply with no IDL": Bad(
        UP + "methods:\n  getItem:\n    fallback: {static: {id: 0}}\n",
        ["methods.getItem.fallback: a static reply needs the service's IDL"],
    ),
    "static_exception naming an undeclared exception": Bad(
        UP + "idl: {idl}\nmethods:\n  getItem:\n"
        "    fallback: {static_exception: {name: InvalidOrder}}\n",
        [
            "methods.getItem.fallback.static_exception.name",
            "'InvalidOrder' is not declared",
            "ItemNotFound",
        ],
    ),
    "static and static_exception both": Bad(
        UP + "methods:\n  getItem:\n    fallback:\n      static: {id: 0}\n"
        "      static_exception: {name: ItemNotFound}\n",
        ["methods.getItem.fallback.static_exception: set static or static_exception, not both"],
    ),
    "health check without a method": Bad(
        UP + "health_check: {interval: 2s}\n", ["health_check.method: required key is missing"]
    ),
    "health check arguments of the wrong type": Bad(
        UP + "idl: {idl}\nhealth_check: {method: getItem, arguments: {id: one}}\n",
        ["health_check.arguments.id: expected an integer that fits i64, got 'one'"],
    ),
    "method key that is a pattern": Bad(
        UP + "methods:\n  'get*': {idempotent: true}\n", ["methods.get*: not a method name"]
    ),
    "sqlite backend without path": Bad(
        UP + "fallback:\n  cache: {backend: sqlite}\n",
        ["fallback.cache.path: required with backend sqlite"],
    ),
    "redis backend without redis_url": Bad(
        UP + "fallback:\n  cache: {backend: redis}\n",
        ["fallback.cache.backend: backend redis needs state.redis_url", "(got 'redis')"],
    ),
    "redis_url that is not a URL": Bad(
        UP + "state: {redis_url: 'localhost:6379'}\n",
        ["state.redis_url: expected a Redis URL", "(got 'localhost:6379')"],
    ),
    "admin port equal to the listen port": Bad(
        UP + "listen: 127.0.0.1:7777\nmetrics: {listen: 0.0.0.0:7777}\n",
        ["metrics.listen: the admin endpoint cannot share the port of listen"],
    ),
    "YAML syntax error": Bad(
        UP + "retry:\n  max_attempts: 3\n   deadline: 2s\n",
        ["not valid YAML at line 4", "mapping values are not allowed"],
    ),
    "YAML tab indentation": Bad(
        UP + "retry:\n\tmax_attempts: 3\n", ["not valid YAML at line 3", "not tabs"]
    ),
    "key written twice": Bad(
        UP + "retry:\n  max_attempts: 3\n  max_attempts: 4\n",
        ["line 4", "'max_attempts' appears twice", "first on line 3"],
    ),
    "top level not a mapping": Bad(
        "- listen: 0.0.0.0:9090\n", ["the top level must be a mapping of keys", "not a list"]
    ),
    "invalid env var value": Bad(
        UP,
        [
            "retry.max_attempts (from environment variable SIDECAR_RETRY__MAX_ATTEMPTS)",
            "expected a whole number (got 'abc')",
        ],
        env={"SIDECAR_RETRY__MAX_ATTEMPTS": "abc"},
    ),
    "misspelt env var": Bad(
        UP,
        ["SIDECAR_BREAKER__FAILMAX", "did you mean SIDECAR_BREAKER__FAIL_MAX?"],
        env={"SIDECAR_BREAKER__FAILMAX": "3"},
    ),
}


def _write_case(tmp_path: Path, case: Bad) -> Path:
    bad_idl = tmp_path / "bad.thrift"
    bad_idl.write_text("service Broken {\n  void f(\n}\n")
    text = case.text.replace("{idl}", str(EXAMPLE_IDL)).replace("{bad_idl}", str(bad_idl))
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


def _assert_config_error(rc: int, out: str, err: str, expected: list[str], what: str) -> None:
    assert rc == 2, f"{what}: exit {rc}\nstdout:\n{out}\nstderr:\n{err}"
    message = err.strip()
    assert message.startswith("sidecar: invalid configuration"), f"{what}: {message}"
    for part in expected:
        assert part in message, f"{what}: {part!r} not in:\n{message}"
    assert "\n\n" not in message, f"{what}: not one paragraph:\n{message}"
    assert "Traceback" not in err


# Commands run at once: enough to overlap interpreter start-ups on 2 cores.
PARALLEL = 4
Outcome = tuple[int, str, str]


@pytest.fixture(scope="module")
def bad_config_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Outcome]]:
    """Every bad config through ``check-config`` and ``run --config``, a few at a time.

    Returns:
        (exit status, stdout, stderr) by case name, then by command.
    """
    jobs: list[tuple[str, str, list[str], dict[str, str], Path]] = []
    for name, case in BAD_CONFIGS.items():
        workdir = tmp_path_factory.mktemp("bad")
        path = _write_case(workdir, case)
        jobs.append((name, "check-config", ["check-config", str(path)], case.env, workdir))
        jobs.append((name, "run", ["run", "--config", str(path)], case.env, workdir))

    def one(job: tuple[str, str, list[str], dict[str, str], Path]) -> Outcome:
        _, _, args, env, workdir = job
        if not FORK:
            return finish(start(args, env, cwd=workdir))
        # Forked from the suite's zygote (tests/support/zygote.py): the same entry
        # point, argument vector, environment and directory, without 80 start-ups.
        out_path, err_path = workdir / f"{args[0]}.out", workdir / f"{args[0]}.err"
        with out_path.open("w") as out, err_path.open("w") as err:
            proc = zygote().fork(args, _env(env), workdir, out.fileno(), errors=err.fileno())
        try:
            rc = proc.wait(COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            pytest.fail(f"sidecar {args} did not exit within {COMMAND_TIMEOUT}s")
        return rc, out_path.read_text(), err_path.read_text()

    results: dict[str, dict[str, Outcome]] = {name: {} for name in BAD_CONFIGS}
    with ThreadPoolExecutor(PARALLEL) as pool:
        for job, outcome in zip(jobs, pool.map(one, jobs), strict=True):
            results[job[0]][job[1]] = outcome
    return results


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_config_exits_2_naming_the_key(
    name: str, bad_config_results: dict[str, dict[str, Outcome]]
) -> None:
    expected = BAD_CONFIGS[name].expected
    rc, out, err = bad_config_results[name]["check-config"]
    _assert_config_error(rc, out, err, expected, "check-config")
    assert out == ""
    rc, out, err = bad_config_results[name]["run"]
    _assert_config_error(rc, out, err, expected, "run --config")


def test_there_are_at_least_twenty_kinds_of_bad_config() -> None:
    assert len(BAD_CONFIGS) >= 20


def test_run_needs_an_upstream_but_check_config_only_warns(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("listen: 127.0.0.1:0\nupstream: {addresses: []}\n")
    check = start(["check-config", str(path)])
    run = start(["run", "--config", str(path)])
    rc, out, err = finish(check)
    assert rc == 0, err
    assert "warning: no upstream address" in err
    rc, out, err = finish(run)
    _assert_config_error(rc, out, err, ["upstream.addresses: at least one upstream"], "run")


def test_bad_flags_are_named_and_exit_2() -> None:
    rc, out, err = sidecar("run", "--upstream", "127.0.0.1:1", "--upstream", "nohost")
    _assert_config_error(
        rc, out, err, ["upstream.addresses[1] (from --upstream)", "(got 'nohost')"], "run"
    )
    rc, _, err = sidecar("run", "--upstream", "127.0.0.1:1", "--transport", "foo")
    assert rc == 2
    assert "Invalid value for '--transport'" in err


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    rc, _, err = sidecar("run", "--config", str(tmp_path / "nope.yaml"))
    assert rc == 2
    assert f"cannot read config file {tmp_path / 'nope.yaml'}" in err
    rc, _, err = sidecar("check-config", str(tmp_path / "nope.yaml"))
    assert rc == 2
    assert "No such file" in err


@pytest.mark.parametrize("name", ["sidecar.yaml", "demo.yaml"])
def test_check_config_accepts_the_shipped_configs(tmp_path: Path, name: str) -> None:
    shipped = REPO / "config" / name
    rc, out, err = sidecar("check-config", str(shipped))
    assert rc == 0, err
    assert err == ""  # no warnings either
    assert out.startswith(f"# {shipped}: valid.")
    # The effective config is YAML that loads back as the same configuration.
    effective = tmp_path / "effective.yaml"
    effective.write_text(out)
    assert load_config(effective, environ={}) == load_config(shipped, environ={})
    assert yaml.safe_load(out)["idl"] == str(EXAMPLE_IDL.resolve())


def test_check_config_prints_warnings_and_env_sources(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        f"idl: {EXAMPLE_IDL}\nupstream: {{addresses: [127.0.0.1:1]}}\n"
        "retry: {idempotent: ['get*', 'list*', 'ping', 'place*']}\n"
    )
    rc, out, err = sidecar("check-config", str(path), env={"SIDECAR_LOG_LEVEL": "debug"})
    assert rc == 0, err
    assert "# log.level is set by the environment variable SIDECAR_LOG_LEVEL" in out
    assert yaml.safe_load(out)["log"]["level"] == "debug"
    assert "warning: retrying after send is enabled for placeOrder" in err
    assert "1 warning(s)" in err


def test_check_config_without_an_idl_does_not_call_methods_unknown(tmp_path: Path) -> None:
    """Without an IDL nothing says which methods exist: no "applies to nothing" warnings."""
    path = tmp_path / "c.yaml"
    path.write_text(
        "upstream: {addresses: [127.0.0.1:1]}\n"
        "methods:\n  getItem: {retry: {max_attempts: 2}}\n  Catalog:ping: {idempotent: true}\n"
    )
    rc, out, err = sidecar("check-config", str(path))
    assert rc == 0, err
    assert out.startswith(f"# {path}: valid.")
    assert err == ""


def test_kubernetes_service_links_do_not_stop_the_sidecar(tmp_path: Path) -> None:
    """A Service named `sidecar` puts SIDECAR_SERVICE_HOST and friends in every pod."""
    links = {
        "SIDECAR_SERVICE_HOST": "10.96.0.20",
        "SIDECAR_SERVICE_PORT": "9090",
        "SIDECAR_SERVICE_PORT_THRIFT": "9090",
        "SIDECAR_PORT": "tcp://10.96.0.20:9090",
        "SIDECAR_PORT_9090_TCP": "tcp://10.96.0.20:9090",
        "SIDECAR_PORT_9090_TCP_PROTO": "tcp",
        "SIDECAR_PORT_9090_TCP_PORT": "9090",
        "SIDECAR_PORT_9090_TCP_ADDR": "10.96.0.20",
    }
    path = tmp_path / "c.yaml"
    path.write_text("upstream: {addresses: [127.0.0.1:1]}\n")
    rc, out, err = sidecar("check-config", str(path), env=links)
    assert rc == 0, err
    assert err == ""
    assert "set by the environment variable" not in out
    rc, out, err = sidecar(
        "check-config", str(path), env={**links, "SIDECAR_RETRY__MAX_ATEMPTS": "3"}
    )
    _assert_config_error(rc, out, err, ["SIDECAR_RETRY__MAX_ATEMPTS"], "check-config")


def test_version() -> None:
    rc, out, _ = sidecar("--version")
    assert rc == 0
    from sidecar import __version__, native

    assert out.startswith(f"thrift-sidecar {__version__} (Python ")
    assert "thriftpy2" in out
    assert out.rstrip().endswith(f", build {native.build()})")


def test_help_texts_explain_themselves() -> None:
    rc, out, _ = sidecar("--help")
    assert rc == 0
    for part in ("run", "check-config", "retrying, circuit-breaking", "--version"):
        assert part in out
    # It names every wire the sidecar takes, not only the first ones it took.
    flowed = " ".join(out.split())
    assert "binary or compact protocol; framed, buffered or THeader; plaintext or TLS" in flowed
    rc, out, _ = sidecar("run", "--help")
    assert rc == 0
    for flag in (
        "--config",
        "--listen",
        "--upstream",
        "--transport",
        "--upstream-transport",
        "--metrics-listen",
        "--idl",
        "--redis-url",
        "--log-level",
        "--log-format",
    ):
        assert flag in out
    for part in ("SIDECAR_UPSTREAM", "SIDECAR_RETRY__MAX_ATTEMPTS", "SIGHUP", "Exit status"):
        assert part in out
    rc, out, _ = sidecar("check-config", "--help")
    assert rc == 0
    for part in ("FILE", "effective configuration", "warnings", "exit status 2"):
        assert part in out


# precedence on a running sidecar: flag > env > file


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("with_flag", [True, False])
def test_run_listens_where_flag_then_env_then_file_say(with_flag: bool) -> None:
    file_port, env_port, flag_port = free_port(), free_port(), free_port()
    args = ["--listen", f"127.0.0.1:{flag_port}"] if with_flag else []
    expected = flag_port if with_flag else env_port
    with run_sidecar(
        ["127.0.0.1:1"],
        config={"listen": f"127.0.0.1:{file_port}"},
        args=args,
        env={"SIDECAR_LISTEN": f"127.0.0.1:{env_port}"},
    ) as proc:
        status, body = http_get(proc.admin + "/state")
        assert status == 200
        assert json.loads(body)["listen"] == f"127.0.0.1:{expected}"
        assert _listening(expected)
        others = {file_port, env_port, flag_port} - {expected}
        assert not any(_listening(port) for port in others)
        assert proc.stop() == 0


def test_every_flag_has_its_environment_variable() -> None:
    from sidecar.cli.loading import flag_overrides
    from sidecar.cli.serving import run
    from sidecar.config import ENV_SHORTCUTS, FLAG_KEYS

    for flag, key_path in FLAG_KEYS.items():
        assert ENV_SHORTCUTS["SIDECAR_" + flag[2:].upper().replace("-", "_")] == key_path
    given = flag_overrides(
        upstreams=("a:1",), **{f[2:].replace("-", "_"): "x" for f in FLAG_KEYS if f != "--upstream"}
    )
    assert set(given) == set(FLAG_KEYS.values())
    assert given[("upstream", "addresses")] == ["a:1"]
    assert flag_overrides(listen=None, upstreams=()) == {}
    with pytest.raises(TypeError, match="not a flag of sidecar run: lisen"):
        flag_overrides(lisen="x")
    # The options of `sidecar run` are the table's flags, and --config.
    options = {name for param in run.params for name in param.opts}
    assert options == {*FLAG_KEYS, "--config"}


def test_run_refuses_a_fallback_file_it_cannot_use(tmp_path: Path) -> None:
    """Only `run` opens the store; the message still names the file and the key."""
    path = tmp_path / "c.yaml"
    path.write_text(
        "upstream: {addresses: [127.0.0.1:1]}\nlisten: 127.0.0.1:0\nmetrics: {listen: null}\n"
        "fallback: {cache: {backend: sqlite, path: no-such-dir/fallback.db}}\n"
    )
    rc, out, err = sidecar("run", "--config", str(path))
    _assert_config_error(rc, out, err, [f"in {path}: fallback.cache.path", "no-such-dir"], "run")
