"""A fault-injecting proxy in front of a real Thrift upstream, for tests and the demo.

    client ──► FaultProxy ──► upstream

`FaultPlan` (plan.py) says what happens to each connection and call;
`FaultProxy` (proxy.py) listens and forwards, one `Session` (session.py) per
client connection; `FaultStats` (stats.py) counts what it saw and did;
`FaultProxyThread` (thread.py) runs a proxy on a loop of its own.
"""

from sidecar.testing.faults.plan import Action, Fault, FaultPlan
from sidecar.testing.faults.proxy import FaultProxy
from sidecar.testing.faults.stats import FaultStats
from sidecar.testing.faults.thread import FaultProxyThread, start_in_thread

__all__ = [
    "Action",
    "Fault",
    "FaultPlan",
    "FaultProxy",
    "FaultProxyThread",
    "FaultStats",
    "start_in_thread",
]
