"""The daemon's side of the per-pod shims: start or reconnect them, and follow their exits.

Each pod has one shim (see shim/). The daemon keeps a client per pod and one task per shim
that listens for exit events, so a container's exit reaches the store as soon as it happens,
not when somebody next asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sandbox.handlers import Handler
from shim import ksm
from shim.client import (
    ProcessState,
    ShimClient,
    ShimError,
    ShimState,
    Subscription,
    ZygoteUnavailable,
    spawn_shim,
    start_zygote,
    zygote_call,
)

log = logging.getLogger("flatpod.shims")

ExitHandler = Callable[[str, ProcessState], Awaitable[None]]
LostHandler = Callable[[str], None]
# Generous: a loaded node may take a while to schedule the zygote, and a false "dead"
# would mean killing a healthy one.
ZYGOTE_PING_TIMEOUT = 10.0
# Starting the zygote preloads and warms up the shim's code before it detaches: a second here,
# but tens of seconds on a slow or emulated CPU. Only a hung start should fail.
ZYGOTE_START_TIMEOUT = 120.0
# A shim that outlived the daemon answers at once; one that takes longer is reported gone.
RECONNECT_TIMEOUT = 5.0


def rfc3339_to_ns(stamp: str | None) -> int:
    """The shim's RFC 3339 (nanosecond) UTC time as ns since the epoch; 0 when absent."""
    if not stamp:
        return 0
    main, _, frac = stamp.rstrip("Z").partition(".")
    seconds = datetime.fromisoformat(main + "+00:00").timestamp()
    nanos = int((frac + "000000000")[:9]) if frac else 0
    return int(seconds) * 1_000_000_000 + nanos


