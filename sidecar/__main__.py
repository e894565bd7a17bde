"""``python -m sidecar`` is the ``sidecar`` command."""

from sidecar.cli import main

main(prog_name="sidecar")
