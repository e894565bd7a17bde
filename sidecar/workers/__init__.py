"""What the workers of one sidecar (``workers: N``) share on this machine
without Redis: the breakers' state, in a memory-mapped file. The supervisor
that starts the workers is `sidecar.app.supervisor`. Why and how:
docs/workers.md."""
