"""The ``sidecar`` command: thin; flags become config overrides, then the app runs.

Precedence: flags > ``SIDECAR_*`` environment > config file > defaults.
Exit status: 0 after a clean stop, 1 when the sidecar cannot start or its
drain timed out, 2 for a bad command line or a bad configuration (the message
names the key path, the bad value, and the variable or flag that set it).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from sidecar import __version__
from sidecar.config import (
    FLAG_KEYS,
    SHORT_NAMES,
    KeyPath,
    SidecarConfig,
    env_sources,
    format_key,
    load_config,
    require_upstream,
)
from sidecar.config.names import parameter_of
from sidecar.errors import ConfigError

if TYPE_CHECKING:
    import asyncio

    from sidecar.app.worker import WorkerRole

T = TypeVar("T")

EXIT_CONFIG = 2

_RUN_EPILOG = """
\b
Environment: every flag can also be set as SIDECAR_<FLAG>, e.g.
SIDECAR_LISTEN, SIDECAR_UPSTREAM (comma-separated), SIDECAR_METRICS_LISTEN,
SIDECAR_LOG_LEVEL, SIDECAR_CONFIG; and any config key as
SIDECAR_<SECTION>__<KEY>, e.g. SIDECAR_RETRY__MAX_ATTEMPTS=4. An empty
variable counts as unset. Flags beat the environment, which beats the file,
which beats the defaults.

\b
Signals: SIGTERM or SIGINT stops accepting, lets calls in flight finish
(up to drain_timeout) and exits 0; SIGHUP reloads the config file (an
invalid file is rejected, logged and counted, and the running config kept).

\b
Exit status: 0 after a clean stop; 1 when the sidecar cannot start (e.g. the
port is taken) or calls were cut off by drain_timeout; 2 for a bad command
line or configuration.

\b
Example:
  sidecar run --upstream 127.0.0.1:9091
  sidecar run --config config/sidecar.yaml --listen 0.0.0.0:9090
"""

_CHECK_EPILOG = """
\b
Example:
  sidecar check-config config/sidecar.yaml
  SIDECAR_UPSTREAM=10.0.0.5:9091 sidecar check-config my.yaml > effective.yaml
"""


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop when it is installed, else on asyncio's loop."""
    import asyncio  # here, not at the top: `check-config` and config errors stay quick

    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(coro)


def fail_config(exc: ConfigError) -> NoReturn:
    """Print a config error on stderr and exit with status 2."""
    click.echo(f"sidecar: {exc}", err=True)
    sys.exit(EXIT_CONFIG)


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"Python {sys.version.split()[0]}"]
    for package in ("thriftpy2", "pybreaker", "pydantic"):
        try:
            parts.append(f"{package} {version(package)}")
        except PackageNotFoundError:  # pragma: no cover - a broken install
            parts.append(f"{package} missing")
    from sidecar import native

    parts.append(f"build {native.build()}")
    click.echo(f"thrift-sidecar {__version__} ({', '.join(parts)})")
    ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the version (and of the libraries it runs on) and exit.",
)
def main() -> None:
    """thrift-sidecar: a retrying, circuit-breaking proxy for Thrift services.

    Point unchanged Thrift clients (binary protocol, framed or buffered) at the
    sidecar; it forwards each call to the upstream service, retries what is
    safe to retry, opens a circuit breaker when the upstream is sick, serves
    cached or static fallback replies while it is, and exports Prometheus
    metrics.

    Start with `sidecar run --upstream HOST:PORT`; see `sidecar run --help`.
    Every config key is listed with its default in config/sidecar.yaml and
    docs/config-reference.md.
    """


