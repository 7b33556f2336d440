"""Undo and errors in process (no daemon): a failing step is reported from where it
happened with its cause's status code, and an undo that fails keeps the record it was about
to forget. tests/test_faults.py proves the same against the real host."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import grpc
import pytest

from cri_api import api_pb2 as pb
from cri_api import api_pb2_grpc as rpc
from sandbox.errors import InvalidArgument, StepFailed, Steps
from sandbox.faults import FAIL_ENV, Faults, InjectedFailure, UnknownFaultPoint
from sandbox.server import Handler, build_server
from sandbox.undo import undo_on_failure


def test_a_step_failure_names_request_and_step_and_keeps_the_status_code() -> None:
    with pytest.raises(StepFailed) as failed, Steps("start container c1") as where:
        where.at("runc start")
        raise InvalidArgument("bad signal")
    assert str(failed.value) == "start container c1: runc start: bad signal"
    assert failed.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(StepFailed) as failed, Steps("stop pod p1") as where:
        where.at("network")
        raise OSError(errno.EBUSY, "Device or resource busy")
    assert str(failed.value) == "stop pod p1: network: [Errno 16] Device or resource busy"
    assert failed.value.code == grpc.StatusCode.INTERNAL
    assert isinstance(failed.value.cause, OSError)


def test_a_branch_names_its_own_step_inside_the_request() -> None:
    """A StepFailed from a branch that runs at once (the network while the pause starts) is
    reported from that branch's step, not the one the request was at."""
    with pytest.raises(StepFailed) as failed, Steps("run pod p1") as where:
        where.at("pause")
        raise StepFailed("network", InvalidArgument("no such subnet"))
    assert str(failed.value) == "run pod p1: network: no such subnet"
    assert failed.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_the_record_is_forgotten_only_when_every_undo_worked() -> None:
    settled: list[str] = []

    async def create(fail_undo: bool) -> None:
        async with undo_on_failure("run pod p1") as undo:
            undo.settle(forget=lambda: settled.append("forgotten"),
                        keep=lambda left: settled.append(f"kept: {left}"))
            undo.at("netns")
            undo.push("netns", lambda: _fail(fail_undo))
            undo.at("network")
            raise OSError(errno.EIO, "network down")

    with pytest.raises(StepFailed) as failed:
        asyncio.run(create(fail_undo=False))
    assert str(failed.value) == "run pod p1: network: [Errno 5] network down"
    assert settled == ["forgotten"]
    settled.clear()
    with pytest.raises(StepFailed) as failed:
        asyncio.run(create(fail_undo=True))
    assert settled == ["kept: netns: [Errno 16] still busy"]
    assert str(failed.value) == (
        "run pod p1: network: [Errno 5] network down "
        "(not undone, kept for a later removal: netns: [Errno 16] still busy)"
    )


def _fail(really: bool) -> None:
    if really:
        raise OSError(errno.EBUSY, "still busy")


def test_an_undo_waits_for_the_branch_it_takes_back() -> None:
    events: list[str] = []

    async def create() -> None:
        async with undo_on_failure("run pod p1") as undo:
            branch = asyncio.ensure_future(_slow_branch(events))
            undo.push_after("network", branch, lambda: events.append("undone"))
            raise OSError(errno.EIO, "pause failed")

    with pytest.raises(StepFailed):
        asyncio.run(create())
    assert events == ["branch done", "undone"]


async def _slow_branch(events: list[str]) -> None:
    await asyncio.sleep(0.05)
    events.append("branch done")


def test_fail_points_fail_once_and_unknown_names_are_refused() -> None:
    faults = Faults.from_env({FAIL_ENV: "run_pod:after_pins, undo:network"})
    with pytest.raises(InjectedFailure):
        faults.point("undo:network")
    faults.point("undo:network")  # once: a retry passes
    faults.point("run_pod:after_netns")  # not named
    with pytest.raises(UnknownFaultPoint):
        Faults.from_env({FAIL_ENV: "undo:netwrok"})


def test_kubelet_reads_the_step_and_the_code(tmp_path: Path) -> None:
    """Through the gRPC server: the step's error is the status's details, with its code; an
    OSError is no longer a bare "internal error"."""

    async def invalid(rt: object, req: object) -> pb.VersionResponse:
        with Steps("run pod p1") as where:
            where.at("pause bundle")
            raise InvalidArgument("linux.sysctls: bad name")

    async def busy(rt: object, req: object) -> pb.StatusResponse:
        with Steps("remove pod p1") as where:
            where.at("cgroup")
            raise OSError(errno.EBUSY, "Device or resource busy")

    handlers: dict[str, Handler] = {
        "RuntimeService/Version": invalid, "RuntimeService/Status": busy,
    }
    socket = tmp_path / "s.sock"

    async def scenario() -> list[tuple[grpc.StatusCode, str]]:
        server = build_server(None, handlers)
        await server.start(socket)
        answers = []
        try:
            async with grpc.aio.insecure_channel(f"unix://{socket}") as channel:
                stub = rpc.RuntimeServiceStub(channel)  # type: ignore[no-untyped-call]
                for call in (stub.Version(pb.VersionRequest()), stub.Status(pb.StatusRequest())):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await call
                    answers.append((err.value.code(), err.value.details() or ""))
        finally:
            await server.stop(0)
        return answers

    assert asyncio.run(scenario()) == [
        (grpc.StatusCode.INVALID_ARGUMENT, "run pod p1: pause bundle: linux.sysctls: bad name"),
        (grpc.StatusCode.INTERNAL, "remove pod p1: cgroup: [Errno 16] Device or resource busy"),
    ]
