"""Checks that cri_api matches the CRI runtime.v1 wire contract (cri-api v0.36.0).

The expected values below were written by hand from upstream
kubernetes/cri-api pkg/apis/runtime/v1/api.proto at tag v0.36.0.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor

from cri_api import api_pb2 as pb
from cri_api import api_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
GENERATED = ("api_pb2.py", "api_pb2_grpc.py", "api_pb2.pyi")

RUNTIME_RPCS = {
    "Version",
    "RunPodSandbox",
    "StopPodSandbox",
    "RemovePodSandbox",
    "PodSandboxStatus",
    "ListPodSandbox",
    "StreamPodSandboxes",
    "CreateContainer",
    "StartContainer",
    "StopContainer",
    "RemoveContainer",
    "ListContainers",
    "StreamContainers",
    "ContainerStatus",
    "UpdateContainerResources",
    "ReopenContainerLog",
    "ExecSync",
    "Exec",
    "Attach",
    "PortForward",
    "ContainerStats",
    "ListContainerStats",
    "StreamContainerStats",
    "PodSandboxStats",
    "ListPodSandboxStats",
    "StreamPodSandboxStats",
    "UpdateRuntimeConfig",
    "Status",
    "CheckpointContainer",
    "GetContainerEvents",
    "ListMetricDescriptors",
    "ListPodSandboxMetrics",
    "StreamPodSandboxMetrics",
    "RuntimeConfig",
    "UpdatePodSandboxResources",
}

IMAGE_RPCS = {
    "ListImages",
    "StreamImages",
    "ImageStatus",
    "PullImage",
    "RemoveImage",
    "ImageFsInfo",
}

# RPCs whose responses are server streams.
SERVER_STREAMING = {
    "RuntimeService": {
        "StreamPodSandboxes",
        "StreamContainers",
        "StreamContainerStats",
        "StreamPodSandboxStats",
        "GetContainerEvents",
        "StreamPodSandboxMetrics",
    },
    "ImageService": {"StreamImages"},
}

# (message, field) -> field number, from upstream.
FIELD_NUMBERS = {
    ("ContainerConfig", "metadata"): 1,
    ("ContainerConfig", "image"): 2,
    ("ContainerConfig", "envs"): 6,
    ("ContainerConfig", "log_path"): 11,
    ("ContainerConfig", "linux"): 15,
    ("ContainerConfig", "CDI_devices"): 17,
    ("ContainerConfig", "stop_signal"): 18,
    ("LinuxContainerSecurityContext", "run_as_user"): 5,
    ("LinuxContainerSecurityContext", "run_as_group"): 12,
    ("LinuxContainerSecurityContext", "no_new_privs"): 11,
    ("LinuxContainerSecurityContext", "seccomp"): 15,
    ("LinuxContainerSecurityContext", "apparmor"): 16,
    ("LinuxContainerSecurityContext", "supplemental_groups_policy"): 17,
    ("PodSandboxConfig", "port_mappings"): 5,
    ("PodSandboxConfig", "linux"): 8,
    ("PodSandboxConfig", "windows"): 9,
    ("ContainerStatus", "image_ref"): 9,
    ("ContainerStatus", "resources"): 16,
    ("ContainerStatus", "image_id"): 17,
    ("ContainerStatus", "user"): 18,
    ("ImageSpec", "annotations"): 2,
    ("ImageSpec", "user_specified_image"): 18,
    ("ImageSpec", "runtime_handler"): 19,
    ("ImageSpec", "image_ref"): 20,
    ("PortMapping", "protocol"): 1,
    ("PortMapping", "container_port"): 2,
    ("PortMapping", "host_port"): 3,
    ("PortMapping", "host_ip"): 4,
    ("ExecSyncRequest", "container_id"): 1,
    ("ExecSyncRequest", "cmd"): 2,
    ("ExecSyncRequest", "timeout"): 3,
    ("Mount", "uidMappings"): 6,
    ("Mount", "image_sub_path"): 10,
    ("LinuxContainerResources", "memory_swap_limit_in_bytes"): 10,
}

# Cardinality/type spot checks: (message, field) -> kind.
REPEATED = "repeated"
MAP = "map"
SINGULAR = "singular"
FIELD_SHAPES = {
    ("ContainerConfig", "command"): REPEATED,
    ("ContainerConfig", "labels"): MAP,
    ("ContainerConfig", "annotations"): MAP,
    ("ContainerConfig", "working_dir"): SINGULAR,
    ("PodSandboxConfig", "port_mappings"): REPEATED,
    ("LinuxContainerResources", "unified"): MAP,
    ("LinuxContainerSecurityContext", "supplemental_groups"): REPEATED,
    ("ExecSyncRequest", "cmd"): REPEATED,
    ("ImageSpec", "annotations"): MAP,
}

FIELD_TYPES = {
    ("ExecSyncRequest", "timeout"): FieldDescriptor.TYPE_INT64,
    ("ExecSyncResponse", "exit_code"): FieldDescriptor.TYPE_INT32,
    ("ExecSyncResponse", "stdout"): FieldDescriptor.TYPE_BYTES,
    ("PortMapping", "container_port"): FieldDescriptor.TYPE_INT32,
    ("PortMapping", "protocol"): FieldDescriptor.TYPE_ENUM,
    ("ContainerStatus", "created_at"): FieldDescriptor.TYPE_INT64,
    ("LinuxContainerSecurityContext", "supplemental_groups"): FieldDescriptor.TYPE_INT64,
    ("ContainerStats", "cpu"): FieldDescriptor.TYPE_MESSAGE,
}

ENUM_VALUES = {
    "Protocol": {"TCP": 0, "UDP": 1, "SCTP": 2},
    "NamespaceMode": {"POD": 0, "CONTAINER": 1, "NODE": 2, "TARGET": 3},
    "ContainerState": {
        "CONTAINER_CREATED": 0,
        "CONTAINER_RUNNING": 1,
        "CONTAINER_EXITED": 2,
        "CONTAINER_UNKNOWN": 3,
    },
    "ContainerEventType": {
        "CONTAINER_CREATED_EVENT": 0,
        "CONTAINER_STARTED_EVENT": 1,
        "CONTAINER_STOPPED_EVENT": 2,
        "CONTAINER_DELETED_EVENT": 3,
    },
    "MountPropagation": {
        "PROPAGATION_PRIVATE": 0,
        "PROPAGATION_HOST_TO_CONTAINER": 1,
        "PROPAGATION_BIDIRECTIONAL": 2,
    },
}


def _field(msg: str, name: str) -> FieldDescriptor:
    desc = pb.DESCRIPTOR.message_types_by_name[msg]
    assert name in desc.fields_by_name, f"{msg}.{name} missing"
    return desc.fields_by_name[name]


# (a) committed stubs are exactly what hack/gen-proto would produce.
def test_generated_stubs_up_to_date(tmp_path: Path) -> None:
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpc_tools (grpcio-tools) is not installed; cannot regenerate")
    (tmp_path / "cri_api").mkdir()
    shutil.copy(REPO / "cri_api" / "api.proto", tmp_path / "cri_api" / "api.proto")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            ".",
            "--python_out=.",
            "--grpc_python_out=.",
            "--pyi_out=.",
            "cri_api/api.proto",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    for name in GENERATED:
        fresh = (tmp_path / "cri_api" / name).read_bytes()
        committed = (REPO / "cri_api" / name).read_bytes()
        assert fresh == committed, f"cri_api/{name} is stale; run hack/gen-proto"


def test_package_and_syntax() -> None:
    assert pb.DESCRIPTOR.package == "runtime.v1"
    assert pb.DESCRIPTOR.name == "cri_api/api.proto"
    assert set(pb.DESCRIPTOR.services_by_name) == {"RuntimeService", "ImageService"}


# (b) exact RPC sets.
def test_runtime_service_rpcs() -> None:
    svc = pb.DESCRIPTOR.services_by_name["RuntimeService"]
    assert {m.name for m in svc.methods} == RUNTIME_RPCS


def test_image_service_rpcs() -> None:
    svc = pb.DESCRIPTOR.services_by_name["ImageService"]
    assert {m.name for m in svc.methods} == IMAGE_RPCS


def test_streaming_shapes() -> None:
    for svc_name, streaming in SERVER_STREAMING.items():
        svc = pb.DESCRIPTOR.services_by_name[svc_name]
        for m in svc.methods:
            assert not m.client_streaming, m.full_name
            assert m.server_streaming == (m.name in streaming), m.full_name


def test_rpc_io_types() -> None:
    rt = pb.DESCRIPTOR.services_by_name["RuntimeService"].methods_by_name
    assert rt["GetContainerEvents"].input_type.name == "GetEventsRequest"
    assert rt["GetContainerEvents"].output_type.name == "ContainerEventResponse"
    assert rt["RuntimeConfig"].output_type.name == "RuntimeConfigResponse"
    # Every other RPC uses <Name>Request / <Name>Response.
    for svc in pb.DESCRIPTOR.services_by_name.values():
        for m in svc.methods:
            if m.name == "GetContainerEvents":
                continue
            assert m.input_type.name == f"{m.name}Request", m.full_name
            assert m.output_type.name == f"{m.name}Response", m.full_name


def test_grpc_stub_paths() -> None:
    assert hasattr(api_pb2_grpc, "RuntimeServiceServicer")
    assert hasattr(api_pb2_grpc, "ImageServiceServicer")
    assert hasattr(api_pb2_grpc, "add_RuntimeServiceServicer_to_server")
    assert hasattr(api_pb2_grpc, "add_ImageServiceServicer_to_server")
    src = (REPO / "cri_api" / "api_pb2_grpc.py").read_text()
    assert "from cri_api import api_pb2" in src
    assert "'/runtime.v1.RuntimeService/ExecSync'" in src
    assert "'/runtime.v1.ImageService/PullImage'" in src


# (c) field numbers, shapes, types and enum values from upstream.
@pytest.mark.parametrize(("msg", "name"), sorted(FIELD_NUMBERS))
def test_field_numbers(msg: str, name: str) -> None:
    assert _field(msg, name).number == FIELD_NUMBERS[(msg, name)]


@pytest.mark.parametrize(("msg", "name"), sorted(FIELD_SHAPES))
def test_field_shapes(msg: str, name: str) -> None:
    f = _field(msg, name)
    is_repeated = f.is_repeated
    is_map = is_repeated and f.message_type is not None and f.message_type.GetOptions().map_entry
    want = FIELD_SHAPES[(msg, name)]
    got = MAP if is_map else REPEATED if is_repeated else SINGULAR
    assert got == want


@pytest.mark.parametrize(("msg", "name"), sorted(FIELD_TYPES))
def test_field_types(msg: str, name: str) -> None:
    assert _field(msg, name).type == FIELD_TYPES[(msg, name)]


@pytest.mark.parametrize("enum", sorted(ENUM_VALUES))
def test_enum_values(enum: str) -> None:
    desc = pb.DESCRIPTOR.enum_types_by_name[enum]
    assert {v.name: v.number for v in desc.values} == ENUM_VALUES[enum]


def test_counts() -> None:
    assert len(pb.DESCRIPTOR.message_types_by_name) == 170
    assert len(pb.DESCRIPTOR.enum_types_by_name) == 10


# (d) serialize / parse round trip.
def test_round_trip() -> None:
    cfg = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name="app", attempt=2),
        image=pb.ImageSpec(image="docker.io/library/busybox:latest"),
        command=["/bin/sh"],
        args=["-c", "sleep 3600"],
        envs=[pb.KeyValue(key="A", value="1")],
        labels={"io.kubernetes.container.name": "app"},
        linux=pb.LinuxContainerConfig(
            resources=pb.LinuxContainerResources(cpu_shares=512, unified={"memory.high": "max"}),
            security_context=pb.LinuxContainerSecurityContext(
                run_as_user=pb.Int64Value(value=0),
                supplemental_groups=[1, 2],
                namespace_options=pb.NamespaceOption(pid=pb.CONTAINER),
            ),
        ),
        stop_signal=pb.SIGTERM,
    )
    req = pb.CreateContainerRequest(
        pod_sandbox_id="sb1",
        config=cfg,
        sandbox_config=pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name="p", uid="u", namespace="default"),
            port_mappings=[pb.PortMapping(protocol=pb.UDP, container_port=53, host_port=5353)],
        ),
    )
    data = req.SerializeToString()
    back = pb.CreateContainerRequest.FromString(data)
    assert back == req
    assert back.config.linux.security_context.run_as_user.value == 0
    assert back.config.linux.security_context.HasField("run_as_user")
    assert back.config.linux.resources.unified["memory.high"] == "max"
    assert back.sandbox_config.port_mappings[0].protocol == pb.UDP


def test_wire_bytes() -> None:
    # Hand-encoded: field 1 (container_id) len-delimited "c", field 2 (cmd) "ls",
    # field 3 (timeout) varint 5.
    req = pb.ExecSyncRequest(container_id="c", cmd=["ls"], timeout=5)
    assert req.SerializeToString() == b"\x0a\x01c\x12\x02ls\x18\x05"
    # PortMapping: protocol=SCTP(2) tag 0x08, container_port=80 tag 0x10.
    pm = pb.PortMapping(protocol=pb.SCTP, container_port=80)
    assert pm.SerializeToString() == b"\x08\x02\x10\x50"
