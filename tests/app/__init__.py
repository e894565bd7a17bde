"""Tests of `sidecar.app`: start, stop and reload of a whole sidecar."""
