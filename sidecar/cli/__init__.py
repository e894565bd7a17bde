"""The ``sidecar`` command: thin; flags become config overrides, then the app runs.

Precedence: flags > ``SIDECAR_*`` environment > config file > defaults.
Exit status: 0 after a clean stop, 1 when the sidecar cannot start or its
drain timed out, 2 for a bad command line or a bad configuration (the message
names the key path, the bad value, and the variable or flag that set it).

This module is the command group and ``--version``; each subcommand lives in
a module of its own, with what it alone needs:

- `serving`: ``sidecar run``, and ``sidecar worker`` (one of its workers);
- `check`: ``sidecar check-config``;
- `tools`: ``sidecar demo`` and ``sidecar top``, which import their packages lazily;
- `loading`: what they share: flags as config overrides, the checked load, and
  a config error printed with exit status 2.
"""

from __future__ import annotations

import sys

import click

from sidecar import __version__
from sidecar.cli.check import check_config
from sidecar.cli.serving import run, worker
from sidecar.cli.tools import demo, top


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

    Point unchanged Thrift clients (binary or compact protocol; framed, buffered
    or THeader; plaintext or TLS) at the sidecar; it forwards each call to the
    upstream service, retries what is safe to retry, opens a circuit breaker
    when the upstream is sick, serves cached or static fallback replies while
    it is, and exports Prometheus metrics.

    Start with `sidecar run --upstream HOST:PORT`; see `sidecar run --help`.
    Every config key is listed with its default in config/sidecar.yaml and
    docs/config-reference.md.
    """


for _command in (run, worker, check_config, demo, top):
    main.add_command(_command)