@dataclass
class ShimRegistry:
    """The pods' shims, and the zygote that forks them.

    A shim forked from the preloaded zygote shares the interpreter's pages copy-on-write
    (about 2.1 MiB private per pod, against about 10 MiB for a fresh interpreter; about
    0.25 MiB once KSM has merged the pages CPython's reference counting copied, see
    shim/ksm.py). The zygote lives as long as the daemon; the shims it forked are not its
    children and outlive both.
    """

    log_level: str
    on_exit: ExitHandler
    # Called with the pod id when a shim goes away without being asked to (killed, OOM).
    on_lost: LostHandler = lambda _pod_id: None
    zygote_socket: Path | None = None
    # config.shim_page_merging: "on", "advise" or "off"
    page_merging: str = "off"
    clients: dict[str, ShimClient] = field(default_factory=dict)
    followers: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    async def start(self) -> None:
        """Reuses the zygote that outlived a killed daemon, or starts one.

        Its pid is kept in a file beside its socket, so a zygote that stopped answering (or
        one whose socket file is gone) is killed rather than left behind forever.
        """
        if self.zygote_socket is None:
            return
        if self.page_merging == "on":  # also when a running zygote is reused
            _start_ksmd()
        socket_path, pid_file = str(self.zygote_socket), self.zygote_socket.with_suffix(".pid")
        old_pid = _read_pid(pid_file)
        if old_pid and _is_zygote(old_pid):
            try:
                reply = await zygote_call(socket_path, "ping", timeout=ZYGOTE_PING_TIMEOUT)
                if int(reply.get("pid", 0)) == old_pid:
                    return
            except ShimError as err:
                log.warning("shim zygote %d does not answer (%s); replacing it", old_pid, err)
            _kill(old_pid)
        self.zygote_socket.unlink(missing_ok=True)
        await start_zygote(socket_path, log_path=str(self.zygote_socket.with_suffix(".log")),
                           merge_pages=self.page_merging != "off", timeout=ZYGOTE_START_TIMEOUT)
        reply = await zygote_call(socket_path, "ping", timeout=ZYGOTE_PING_TIMEOUT)
        pid_file.write_text(f"{int(reply['pid'])}\n")

    async def spawn(self, pod_id: str, pod_dir: Path, handler: Handler) -> ShimClient:
        """The pod's shim, which runs the pod's OCI runtime (its handler's) for life."""
        zygote = str(self.zygote_socket) if self.zygote_socket else None
        try:
            client = await self._spawn(pod_id, pod_dir, handler, zygote)
        except ZygoteUnavailable as err:
            log.warning("shim zygote failed (%s); starting a new one", err)
            await self.start()
            client = await self._spawn(pod_id, pod_dir, handler, zygote)
        self._adopt(pod_id, client)
        return client

    async def _spawn(self, pod_id: str, pod_dir: Path, handler: Handler,
                     zygote: str | None) -> ShimClient:
        return await spawn_shim(
            pod_id, str(pod_dir), str(handler.root), python=sys.executable,
            runc=handler.binary, runc_args=list(handler.global_args),
            log_level=self.log_level, zygote_socket=zygote,
        )

    async def reconnect(self, pod_id: str, pod_dir: Path
                        ) -> tuple[ShimClient, ShimState] | None:
        """After a daemon restart: the shim of a pod, if it is still alive, and its view of
        every process it holds. The exit events are subscribed to before the view is taken,
        so an exit falls in one or the other (or both: applying an exit is idempotent)."""
        if not (pod_dir / "shim.sock").exists():
            return None
        client = ShimClient(str(pod_dir), timeout=RECONNECT_TIMEOUT)
        try:
            subscription = await client.subscribe()
        except (ShimError, OSError) as err:
            log.warning("shim of pod %s does not answer: %s", pod_id, err)
            return None
        try:
            view = await client.shim_state()
        except (ShimError, OSError) as err:
            subscription.writer.close()
            log.warning("shim of pod %s does not answer: %s", pod_id, err)
            return None
        self._adopt(pod_id, client, subscription)
        return client, view

    def get(self, pod_id: str) -> ShimClient | None:
        return self.clients.get(pod_id)

    def _adopt(self, pod_id: str, client: ShimClient,
               subscription: Subscription | None = None) -> None:
        self.clients[pod_id] = client
        task = asyncio.create_task(self._follow(pod_id, client, subscription))
        if subscription is not None:  # also if the task is cancelled before it ever ran
            task.add_done_callback(lambda _: subscription.writer.close())
        self.followers[pod_id] = task

    async def _follow(self, pod_id: str, client: ShimClient,
                      subscription: Subscription | None) -> None:
        """Feeds exit events to the daemon until the shim goes away."""
        try:
            async for event in client.events(subscription):
                if event.get("event") == "exit" and "exec_id" not in event:
                    try:
                        await self.on_exit(pod_id, ProcessState.from_message("exit", event))
                    except Exception:
                        log.exception("handling exit of %s", event.get("container_id"))
        except (ShimError, OSError) as err:
            log.info("shim of pod %s went away: %s", pod_id, err)
        # Its event stream ended: the shim is gone. (forget() cancels this task first, so a
        # shim shut down on purpose never gets here.)
        if self.followers.get(pod_id) is asyncio.current_task():
            self.clients.pop(pod_id, None)
            self.followers.pop(pod_id, None)
            self.on_lost(pod_id)

    async def forget(self, pod_id: str) -> None:
        """Stops following a pod's shim (it was shut down, or the pod is removed)."""
        self.clients.pop(pod_id, None)
        task = self.followers.pop(pod_id, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def close(self) -> None:
        for pod_id in list(self.followers):
            await self.forget(pod_id)
        if self.zygote_socket is not None:
            pid_file = self.zygote_socket.with_suffix(".pid")
            pid = _read_pid(pid_file)
            with contextlib.suppress(ShimError):
                await zygote_call(str(self.zygote_socket), "stop", timeout=ZYGOTE_PING_TIMEOUT)
            if pid and _is_zygote(pid):
                _kill(pid)
            pid_file.unlink(missing_ok=True)


def _read_pid(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0


def _start_ksmd() -> None:
    try:
        started = ksm.start_ksmd()
    except OSError as err:
        log.warning("could not start ksmd (%s): shim pages will not be merged", err)
        return
    state = ksm.ksmd_state()
    if started:
        log.info("started the kernel's same-page merging (%s=1) for shim memory", ksm.KSM_RUN)
    elif state is None:
        log.info("no KSM in this kernel: shim pages will not be merged")
    elif state != "1":
        log.info("%s is %s: shim pages will not be merged", ksm.KSM_RUN, state)


def _is_zygote(pid: int) -> bool:
    """The pid still names a shim zygote (pids are reused)."""
    try:
        return b"shim.zygote" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
