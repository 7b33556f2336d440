"""What the store remembers about each pod sandbox and container.

A record is a dataclass (the JSON `doc` column) plus the CRI config as protobuf bytes (the
`config` column). The daemon keeps every record in memory too: kubelet lists pods and
containers every second, and a list must not cost a database round trip.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from cri_api import api_pb2 as pb
from sandbox.store import Store, journal

# The journal kind of a removed container whose host traces are still being cleaned.
REMOVE_CONTAINER = "remove_container"
# The journal kind of a removed pod whose host traces are still being cleaned.
REMOVE_POD = "remove_pod"

# Marks a field that lives in memory only: never stored, rebuilt on demand.
TRANSIENT = {"transient": True}


class PodState(StrEnum):
    """A pod sandbox's state: the CRI's two, and one before them that nobody sees."""

    CREATING = "creating"  # being made: listed nowhere, found only by its own retry
    READY = "ready"
    NOTREADY = "notready"


class PodStop(StrEnum):
    """How far StopPodSandbox got with the pod's pause and network. In memory only: after a
    restart a stop does it all again (each step is idempotent)."""

    NONE = "none"
    KILLING = "killing"  # the pause is being killed: its exit is the stop's (exits.py)
    DONE = "done"  # the pause, its runc state, the network and the netns are gone


class ContainerState(StrEnum):
    """A container's state: the CRI's four, and one before them that nobody sees."""

    CREATING = "creating"
    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"
    UNKNOWN = "unknown"


# The names other modules import.
SANDBOX_READY = PodState.READY
SANDBOX_NOTREADY = PodState.NOTREADY
CREATED = ContainerState.CREATED
RUNNING = ContainerState.RUNNING
EXITED = ContainerState.EXITED
UNKNOWN = ContainerState.UNKNOWN

# The CRI state each record state is answered as (a record being created is answered by no
# status or list; registry.py's state filters select by the same pairs).
CRI_POD_STATES: dict[PodState, pb.PodSandboxState] = {
    SANDBOX_READY: pb.SANDBOX_READY,
    SANDBOX_NOTREADY: pb.SANDBOX_NOTREADY,
}
CRI_CONTAINER_STATES: dict[ContainerState, pb.ContainerState] = {
    CREATED: pb.CONTAINER_CREATED,
    RUNNING: pb.CONTAINER_RUNNING,
    EXITED: pb.CONTAINER_EXITED,
    UNKNOWN: pb.CONTAINER_UNKNOWN,
}


def cri_pod_state(state: PodState) -> pb.PodSandboxState:
    return CRI_POD_STATES.get(state, pb.SANDBOX_NOTREADY)


def cri_container_state(state: ContainerState) -> pb.ContainerState:
    return CRI_CONTAINER_STATES.get(state, pb.CONTAINER_UNKNOWN)


@dataclass
class PodRecord:
    id: str
    name: str  # the reserved CRI name, see pods.sandbox_name
    created_at: int  # ns since the epoch
    config: pb.PodSandboxConfig = field(repr=False)
    runtime_handler: str = ""
    # A factory, not a default: with an enum member left as the class attribute, CPython
    # 3.11 does not specialize loads of `record.state`, and a relist reads it per record
    # (measured: the visibility pass took twice as long).
    state: PodState = field(default_factory=lambda: PodState.READY)
    netns_path: str = ""  # empty: host network
    network_kind: str = ""  # "bridge", "cni" or "" for host network
    ip: str = ""
    additional_ips: list[str] = field(default_factory=list)
    pause_pid: int = 0
    # The pod-level cgroup's path below the hierarchy root, same in every hierarchy (systemd
    # driver: kubelet's pod slice, or empty when the pod names none).
    cgroup_path: str = ""
    cgroup_slice: str = ""  # systemd driver: the slice of the pod's scopes; empty: cgroupfs
    # Pinned namespace files that containers join ("ipc", "uts", "pid").
    namespaces: dict[str, str] = field(default_factory=dict)
    # True when the RunPodSandbox that made this pod never got its answer to the client (it
    # timed out on kubelet's side): kubelet's retry with the same name is handed this pod.
    unclaimed: bool = False
    # Set when RunPodSandbox failed and an undo step failed too: what was not undone. The pod
    # is kept NOTREADY, so kubelet (or a retry, or recovery) removes it and that finishes the
    # cleanup (sandbox/undo.py).
    cleanup_error: str = ""
    # This record's entry in a ListPodSandbox answer, serialized; emptied on every save.
    list_entry: bytes = field(default=b"", repr=False, compare=False, metadata=TRANSIENT)
    # Its PodSandboxStatus message, serialized; emptied on every save.
    status_bytes: bytes = field(default=b"", repr=False, compare=False, metadata=TRANSIENT)
    # The `info` entry of its verbose PodSandboxStatus answer, serialized; emptied on every save.
    verbose_info: bytes = field(default=b"", repr=False, compare=False, metadata=TRANSIENT)
    # How far a StopPodSandbox got; a pod never starts again, so it only moves forward.
    stop: PodStop = field(default_factory=lambda: PodStop.NONE, repr=False, compare=False,
                          metadata=TRANSIENT)

    def __post_init__(self) -> None:
        self.state = PodState(self.state)  # a member, also when given its value

    @property
    def short(self) -> str:
        return self.id[:12]


@dataclass
class ContainerRecord:
    id: str
    pod_id: str
    name: str  # the reserved CRI name, see containers.container_name
    created_at: int
    config: pb.ContainerConfig = field(repr=False)
    image_ref: str = ""  # the image as kubelet asked for it
    image_id: str = ""  # sha256:<config digest>
    image_name: str = ""  # the repo tag or digest it resolved through
    state: ContainerState = field(default_factory=lambda: ContainerState.CREATED)  # see PodRecord
    pid: int = 0
    started_at: int = 0
    finished_at: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    log_path: str = ""
    rootfs: str = ""
    snapshots: list[str] = field(default_factory=list)  # chain ids, topmost first
    cgroup_path: str = ""
    stop_signal: str = ""
    unclaimed: bool = False
    # Resources as last applied (UpdateContainerResources), serialized LinuxContainerResources.
    resources: bytes = field(default=b"", repr=False)
    uid: int = 0
    gid: int = 0
    supplemental_groups: list[int] = field(default_factory=list)
    # Set when CreateContainer failed and an undo step failed too: what was not undone. The
    # record stays CREATING, seen by nobody, until a removal (its pod's, a retry's, or
    # recovery's) finishes the cleanup (sandbox/undo.py).
    cleanup_error: str = ""
    # This record's entry in a ListContainers answer, serialized; emptied on every save.
    list_entry: bytes = field(default=b"", repr=False, compare=False, metadata=TRANSIENT)
    # Its ContainerStatus message, serialized; emptied on every save.
    status_bytes: bytes = field(default=b"", repr=False, compare=False, metadata=TRANSIENT)
    # The `info` entry of its verbose ContainerStatus answer, serialized; emptied on every save.
    verbose_info: bytes = field(default=b"", repr=False, compare=False, metadata=TRANSIENT)

    def __post_init__(self) -> None:
        self.state = ContainerState(self.state)


R = TypeVar("R", PodRecord, ContainerRecord)

_BYTES_FIELDS = frozenset({"resources"})


def _doc(record: PodRecord | ContainerRecord) -> str:
    doc: dict[str, Any] = {}
    for f in dataclasses.fields(record):
        if f.name == "config" or f.metadata.get("transient"):
            continue
        value = getattr(record, f.name)
        doc[f.name] = value.hex() if f.name in _BYTES_FIELDS else value
    return json.dumps(doc, sort_keys=True)


def _from_doc(cls: type[R], doc: str, config: bytes) -> R:
    raw = json.loads(doc)
    known = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("transient")}
    values = {k: v for k, v in raw.items() if k in known}
    for name in _BYTES_FIELDS & values.keys():
        values[name] = bytes.fromhex(values[name])
    config_type = pb.PodSandboxConfig if cls is PodRecord else pb.ContainerConfig
    values["config"] = config_type.FromString(config)
    return cls(**values)


def save_pod(store: Store, pod: PodRecord) -> None:
    _save(
        store, pod,
        "INSERT INTO pods(id, doc, config) VALUES (?, ?, ?) "
        "ON CONFLICT(id) DO UPDATE SET doc = excluded.doc, config = excluded.config",
        (pod.id, _doc(pod), pod.config.SerializeToString()),
    )


def save_container(store: Store, ctr: ContainerRecord) -> None:
    _save(
        store, ctr,
        "INSERT INTO containers(id, pod_id, doc, config) VALUES (?, ?, ?, ?) "
        "ON CONFLICT(id) DO UPDATE SET doc = excluded.doc",
        (ctr.id, ctr.pod_id, _doc(ctr), ctr.config.SerializeToString()),
    )


def _save(
    store: Store, record: PodRecord | ContainerRecord, upsert: str, row: tuple[object, ...]
) -> None:
    """Stores a changed record. Its cached answers (list entry, status) are emptied, to be
    built again from it when next asked for: a save is the one place that does it."""
    record.list_entry = record.status_bytes = record.verbose_info = b""
    with store.tx() as conn:
        conn.execute(upsert, row)


def insert_pod(store: Store, pod: PodRecord) -> str | None:
    """Reserves the pod's name and stores it, in one transaction.

    Returns the id of the object already holding the name (and stores nothing) when it is taken.
    """
    with store.tx() as conn:
        holder = _claim_name(conn, pod.name, pod.id, "pod")
        if holder is None:
            conn.execute(
                "INSERT INTO pods(id, doc, config) VALUES (?, ?, ?)",
                (pod.id, _doc(pod), pod.config.SerializeToString()),
            )
        return holder


def insert_container(store: Store, ctr: ContainerRecord) -> str | None:
    """Reserves the container's name and stores it, in one transaction (see insert_pod)."""
    with store.tx() as conn:
        holder = _claim_name(conn, ctr.name, ctr.id, "container")
        if holder is None:
            conn.execute(
                "INSERT INTO containers(id, pod_id, doc, config) VALUES (?, ?, ?, ?)",
                (ctr.id, ctr.pod_id, _doc(ctr), ctr.config.SerializeToString()),
            )
        return holder


