"""Markdown helpers shared by the generated references."""

from __future__ import annotations


def cell(text: str) -> str:
    """``text`` as one table cell: pipes escaped, on one line."""
    return text.replace("|", "\\|").replace("\n", " ")
