"""Test configuration shared by every test directory."""

from __future__ import annotations

import sys
from pathlib import Path

# Tests import `sidecar` and `tests.support` from the checkout, installed or not.
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)
