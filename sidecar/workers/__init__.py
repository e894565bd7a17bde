"""What the workers of one sidecar (``workers: N``) share on this machine
without Redis, each in a memory-mapped file: the breakers' state, and the
method label values (so that one method has one label, and one breaker, in
every worker). The supervisor
that starts the workers is `sidecar.app.supervisor`. Why and how:
docs/workers.md."""
