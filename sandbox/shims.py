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
import select
import shutil
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from netns.enter import on_own_thread
from netns.network import NetworkAhead, NetworkResult
from netns.pin import create_netns_here, pod_netns_path, unpin
from sandbox.handlers import Handler
from shim import ksm
from shim.client import (
    ProcessState,
    ShimClient,
    ShimError,
    ShimState,
    Subscription,
    ZygoteUnavailable,
    fork_shim,
    spawn_shim,
    start_zygote,
    zygote_call,
)

T = TypeVar("T")
log = logging.getLogger("flatpod.shims")

ExitHandler = Callable[[str, ProcessState], Awaitable[None]]
LostHandler = Callable[[str], None]
# Generous: a loaded node may take a while to schedule the zygote, and a false "dead"
# would mean killing a healthy one.
ZYGOTE_PING_TIMEOUT = 10.0
# A new zygote preloads and warms up the shim's code (a warm-up container included) right after
# it detaches, and answers its first ping once done: a second here, but tens of seconds on a
# slow or emulated CPU (the VM stage on a loaded host took over 10 s). Only a hung start fails.
ZYGOTE_START_TIMEOUT = 120.0
# A shim that outlived the daemon answers at once; one that takes longer is reported gone.
RECONNECT_TIMEOUT = 5.0
SHIM_EXIT_TIMEOUT = 5.0
FOLLOWER_CANCEL_WAIT = 1.0
# In the dir of a spare shim's pod-to-be (see ShimRegistry.spare): the shim's pid, 0 while it is
# forked (what tells an operator, or a test, a spare's dir from a pod's). A pod that takes the
# dir removes it. A spare a killed daemon left has no record: the next start removes its dir,
# marked or not, with the other dirs no record names (remove_stray_pod_dirs).
SPARE_MARKER = "spare"
# The spare is forked this long after the RunPodSandbox that used the last one has answered:
# kubelet's (and critest's) PodSandboxStatus follows that answer at once (1.5-4 ms), and a
# fork and a shim's start beside it on a 2-core node made it wait (2.0-4.0 against 1.5-1.8
# ms, interleaved). Not longer: a pod that comes before the spare is up forks its own shim,
# and with 50 ms every other pod of a stop-and-run loop did (40-45 ms between an answer and
# the next RunPodSandbox), its pause waiting 6-15 ms for that fork instead of under 1 ms.
SPARE_FORK_DELAY = 0.015


def new_pod_id() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex  # 64 hex digits, as kubelet expects ids


