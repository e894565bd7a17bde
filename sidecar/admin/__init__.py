"""The sidecar's HTTP listeners: read-only admin endpoints, and runtime control on its own port.

- `listener`: the machinery both share (h11, one request per connection,
  bounded clients) and `HttpServer`, which a listener subclasses with its routes;
- `endpoints`: `AdminServer`, the read-only port Prometheus and the probes use;
- `control`: `ControlServer`, the POST-only port for changes by hand;
- `readiness`: what ``/readyz`` answers, and why not.
"""

from sidecar.admin.control import ControlServer
from sidecar.admin.endpoints import AdminServer
from sidecar.admin.listener import Answer, HttpConnection, HttpServer, Request, text
from sidecar.admin.readiness import Readiness

__all__ = [
    "AdminServer",
    "Answer",
    "ControlServer",
    "HttpConnection",
    "HttpServer",
    "Readiness",
    "Request",
    "text",
]
