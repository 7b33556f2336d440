"""ListPodSandbox and ListContainers as kubelet's relist calls them: unfiltered, every second.

In process, no daemon: the list functions over a real store. Their unfiltered answers are
cached whole (sandbox/wire.py, AnswerCache); these tests change records the way the RPCs do
(save, insert, delete) and check that every answer is the current one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TypeVar

import pytest

from cri_api import api_pb2 as pb
from sandbox import containers, pods
from sandbox.config import Config
from sandbox.records import (
    EXITED,
    RUNNING,
    SANDBOX_NOTREADY,
    SANDBOX_READY,
    ContainerRecord,
    PodRecord,
    delete_container,
    delete_pod,
    insert_container,
    insert_pod,
    save_container,
    save_pod,
)
from sandbox.runtime import Paths, Runtime
from sandbox.store import Store


@pytest.fixture
def rt(tmp_path: Path) -> Runtime:
    return Runtime(config=Config(), store=Store(tmp_path / "state.db"),
                   paths=Paths(tmp_path / "root", tmp_path / "state"))


def _add_pod(rt: Runtime, pod_id: str, state: str = SANDBOX_READY) -> PodRecord:
    config = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=pod_id, uid="u", namespace="ns"),
        labels={"app": pod_id},
    )
    pod = PodRecord(id=pod_id, name=pod_id, created_at=time.time_ns(), config=config,
                    state=state)
    assert insert_pod(rt.store, pod) is None
    rt.pods[pod.id] = pod
    return pod


def _add_container(rt: Runtime, ctr_id: str, pod_id: str, state: str = RUNNING) -> ContainerRecord:
    config = pb.ContainerConfig(metadata=pb.ContainerMetadata(name=ctr_id))
    ctr = ContainerRecord(id=ctr_id, pod_id=pod_id, name=ctr_id, created_at=time.time_ns(),
                          config=config, image_ref="busybox", state=state)
    assert insert_container(rt.store, ctr) is None
    rt.containers[ctr.id] = ctr
    return ctr


def _pods(rt: Runtime, flt: pb.PodSandboxFilter | None = None) -> list[tuple[str, int]]:
    raw = pods.list_pod_sandbox(rt, pb.ListPodSandboxRequest(filter=flt))
    return sorted((p.id, p.state) for p in pb.ListPodSandboxResponse.FromString(raw).items)


def _containers(rt: Runtime, flt: pb.ContainerFilter | None = None) -> list[tuple[str, int]]:
    raw = containers.list_containers(rt, pb.ListContainersRequest(filter=flt))
    listed = pb.ListContainersResponse.FromString(raw).containers
    return sorted((c.id, c.state) for c in listed)


def test_unfiltered_pod_list_follows_every_change(rt: Runtime) -> None:
    ready, notready = pb.SANDBOX_READY, pb.SANDBOX_NOTREADY
    first = _add_pod(rt, "p1")
    creating = _add_pod(rt, "p2", state=pods.SANDBOX_CREATING)
    assert _pods(rt) == [("p1", ready)]  # a pod being created is listed nowhere

    creating.state = SANDBOX_READY
    save_pod(rt.store, creating)
    assert _pods(rt) == [("p1", ready), ("p2", ready)]

    first.state = SANDBOX_NOTREADY
    save_pod(rt.store, first)
    assert _pods(rt) == [("p1", notready), ("p2", ready)]
    # a filter is answered from the records, beside the cached unfiltered answer
    only_ready = pb.PodSandboxFilter(state=pb.PodSandboxStateValue(state=pb.SANDBOX_READY))
    assert _pods(rt, only_ready) == [("p2", ready)]
    assert _pods(rt, pb.PodSandboxFilter(label_selector={"app": "p1"})) == [("p1", notready)]

    rt.pods.pop(first.id)
    delete_pod(rt.store, first)
    assert _pods(rt) == [("p2", ready)]


def test_unfiltered_container_list_follows_every_change(rt: Runtime) -> None:
    running, exited = pb.CONTAINER_RUNNING, pb.CONTAINER_EXITED
    _add_pod(rt, "p1")
    c1 = _add_container(rt, "c1", "p1")
    assert _containers(rt) == [("c1", running)]

    _add_container(rt, "c2", "p1", state=containers.CONTAINER_CREATING)
    assert _containers(rt) == [("c1", running)]

    c1.state = EXITED
    save_container(rt.store, c1)
    assert _containers(rt) == [("c1", exited)]
    assert _containers(rt, pb.ContainerFilter(id="c1")) == [("c1", exited)]

    rt.containers.pop(c1.id)
    delete_container(rt.store, c1)
    assert _containers(rt) == []


def test_unchanged_records_answer_the_same_bytes(rt: Runtime) -> None:
    _add_pod(rt, "p1")
    _add_pod(rt, "p2")
    request = pb.ListPodSandboxRequest()
    first = pods.list_pod_sandbox(rt, request)
    again = pods.list_pod_sandbox(rt, request)
    assert again is first  # kept whole: not reassembled from the records
    rt.store.put_setting("unrelated", "1")  # any write: built again, equal
    rebuilt = pods.list_pod_sandbox(rt, request)
    assert rebuilt == first and rebuilt is not first


M = TypeVar("M", pb.PodSandboxStatusResponse, pb.ContainerStatusResponse)


def _decoded(answer: M | bytes, response_type: type[M]) -> M:
    """A status handler's answer as a message, whether it answered bytes or a message."""
    return response_type.FromString(answer) if isinstance(answer, bytes) else answer


