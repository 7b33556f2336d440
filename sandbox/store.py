"""The local store: one SQLite database in WAL mode under the root dir.

Every state change is one transaction, so a daemon killed at any instant leaves the database at
a transaction boundary; WAL recovery on the next open rolls back whatever was half-written.
`synchronous=NORMAL` keeps commits off the disk's flush path: in WAL mode it can lose the last
commits to a power cut but never corrupts, and a process crash (the common case) loses nothing.

The store knows tables, not behaviour: pods.py and containers.py decide what a record means.
Records are JSON documents plus the CRI config as serialized protobuf bytes, so a field added
to the CRI later needs no migration.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Each entry moves the schema from version N to N+1; never edit one that has shipped.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE pods (
        id TEXT PRIMARY KEY,
        doc TEXT NOT NULL,
        config BLOB NOT NULL
    );
    CREATE TABLE containers (
        id TEXT PRIMARY KEY,
        pod_id TEXT NOT NULL,
        doc TEXT NOT NULL,
        config BLOB NOT NULL
    );
    CREATE INDEX containers_by_pod ON containers(pod_id);
    -- A CRI name (kubelet's pod or container name with attempt) is held by at most one object.
    CREATE TABLE names (
        name TEXT PRIMARY KEY,
        owner_id TEXT NOT NULL,
        kind TEXT NOT NULL
    );
    CREATE TABLE images (
        id TEXT PRIMARY KEY,
        doc TEXT NOT NULL
    );
    CREATE TABLE image_refs (
        ref TEXT PRIMARY KEY,
        image_id TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE
    );
    CREATE INDEX image_refs_by_image ON image_refs(image_id);
    CREATE TABLE ip_leases (
        network TEXT NOT NULL,
        ip TEXT NOT NULL,
        owner TEXT NOT NULL,
        PRIMARY KEY (network, ip)
    );
    CREATE INDEX ip_leases_by_owner ON ip_leases(network, owner);
    -- Mutating operations in flight: written before the host is touched, deleted when done,
    -- so startup knows what a crash interrupted.
    CREATE TABLE operations (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        target TEXT NOT NULL,
        doc TEXT NOT NULL
    );
    -- Runtime-wide settings that UpdateRuntimeConfig and friends change.
    CREATE TABLE settings (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
)


class StoreError(RuntimeError):
    pass


class Store:
    """A thread-safe handle on state.db.

    One connection, guarded by a lock: every statement here takes microseconds, so a pool
    would only add contention between writers that SQLite serializes anyway.
    """

    def __init__(self, db_path: Path) -> None:
        db_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = db_path
        self._lock = threading.RLock()
        self._commits = 0
        self._conn = sqlite3.connect(
            db_path, isolation_level=None, check_same_thread=False, timeout=30
        )
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    @property
    def commits(self) -> int:
        """How many write transactions committed so far: unchanged, nothing was written."""
        return self._commits

    @property
    def schema_version(self) -> int:
        row = self._conn.execute("PRAGMA user_version").fetchone()
        return int(row[0])

    def _migrate(self) -> None:
        with self.tx() as conn:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"{self.path} has schema version {version}, newer than this flatpod "
                    f"({len(MIGRATIONS)}); refusing to touch it"
                )
            for number in range(version, len(MIGRATIONS)):
                for statement in _statements(MIGRATIONS[number]):
                    conn.execute(statement)
            # PRAGMA takes no parameters; the value is our own integer.
            conn.execute(f"PRAGMA user_version={len(MIGRATIONS)}")

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed when the block ends, rolled back if it raises."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            else:
                self._conn.execute("COMMIT")
                self._commits += 1

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # --- settings -----------------------------------------------------------------------

    def get_setting(self, key: str) -> str | None:
        rows = self.query("SELECT value FROM settings WHERE key = ?", (key,))
        return str(rows[0]["value"]) if rows else None

    def put_setting(self, key: str, value: str) -> None:
        with self.tx() as conn:
            conn.execute(
                "INSERT INTO settings(key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    # --- operations journal ---------------------------------------------------------------

    def begin_operation(self, op_id: str, kind: str, target: str, doc: dict[str, Any]) -> None:
        with self.tx() as conn:
            journal(conn, op_id, kind, target, doc)

    def end_operation(self, op_id: str) -> None:
        with self.tx() as conn:
            conn.execute("DELETE FROM operations WHERE id = ?", (op_id,))

    def operations(self) -> list[tuple[str, str, str, dict[str, Any]]]:
        rows = self.query("SELECT id, kind, target, doc FROM operations ORDER BY rowid")
        return [(r["id"], r["kind"], r["target"], json.loads(r["doc"])) for r in rows]

    # --- IP leases: netns.ipam.LeaseBook ----------------------------------------------------

    def leased(self, network: str) -> dict[str, str]:
        rows = self.query("SELECT ip, owner FROM ip_leases WHERE network = ?", (network,))
        return {str(r["ip"]): str(r["owner"]) for r in rows}

    def try_claim(self, network: str, ip: str, owner: str) -> bool:
        with self.tx() as conn:
            cursor = conn.execute(
                "INSERT OR IGNORE INTO ip_leases(network, ip, owner) VALUES (?, ?, ?)",
                (network, ip, owner),
            )
            return cursor.rowcount == 1

    def release(self, network: str, owner: str) -> None:
        with self.tx() as conn:
            conn.execute(
                "DELETE FROM ip_leases WHERE network = ? AND owner = ?", (network, owner)
            )

    def owned_by(self, network: str, owner: str) -> list[str]:
        rows = self.query(
            "SELECT ip FROM ip_leases WHERE network = ? AND owner = ? ORDER BY ip",
            (network, owner),
        )
        return [str(r["ip"]) for r in rows]


def journal(
    conn: sqlite3.Connection, op_id: str, kind: str, target: str, doc: dict[str, Any]
) -> None:
    """Journals an operation inside a transaction the caller holds (see Store.begin_operation),
    so that a change and the work it leaves to do commit together."""
    conn.execute(
        "INSERT OR REPLACE INTO operations(id, kind, target, doc) VALUES (?, ?, ?, ?)",
        (op_id, kind, target, json.dumps(doc)),
    )


def _statements(script: str) -> list[str]:
    """Splits a migration into statements, so each runs inside our own transaction.

    (sqlite3's executescript would COMMIT first.) Migrations hold no `;` inside literals.
    """
    lines = [line for line in script.splitlines() if not line.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
