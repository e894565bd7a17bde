"""Tests of `sidecar demo` and of the container and deployment files."""
