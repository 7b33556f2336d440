"""critest's Streaming specs, through the daemon: the URLs come from the Exec, Attach and
PortForward RPCs and lead to real containers, over SPDY (our client) and WebSocket (the
kubernetes client's WSClient, websocket-client for the port-forward tunnel).

Mirrors streaming.go / streaming_linux.go: exec with tty=false/stdin=false and with
tty=true/stdin=true, attach, portforward, portforward in host network; and the edges behind
them: exit status, stdin EOF, single-use tokens, an exec whose client vanishes."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from kubernetes.stream.ws_client import WSClient

from cri_api import api_pb2 as pb
from tests.cri import CriClient
from tests.pods import (
    attach_url,
    container_config,
    container_status,
    exec_sync,
    exec_url,
    pod_config,
    run_pod,
    start_container,
    wait_for,
)
from tests.support.plugin import TestImages
from tests.test_streaming_portforward import TunnelledSpdyClient, forward_once
from tests.test_streaming_support import (
    BASE64_PROTOCOLS,
    ChannelClient,
    RemoteCommand,
    SpdyClient,
    UpgradeRefused,
    echo_hello_then_eof,
    run,
    run_command,
    ws_client,
)

SPDY_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io", "v3.channel.k8s.io",
                  "v2.channel.k8s.io", "channel.k8s.io")  # client-go's offer, in its order
HTTP_GET = b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n"


@dataclass(frozen=True)
class StreamingPod:
    pod_id: str
    config: pb.PodSandboxConfig
    worker: str  # busybox running `top`, critest's default container
    web: str  # httpd on the pod's port 80


def remove_pod(fp: CriClient, pod_id: str) -> None:
    fp.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    fp.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))


@pytest.fixture(scope="module")
def streaming_pod(fp: CriClient, pulled: TestImages,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[StreamingPod]:
    config = pod_config(log_dir=tmp_path_factory.mktemp("logs"),
                        port_mappings=[pb.PortMapping(container_port=80)])
    pod_id = run_pod(fp, config)
    try:
        worker = start_container(fp, pod_id, config, container_config(
            pulled.busybox.reference, command=["top"]))
        web = start_container(fp, pod_id, config, container_config(pulled.web.reference))
        yield StreamingPod(pod_id, config, worker, web)
    finally:
        remove_pod(fp, pod_id)


def forward_url(fp: CriClient, pod_id: str, port: int) -> str:
    url: str = fp.PortForward(pb.PortForwardRequest(pod_sandbox_id=pod_id, port=[port])).url
    return url


def v5_client(url: str) -> WSClient:
    """kubelet's clients' current WebSocket protocol."""
    return ws_client(url, "v5.channel.k8s.io")


def exit_code(status: dict[str, Any]) -> int:
    """The exit code in a remotecommand v4 error-stream Status."""
    if status["status"] == "Success":
        return 0
    causes = status["details"]["causes"]
    return int(next(c["message"] for c in causes if c["reason"] == "ExitCode"))


def free_host_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def http_through_spdy(url: str, port: int) -> bytes:
    async def scenario() -> bytes:
        client = await SpdyClient.connect(url, ["portforward.k8s.io"])
        try:
            received, error_text = await forward_once(client, port, 0, HTTP_GET)
            assert error_text == b""
            return received
        finally:
            await client.close()
    return run(scenario())


def http_through_websocket(url: str, port: int) -> bytes:
    client = TunnelledSpdyClient(url)
    try:
        headers = {"port": str(port), "requestID": "0"}
        error = client.open({"streamType": "error", **headers}, fin=True)
        data = client.open({"streamType": "data", **headers})
        client.send(data, HTTP_GET, fin=True)
        got = client.collect({error, data})
    finally:
        client.ws.close()
    assert got[error] == b""
    return got[data]


def is_http_ok(response: bytes) -> bool:
    status_line = response.split(b"\r\n", 1)[0]
    return status_line.startswith(b"HTTP/1.") and b" 200 " in status_line + b" "


# --- exec ------------------------------------------------------------------------------------


def test_exec_without_tty_or_stdin_over_spdy(fp: CriClient, streaming_pod: StreamingPod) -> None:
    url = exec_url(fp, streaming_pod.worker, ["echo", "-n", "hello"])
    result = run(run_command(url, protocols=SPDY_PROTOCOLS))
    assert (result.stdout, result.stderr) == (b"hello", b"")
    assert result.status["status"] == "Success"


def test_exec_with_tty_and_open_stdin_over_spdy(fp: CriClient,
                                                streaming_pod: StreamingPod) -> None:
    url = exec_url(fp, streaming_pod.worker, ["echo", "-n", "hello"], tty=True, stdin=True)

    async def scenario() -> bytes:
        command = await RemoteCommand.open(url, stdin=True, tty=True, protocols=SPDY_PROTOCOLS)
        try:
            # stdin stays open: the stream must end because the process did.
            result = await command.result(timeout=20)
            assert result.status["status"] == "Success"
            return result.stdout
        finally:
            await command.client.close()
    assert b"hello" in run(scenario())


def test_exec_stdin_and_exit_status_over_spdy(fp: CriClient,
                                              streaming_pod: StreamingPod) -> None:
    echoed = run(run_command(exec_url(fp, streaming_pod.worker, ["cat"], stdin=True),
                             stdin_data=b"line one\nline two\n", protocols=SPDY_PROTOCOLS))
    assert echoed.stdout == b"line one\nline two\n"
    assert exit_code(echoed.status) == 0
    failed = run(run_command(exec_url(fp, streaming_pod.worker, ["sh", "-c", "exit 3"]),
                             protocols=SPDY_PROTOCOLS))
    assert exit_code(failed.status) == 3
    assert failed.status["reason"] == "NonZeroExitCode"


@pytest.mark.parametrize("protocol", ["v5.channel.k8s.io", "v4.channel.k8s.io"])
def test_exec_over_websocket(fp: CriClient, streaming_pod: StreamingPod, protocol: str) -> None:
    client = ws_client(exec_url(fp, streaming_pod.worker, ["echo", "-n", "hello"]), protocol)
    try:
        assert client.subprotocol == protocol
        client.run_forever(timeout=20)
        assert (client.read_stdout(), client.read_stderr()) == (b"hello", b"")
        assert client.returncode == 0
    finally:
        client.close()
    client = ws_client(exec_url(fp, streaming_pod.worker, ["sh", "-c", "exit 5"]), protocol)
    try:
        client.run_forever(timeout=20)
        assert client.returncode == 5
    finally:
        client.close()


@pytest.mark.parametrize("protocol", ["channel.k8s.io", "base64.channel.k8s.io",
                                      "v4.channel.k8s.io", "v4.base64.channel.k8s.io"])
def test_exec_and_attach_over_legacy_websocket_protocols(
        fp: CriClient, pulled: TestImages, streaming_pod: StreamingPod, protocol: str) -> None:
    """Kubernetes' "remote command execution over websockets" spec asks for channel.k8s.io:
    only stdout may carry data, and a success sends nothing else (v1) or a Status (v4)."""
    client = ChannelClient.connect(
        exec_url(fp, streaming_pod.worker, ["cat", "/etc/hostname"]), protocol)
    got = client.run_to_close()
    assert got.get(1, b"").strip() and set(got) <= {1, 3}
    if protocol.startswith("v4."):
        assert json.loads(got[3])["status"] == "Success"
    assert client.opcodes == ({1} if protocol in BASE64_PROTOCOLS else {2})
    shell = interactive_shell(fp, pulled, streaming_pod)
    client = ChannelClient.connect(attach_url(fp, shell), protocol)
    client.send(0, b"echo -n attached; exit 0\n")
    assert client.run_to_close().get(1) == b"attached"


def test_exec_tty_and_stdin_over_websocket(fp: CriClient, streaming_pod: StreamingPod) -> None:
    client = v5_client(exec_url(fp, streaming_pod.worker, ["echo", "-n", "hello"],
                                tty=True, stdin=True))
    try:
        client.run_forever(timeout=20)
        assert b"hello" in client.read_stdout()
        assert client.returncode == 0
    finally:
        client.close()
    client = v5_client(exec_url(fp, streaming_pod.worker, ["cat"], stdin=True))
    try:
        client.write_stdin(b"echoed back\n")
        client.close_channel(0)  # v5 CLOSE: cat sees EOF
        client.run_forever(timeout=20)
        assert client.read_stdout() == b"echoed back\n"
        assert client.returncode == 0
    finally:
        client.close()


def test_exec_whose_client_vanishes_leaves_no_process(fp: CriClient,
                                                      streaming_pod: StreamingPod) -> None:
    url = exec_url(fp, streaming_pod.worker, ["sleep", "4242"], stdin=True)

    def sleeping() -> bool:
        listing = exec_sync(fp, streaming_pod.worker, "ps", "-o", "args").stdout
        return b"sleep 4242" in listing

    async def scenario() -> None:
        command = await RemoteCommand.open(url, stdin=True, protocols=SPDY_PROTOCOLS)
        await asyncio.to_thread(wait_for, sleeping, 10, "the exec to start")
        await command.client.abort()
    run(scenario())
    wait_for(lambda: not sleeping(), timeout=10, what="the abandoned exec to be killed")


def test_tokens_are_single_use_and_unknown_ones_are_404(fp: CriClient,
                                                        streaming_pod: StreamingPod) -> None:
    url = exec_url(fp, streaming_pod.worker, ["true"])
    run(run_command(url, protocols=SPDY_PROTOCOLS))

    for target in (url, url.rsplit("/", 1)[0] + "/no-such-token"):
        with pytest.raises(UpgradeRefused) as refused:
            run(SpdyClient.connect(target, ["v4.channel.k8s.io"]))
        assert refused.value.status == 404, target


# --- attach ----------------------------------------------------------------------------------


def interactive_shell(fp: CriClient, pulled: TestImages, pod: StreamingPod) -> str:
    """critest's attach container: /bin/sh with Stdin and StdinOnce, no tty."""
    return start_container(fp, pod.pod_id, pod.config, container_config(
        pulled.busybox.reference, command=["/bin/sh"], stdin=True, stdin_once=True))


