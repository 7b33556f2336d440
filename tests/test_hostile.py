"""Hostile input: every RPC of both services, with generated requests (unknown ids, 1 MB
strings, huge maps, `..`, absolute paths, NUL bytes, unicode, contradictory options), answers
with a deliberate status, never INTERNAL or UNKNOWN; the daemon keeps serving; and nothing
appears outside flatpod's dirs, the requested mounts and the log dir."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cri_api import api_pb2 as pb
from tests.cri import CriClient, status_code
from tests.daemon import Daemon, running_daemon
from tests.pods import container_config, pod_config, remove_all_pods
from tests.support.plugin import TestImages

ALLOWED = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED,
}
MARK = "fphostile"
HOSTILE_TEXT = [
    "", ".", "..", "../../../etc", f"../{MARK}", f"/etc/{MARK}", "/", "/etc/passwd",
    f"/tmp/{MARK}/../../etc", f"a\x00{MARK}", f"{MARK}\n", "\u202e☃ünï\U0001f600", "-", "*",
    "x" * 1_000_000, "9" * 64, "sha256:" + "0" * 64, "%s%n", f"{MARK}/" * 200,
]
EDGE_INTS = [0, -1, 1, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63), 65536, 99999]
SERVICES = [pb.DESCRIPTOR.services_by_name[n] for n in ("RuntimeService", "ImageService")]
METHODS = [(s.name, m) for s in SERVICES for m in s.methods]


def _int_range(field: Any) -> tuple[int, int]:
    if field.type in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return 0, 2**32 - 1
    if field.type in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return 0, 2**64 - 1
    if field.type in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32,
                      FieldDescriptor.TYPE_SFIXED32, FieldDescriptor.TYPE_ENUM):
        return -(2**31), 2**31 - 1
    return -(2**63), 2**63 - 1


def scalar(field: Any, texts: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_STRING:
        return texts
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.sampled_from([b"", b"\x00" * 16, b"\xff" * 1024])
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.sampled_from([0.0, -1.0, 1e300, float("inf")])
    lo, hi = _int_range(field)
    return st.sampled_from([i for i in EDGE_INTS if lo <= i <= hi] + [lo, hi])


@st.composite
def fill(draw: st.DrawFn, message: Message, texts: st.SearchStrategy[str], depth: int) -> None:
    """Sets a random subset of `message`'s fields to hostile values, nested up to `depth`."""
    for field in message.DESCRIPTOR.fields:
        if not draw(st.integers(0, 2)):  # about a third of the fields stay unset
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_field = field.message_type.fields_by_name["key"]
            value_field = field.message_type.fields_by_name["value"]
            if value_field.message_type is not None:
                continue
            target = getattr(message, field.name)
            if draw(st.integers(0, 9)) == 0:  # now and then a huge map
                target.update({f"k{i}": "v" * 100 for i in range(20_000)})
            for _ in range(draw(st.integers(0, 3))):
                target[draw(scalar(key_field, texts))] = draw(scalar(value_field, texts))
        elif field.message_type is not None:
            if depth <= 0:
                continue
            if field.is_repeated:
                for _ in range(draw(st.integers(0, 2))):
                    draw(fill(getattr(message, field.name).add(), texts, depth - 1))
            else:
                draw(fill(getattr(message, field.name), texts, depth - 1))
        elif field.is_repeated:
            getattr(message, field.name).extend(
                draw(st.lists(scalar(field, texts), max_size=3)))
        else:
            setattr(message, field.name, draw(scalar(field, texts)))


@st.composite
def request(draw: st.DrawFn, method: Any, base: Message | None,
            texts: st.SearchStrategy[str]) -> Message:
    message: Message = getattr(pb, method.input_type.name)()
    if base is not None and draw(st.booleans()):
        message.CopyFrom(base)  # mostly valid: only some fields turn hostile
    draw(fill(message, texts, depth=4))
    return message


def snapshot() -> dict[str, set[str]]:
    return {d: set(os.listdir(d)) for d in ("/", "/etc", "/tmp", "/run")}


@pytest.fixture(scope="module")
def hostile(
    tmp_path_factory: pytest.TempPathFactory, test_images: TestImages
) -> Iterator[tuple[Daemon, CriClient, dict[str, Message], list[str]]]:
    base = tmp_path_factory.mktemp("hostile")
    with running_daemon(base) as d:
        cri = d.client()
        image = test_images.busybox.reference
        cri.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)))
        # Real ids to aim at, so requests reach past the lookups.
        config = pod_config(log_dir=base / "logs")
        pod_id = cri.RunPodSandbox(pb.RunPodSandboxRequest(config=config)).pod_sandbox_id
        ctr_config = container_config(image, command=["sleep", "3600"])
        ctr_id = cri.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=ctr_config, sandbox_config=config)).container_id
        cri.StartContainer(pb.StartContainerRequest(container_id=ctr_id))
        bases: dict[str, Message] = {
            "RunPodSandboxRequest": pb.RunPodSandboxRequest(config=config),
            "CreateContainerRequest": pb.CreateContainerRequest(
                pod_sandbox_id=pod_id, config=ctr_config, sandbox_config=config),
            "PullImageRequest": pb.PullImageRequest(image=pb.ImageSpec(image=image)),
        }
        ids = [pod_id, ctr_id, image, test_images.busybox.config_digest]
        yield d, cri, bases, ids
        remove_all_pods(cri)
        cri.close()


@pytest.mark.parametrize("method", [m for _, m in METHODS], ids=[m.name for _, m in METHODS])
def test_hostile_requests(
    method: Any, hostile: tuple[Daemon, CriClient, dict[str, Message], list[str]]
) -> None:
    _, cri, bases, ids = hostile
    texts = st.sampled_from(HOSTILE_TEXT + ids)
    if method.name == "PullImage":
        # Only the local registry: a hostile name must not send this test to the internet.
        host = ids[2].split("/")[0]
        texts = st.sampled_from(HOSTILE_TEXT).map(lambda t: f"{host}/{t}")
    before = snapshot()

    @settings(max_examples=25, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(request(method, bases.get(method.input_type.name), texts))
    def check(req: Message) -> None:
        call = cri.runtime if hasattr(cri.runtime, method.name) else cri.image
        stub = getattr(call, method.name)
        try:
            if method.server_streaming:
                for _ in stub(req, timeout=1):
                    break
            else:
                stub(req, timeout=15)
        except grpc.RpcError as err:
            code = status_code(err)
            assert code in ALLOWED, f"{method.name}: {code}: {err.details()}"
        assert cri.Version(pb.VersionRequest()).runtime_name

    try:
        check()
    finally:
        _remove_extra_pods(cri, ids[0])
    after = snapshot()
    for top in ("/", "/etc"):
        assert after[top] - before[top] == set(), f"{top} gained entries"
    for top in ("/tmp", "/run"):
        strays = {n for n in after[top] - before[top] if MARK in n or n in HOSTILE_TEXT}
        assert strays == set(), f"{top} gained {strays}"
    assert not [p for p in Path("/etc").iterdir() if MARK in p.name]


def _remove_extra_pods(cri: CriClient, keep: str) -> None:
    for pod in cri.ListPodSandbox(pb.ListPodSandboxRequest()).items:
        if pod.id != keep:
            cri.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod.id))
            cri.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod.id))
