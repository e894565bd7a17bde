"""``sidecar demo``: the runner (`sidecar.demo.runner`) and the traffic driver (`.traffic`).

The upstream and the fault injector it runs are `sidecar.testing`'s.
"""
