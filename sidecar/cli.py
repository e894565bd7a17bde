"""The ``sidecar`` command: thin; flags become config overrides, then the app runs.

Precedence: flags > ``SIDECAR_*`` environment > config file > defaults.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import click
import yaml

from sidecar import __version__
from sidecar.config import SidecarConfig, load_config
from sidecar.errors import ConfigError

T = TypeVar("T")

EXIT_CONFIG = 2

_RUN_EPILOG = """
\b
Every flag can also be set in the environment: SIDECAR_LISTEN,
SIDECAR_UPSTREAM (comma-separated), SIDECAR_TRANSPORT,
SIDECAR_UPSTREAM_TRANSPORT, SIDECAR_METRICS_LISTEN, SIDECAR_IDL,
SIDECAR_REDIS_URL, SIDECAR_LOG_LEVEL, SIDECAR_LOG_FORMAT, SIDECAR_CONFIG;
and any config key as SIDECAR_<SECTION>__<KEY>, e.g. SIDECAR_RETRY__MAX_ATTEMPTS=4.
Flags beat the environment, which beats the file, which beats the defaults.

\b
Signals: SIGTERM/SIGINT drain in-flight calls (up to drain_timeout) and exit 0;
SIGHUP reloads the config file (an invalid file is rejected and the running
config kept).

\b
Example:
  sidecar run --listen 0.0.0.0:9090 --upstream 127.0.0.1:9091 --metrics-listen 0.0.0.0:9464
"""


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop when it is installed, else on asyncio's loop."""
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(coro)


def fail_config(exc: ConfigError) -> None:
    click.echo(f"sidecar: {exc}", err=True)
    sys.exit(EXIT_CONFIG)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="thrift-sidecar")
def main() -> None:
    """thrift-sidecar: a retrying, circuit-breaking proxy for Thrift services.

    Point unchanged Thrift clients (binary protocol, framed or buffered) at the
    sidecar; it forwards each call to the upstream service, retries what is
    safe to retry, opens a circuit breaker when the upstream is sick, serves
    cached or static fallback replies while it is, and exports Prometheus
    metrics.
    """


@main.command(epilog=_RUN_EPILOG)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    envvar="SIDECAR_CONFIG",
    help="YAML config file (see config/sidecar.yaml for every key).",
)
@click.option(
    "--listen", metavar="HOST:PORT", help="Where clients connect. [default: 0.0.0.0:9090]"
)
@click.option(
    "--upstream",
    "upstreams",
    metavar="HOST:PORT",
    multiple=True,
    help="Upstream service address; repeat for several.",
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
@click.option("--idl", type=click.Path(dir_okay=False), help="Thrift IDL of the upstream service.")
@click.option("--redis-url", metavar="URL", help="redis://host:port/db turns on fleet mode.")
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), help="[default: info]"
)
@click.option("--log-format", type=click.Choice(["text", "json"]), help="[default: text]")
def run(config_path: str | None, upstreams: tuple[str, ...], **flags: str | None) -> None:
    """Run the sidecar until SIGTERM or SIGINT."""
    from sidecar.app import Sidecar, serve
    from sidecar.logs import configure_logging

    overrides = flag_overrides(upstreams=upstreams, **flags)

    def load() -> SidecarConfig:
        return load_config(config_path, overrides=overrides)

    try:
        config = load()
        configure_logging(config.log.level, config.log.format)
        sidecar = Sidecar(config, **static_parts(config))
    except ConfigError as exc:
        fail_config(exc)
        return
    try:
        clean = run_async(serve(sidecar, load))
    except OSError as exc:
        click.echo(f"sidecar: cannot start: {exc}", err=True)
        sys.exit(1)
    sys.exit(0 if clean else 1)


def flag_overrides(
    *,
    upstreams: tuple[str, ...] = (),
    listen: str | None = None,
    transport: str | None = None,
    upstream_transport: str | None = None,
    metrics_listen: str | None = None,
    idl: str | None = None,
    redis_url: str | None = None,
    log_level: str | None = None,
    log_format: str | None = None,
) -> dict[tuple[str, ...], Any]:
    """Config key paths set by the command-line flags that were given."""
    given: dict[tuple[str, ...], Any] = {
        ("listen",): listen,
        ("transport",): transport,
        ("upstream", "transport"): upstream_transport,
        ("metrics", "listen"): metrics_listen,
        ("idl",): idl,
        ("state", "redis_url"): redis_url,
        ("log", "level"): log_level,
        ("log", "format"): log_format,
        ("upstream", "addresses"): list(upstreams) or None,
    }
    return {path: value for path, value in given.items() if value is not None}


def static_parts(config: SidecarConfig) -> dict[str, Any]:
    """What the IDL contributes: static replies and known method names."""
    from sidecar.fallback.static import load_idl_parts

    return load_idl_parts(config)


@main.command("check-config")
@click.argument("path", type=click.Path(dir_okay=False))
def check_config(path: str) -> None:
    """Validate a config file and print the effective config and warnings.

    The environment is applied as `sidecar run` would. Exit status 0 when the
    file is valid, 2 when it is not.
    """
    from sidecar.checks import config_warnings

    try:
        config = load_config(path)
        static_parts(config)
    except ConfigError as exc:
        fail_config(exc)
        return
    click.echo(f"# {path}: valid. Effective configuration (defaults filled in):")
    click.echo(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).rstrip())
    for warning in config_warnings(config):
        click.echo(f"warning: {warning}", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
