"""The I/O side: client connections, upstream connection pools, the call pipeline."""