def test_attach_over_spdy(fp: CriClient, pulled: TestImages,
                          streaming_pod: StreamingPod) -> None:
    shell = interactive_shell(fp, pulled, streaming_pod)
    url = attach_url(fp, shell)

    async def scenario() -> tuple[bytes, bytes, bytes]:
        command = await RemoteCommand.open(url, stdin=True, protocols=SPDY_PROTOCOLS)
        try:
            assert command.stdin is not None and command.stdout is not None
            await command.client.send(command.stdin, b"echo -n hello\n")
            await command.client.wait_for_data(command.stdout, b"hello")
            await asyncio.sleep(0.5)
            seen = bytes(command.stdout.data)
            # Closing stdin is EOF for sh (StdinOnce): it exits and the session ends.
            await command.client.send(command.stdin, b"", fin=True)
            result = await command.result(timeout=20)
            return seen, result.stderr, result.error
        finally:
            await command.client.close()
    seen, stderr, error = run(scenario())
    assert (seen, stderr) == (b"hello", b"")
    assert error == b"" or json.loads(error)["status"] == "Success"
    assert wait_for(lambda: container_status(fp, shell).state == pb.CONTAINER_EXITED,
                    what="sh to exit on stdin EOF")


def test_attach_over_websocket(fp: CriClient, pulled: TestImages,
                               streaming_pod: StreamingPod) -> None:
    shell = interactive_shell(fp, pulled, streaming_pod)
    client = v5_client(attach_url(fp, shell))
    try:
        echo_hello_then_eof(client)
        assert client.read_stderr() == b""
    finally:
        client.close()
    assert wait_for(lambda: container_status(fp, shell).state == pb.CONTAINER_EXITED,
                    what="sh to exit on stdin EOF")


