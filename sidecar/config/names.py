"""The names a key goes by outside the file: flags and environment variables.

Every key can be set as ``SIDECAR_<SECTION>__<KEY>`` (`env_name`). The common
keys also have a short name, written once in `SHORT_NAMES`: it gives both the
flag of ``sidecar run`` (``--redis-url``) and the short environment variable
(``SIDECAR_REDIS_URL``), so the two cannot drift apart.
"""

from __future__ import annotations

from sidecar.config.base import KeyPath

# Short name → key path (design §8). The flag is ``--<name>``; the environment
# variable ``SIDECAR_<NAME>`` with dashes as underscores.
SHORT_NAMES: dict[str, KeyPath] = {
    "listen": ("listen",),
    "upstream": ("upstream", "addresses"),
    "transport": ("transport",),
    "upstream-transport": ("upstream", "transport"),
    "metrics-listen": ("metrics", "listen"),
    "idl": ("idl",),
    "redis-url": ("state", "redis_url"),
    "log-level": ("log", "level"),
    "log-format": ("log", "format"),
    "workers": ("workers",),
}

ENV_PREFIX = "SIDECAR_"


def flag_of(short_name: str) -> str:
    """``redis-url`` → ``--redis-url``."""
    return "--" + short_name


def shortcut_variable(short_name: str) -> str:
    """``redis-url`` → ``SIDECAR_REDIS_URL``."""
    return ENV_PREFIX + short_name.upper().replace("-", "_")


def parameter_of(short_name: str) -> str:
    """``redis-url`` → ``redis_url``, the name click gives the flag's value."""
    return short_name.replace("-", "_")


def env_name(path: KeyPath) -> str:
    """The generic environment variable for a key path: ``SIDECAR_RETRY__MAX_ATTEMPTS``."""
    return ENV_PREFIX + "__".join(path).upper()


# Each flag of `sidecar run`: its key path in the config.
FLAG_KEYS: dict[str, KeyPath] = {flag_of(name): path for name, path in SHORT_NAMES.items()}
# Short environment names for the common keys.
ENV_SHORTCUTS: dict[str, KeyPath] = {
    shortcut_variable(name): path for name, path in SHORT_NAMES.items()
}
