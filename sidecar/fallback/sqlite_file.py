"""Opening the SQLite fallback file: the path checks, the schema, and what a failure means.

`open_file` returns the write connection with the schema in place and the file
proven writable; a path that cannot be used is a `ConfigError`, a damaged file
is `Damaged` (the store then keeps entries in memory). See
docs/fallback-stores.md ("SQLite").
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
from pathlib import Path

from sidecar.errors import ConfigError

log = logging.getLogger("sidecar.fallback")

KEY_PATH = "fallback.cache.path"

# "TSFC" (thrift-sidecar fallback cache) in the file header's application_id:
# tells our files from other SQLite databases.
APPLICATION_ID = 0x54534643
# The table layout below; a file with another user_version is rebuilt.
SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    seqid_offset INTEGER NOT NULL,
    stored_at REAL NOT NULL,
    used_seq INTEGER NOT NULL,
    size INTEGER NOT NULL,
    message BLOB NOT NULL,
    args BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_lru ON entries (used_seq, size);
CREATE INDEX IF NOT EXISTS entries_age ON entries (stored_at, size);
"""


class Damaged(Exception):
    """The file is not a readable fallback cache."""


# (device, inode) of a file: a path whose identity changed names another file.
FileIdentity = tuple[int, int]


def file_identity(path: Path) -> FileIdentity | None:
    """The identity of the file at ``path`` now; None when nothing (or no file) is there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None


def connect(path: Path, busy_timeout: float) -> sqlite3.Connection:
    return sqlite3.connect(
        str(path), timeout=busy_timeout, isolation_level=None, check_same_thread=False
    )


def check_path(path: Path) -> None:
    """Refuse paths SQLite could not write, with a message that says what to change."""
    parent = path.parent
    if path.is_dir():
        raise ConfigError(
            f"{KEY_PATH}: {path} is a directory; name a file in it, e.g. {path / 'fallback.db'}"
        )
    if not parent.exists():
        raise ConfigError(f"{KEY_PATH}: directory {parent} (of {path}) does not exist")
    if not parent.is_dir():
        raise ConfigError(f"{KEY_PATH}: {parent} (in {path}) is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{KEY_PATH}: directory {parent} is not writable by this process "
            f"(SQLite creates {path.name}-wal and {path.name}-shm beside the file)"
        )
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise ConfigError(f"{KEY_PATH}: {path} is not readable and writable by this process")


def classify(exc: sqlite3.Error, path: Path) -> Exception:
    """A damaged file (degrade to memory) or a path that cannot be used (config error)."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")):
        return Damaged(str(exc))
    return ConfigError(f"{KEY_PATH}: cannot use {path} as the fallback cache: {exc}")


def open_file(path: Path, busy_timeout: float) -> sqlite3.Connection:
    """The write connection, with the schema in place and the file proven writable.

    Raises:
        ConfigError: the path cannot be used.
        Damaged: the file is not a readable fallback cache.
    """
    check_path(path)
    try:
        conn = connect(path, busy_timeout)
    except sqlite3.Error as exc:
        raise classify(exc, path) from None
    try:
        prepare(conn, path)
    except sqlite3.Error as exc:
        conn.close()
        raise classify(exc, path) from None
    except BaseException:
        conn.close()
        raise
    return conn


def prepare(conn: sqlite3.Connection, path: Path) -> None:
    """Check the file is ours and readable, then create or update the schema."""
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    if app_id not in (0, APPLICATION_ID) or (app_id == 0 and tables):
        raise ConfigError(
            f"{KEY_PATH}: {path} is an SQLite database of something else "
            f"(application_id {app_id}, tables {', '.join(tables) or 'none'}); "
            "name a file of its own"
        )
    current = app_id == APPLICATION_ID and version == SCHEMA_VERSION
    if current:
        figures(conn)  # reads the whole LRU index: damage shows here, before any write
    if app_id == 0:  # a new file: free pages can be returned later (only settable now)
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        log.warning("%s: %s stays in journal mode %s, not WAL", KEY_PATH, path, mode)
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("BEGIN IMMEDIATE")  # proves the file writable (and not locked by another)
    try:
        if app_id == APPLICATION_ID and not current:
            log.info(
                "%s: %s has layout %d, not %d; rebuilding it",
                KEY_PATH,
                path,
                version,
                SCHEMA_VERSION,
            )
            conn.execute("DROP TABLE IF EXISTS entries")
        for statement in _SCHEMA.split(";"):  # not executescript: it would COMMIT first
            if statement.strip():
                conn.execute(statement)
        if not current:
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


def figures(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """(rows, bytes, highest used_seq) of the table, read from the LRU index."""
    row = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(MAX(used_seq), 0) FROM entries"
    ).fetchone()
    return int(row[0]), int(row[1]), int(row[2])