@main.command(epilog=_RUN_EPILOG, short_help="Run the sidecar until SIGTERM or SIGINT.")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    envvar="SIDECAR_CONFIG",
    metavar="FILE",
    help="YAML config file; every key is optional (see config/sidecar.yaml). [env: SIDECAR_CONFIG]",
)
@click.option(
    "--listen", metavar="HOST:PORT", help="Where Thrift clients connect. [default: 0.0.0.0:9090]"
)
@click.option(
    "--upstream",
    "upstreams",
    metavar="HOST:PORT",
    multiple=True,
    help="Address of the upstream Thrift service; repeat for several. Required here, "
    "in SIDECAR_UPSTREAM or in the file (upstream.addresses).",
)
@click.option(
    "--transport",
    type=click.Choice(["auto", "framed", "buffered"]),
    help="Client-side transport; auto detects it per connection. [default: auto]",
)
@click.option(
    "--upstream-transport",
    type=click.Choice(["same", "framed", "buffered"]),
    help="Transport the upstream speaks; same = as each client. [default: same]",
)
@click.option(
    "--metrics-listen",
    metavar="HOST:PORT",
    help="Admin HTTP address: /metrics /healthz /readyz /state. [default: 0.0.0.0:9464]",
)
@click.option(
    "--idl",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="Thrift IDL of the upstream service (optional: checks method names, encodes "
    "static fallback replies).",
)
@click.option(
    "--redis-url",
    metavar="URL",
    help="redis://host:6379/0 turns on fleet mode (breaker state shared by every sidecar).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    help="Least severe level logged. [default: info]",
)
@click.option(
    "--workers",
    metavar="N|auto",
    help="Processes serving --listen (SO_REUSEPORT), sharing breaker state, retry budget "
    "and fallback cache; auto: one per usable CPU. [default: 1]",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"], case_sensitive=False),
    help="text: readable lines; json: one JSON object per line. [default: text]",
)
def run(config_path: str | None, upstreams: tuple[str, ...], **flags: str | None) -> None:
    """Run the sidecar until SIGTERM or SIGINT.

    Listens for Thrift clients, forwards each call to the upstream, and serves
    the admin endpoint (metrics, health, state). The configuration comes from
    the defaults, the config file, SIDECAR_* environment variables and the
    flags below, in rising order of precedence; it is checked before anything
    starts.
    """
    overrides = flag_overrides(upstreams=upstreams, **flags)

    def load() -> tuple[SidecarConfig, dict[str, Any]]:
        return load_checked(config_path, overrides)

    where = f" in {config_path}" if config_path else ""
    try:
        config, parts = load_checked(config_path, overrides)
    except ConfigError as exc:
        fail_config(exc)
    try:
        require_upstream(config)
    except ConfigError as exc:
        fail_config(_in_file(exc, where))
    from sidecar.config.model import worker_count
    from sidecar.logs import configure_logging

    configure_logging(config.log.level, config.log.format)
    if worker_count(config.workers) > 1:
        from sidecar.app.supervisor import supervise

        _run_until_stopped(
            lambda: supervise(config, config_path, overrides),
            where,
            start_errors=(OSError, RuntimeError),  # RuntimeError: a worker did not start
        )
    _serve(config, parts, load, where)


@main.command("worker", hidden=True)
def worker() -> None:
    """One worker of `sidecar run` with workers: N (started by its supervisor)."""
    from sidecar.app.worker import WORKER_ENV, WorkerRole, die_with_parent
    from sidecar.logs import configure_logging, set_worker

    die_with_parent()
    role = WorkerRole.from_env(os.environ[WORKER_ENV])
    set_worker(role.index)
    if role.orphaned():  # the supervisor died before prctl took effect
        click.echo(f"sidecar worker: its supervisor (pid {role.supervisor_pid}) is gone", err=True)
        sys.exit(1)

    def load() -> tuple[SidecarConfig, dict[str, Any]]:
        config, parts = load_checked(role.config_path, role.override_map)
        return role.adjust(config), parts

    where = f" in {role.config_path}" if role.config_path else ""
    try:
        config, parts = load()
    except ConfigError as exc:
        fail_config(exc)
    configure_logging(config.log.level, config.log.format)
    _serve(config, parts, load, where, worker=role)


