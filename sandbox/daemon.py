"""`flatpod serve`: open the store, recover, serve the CRI on a unix socket, stop gracefully.

Stopping (SIGTERM, SIGINT) closes the socket and the streaming server and leaves every pod
running: the shims own the containers, and the next `flatpod serve` picks them up again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import stat
import time
from collections.abc import Mapping
from pathlib import Path

from sandbox import info
from sandbox.config import Config
from sandbox.records import load_containers, load_pods
from sandbox.runtime import Paths, Runtime
from sandbox.server import Handler, build_server
from sandbox.store import Store

log = logging.getLogger("flatpod.daemon")


def rpc_handlers() -> Mapping[str, Handler]:
    """Every RPC flatpod implements, by "Service/Method"; the rest answer UNIMPLEMENTED."""
    return {
        "RuntimeService/Version": info.version,
        "RuntimeService/Status": info.status,
        "RuntimeService/RuntimeConfig": info.runtime_config,
        "RuntimeService/UpdateRuntimeConfig": info.update_runtime_config,
    }


def open_runtime(config: Config) -> Runtime:
    paths = Paths.from_config(config)
    paths.create_dirs()
    store = Store(paths.db)
    rt = Runtime(config=config, store=store, paths=paths)
    rt.pods = load_pods(store)
    rt.containers = load_containers(store)
    rt.started_at = time.time()
    return rt


def bind_socket_path(path: Path) -> None:
    """Prepares the socket's directory (root only) and removes a stale socket."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    try:
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
        else:
            raise SystemExit(f"flatpod: {path} exists and is not a socket; refusing to replace it")
    except FileNotFoundError:
        pass


async def serve(config: Config) -> None:
    rt = open_runtime(config)
    server = build_server(rt, rpc_handlers())
    socket_path = config.socket_path
    bind_socket_path(socket_path)
    server.add_insecure_port(f"unix://{socket_path}")
    # Created with the process umask; the socket gives full control of the node: root only.
    await server.start()
    os.chmod(socket_path, 0o600)
    log.info("serving CRI on %s (root %s, state %s)", socket_path, rt.paths.root, rt.paths.state)

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()

    log.info("stopping: pods keep running")
    await server.stop(grace=5)
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    rt.store.close()
    log.info("stopped")
