"""The registry's rules about records, in process over a real store (no daemon)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from cri_api import api_pb2 as pb
from sandbox.creation import CALL_DEADLINE, Creations
from sandbox.errors import AlreadyExists, DeadlineExceeded, NotFound
from sandbox.records import ContainerRecord, ContainerState, PodRecord, PodState
from sandbox.registry import Registry
from sandbox.store import Store


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(Store(tmp_path / "state.db"))


def _pod(pod_id: str, name: str, state: PodState = PodState.READY) -> PodRecord:
    config = pb.PodSandboxConfig(metadata=pb.PodSandboxMetadata(name=name), labels={"app": name})
    return PodRecord(id=pod_id, name=name, created_at=time.time_ns(), config=config, state=state)


def _ctr(ctr_id: str, pod_id: str, name: str, state: ContainerState) -> ContainerRecord:
    config = pb.ContainerConfig(metadata=pb.ContainerMetadata(name=name), labels={"app": name})
    return ContainerRecord(id=ctr_id, pod_id=pod_id, name=name, created_at=time.time_ns(),
                           config=config, state=state)


def test_a_name_clash_is_already_exists_for_pods_and_containers(registry: Registry) -> None:
    registry.reserve(_pod("p1", "name-a"))
    registry.reserve(_ctr("c1", "p1", "name-c", ContainerState.CREATED))
    with pytest.raises(AlreadyExists, match="p1"):
        registry.reserve(_pod("p2", "name-a"))
    with pytest.raises(AlreadyExists, match="c1"):
        registry.reserve(_ctr("c2", "p1", "name-c", ContainerState.CREATED))
    assert set(registry.pods) == {"p1"} and set(registry.containers) == {"c1"}


def test_a_record_being_created_is_seen_by_nothing_but_lookups(registry: Registry) -> None:
    registry.reserve(_pod("p1", "ready"))
    registry.reserve(_pod("p2", "creating", PodState.CREATING))
    registry.reserve(_ctr("c1", "p1", "c-running", ContainerState.RUNNING))
    registry.reserve(_ctr("c2", "p1", "c-creating", ContainerState.CREATING))
    assert [p.id for p in registry.pods_matching()] == ["p1"]
    assert [c.id for c in registry.containers_matching()] == ["c1"]
    assert [c.id for c in registry.visible_containers_of("p1")] == ["c1"]
    with pytest.raises(NotFound, match="still being created"):
        registry.visible_pod("p2")
    with pytest.raises(NotFound, match="still being created"):
        registry.visible_container("c2")
    assert registry.pod("p2").id == "p2"  # its own creation and recovery still find it
    assert [p.id for p in registry.unfinished_pods()] == ["p2"]
    assert [c.id for c in registry.unfinished_containers()] == ["c2"]


def test_filters_select_by_id_pod_state_and_labels(registry: Registry) -> None:
    registry.reserve(_pod("pa1", "a"))
    registry.reserve(_pod("pb1", "b", PodState.NOTREADY))
    registry.reserve(_ctr("ca1", "pa1", "ca", ContainerState.RUNNING))
    registry.reserve(_ctr("cb1", "pb1", "cb", ContainerState.EXITED))
    assert [p.id for p in registry.pods_matching("pb")] == ["pb1"]
    assert [p.id for p in registry.pods_matching(state=pb.SANDBOX_READY)] == ["pa1"]
    assert [p.id for p in registry.pods_matching(labels={"app": "b"})] == ["pb1"]
    assert [c.id for c in registry.containers_matching(pod_prefix="pa")] == ["ca1"]
    assert [c.id for c in registry.containers_matching(state=pb.CONTAINER_EXITED)] == ["cb1"]
    assert [c.id for c in registry.containers_matching(labels={"app": "cb"})] == ["cb1"]
    assert registry.containers_matching("ca", labels={"app": "cb"}) == []


def test_a_state_filter_the_cri_does_not_define_selects_nothing(registry: Registry) -> None:
    """An unknown state value is a filter that matches nothing, never "no filter"."""
    registry.reserve(_pod("p1", "a"))
    registry.reserve(_pod("p2", "b", PodState.NOTREADY))
    registry.reserve(_ctr("c1", "p1", "c", ContainerState.RUNNING))
    assert [p.id for p in registry.pods_matching(state=pb.SANDBOX_NOTREADY)] == ["p2"]
    assert registry.pods_matching(state=7) == []
    assert [c.id for c in registry.containers_matching(state=pb.CONTAINER_RUNNING)] == ["c1"]
    assert registry.containers_matching(state=42) == []


def test_a_record_kept_with_a_cleanup_error_is_unfinished_and_yields_its_name(
    registry: Registry,
) -> None:
    """A pod whose failed creation could not be undone is kept NOTREADY (kubelet sees it and
    removes it); it counts as unfinished, and a request for its name first removes it."""
    pod = _pod("p1", "name-a", PodState.NOTREADY)
    registry.reserve(pod)
    assert registry.unfinished_pods() == []
    registry.update(pod, cleanup_error="network: EIO")
    assert [p.id for p in registry.unfinished_pods()] == ["p1"]
    assert [p.id for p in registry.pods_matching()] == ["p1"]
    removed: list[str] = []

    async def remove(pod_id: str) -> None:
        removed.append(pod_id)
        registry.forget(registry.pod(pod_id))

    async def make() -> str:
        registry.reserve(_pod("p2", "name-a"))
        return "p2"

    assert asyncio.run(registry.create_once("pod sandbox", "name-a", make, remove)) == "p2"
    assert removed == ["p1"] and set(registry.pods) == {"p2"}
    with pytest.raises(AlreadyExists):  # a holder without a cleanup left is not replaced
        asyncio.run(registry.create_once("pod sandbox", "name-a", make, remove))


def test_a_transition_is_saved_with_the_fields_that_change(
    registry: Registry, tmp_path: Path
) -> None:
    ctr = _ctr("c1", "p1", "c", ContainerState.RUNNING)
    registry.reserve(ctr)
    ctr.list_entry = b"stale"
    registry.transition(ctr, ContainerState.EXITED, exit_code=3, reason="Error")
    assert ctr.list_entry == b""  # the list answer is built again
    again = Registry(Store(tmp_path / "state.db"))
    again.load()
    loaded = again.containers["c1"]
    assert (loaded.state, loaded.exit_code, loaded.reason) == (ContainerState.EXITED, 3, "Error")
    assert loaded.state is ContainerState.EXITED  # a member, as visibility compares them
    with pytest.raises(AttributeError, match="no_such_field"):
        registry.update(ctr, no_such_field=1)


def test_forget_removes_the_record_and_frees_its_name(registry: Registry) -> None:
    pod = _pod("p1", "name-a")
    registry.reserve(pod)
    registry.forget(pod)
    assert registry.find_pod("p1") is None
    registry.reserve(_pod("p2", "name-a"))  # the name is free again
    assert set(registry.pods) == {"p2"}


def test_an_object_made_after_its_call_s_deadline_is_left_for_the_retry() -> None:
    """A create that finishes once its call's deadline has passed (and before the daemon has
    seen the cancellation) cannot answer its client: the object is marked unclaimed, so
    kubelet's retry gets it instead of "name is reserved" (sandbox/creation.py)."""
    unclaimed: list[str] = []

    async def made() -> str:
        return "id-1"

    async def never(_id: str) -> None:
        raise AssertionError("no leftover to remove")

    async def call(deadline: float | None) -> str:
        CALL_DEADLINE.set(deadline)
        return await Creations().create_once(
            "name", "container", None, made, lambda _id: None, unclaimed.append, never)

    with pytest.raises(DeadlineExceeded):
        asyncio.run(call(time.monotonic() - 0.001))
    assert unclaimed == ["id-1"]
    assert asyncio.run(call(time.monotonic() + 60)) == "id-1"  # in time: delivered
    assert asyncio.run(call(None)) == "id-1"  # no deadline
    assert unclaimed == ["id-1"]