def _serve(
    config: SidecarConfig,
    parts: dict[str, Any],
    load: Callable[[], tuple[SidecarConfig, dict[str, Any]]],
    where: str,
    worker: WorkerRole | None = None,
) -> NoReturn:
    """Run one sidecar process (alone, or one worker) until it is stopped; exit."""
    from sidecar.app import Sidecar, serve

    try:
        sidecar = Sidecar(config, worker=worker, **parts)
    except ConfigError as exc:  # a part that refuses its settings
        fail_config(_in_file(exc, where))
    _run_until_stopped(lambda: serve(sidecar, load), where)


def _run_until_stopped(
    main: Callable[[], Coroutine[Any, Any, bool]],
    where: str,
    start_errors: tuple[type[Exception], ...] = (OSError,),
) -> NoReturn:
    """Run a sidecar's (or a supervisor's) main coroutine; exit 0 when it stopped cleanly."""
    try:
        clean = run_async(main())
    except ConfigError as exc:  # found on start-up, e.g. a fallback store file it cannot use
        fail_config(_in_file(exc, where))
    except start_errors as exc:
        click.echo(f"sidecar: cannot start: {exc}", err=True)
        sys.exit(1)
    sys.exit(0 if clean else 1)


def _in_file(exc: ConfigError, where: str) -> ConfigError:
    return ConfigError(f"invalid configuration{where}: {exc}")


# The keyword each flag's value arrives under (``redis_url``): its key path.
_PARAMETER_KEYS: dict[str, KeyPath] = {
    parameter_of(name): path for name, path in SHORT_NAMES.items() if name != "upstream"
}
_UPSTREAMS = SHORT_NAMES["upstream"]


def flag_overrides(*, upstreams: tuple[str, ...] = (), **flags: str | None) -> dict[KeyPath, Any]:
    """Config key paths set by the command-line flags that were given.

    Args:
        upstreams: the values of the repeatable ``--upstream``.
        flags: the other flags' values by parameter name (``metrics_listen``); None
            when the flag was not given.

    Raises:
        TypeError: a parameter that is no flag of `sidecar run`.
    """
    unknown = set(flags) - set(_PARAMETER_KEYS)
    if unknown:
        raise TypeError(f"not a flag of sidecar run: {', '.join(sorted(unknown))}")
    given: dict[KeyPath, Any] = {
        _PARAMETER_KEYS[name]: value for name, value in flags.items() if value is not None
    }
    if upstreams:
        given[_UPSTREAMS] = list(upstreams)
    return given


