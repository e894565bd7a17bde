"""``sidecar run`` and its hidden ``sidecar worker``: serve until stopped, then exit.

`run` loads and checks the config before anything starts, then serves in
this process or, with ``workers: N``, supervises N worker processes, each a
``sidecar worker`` that loads the same config. Exit status: 0 after a clean
stop, 1 when the sidecar cannot start or its drain timed out, 2 for a bad
configuration. The event loop is uvloop's when it is installed (`run_async`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from sidecar.cli.loading import fail_config, flag_overrides, load_checked
from sidecar.config import SidecarConfig, require_upstream
from sidecar.errors import ConfigError

if TYPE_CHECKING:
    import asyncio

    from sidecar.app.worker import WorkerRole

T = TypeVar("T")

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


@click.command(epilog=_RUN_EPILOG, short_help="Run the sidecar until SIGTERM or SIGINT.")
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


@click.command("worker", hidden=True)
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
