"""From the command line to a checked config, shared by the commands that load one.

Flags become config key paths (`flag_overrides`); `load_checked` loads the
file, the ``SIDECAR_*`` environment and those overrides, then checks what
needs the IDL; `fail_config` prints a `ConfigError` and exits with status 2.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import click

from sidecar.config import FLAG_KEYS, SHORT_NAMES, KeyPath, SidecarConfig, load_config
from sidecar.config.names import parameter_of
from sidecar.errors import ConfigError

EXIT_CONFIG = 2


def fail_config(exc: ConfigError) -> NoReturn:
    """Print a config error on stderr and exit with status 2."""
    click.echo(f"sidecar: {exc}", err=True)
    sys.exit(EXIT_CONFIG)


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
