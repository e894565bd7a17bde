"""``python -m sidecar.docs config|metrics``: print, write or check a generated reference.

``--check FILE`` exits 1 when FILE differs from what the code generates,
``--write FILE`` rewrites FILE, and without either the document is printed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from sidecar.docs.config_reference import render_config_reference
from sidecar.docs.metrics_reference import render_metrics_reference

TARGETS: dict[str, tuple[Callable[[], str], str]] = {
    "config": (render_config_reference, "docs/config-reference.md"),
    "metrics": (render_metrics_reference, "docs/metrics-reference.md"),
}


def main(argv: list[str] | None = None) -> int:
    """Print, write or check a generated document. Returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m sidecar.docs", description="Reference documents generated from the code."
    )
    parser.add_argument("target", choices=sorted(TARGETS), help="which document")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="FILE", help="write the document to FILE")
    group.add_argument("--check", metavar="FILE", help="exit 1 if FILE is not up to date")
    args = parser.parse_args(argv)
    render, default_path = TARGETS[args.target]
    text = render()
    if args.write:
        Path(args.write).write_text(text, encoding="utf-8")
    elif args.check:
        path = Path(args.check)
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if current != text:
            print(
                f"{path} is out of date; regenerate it with "
                f"`python -m sidecar.docs {args.target} --write {default_path}`",
                file=sys.stderr,
            )
            return 1
    else:
        sys.stdout.write(text)
    return 0
