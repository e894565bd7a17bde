"""``sidecar check-config``: validate a file as ``sidecar run`` would, print the effective config.

Nothing starts: the config is loaded and checked (the IDL and static replies
included), printed as YAML on stdout, and warnings go to stderr.
"""

from __future__ import annotations

import os

import click

from sidecar.cli.loading import fail_config, load_checked
from sidecar.config import env_sources, format_key
from sidecar.errors import ConfigError

_CHECK_EPILOG = """
\b
Example:
  sidecar check-config config/sidecar.yaml
  SIDECAR_UPSTREAM=10.0.0.5:9091 sidecar check-config my.yaml > effective.yaml
"""


@click.command("check-config", epilog=_CHECK_EPILOG, short_help="Validate a config file.")
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
