"""The one owner of pod and container records: what exists, who sees it, what it is called.

Every RPC family asks the registry instead of reading the indexes itself, so each rule about
records has one home:
- visibility: a record still being created is listed nowhere and found by no status, stats
  or event; only its own creation (and recovery) sees it;
- filters: id prefix, pod id prefix, state and label selector, as the CRI filters name them
  (a state value the CRI does not define selects nothing: a filter never fails open);
- names: reserving a name together with storing the record, and handing a finished object to
  a retry of the request that made it (sandbox/creation.py);
- changes: a state change is a transition that saves the record as part of the change, so
  no caller can forget the save (and with it the list entry it empties; see Runtime.list_answer).

Records join and leave the indexes together with their insert and delete in the store.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeVar, overload

from sandbox.creation import Creations, name_taken
from sandbox.errors import FailedPrecondition, InvalidArgument, NotFound
from sandbox.records import (
    CRI_CONTAINER_STATES,
    CRI_POD_STATES,
    ContainerRecord,
    ContainerState,
    PodRecord,
    PodState,
    delete_container,
    delete_pod,
    insert_container,
    insert_pod,
    load_containers,
    load_pods,
    save_container,
    save_pod,
)
from sandbox.store import Store

T = TypeVar("T")
R = TypeVar("R", PodRecord, ContainerRecord)
Kind = Literal["pod sandbox", "container"]
# Looking an enum member up on its class costs ~55 ns (EnumType's descriptor), and `!=` on
# a str subclass misses CPython's fast path for str: per record in a relist, both cost more
# than the rest of the pass. A record's state is always a member (records.py), so visibility
# compares identities with these.
_POD_CREATING = PodState.CREATING
_CTR_CREATING = ContainerState.CREATING
# The record state a CRI state filter selects, by the filter's value.
_POD_STATE_FILTERS: dict[int, PodState] = {cri: s for s, cri in CRI_POD_STATES.items()}
_CONTAINER_STATE_FILTERS: dict[int, ContainerState] = {
    cri: s for s, cri in CRI_CONTAINER_STATES.items()
}
_FIELDS = {
    PodRecord: frozenset(f.name for f in dataclasses.fields(PodRecord)),
    ContainerRecord: frozenset(f.name for f in dataclasses.fields(ContainerRecord)),
}


@dataclass
class Registry:
    store: Store
    pods: dict[str, PodRecord] = field(default_factory=dict)
    containers: dict[str, ContainerRecord] = field(default_factory=dict)
    creations: Creations = field(default_factory=Creations)

    def load(self) -> None:
        """The records as the store has them (at startup)."""
        self.pods = load_pods(self.store)
        self.containers = load_containers(self.store)

    # --- lookups: every record, also one being created -----------------------------------

    def pod(self, ref: str) -> PodRecord:
        """The pod whose id is `ref` or starts with it (crictl users type prefixes)."""
        return _by_id_or_prefix(self.pods, ref, "pod sandbox")

    def container(self, ref: str) -> ContainerRecord:
        return _by_id_or_prefix(self.containers, ref, "container")

    def find_pod(self, ref: str) -> PodRecord | None:
        try:
            return self.pod(ref)
        except NotFound:
            return None

    def find_container(self, ref: str) -> ContainerRecord | None:
        try:
            return self.container(ref)
        except NotFound:
            return None

    def containers_of(self, pod_id: str) -> list[ContainerRecord]:
        return [c for c in self.containers.values() if c.pod_id == pod_id]

    def unfinished_pods(self) -> list[PodRecord]:
        """Pods whose creation has not finished, or failed and left a cleanup to finish
        (recovery removes them)."""
        return [
            p for p in self.pods.values() if p.state == PodState.CREATING or p.cleanup_error
        ]

    def unfinished_containers(self) -> list[ContainerRecord]:
        """Containers being created, or whose failed creation left a cleanup to finish (these
        stay CREATING: see ContainerRecord.cleanup_error)."""
        return [c for c in self.containers.values() if c.state == ContainerState.CREATING]

    # --- visibility: what status, list, stats and events see -----------------------------

    def visible_pod(self, ref: str) -> PodRecord:
        pod = self.pod(ref)
        if pod.state == PodState.CREATING:
            raise NotFound(f"pod sandbox {ref!r} not found (it is still being created)")
        return pod

    def visible_container(self, ref: str) -> ContainerRecord:
        ctr = self.container(ref)
        if ctr.state == ContainerState.CREATING:
            why = ("its creation failed; removing it finishes the cleanup" if ctr.cleanup_error
                   else "it is still being created")
            raise NotFound(f"container {ref!r} not found ({why})")
        return ctr

    def visible_containers_of(self, pod_id: str) -> list[ContainerRecord]:
        return [
            c for c in self.containers.values()
            if c.pod_id == pod_id and c.state is not _CTR_CREATING
        ]

    def ready_pod(self, ref: str) -> PodRecord:
        """The pod a new container goes into: it must exist and be ready."""
        pod = self.visible_pod(ref)
        if pod.state != PodState.READY:
            raise FailedPrecondition(f"pod sandbox {pod.id} is {pod.state}, not ready")
        return pod

    # --- filters ---------------------------------------------------------------------------
    # One pass per criterion given, so the empty filter of kubelet's relist costs one
    # comprehension; the label selector (a protobuf map) is read once, not once per record
    # (reading it once per pod cost ~0.8 us a pod).

    def pods_matching(
        self,
        id_prefix: str = "",
        state: int | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> list[PodRecord]:
        """The visible pods a CRI filter selects (ListPodSandbox, the pod stats RPCs); `state`
        is the filter's PodSandboxState value, None for none."""
        want = None if state is None else _POD_STATE_FILTERS.get(state)
        if state is not None and want is None:
            return []
        found = [p for p in self.pods.values() if p.state is not _POD_CREATING]
        return _selected(found, id_prefix, want, labels)

    def containers_matching(
        self,
        id_prefix: str = "",
        pod_prefix: str = "",
        labels: Mapping[str, str] | None = None,
        state: int | None = None,
    ) -> list[ContainerRecord]:
        """The visible containers a CRI filter selects (ListContainers, the stats RPCs);
        `state` is the filter's ContainerState value, None for none."""
        want = None if state is None else _CONTAINER_STATE_FILTERS.get(state)
        if state is not None and want is None:
            return []
        found = [c for c in self.containers.values() if c.state is not _CTR_CREATING]
        if pod_prefix:
            found = [c for c in found if c.pod_id.startswith(pod_prefix)]
        return _selected(found, id_prefix, want, labels)

    # --- names: reserve, create once, claim --------------------------------------------------

    async def create_once(
        self,
        kind: Kind,
        name: str,
        make: Callable[[], Awaitable[str]],
        remove_leftover: Callable[[str], Awaitable[None]],
    ) -> str:
        """The id of the `kind` called `name`: made by `make`, or the one already made (see
        sandbox/creation.py). A holder of the name whose creation failed with a cleanup left
        is first removed, by id, with `remove_leftover`."""
        index: Mapping[str, PodRecord | ContainerRecord] = (
            self.pods if kind == "pod sandbox" else self.containers
        )
        holder = next((r for r in index.values() if r.name == name), None)
        return await self.creations.create_once(
            name, kind, holder, make, self._claim, self._mark_unclaimed, remove_leftover
        )

    def reserve(self, record: PodRecord | ContainerRecord) -> None:
        """Reserves the record's name and stores it, in one transaction, then indexes it.

        A name another object holds answers ALREADY_EXISTS, as create_once does."""
        if isinstance(record, PodRecord):
            kind: Kind = "pod sandbox"
            holder = insert_pod(self.store, record)
            if holder is None:
                self.pods[record.id] = record
        else:
            kind = "container"
            holder = insert_container(self.store, record)
            if holder is None:
                self.containers[record.id] = record
        if holder is not None:
            held = self.pods.get(holder) or self.containers.get(holder)
            raise name_taken(kind, record.name, holder, held.state if held else "")

    def _claim(self, record_id: str) -> None:
        self._set_unclaimed(record_id, False)

    def _mark_unclaimed(self, record_id: str) -> None:
        self._set_unclaimed(record_id, True)

    def _set_unclaimed(self, record_id: str, unclaimed: bool) -> None:
        record = self.pods.get(record_id) or self.containers.get(record_id)
        if record is not None:
            self.update(record, unclaimed=unclaimed)

    # --- changes: saved as they are made -----------------------------------------------------

    @overload
    def transition(self, record: PodRecord, state: PodState, **changes: object) -> None: ...

    @overload
    def transition(
        self, record: ContainerRecord, state: ContainerState, **changes: object
    ) -> None: ...

    def transition(
        self, record: PodRecord | ContainerRecord, state: PodState | ContainerState,
        **changes: object,
    ) -> None:
        """Moves the record to `state`, with the fields that change with it, and saves it."""
        self.update(record, state=state, **changes)

    def update(self, record: PodRecord | ContainerRecord, **changes: object) -> None:
        """Sets the record's fields named in `changes` and saves it."""
        unknown = changes.keys() - _FIELDS[type(record)]
        if unknown:
            raise AttributeError(f"{type(record).__name__} has no field {sorted(unknown)}")
        for name, value in changes.items():
            setattr(record, name, value)
        self.save(record)

    def save(self, record: PodRecord | ContainerRecord) -> None:
        """Saves a record changed in place (a protobuf config edited, fields set while it
        was being created)."""
        if isinstance(record, PodRecord):
            save_pod(self.store, record)
        else:
            save_container(self.store, record)

    def forget(self, record: PodRecord | ContainerRecord,
               leftovers: dict[str, object] | None = None) -> None:
        """Removes the record from the indexes and the store, its name with it; with
        `leftovers` (what is still on the host), journals them in the same transaction."""
        if isinstance(record, PodRecord):
            self.pods.pop(record.id, None)
            delete_pod(self.store, record, leftovers)
        else:
            self.containers.pop(record.id, None)
            delete_container(self.store, record, leftovers)


def _selected(
    found: list[R],
    id_prefix: str,
    state: PodState | ContainerState | None,
    labels: Mapping[str, str] | None,
) -> list[R]:
    if id_prefix:
        found = [r for r in found if r.id.startswith(id_prefix)]
    if state is not None:
        found = [r for r in found if r.state is state]  # members both (see _POD_CREATING)
    if labels:
        selector = dict(labels)
        found = [r for r in found if all(r.config.labels.get(k) == v for k, v in selector.items())]
    return found


def _by_id_or_prefix(index: dict[str, T], ref: str, what: str) -> T:
    if not ref:
        raise InvalidArgument(f"{what} id is empty")
    found = index.get(ref)
    if found is not None:
        return found
    matches = list(_prefixed(index.keys(), ref))
    if len(matches) == 1:
        return index[matches[0]]
    if len(matches) > 1:
        raise InvalidArgument(f"{what} id prefix {ref!r} is ambiguous: {len(matches)} match")
    raise NotFound(f"{what} {ref!r} not found")


def _prefixed(ids: Iterable[str], prefix: str) -> Iterable[str]:
    return (i for i in ids if i.startswith(prefix))
