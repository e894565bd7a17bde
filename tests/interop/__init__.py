"""Cross-language interop: clients on the official Thrift libraries, through a real sidecar."""
