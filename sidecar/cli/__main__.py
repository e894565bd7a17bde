"""``python -m sidecar.cli`` is the ``sidecar`` command too (as ``python -m sidecar`` is)."""

from sidecar.cli import main

main()
