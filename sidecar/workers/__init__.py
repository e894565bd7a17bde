"""``workers: N``: N processes of one sidecar on one port, sharing breaker
state and the fallback cache on this machine without Redis. Why and how:
docs/workers.md."""
