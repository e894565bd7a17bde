"""The soak run: a real sidecar under restarts, resets, reloads and Redis and SQLite faults.

`bench/soak.py` runs it for minutes; `test_soak.py` runs it briefly in CI.
"""