def load_checked(
    path: str | None,
    overrides: dict[KeyPath, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> tuple[SidecarConfig, dict[str, Any]]:
    """Load the config and check what needs the IDL (static replies, method names).

    Returns:
        The config and the keyword arguments `sidecar.app.Sidecar` takes from the IDL.

    Raises:
        ConfigError: anything wrong, with the file named.
    """
    flag_names = {key: flag for flag, key in FLAG_KEYS.items()}
    config = load_config(path, environ=environ, overrides=overrides, override_names=flag_names)
    try:
        return config, static_parts(config)
    except ConfigError as exc:
        where = f" in {path}" if path is not None else ""
        raise ConfigError(f"invalid configuration{where}: {exc}") from None


def static_parts(config: SidecarConfig) -> dict[str, Any]:
    """What the IDL contributes: static replies and known method names."""
    from sidecar.fallback.static import load_idl_parts

    return load_idl_parts(config)


@main.command("check-config", epilog=_CHECK_EPILOG, short_help="Validate a config file.")
@click.argument("path", metavar="FILE", type=click.Path(dir_okay=False))
def check_config(path: str) -> None:
    """Validate FILE and print the effective configuration and warnings.

    Checks what `sidecar run --config FILE` would check before starting:
    every key and value, the IDL, and the static fallback replies against
    it. SIDECAR_* environment variables are applied as `sidecar run` would.

    On success, prints the effective configuration (defaults filled in,
    durations and sizes with units) as YAML on stdout, and warnings about
    settings that are valid but probably unintended on stderr; exit status 0.
    On a bad configuration, prints what is wrong on stderr; exit status 2.
    """
    from sidecar.config import config_warnings, dump_yaml, to_yaml_data

    try:
        config, parts = load_checked(path)
    except ConfigError as exc:
        fail_config(exc)
    from_env = env_sources(os.environ)
    click.echo(f"# {path}: valid. Effective configuration (defaults filled in):")
    for key_path, name in sorted(from_env.items()):
        click.echo(f"# {format_key(key_path)} is set by the environment variable {name}")
    click.echo(dump_yaml(to_yaml_data(config)).rstrip())
    # Without an IDL nothing is known about the methods: no "no such method" warnings.
    known = parts["known_methods"] if config.idl is not None else None
    warnings = config_warnings(config, known_methods=known)
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    if warnings:
        click.echo(f"sidecar: {path} is valid, with {len(warnings)} warning(s)", err=True)


@main.command(short_help="Watch retries, the breaker and fallbacks at work, in under a minute.")
@click.option(
    "--duration",
    type=click.FloatRange(min=12),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="Total length of the four phases (they scale with it; at least 12).",
)
@click.option(
    "--keep-running",
    is_flag=True,
    help="After the phases, keep the upstream, the sidecar and light traffic up until Ctrl-C.",
)
@click.option("--no-faults", is_flag=True, help="Inject no faults: every phase is healthy.")
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    help="The sidecar's Thrift port on 127.0.0.1. [default: a free port]",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    help="The sidecar's admin port (/metrics) on 127.0.0.1. [default: a free port]",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=1, max=5000),
    default=120.0,
    show_default=True,
    help="Calls per second from all the demo's clients together.",
)
@click.option(
    "--overload",
    is_flag=True,
    help="The upstream serves one call at a time, and a fifth phase (8s) overloads it with "
    "more clients: the sidecar sheds the calls over upstream.max_in_flight.",
)
def demo(
    duration: float,
    keep_running: bool,
    no_faults: bool,
    port: int | None,
    metrics_port: int | None,
    rate: float,
    overload: bool,
) -> None:
    """Run the example Catalog service behind the sidecar, with injected faults.

    Starts the example upstream (idl/example.thrift), a fault injector in
    front of it, the sidecar with the demo settings (config/demo.yaml) and
    client threads, all on 127.0.0.1, then walks through four phases:
    healthy, flaky (retries absorb resets), outage (the breaker opens, cached
    and static fallbacks are served) and recovery (a half-open probe closes
    the breaker). Prints a table per second from the clients' counts and the
    sidecar's /metrics, then a summary. With --overload, a fifth phase
    overloads an upstream of fixed capacity and the sidecar sheds the calls
    over upstream.max_in_flight. Exit status 0 when every phase went as
    described, 1 when not, 2 when the demo could not start.
    """
    from sidecar.demo.phases import DemoOptions
    from sidecar.demo.runner import run_demo

    options = DemoOptions(
        duration=duration,
        keep_running=keep_running,
        faults=not no_faults,
        port=port,
        metrics_port=metrics_port,
        rate=rate,
        overload=overload,
    )
    sys.exit(run_demo(options))


@main.command(short_help="A live view of a running sidecar: calls, latency, breakers.")
@click.option(
    "--admin",
    metavar="URL",
    help="The sidecar's admin endpoint, http://HOST:PORT or HOST:PORT. [default: from "
    "SIDECAR_METRICS_LISTEN, else 127.0.0.1:9464]",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    metavar="SECONDS",
    help="Seconds between two readings; the rates are over this interval.",
)
@click.option("--once", is_flag=True, help="Read twice, one interval apart, print one frame, exit.")
def top(admin: str | None, interval: float, once: bool) -> None:
    """Watch a running sidecar: per-method calls/s, success, errors/s, retries/s,
    fallbacks/s, p50 and p99 latency, breaker state and ejected upstream addresses.

    Reads /metrics and /state of the admin endpoint every interval; the rates and
    quantiles are over the interval between two readings. Ctrl-C exits (status 0).
    With --once, prints one frame and exits: 0, or 1 when the endpoint cannot be read.
    """
    from sidecar.top import live

    url = live.admin_url(admin) if admin else live.default_admin()
    show = live.once if once else live.watch
    sys.exit(show(url, interval, sys.stdout))


if __name__ == "__main__":  # pragma: no cover
    main()
