"""The running sidecar: parts built from the config, started, reloaded, stopped.

- `build`: the parts and the call context, from a config;
- `lifecycle`: `Sidecar` (start, stop) and `serve` (signals);
- `reload`: SIGHUP, a new context for the calls that start afterwards;
- `gauges`: start-up series and the gauges read off the parts;
- `state`: the ``/state`` document.
"""

from sidecar.app.lifecycle import Sidecar, serve

__all__ = ["Sidecar", "serve"]