# --- port-forward ----------------------------------------------------------------------------


def test_port_forward_to_pod_port_80(fp: CriClient, streaming_pod: StreamingPod) -> None:
    def served() -> bool:
        return exec_sync(fp, streaming_pod.worker, "wget", "-qO-",
                         "http://127.0.0.1:80/").exit_code == 0
    wait_for(served, what="httpd in the pod")
    over_spdy = http_through_spdy(forward_url(fp, streaming_pod.pod_id, 80), 80)
    assert is_http_ok(over_spdy) and over_spdy.endswith(b"flatpod web\n")
    over_websocket = http_through_websocket(forward_url(fp, streaming_pod.pod_id, 80), 80)
    assert is_http_ok(over_websocket) and over_websocket.endswith(b"flatpod web\n")


def test_port_forward_in_host_network(fp: CriClient, pulled: TestImages,
                                      tmp_path_factory: pytest.TempPathFactory) -> None:
    port = free_host_port()
    config = pod_config(log_dir=tmp_path_factory.mktemp("hostnet"),
                        linux=pb.LinuxPodSandboxConfig(
                            security_context=pb.LinuxSandboxSecurityContext(
                                namespace_options=pb.NamespaceOption(network=pb.NODE))))
    pod_id = run_pod(fp, config)
    try:
        start_container(fp, pod_id, config, container_config(
            pulled.web.reference,
            command=["httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", "/www"]))

        def listening() -> bool:
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0
        wait_for(listening, what=f"httpd on the host's 127.0.0.1:{port}")
        over_spdy = http_through_spdy(forward_url(fp, pod_id, port), port)
        assert is_http_ok(over_spdy) and over_spdy.endswith(b"flatpod web\n")
        over_websocket = http_through_websocket(forward_url(fp, pod_id, port), port)
        assert is_http_ok(over_websocket)
    finally:
        remove_pod(fp, pod_id)
