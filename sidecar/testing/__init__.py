"""Test tooling shipped with the product, shared by the tests, the benchmarks and the demo.

- `sidecar.testing.faults`: a fault-injecting TCP proxy in front of a real upstream.
- `sidecar.testing.catalog`: the example Catalog service (``idl/example.thrift``).
- `sidecar.testing.thrift_server`: the stoppable threaded server both build on.
- ``python -m sidecar.testing.upstream``: the Catalog as a program (docker-compose runs it).
- `sidecar.testing.ports`: free ports for the processes tests and benchmarks start.
"""
