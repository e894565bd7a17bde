"""Tests of `sidecar.testing`: the fault proxy, the example Catalog service, the threaded server."""
