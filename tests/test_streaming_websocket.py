"""Exec and attach over WebSocket with the kubernetes Python client's WSClient (v4/v5) and
websocket-client itself (every channel protocol, binary and base64), and TLS."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from sandbox.streaming.server import AttachParams
from tests.test_streaming_support import (
    BASE64_PROTOCOLS,
    ChannelClient,
    ServerHarness,
    echo_hello_then_eof,
    exec_url,
    run,
    run_command,
    ws_client,
)


@pytest.mark.parametrize("protocol", ["v5.channel.k8s.io", "v4.channel.k8s.io"])
def test_exec_exit_status(harness: ServerHarness, protocol: str) -> None:
    client = ws_client(exec_url(harness, ["sh", "-c", "echo -n out; echo -n err >&2; exit 4"]),
                       protocol)
    try:
        assert client.subprotocol == protocol
        client.run_forever(timeout=20)
        assert client.read_stdout() == b"out"
        assert client.read_stderr() == b"err"
        assert client.returncode == 4
    finally:
        client.close()


def test_default_offer_picks_v5_and_stdin_close_signal(harness: ServerHarness) -> None:
    payload = os.urandom(200_000)
    client = ws_client(exec_url(harness, ["cat"], stdin=True))
    try:
        assert client.subprotocol == "v5.channel.k8s.io"
        client.write_stdin(payload)
        client.close_channel(0)  # [255, 0]: the process sees EOF
        client.run_forever(timeout=20)
        assert client.read_stdout() == payload
        assert client.returncode == 0
    finally:
        client.close()


def test_attach_over_websocket(harness: ServerHarness) -> None:
    harness.backend.attach_commands["ctr"] = ["sh"]
    url: str = harness.on_loop(harness.server.get_attach_url,
                               AttachParams("ctr", stdin=True, stdout=True, stderr=True))
    client = ws_client(url)
    try:
        echo_hello_then_eof(client)
        assert client.returncode == 0
    finally:
        client.close()


# Every subprotocol kubelet accepts (None: the client offers none, which is channel.k8s.io).
LEGACY_PROTOCOLS = ["channel.k8s.io", "base64.channel.k8s.io", "v4.channel.k8s.io",
                    "v4.base64.channel.k8s.io", None]


def expected_exit_report(protocol: str | None, code: int, description: str) -> bytes | dict:
    """v4 sends a JSON Status on the error channel; v1 the error's text only."""
    if protocol and protocol.startswith("v4."):
        return {"reason": "NonZeroExitCode", "code": str(code)}
    return (f"command terminated with non-zero exit code: error executing {description}, "
            f"exit code {code}").encode()


def exit_report(protocol: str | None, error: bytes) -> bytes | dict:
    if protocol and protocol.startswith("v4."):
        status = json.loads(error)
        return {"reason": status["reason"], "code": status["details"]["causes"][0]["message"]}
    return error


@pytest.mark.parametrize("protocol", LEGACY_PROTOCOLS)
def test_exec_over_every_channel_protocol(harness: ServerHarness, protocol: str | None) -> None:
    cmd = ["sh", "-c", "head -c 5; echo -n err >&2; exit 3"]
    client = ChannelClient.connect(exec_url(harness, cmd, stdin=True), protocol)
    assert client.ws.subprotocol == protocol
    client.send(0, b"hello")  # head reads five bytes and goes on: no stdin EOF needed
    got = client.run_to_close()
    assert (got.get(1), got.get(2)) == (b"hello", b"err")
    assert exit_report(protocol, got[3]) == expected_exit_report(protocol, 3, f"command {cmd}")
    # Base64 protocols travel in text messages, the others in binary ones.
    assert client.opcodes == ({1} if protocol in BASE64_PROTOCOLS else {2})


@pytest.mark.parametrize("protocol", LEGACY_PROTOCOLS)
def test_attach_over_every_channel_protocol(harness: ServerHarness,
                                            protocol: str | None) -> None:
    harness.backend.attach_commands["ctr"] = ["sh"]
    url: str = harness.on_loop(harness.server.get_attach_url,
                               AttachParams("ctr", stdin=True, stdout=True, stderr=True))
    client = ChannelClient.connect(url, protocol)
    client.send(0, b"echo -n attached; exit 0\n")
    got = client.run_to_close()
    assert got.get(1) == b"attached"
    # Success: v4 sends a Success Status, v1 nothing at all.
    if protocol and protocol.startswith("v4."):
        assert json.loads(got[3])["status"] == "Success"
    else:
        assert 3 not in got


def test_websocket_without_known_subprotocol_is_rejected(harness: ServerHarness) -> None:
    with pytest.raises(Exception, match="400"):
        ws_client(exec_url(harness, ["true"]), "v9.channel.k8s.io")


@pytest.fixture
def tls_harness(tmp_path: Path) -> ServerHarness:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return ServerHarness(tls=(str(cert), str(key)))


def test_tls_spdy_and_websocket(tls_harness: ServerHarness) -> None:
    import ssl
    try:
        assert tls_harness.server.url.startswith("https://")
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        url = exec_url(tls_harness, ["sh", "-c", "echo -n secure"])
        result = run(run_command(url, ssl_context=insecure))
        assert result.stdout == b"secure"
        client = ws_client(exec_url(tls_harness, ["sh", "-c", "echo -n wss"]))
        try:
            client.run_forever(timeout=20)
            assert client.read_stdout() == b"wss"
        finally:
            client.close()
    finally:
        tls_harness.close()
