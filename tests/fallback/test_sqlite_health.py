"""The SQLite cache file deleted or replaced under a running sidecar: noticed, reported, replaced.

A real sidecar process with a real SQLite file, which the test deletes (the
file alone, or with its ``-wal`` and ``-shm``) or replaces with a directory.
The sidecar must notice within seconds, count it in
``thrift_sidecar_fallback_store_errors_total``, log it, and open a fresh file
at the path, which then holds what is stored and serves fallbacks. While no
file can be opened there, ``thrift_sidecar_fallback_store_up`` is 0 and
``/state`` says unhealthy; both come back once a read works again.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from tests.support.clients import thriftpy2_client
from tests.support.servers import thriftpy2_server
from tests.support.sidecar import SidecarProcess, run_sidecar
from tests.support.wait import wait_until

UP = "thrift_sidecar_fallback_store_up"
ERRORS = "thrift_sidecar_fallback_store_errors_total"
FALLBACKS = "thrift_sidecar_fallback_replies_total"
# Far above the once-a-second check, for two shared cores.
NOTICE = 15.0


def config(path: Path) -> dict[str, object]:
    return {
        "fallback": {"cache": {"backend": "sqlite", "path": str(path)}},
        "retry": {"max_attempts": 1},
        "breaker": {"fail_max": 1, "reset_timeout": "10m"},
    }


def rows_in(path: Path) -> list[int]:
    """The cache keys' count, read from the file at ``path`` by a connection of our own."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [int(conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0])]
    finally:
        conn.close()


def store_state(sidecar: SidecarProcess) -> dict[str, object]:
    return dict(sidecar.state()["fallback_store"])


def errors(sidecar: SidecarProcess, operation: str) -> float:
    return sidecar.metrics().value(ERRORS, operation=operation)


@pytest.mark.parametrize(
    "deleted", [("fallback.db",), ("fallback.db", "fallback.db-wal", "fallback.db-shm")]
)
def test_a_deleted_cache_file_is_noticed_counted_and_opened_afresh(
    tmp_path: Path, deleted: tuple[str, ...]
) -> None:
    path = tmp_path / "fallback.db"
    with (
        thriftpy2_server() as upstream,
        run_sidecar([upstream.address], config=config(path)) as sidecar,
    ):
        with thriftpy2_client(sidecar.address) as client:
            assert client.getItem(1).id == 1
        wait_until(lambda: store_state(sidecar)["entries"] == 1, message="first reply stored")
        assert sidecar.metrics().value(UP) == 1
        assert errors(sidecar, "file") == 0

        for name in deleted:
            (tmp_path / name).unlink(missing_ok=True)

        wait_until(lambda: errors(sidecar, "file") == 1, timeout=NOTICE, message="noticed")
        # A fresh file at the path, and the store healthy once it has read it.
        wait_until(lambda: sidecar.metrics().value(UP) == 1, timeout=NOTICE, message="up again")
        assert path.is_file()
        state = store_state(sidecar)
        assert (state["healthy"], state["entries"]) == (True, 0)
        assert "was deleted while open" in sidecar.log()
        assert "opened the file at the path afresh" in sidecar.log()

        # What is stored now is in the file at the path ...
        with thriftpy2_client(sidecar.address) as client:
            assert client.getItem(2).id == 2
        wait_until(lambda: rows_in(path) == [1], timeout=NOTICE, message="stored in the new file")
        # ... and served from it when the upstream is gone.
        upstream.stop()
        with thriftpy2_client(sidecar.address) as client:
            assert client.getItem(2).id == 2
        assert sidecar.metrics().value(FALLBACKS, source="cache") == 1
        assert sidecar.metrics().value(UP) == 1
        assert sidecar.metrics().value(ERRORS, operation="read") == 0


def test_no_file_can_be_opened_at_the_path_down_until_a_read_works(tmp_path: Path) -> None:
    path = tmp_path / "fallback.db"
    with (
        thriftpy2_server() as upstream,
        run_sidecar([upstream.address], config=config(path)) as sidecar,
    ):
        with thriftpy2_client(sidecar.address) as client:
            assert client.getItem(1).id == 1
        wait_until(lambda: store_state(sidecar)["entries"] == 1, message="first reply stored")

        path.unlink()
        path.mkdir()  # nothing can be opened there now
        wait_until(lambda: errors(sidecar, "reopen") >= 2, timeout=NOTICE, message="retried")
        # Down, and it stays down while the path is unusable (writes do not make it healthy).
        with thriftpy2_client(sidecar.address) as client:
            assert client.getItem(3).id == 3
        metrics = sidecar.metrics()
        assert (metrics.value(UP), metrics.value(ERRORS, operation="file")) == (0, 1)
        assert store_state(sidecar)["healthy"] is False
        assert "cannot open a fresh file" in sidecar.log()

        shutil.rmtree(path)
        wait_until(lambda: sidecar.metrics().value(UP) == 1, timeout=NOTICE, message="up again")
        assert store_state(sidecar)["healthy"] is True
        assert path.is_file()