def _statuses(rt: Runtime, pod_id: str, verbose: bool) -> pb.PodSandboxStatusResponse:
    request = pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=verbose)
    return _decoded(pods.pod_sandbox_status(rt, request),
                    pb.PodSandboxStatusResponse)


def _container_status(rt: Runtime, ctr_id: str, verbose: bool) -> pb.ContainerStatusResponse:
    request = pb.ContainerStatusRequest(container_id=ctr_id, verbose=verbose)
    return _decoded(containers.container_status(rt, request),
                    pb.ContainerStatusResponse)


def test_status_answers_from_kept_bytes_follow_every_change(rt: Runtime) -> None:
    """The non-verbose status answers (kubelet's), assembled from each record's kept bytes,
    say what the verbose ones built from the records say, also after each change."""
    pod = _add_pod(rt, "p1")
    ctr = _add_container(rt, "c1", "p1")
    _add_container(rt, "c2", "p1", state=containers.CONTAINER_CREATING)  # seen by nobody
    for _ in range(2):  # the first builds the kept bytes, the second answers them
        fast, full = _statuses(rt, "p1", False), _statuses(rt, "p1", True)
        assert fast.status == full.status and fast.status.state == pb.SANDBOX_READY
        assert list(fast.containers_statuses) == list(full.containers_statuses)
        assert [c.id for c in fast.containers_statuses] == ["c1"]
        assert fast.timestamp > 0 and not fast.info
        assert _container_status(rt, "c1", False).status == full.containers_statuses[0]

    pod.state = SANDBOX_NOTREADY
    save_pod(rt.store, pod)
    ctr.state, ctr.exit_code, ctr.reason = EXITED, 3, "Error"
    save_container(rt.store, ctr)
    fast = _statuses(rt, "p1", False)
    assert fast.status.state == pb.SANDBOX_NOTREADY
    status = _container_status(rt, "c1", False).status
    assert (status.state, status.exit_code, status.reason) == (pb.CONTAINER_EXITED, 3, "Error")
    assert fast.containers_statuses[0] == status
    assert status == _container_status(rt, "c1", True).status


def test_verbose_status_answers_from_kept_bytes_follow_every_change(rt: Runtime) -> None:
    """The verbose answers (critest's, crictl inspect's) are the kept status bytes plus a kept
    info entry: each equals the message built from the record, and a saved change shows."""
    pod = _add_pod(rt, "p1")
    ctr = _add_container(rt, "c1", "p1")
    for _ in range(2):  # the first builds the kept bytes, the second answers them
        answer = _statuses(rt, "p1", True)
        assert answer.status == pods.sandbox_status(pod)
        assert list(answer.containers_statuses) == [containers.container_status_message(rt, ctr)]
        assert json.loads(answer.info["info"])["pid"] == 0 and list(answer.info) == ["info"]
        single = _container_status(rt, "c1", True)
        assert single.status == containers.container_status_message(rt, ctr)
        info = json.loads(single.info["info"])
        assert (info["pid"], info["sandboxID"], info["config"]["metadata"]) == (
            0, "p1", {"name": "c1"})

    pod.pause_pid, ctr.pid = 4242, 4343
    save_pod(rt.store, pod)
    save_container(rt.store, ctr)
    assert json.loads(_statuses(rt, "p1", True).info["info"])["pid"] == 4242
    assert json.loads(_container_status(rt, "c1", True).info["info"])["pid"] == 4343
    assert not _container_status(rt, "c1", False).info
