"""The store: migrations, transactions, name reservations, and consistency after kill -9."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cri_api import api_pb2 as pb
from sandbox.records import (
    PodRecord,
    insert_pod,
    load_pods,
    save_pod,
)
from sandbox.store import MIGRATIONS, Store, StoreError
from tests.daemon import REPO


def _pod(pod_id: str, name: str) -> PodRecord:
    config = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, uid="u", namespace="ns", attempt=0),
        labels={"a": "b"},
    )
    return PodRecord(id=pod_id, name=name, created_at=time.time_ns(), config=config)


def test_schema_version_and_wal(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    assert store.schema_version == len(MIGRATIONS)
    mode = store.query("PRAGMA journal_mode")[0][0]
    assert mode == "wal"
    store.close()
    # reopening is a no-op migration
    assert Store(tmp_path / "state.db").schema_version == len(MIGRATIONS)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    Store(tmp_path / "state.db").close()
    conn = sqlite3.connect(tmp_path / "state.db")
    conn.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer than this flatpod"):
        Store(tmp_path / "state.db")


def test_name_reservation_is_exclusive(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    assert insert_pod(store, _pod("p1", "name-a")) is None
    assert insert_pod(store, _pod("p2", "name-a")) == "p1"
    assert set(load_pods(store)) == {"p1"}


def test_record_round_trip_keeps_config(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    pod = _pod("p1", "n")
    pod.ip = "10.0.0.2"
    pod.namespaces = {"ipc": "/x/ipc"}
    insert_pod(store, pod)
    pod.state = "notready"
    save_pod(store, pod)
    loaded = load_pods(Store(tmp_path / "state.db"))["p1"]
    assert loaded == pod
    assert loaded.config.labels["a"] == "b"


def test_transaction_rolls_back_on_error(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    with pytest.raises(RuntimeError), store.tx() as conn:
        conn.execute("INSERT INTO settings(key, value) VALUES ('k', 'v')")
        raise RuntimeError("boom")
    assert store.get_setting("k") is None


def test_ip_leases_are_exclusive(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    assert store.try_claim("net", "10.0.0.2", "a")
    assert not store.try_claim("net", "10.0.0.2", "b")
    assert store.owned_by("net", "a") == ["10.0.0.2"]
    store.release("net", "a")
    assert store.leased("net") == {}


WRITER = """
import sys, time
from sandbox.store import Store
store = Store(__import__('pathlib').Path(sys.argv[1]))
i = 0
print("ready", flush=True)
while True:
    # each transaction writes a pair that must always be seen together
    with store.tx() as conn:
        conn.execute("INSERT INTO settings(key, value) VALUES (?, ?)", (f"a{i}", "x" * 2000))
        conn.execute("INSERT INTO settings(key, value) VALUES (?, ?)", (f"b{i}", "y" * 2000))
    i += 1
"""


def test_kill_9_mid_write_leaves_a_consistent_store(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for round_ in range(3):
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(db)], stdout=subprocess.PIPE, env=env
        )
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == b"ready"
        time.sleep(0.3 + 0.1 * round_)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        store = Store(db)
        assert store.query("PRAGMA integrity_check")[0][0] == "ok"
        keys = {r["key"] for r in store.query("SELECT key FROM settings")}
        a_keys = {k[1:] for k in keys if k.startswith("a")}
        b_keys = {k[1:] for k in keys if k.startswith("b")}
        assert a_keys == b_keys, "a transaction was half-applied"
        assert a_keys, "the writer wrote nothing before it was killed"
        with store.tx() as conn:
            conn.execute("DELETE FROM settings")
        store.close()