def _claim_name(conn: sqlite3.Connection, name: str, owner_id: str, kind: str) -> str | None:
    row = conn.execute("SELECT owner_id FROM names WHERE name = ?", (name,)).fetchone()
    if row is not None:
        return str(row["owner_id"])
    conn.execute("INSERT INTO names(name, owner_id, kind) VALUES (?, ?, ?)", (name, owner_id, kind))
    return None


def delete_pod(store: Store, pod: PodRecord, leftovers: dict[str, Any] | None = None) -> None:
    """Deletes the record and frees its name; with `leftovers`, journals in the same
    transaction what remains to be cleaned on the host (kind "remove_pod", keyed by the pod
    id), as delete_container does."""
    with store.tx() as conn:
        conn.execute("DELETE FROM pods WHERE id = ?", (pod.id,))
        conn.execute("DELETE FROM names WHERE owner_id = ?", (pod.id,))
        if leftovers is not None:
            journal(conn, pod.id, REMOVE_POD, pod.id, leftovers)


def delete_container(
    store: Store, ctr: ContainerRecord, leftovers: dict[str, Any] | None = None
) -> None:
    """Deletes the record and frees its name; with `leftovers`, journals in the same
    transaction what remains to be cleaned on the host (kind "remove_container", keyed by the
    container id), so that no crash can lose it."""
    with store.tx() as conn:
        conn.execute("DELETE FROM containers WHERE id = ?", (ctr.id,))
        conn.execute("DELETE FROM names WHERE owner_id = ?", (ctr.id,))
        if leftovers is not None:
            journal(conn, ctr.id, REMOVE_CONTAINER, ctr.id, leftovers)


def load_pods(store: Store) -> dict[str, PodRecord]:
    rows = store.query("SELECT doc, config FROM pods")
    pods = (_from_doc(PodRecord, r["doc"], r["config"]) for r in rows)
    return {p.id: p for p in pods}


def load_containers(store: Store) -> dict[str, ContainerRecord]:
    rows = store.query("SELECT doc, config FROM containers")
    ctrs = (_from_doc(ContainerRecord, r["doc"], r["config"]) for r in rows)
    return {c.id: c for c in ctrs}
