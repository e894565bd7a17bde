"""thrift-sidecar: a retrying, circuit-breaking proxy for Thrift binary-protocol services."""

__version__ = "0.1.0"
