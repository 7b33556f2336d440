"""The foundation: flatpod serve answers Version, Status and RuntimeConfig over its socket."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message

from cri_api import api_pb2 as pb
from cri_api import api_pb2_grpc as rpc
from sandbox import cgroups
from sandbox.errors import NotFound
from sandbox.server import Handler, Inline, InlineHandler, build_server
from shim import ksm
from tests.cri import CriClient, status_code
from tests.daemon import REPO, Daemon, running_daemon


def test_version(cri: CriClient) -> None:
    response = cri.Version(pb.VersionRequest(version="0.1.0"))
    assert response.runtime_name == "flatpod"
    assert response.runtime_api_version == "v1"
    assert response.version == "0.1.0"
    assert response.runtime_version


def test_status_conditions_and_verbose_config(cri: CriClient, daemon: Daemon) -> None:
    response = cri.Status(pb.StatusRequest(verbose=True))
    conditions = {c.type: c for c in response.status.conditions}
    assert set(conditions) == {"RuntimeReady", "NetworkReady"}
    assert conditions["RuntimeReady"].status is True
    for condition in conditions.values():
        if not condition.status:
            assert condition.reason and condition.message
    config = json.loads(response.info["config"])
    assert config["root_dir"] == str(daemon.root)
    assert response.features.supplemental_groups_policy is True


def test_runtime_config_answers_the_driver_in_use(cri: CriClient) -> None:
    response = cri.RuntimeConfig(pb.RuntimeConfigRequest())
    # The driver in use: systemd where it is PID 1 (the default), else cgroupfs.
    systemd = cgroups.detect_driver() is cgroups.Driver.SYSTEMD
    assert response.linux.cgroup_driver == (pb.SYSTEMD if systemd else pb.CGROUPFS)


def test_update_runtime_config_stores_pod_cidr(cri: CriClient, daemon: Daemon) -> None:
    cri.UpdateRuntimeConfig(
        pb.UpdateRuntimeConfigRequest(
            runtime_config=pb.RuntimeConfig(network_config=pb.NetworkConfig(pod_cidr="10.1.0.0/24"))
        )
    )
    daemon.stop()
    daemon.start()
    client = daemon.client()
    info = client.Status(pb.StatusRequest(verbose=True)).info
    client.close()
    assert json.loads(info["pod_cidr"]) == "10.1.0.0/24"


def test_unknown_rpc_answers_unimplemented(daemon: Daemon, cri: CriClient) -> None:
    # Every runtime.v1 RPC is implemented; a method the daemon does not know stands in.
    with grpc.insecure_channel(f"unix://{daemon.socket}") as channel:
        call = channel.unary_unary("/runtime.v1.RuntimeService/NoSuchMethod")
        with pytest.raises(grpc.RpcError) as err:
            call(b"", timeout=10)
    assert status_code(err.value) == grpc.StatusCode.UNIMPLEMENTED
    # and the daemon keeps serving
    assert cri.Version(pb.VersionRequest()).runtime_name == "flatpod"


def test_socket_and_dir_are_root_only(daemon: Daemon) -> None:
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o600
    assert stat.S_IMODE(daemon.socket.parent.stat().st_mode) == 0o700
    assert stat.S_ISSOCK(daemon.socket.stat().st_mode)


def test_sigterm_stops_gracefully_and_restart_serves(daemon: Daemon) -> None:
    assert daemon.stop(signal.SIGTERM) == 0
    assert not daemon.socket.exists()
    daemon.start()
    with_client = daemon.client()
    assert with_client.Version(pb.VersionRequest()).runtime_name == "flatpod"
    with_client.close()


def test_stale_socket_after_kill_is_replaced(daemon: Daemon) -> None:
    daemon.kill()
    assert daemon.socket.exists()
    daemon.start()
    client = daemon.client()
    assert client.Version(pb.VersionRequest()).runtime_api_version == "v1"
    client.close()


def _flatpod(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "sandbox", *args],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=60,
    )


def test_cli_version_and_help() -> None:
    assert _flatpod("--version").stdout.startswith("flatpod ")
    for args in (["--help"], ["serve", "--help"], ["config", "--help"]):
        result = _flatpod(*args)
        assert result.returncode == 0
        assert "usage: flatpod" in result.stdout


@pytest.mark.parametrize(("command", "text", "key"), [
    # An unknown key is a clear startup error.
    ("serve", 'root_dir = "/tmp/x"\n[network]\nbrige = "br0"\n', "network.brige"),
    # A bad value names its key.
    ("config", '[network]\nmtu = "big"\n', "network.mtu"),
])
def test_a_bad_config_file_names_the_key(
    tmp_path: Path, command: str, text: str, key: str
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(text)
    result = _flatpod(command, "--config", str(config))
    assert result.returncode == 2
    assert f"'{key}'" in result.stderr


def test_missing_default_config_means_defaults(tmp_path: Path) -> None:
    with running_daemon(tmp_path) as d:
        client = d.client()
        info = json.loads(client.Status(pb.StatusRequest(verbose=True)).info["config"])
        client.close()
    assert info["runtime_path"] == "/usr/sbin/runc"
    assert info["images"]["pull_progress_timeout_seconds"] == 300
    assert info["network"]["mtu"] == 1500


def zygote_heap_flags(d: Daemon) -> str:
    """The VmFlags line of the daemon's zygote's heap ("mg": marked MADV_MERGEABLE)."""
    zygote = int((d.state / "zygote.pid").read_text())
    heap = Path(f"/proc/{zygote}/smaps").read_text().split("[heap]\n", 1)[1]
    return next(line for line in heap.splitlines() if line.startswith("VmFlags:"))


@pytest.fixture
def ksmd_stopped() -> Iterator[None]:
    """ksmd stopped for the test, and put back as it was afterwards."""
    before = ksm.ksmd_state()
    if before is None:
        pytest.skip("no KSM in this kernel")
    ksm.set_ksmd_state("0")
    try:
        yield
    finally:
        ksm.set_ksmd_state(before)


@pytest.mark.usefixtures("ksmd_stopped")
def test_default_page_merging_marks_the_zygote_and_leaves_ksmd_stopped(tmp_path: Path) -> None:
    """The default, "advise": the zygote's memory (which every shim inherits) is marked
    mergeable, but ksmd, a host-wide setting, stays as the operator left it."""
    # tests/daemon.py writes "advise" unless the extra config names the key; a comment
    # naming it leaves the key unset, so the daemon runs on its built-in default.
    with running_daemon(tmp_path, "# shim_page_merging: the default") as d:
        assert " mg" in zygote_heap_flags(d)
        assert "started the kernel's same-page merging" not in d.log()
        assert ksm.ksmd_state() == "0"


@pytest.mark.usefixtures("ksmd_stopped")
def test_shim_page_merging_on_starts_ksmd_and_marks_the_zygote(tmp_path: Path) -> None:
    """"on", the operator's opt-in: ksmd is started when stopped, and the zygote's memory
    (which every shim inherits) is offered to it."""
    with running_daemon(tmp_path, 'shim_page_merging = "on"') as d:
        assert ksm.ksmd_state() == "1"
        assert " mg" in zygote_heap_flags(d)
        assert "started the kernel's same-page merging" in d.log()


def _unary_handler(func: InlineHandler, inline: bool) -> Handler:
    """`func` as an Inline handler, or as an async one that awaits nothing."""
    if inline:
        return Inline(func)

    async def handler(rt: object, req: object) -> Message | bytes:
        return func(rt, req)

    return handler


@pytest.mark.parametrize("inline", [False, True], ids=["async", "inline"])
@pytest.mark.parametrize("kind", ["flatpod", "grpcio"])
def test_handler_failures_map_to_statuses_and_are_observed(
    tmp_path: Path, kind: str, inline: bool
) -> None:
    """In process, no daemon: what build_server answers, with either server, when a unary
    (async or Inline) or streaming handler raises or a request does not parse, and what the
    observer (the metrics endpoint's hook) is told for each call."""

    def not_found(rt: object, req: object) -> pb.VersionResponse:
        raise NotFound("no such thing")

    def broken(rt: object, req: object) -> pb.VersionResponse:
        raise RuntimeError("boom")

    def answer_bytes(rt: object, req: object) -> bytes:
        return pb.ListContainersResponse(containers=[pb.Container(id="c1")]).SerializeToString()

    async def broken_stream(rt: object, req: object) -> AsyncIterator[pb.ContainerEventResponse]:
        yield pb.ContainerEventResponse(container_id="first")
        raise RuntimeError("stream boom")

    handlers: dict[str, Handler] = {
        "RuntimeService/Version": _unary_handler(not_found, inline),
        "RuntimeService/Status": _unary_handler(broken, inline),
        "RuntimeService/ListContainers": _unary_handler(answer_bytes, inline),
        "RuntimeService/GetContainerEvents": broken_stream,
    }
    observed: list[tuple[str, grpc.StatusCode]] = []
    socket = tmp_path / "s.sock"

    async def scenario() -> None:
        server = build_server(None, handlers, lambda name, _s, code: observed.append((name, code)),
                              kind)
        await server.start(socket)
        try:
            async with grpc.aio.insecure_channel(f"unix://{socket}") as channel:
                stub = rpc.RuntimeServiceStub(channel)  # type: ignore[no-untyped-call]
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Version(pb.VersionRequest())
                assert err.value.code() == grpc.StatusCode.NOT_FOUND
                assert err.value.details() == "no such thing"
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Status(pb.StatusRequest())
                assert err.value.code() == grpc.StatusCode.INTERNAL
                assert "internal error: boom" in (err.value.details() or "")
                listed = await stub.ListContainers(pb.ListContainersRequest())
                assert [c.id for c in listed.containers] == ["c1"]
                call = stub.GetContainerEvents(pb.GetEventsRequest())
                assert (await call.read()).container_id == "first"
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call.read()
                assert err.value.code() == grpc.StatusCode.INTERNAL
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.CheckpointContainer(pb.CheckpointContainerRequest())
                assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
                not_a_message = channel.unary_unary("/runtime.v1.RuntimeService/Version")
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await not_a_message(b"\xff\xff\xff")
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "not a valid message" in (err.value.details() or "")
        finally:
            await server.stop(0)

    asyncio.run(scenario())
    service = "/runtime.v1.RuntimeService"
    assert observed == [
        (f"{service}/Version", grpc.StatusCode.NOT_FOUND),
        (f"{service}/Status", grpc.StatusCode.INTERNAL),
        (f"{service}/ListContainers", grpc.StatusCode.OK),
        (f"{service}/GetContainerEvents", grpc.StatusCode.INTERNAL),
        (f"{service}/CheckpointContainer", grpc.StatusCode.UNIMPLEMENTED),
        (f"{service}/Version", grpc.StatusCode.INVALID_ARGUMENT),
    ]


def test_entry_point_chooses_grpc_settings_before_grpc_loads() -> None:
    """gRPC reads GRPC_EXPERIMENTS and GRPC_POLL_STRATEGY once, at import: the entry point
    must set them first, so its module may not import grpc; an operator's own values are kept."""
    probe = (
        "import os, sys\n"
        "from sandbox import __main__ as m\n"
        "assert 'grpc' not in sys.modules, 'sandbox.__main__ imports grpc at its top'\n"
        "m.choose_grpc_settings()\n"
        "print(os.environ['GRPC_EXPERIMENTS'], os.environ['GRPC_POLL_STRATEGY'])\n"
    )
    settings = ("GRPC_EXPERIMENTS", "GRPC_POLL_STRATEGY")
    env = {k: v for k, v in os.environ.items() if k not in settings}
    env["PYTHONPATH"] = str(REPO)
    run = [sys.executable, "-c", probe]
    chosen = subprocess.run(run, env=env, capture_output=True, text=True, check=True)
    assert chosen.stdout.split() == ["-event_engine_listener", "poll"]
    env.update(GRPC_EXPERIMENTS="operator_choice", GRPC_POLL_STRATEGY="epoll1")
    kept = subprocess.run(run, env=env, capture_output=True, text=True, check=True)
    assert kept.stdout.split() == ["operator_choice", "epoll1"]


@pytest.mark.parametrize("kind", ["flatpod", "grpcio"])
def test_deadlines_and_cancellations_reach_the_handler(tmp_path: Path, kind: str) -> None:
    """A call past its deadline answers DEADLINE_EXCEEDED and its handler is cancelled; one
    the client cancels is cancelled too; the handler saw the call's deadline (creation.py's
    CALL_DEADLINE) and other calls on the connection go on."""
    from sandbox.creation import CALL_DEADLINE

    seen: list[float | None] = []
    cancelled: list[str] = []

    async def slow(rt: object, req: object) -> pb.VersionResponse:
        seen.append(CALL_DEADLINE.get())
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append("version")
            raise
        return pb.VersionResponse()

    async def quick(rt: object, req: object) -> pb.StatusResponse:
        seen.append(CALL_DEADLINE.get())
        return pb.StatusResponse()

    socket = tmp_path / "s.sock"

    async def scenario() -> None:
        server = build_server(None, {"RuntimeService/Version": slow,
                                     "RuntimeService/Status": quick}, kind=kind)
        await server.start(socket)
        try:
            async with grpc.aio.insecure_channel(f"unix://{socket}") as channel:
                stub = rpc.RuntimeServiceStub(channel)  # type: ignore[no-untyped-call]
                before = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Version(pb.VersionRequest(), timeout=0.3)
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert seen[0] is not None and before < seen[0] < before + 0.6
                call = stub.Version(pb.VersionRequest())
                await asyncio.sleep(0.3)
                call.cancel()
                await stub.Status(pb.StatusRequest())
                assert seen[-1] is None
                for _ in range(100):
                    if len(cancelled) == 2:
                        break
                    await asyncio.sleep(0.05)
        finally:
            await server.stop(0)

    asyncio.run(scenario())
    assert cancelled == ["version", "version"]


@pytest.mark.parametrize("kind", ["flatpod", "grpcio"])
def test_inline_lookups_answer_without_a_task(tmp_path: Path, kind: str) -> None:
    """An Inline handler's call is made in the callback that read its request on flatpod's
    server (no task: asyncio.current_task() is None in it), within grpcio's own task on
    grpcio's; on both it sees its deadline, and it answers while a long call waits on the same
    connection. (Its statuses: test_handler_failures_map_to_statuses_and_are_observed.)"""
    from sandbox.creation import CALL_DEADLINE

    seen: list[tuple[bool, float | None]] = []
    slow_started = asyncio.Event()

    def version(rt: object, req: object) -> pb.VersionResponse:
        seen.append((asyncio.current_task() is not None, CALL_DEADLINE.get()))
        return pb.VersionResponse(runtime_name="inline")

    async def slow(rt: object, req: object) -> pb.StatusResponse:
        slow_started.set()
        await asyncio.sleep(30)
        return pb.StatusResponse()

    socket = tmp_path / "s.sock"

    async def scenario() -> None:
        server = build_server(None, {"RuntimeService/Version": Inline(version),
                                     "RuntimeService/Status": slow}, kind=kind)
        await server.start(socket)
        try:
            async with grpc.aio.insecure_channel(f"unix://{socket}") as channel:
                stub = rpc.RuntimeServiceStub(channel)  # type: ignore[no-untyped-call]
                waiting = asyncio.ensure_future(stub.Status(pb.StatusRequest()))
                await asyncio.wait_for(slow_started.wait(), 10)
                before = time.monotonic()
                answer = await stub.Version(pb.VersionRequest(), timeout=10)
                assert answer.runtime_name == "inline"
                assert not waiting.done()
                waiting.cancel()
        finally:
            await server.stop(0)
        in_task, deadline = seen[0]
        assert in_task is (kind == "grpcio")
        # grpc-timeout is sent rounded up
        assert deadline is not None and before + 5 < deadline < before + 12

    asyncio.run(scenario())


def test_a_streaming_rpc_cannot_be_inline() -> None:
    def events(rt: object, req: object) -> bytes:
        return b""

    with pytest.raises(ValueError, match="GetContainerEvents streams"):
        build_server(None, {"RuntimeService/GetContainerEvents": Inline(events)})


def test_an_inline_call_that_would_wait_answers_internal() -> None:
    """Only a synchronous handler's call is made inline; were one to suspend, it is closed and
    answers INTERNAL rather than being left half run."""
    from sandbox.http2.grpc_calls import RpcError, Status
    from sandbox.server import _at_once

    closed: list[bool] = []

    async def waits(message: bytes, deadline: float | None) -> bytes:
        try:
            await asyncio.sleep(0)
        finally:
            closed.append(True)
        return message

    with pytest.raises(RpcError) as err:
        _at_once("/runtime.v1.RuntimeService/Version", waits)(b"", None)
    assert err.value.status is Status.INTERNAL
    assert closed == [True]
