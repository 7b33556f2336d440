"""ExecSync against a container that exited before flatpod applied its exit (a kubelet probe
racing the exit): a clean FAILED_PRECONDITION, not an internal error with a traceback. The node
e2e suite hit this once in a full NodeConformance run. Real shim, real runc container."""

from __future__ import annotations

import grpc
import pytest

from sandbox.containers import exec_sync_in
from sandbox.errors import FailedPrecondition
from shim.client import ShimError
from tests.test_shim import run, shim_pod, wait_exit

PROCESS = {"args": ["true"], "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}}


def test_exec_into_a_container_that_just_exited_is_failed_precondition() -> None:
    with shim_pod(None) as pod:
        async def scenario() -> None:
            cid, _bundle = await pod.run_container(["sh", "-c", "exit 0"])
            assert (await wait_exit(pod.client, cid)).exited
            # The shim itself refuses: this is the reply the race produces.
            with pytest.raises(ShimError):
                await pod.client.exec_sync(cid, PROCESS, timeout=10)
            with pytest.raises(FailedPrecondition) as refused:
                await exec_sync_in(pod.client, cid, PROCESS, timeout=10)
            assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert cid in str(refused.value) and "exited" in str(refused.value)
        run(scenario())


def test_exec_into_a_running_container_still_runs() -> None:
    with shim_pod(None) as pod:
        async def scenario() -> None:
            cid, _bundle = await pod.run_container(["sleep", "1000"])
            result = await exec_sync_in(pod.client, cid, PROCESS, timeout=10)
            assert result.exit_code == 0 and not result.timed_out
        run(scenario())