@dataclass(frozen=True)
class SpareShim:
    """A shim forked ahead of demand for the next pod of `handler`: that pod takes its id and
    dir (made with the shim), so RunPodSandbox waits for no fork."""

    pod_id: str
    pod_dir: Path
    handler: Handler
    client: ShimClient
    pidfd: int  # readable once the shim has exited
    # Its netns's pod network, plumbed ahead (ShimRegistry.network_ahead); None: not made.
    network: NetworkResult | None = None

    def alive(self) -> bool:
        return not select.select([self.pidfd], [], [], 0)[0]


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
    (about 1.6 MiB private per pod, against about 10 MiB for a fresh interpreter; about
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
    # Where pod dirs are; with it, one spare shim is kept, forked after each RunPodSandbox
    # (see SpareShim); None: none is.
    pods_dir: Path | None = None
    spare: SpareShim | None = None
    forking_spare: asyncio.Task[None] | None = None
    # With it (the built-in bridge), a spare's netns is plumbed as it is made (veth, address,
    # routes), and every cleanup of a spare tears that down; None (CNI): it is not.
    network_ahead: NetworkAhead | None = None
    # Cleanups of dead spares, held until they end.
    cleanups: set[asyncio.Task[None]] = field(default_factory=set)

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
        reply = await zygote_call(socket_path, "ping", timeout=ZYGOTE_START_TIMEOUT)
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
        if zygote is not None:
            return (await self._fork(pod_id, pod_dir, handler, zygote))[0]
        return await spawn_shim(
            pod_id, str(pod_dir), str(handler.root), python=sys.executable,
            runc=handler.binary, runc_args=list(handler.global_args), log_level=self.log_level,
        )

    async def _fork(self, pod_id: str, pod_dir: Path, handler: Handler,
                    zygote: str) -> tuple[ShimClient, int]:
        """The shim forked by the zygote, and its pid (the zygote's answer names it)."""
        return await fork_shim(zygote, pod_id, str(pod_dir), str(handler.root),
                               runc=handler.binary, runc_args=list(handler.global_args),
                               log_level=self.log_level)

    def spare_for(self, handler: Handler) -> SpareShim | None:
        """The spare shim, if it runs `handler`'s runtime and still lives. Taken with
        `claim_spare`, in the same step of the event loop (nothing else can take it between)."""
        spare = self.spare
        if spare is None or spare.handler != handler:
            return None
        if not spare.alive():
            log.warning("spare shim for pod %s exited; forking another", spare.pod_id[:12])
            self.spare = None
            os.close(spare.pidfd)
            cleanup = asyncio.ensure_future(self._stop_spare_dir(spare.pod_dir))
            self.cleanups.add(cleanup)
            cleanup.add_done_callback(self.cleanups.discard)
            return None
        return spare

    def claim_spare(self, spare: SpareShim) -> ShimClient:
        """The spare's dir and shim are its pod's from now on (its record is reserved)."""
        self.spare = None
        os.close(spare.pidfd)
        # Between the pod's reservation and its undo's set-up: nothing here may raise.
        (spare.pod_dir / SPARE_MARKER).unlink(missing_ok=True)
        self._adopt(spare.pod_id, spare.client)
        return spare.client

    def fork_spare(self, handler: Handler, make_pod_dir: Callable[[Path], None]) -> None:
        """Forks a spare shim for the next pod of `handler`, in the background, unless one
        is kept or being forked (or no pods dir was given). A spare of another handler is
        replaced: the last pod's handler is the likeliest next."""
        if self.pods_dir is None or self.zygote_socket is None or self.forking_spare is not None:
            return
        replaced = self.spare
        if replaced is not None and replaced.handler == handler:
            return
        self.spare = None
        self.forking_spare = asyncio.create_task(
            self._fork_spare(handler, make_pod_dir, replaced))

    async def _fork_spare(self, handler: Handler, make_pod_dir: Callable[[Path], None],
                          replaced: SpareShim | None) -> None:
        assert self.pods_dir is not None
        pod_id = new_pod_id()
        pod_dir = self.pods_dir / pod_id
        network: asyncio.Future[NetworkResult | None] | None = None
        try:
            await asyncio.sleep(SPARE_FORK_DELAY)
            if replaced is not None:
                os.close(replaced.pidfd)
                await self._stop_spare_dir(replaced.pod_dir)
            await _to_the_end(on_own_thread(lambda: _make_spare_dir(pod_dir, make_pod_dir)))
            if self.network_ahead is not None:  # on a worker thread, beside the fork
                network = asyncio.ensure_future(
                    asyncio.to_thread(_plumb_ahead, self.network_ahead, pod_id))
            # The pid from the zygote's answer: no call to the new shim to ask it.
            client, pid = await self._fork(pod_id, pod_dir, handler, str(self.zygote_socket))
            (pod_dir / SPARE_MARKER).write_text(f"{pid}\n")
            plumbed = await _to_the_end(network) if network is not None else None
            self.spare = SpareShim(pod_id, pod_dir, handler, client, os.pidfd_open(pid), plumbed)
        except (ShimError, OSError) as err:
            log.warning("forking a spare shim failed: %s", err)
            await _ended(network)
            await self._stop_spare_dir(pod_dir)
        except asyncio.CancelledError:
            await _ended(network)
            await self._stop_spare_dir(pod_dir)
            raise
        finally:
            self.forking_spare = None

    async def remove_stray_pod_dirs(self, known: Collection[str]) -> None:
        """Removes the pod dirs that no record names, with their shim, network and netns: the
        spares a killed daemon left, marked or not (killed between a spare dir's mkdir and
        its marker, or while removing one). Only at start, after recovery: no pod or spare
        is being made then, and an interrupted RunPodSandbox that took a spare has a record."""
        if self.pods_dir is None or not self.pods_dir.is_dir():
            return
        for pod_dir in self.pods_dir.iterdir():
            if pod_dir.name not in known:
                log.warning("removing %s: no pod has it", pod_dir)
                await self._stop_spare_dir(pod_dir)

    async def _stop_spare_dir(self, pod_dir: Path) -> None:
        """Stops the spare shim of `pod_dir`, if it runs, and removes its network (if made
        ahead), its netns and the dir (a crash midway leaves a dir no record names, which the
        next start removes)."""
        if (pod_dir / "shim.sock").exists():
            await shut_down(ShimClient(str(pod_dir), timeout=RECONNECT_TIMEOUT),
                            f"spare shim in {pod_dir}")
        netns = pod_netns_path(pod_dir.name)
        ahead = self.network_ahead
        if ahead is not None:  # idempotent: nothing to do when none was made
            try:
                await asyncio.to_thread(ahead.teardown, pod_dir.name, netns, False)
            except OSError as err:  # its lease and veth stay, named by its id: logged
                log.warning("spare %s: tearing down its network: %s", pod_dir.name[:12], err)
        unpin(netns)
        shutil.rmtree(pod_dir, ignore_errors=True)

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
        while task is not None and not task.done():
            # Again if it did not end: a cancellation can be lost in an await that was
            # finishing (3.11's wait_for), and the follower would read events for ever.
            task.cancel()
            await asyncio.wait([task], timeout=FOLLOWER_CANCEL_WAIT)
        if task is not None and not task.cancelled():
            task.exception()  # retrieved: it was logged where it happened

    async def close(self) -> None:
        if self.forking_spare is not None:
            self.forking_spare.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.forking_spare
        if self.spare is not None:
            spare, self.spare = self.spare, None
            os.close(spare.pidfd)
            await self._stop_spare_dir(spare.pod_dir)
        if self.cleanups:
            await asyncio.wait(self.cleanups)
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


async def shut_down(client: ShimClient, what: str) -> None:
    """Asks the shim to exit (its processes are gone by now) and waits until it has; kills it
    if it does not. `what` names it in the log."""
    try:
        shim_pid = (await client.shim_state()).pid
        # Held from while it answers: no reused pid can be waited for or killed.
        pidfd = _pidfd(shim_pid)
    except (ShimError, OSError) as err:
        log.info("%s: %s", what, err)
        return
    if pidfd is None:
        return
    try:
        await client.shutdown()
        if not await _exited(pidfd, SHIM_EXIT_TIMEOUT):
            log.warning("%s (pid %d) did not exit; killing it", what, shim_pid)
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except (ShimError, OSError) as err:
        log.info("%s: %s", what, err)
    finally:
        os.close(pidfd)


async def _to_the_end(work: Awaitable[T]) -> T:
    """Awaits `work`; cancelled meanwhile, first lets it end (a thread cannot be stopped),
    so that the cleanup after the cancellation never races it."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise


def _make_spare_dir(pod_dir: Path, make_pod_dir: Callable[[Path], None]) -> None:
    """A spare's dir, marked, and its netns, made ahead (after the marker: a left spare's
    is unpinned with it): a pod of the pod network takes it, the others unpin it at the
    claim. For a thread of its own (netns.enter.on_own_thread), which moves into the netns
    to make it: a pooled thread starting another to do so (create_netns) cost the daemon
    ~1 ms more CPU; and the loop is not held while the file system works."""
    make_pod_dir(pod_dir)
    (pod_dir / SPARE_MARKER).write_text("0\n")  # before the fork: never unmarked
    create_netns_here(pod_netns_path(pod_dir.name))


def _plumb_ahead(network: NetworkAhead, pod_id: str) -> NetworkResult | None:
    """The spare's netns plumbed; None if that failed (the pod that takes the spare then
    sets its network up itself, as without a spare)."""
    try:
        return network.plumb(pod_id, pod_netns_path(pod_id))
    except Exception as err:
        log.warning("plumbing a spare's netns failed: %s", err)
        return None


async def _ended(work: asyncio.Future[T] | None) -> None:
    """Waits for `work` to end, whatever its outcome (a thread's cleanup must not race it)."""
    if work is not None:
        await asyncio.wait([work])


def _pidfd(pid: int) -> int | None:
    """A pidfd of `pid`; None when there is no such process (any more)."""
    if not pid:
        return None
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


async def _exited(pidfd: int, timeout: float) -> bool:
    """Waits until the process exits (its pidfd turns readable; one event-loop wakeup where
    polling /proc took one every 10 ms); False if it still runs after `timeout`."""
    loop = asyncio.get_running_loop()
    gone: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not gone.done():
            gone.set_result(None)

    loop.add_reader(pidfd, readable)
    try:
        await asyncio.wait_for(gone, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(pidfd)


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
