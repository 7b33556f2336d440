"""`flatpod serve`: open the store, recover, serve the CRI on a unix socket, stop gracefully.

Stopping (SIGTERM, SIGINT) closes the socket and the streaming server and leaves every pod
running: the shims own the containers, and the next `flatpod serve` picks them up again.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import stat
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from netns.bridge import BridgeConfig, BridgeNetwork
from netns.cni import CniNetwork
from sandbox import checkpoint, containers, events, exec, exits, info, pods, recovery, stats
from sandbox.config import Config, ConfigError
from sandbox.faults import Faults
from sandbox.images.service import ImageService
from sandbox.metrics import MetricsEndpoint
from sandbox.runtime import Paths, Runtime
from sandbox.server import Handler, Inline, build_server
from sandbox.shims import ShimRegistry
from sandbox.slots import LifecycleSlots, waits_for_exit
from sandbox.store import Store
from sandbox.streaming.server import StreamingServer
from shim.client import ProcessState

log = logging.getLogger("flatpod.daemon")


def rpc_handlers(slots: LifecycleSlots) -> Mapping[str, Handler]:
    """Every RPC flatpod implements, by "Service/Method"; the rest answer UNIMPLEMENTED.
    The lifecycle calls run at most `slots.limit` at a time (sandbox/slots.py). The lookups
    answered from memory are Inline: answered in the callback that read them, with no task
    (sandbox/server.py's Inline says which handlers may be)."""
    # The stats RPCs share their samples (and the previous one, for cpu rates): one per server.
    st = stats.Stats()
    checkpoints = checkpoint.Checkpoints()  # holds what `criu check` said, asked once
    bounded = slots.bounded
    return {
        "RuntimeService/Version": Inline(info.version),
        "RuntimeService/Status": info.status,
        "RuntimeService/RuntimeConfig": Inline(info.runtime_config),
        "RuntimeService/UpdateRuntimeConfig": info.update_runtime_config,
        "RuntimeService/RunPodSandbox": bounded(pods.run_pod_sandbox),
        "RuntimeService/StopPodSandbox": bounded(pods.stop_pod_sandbox),
        "RuntimeService/RemovePodSandbox": bounded(pods.remove_pod_sandbox),
        "RuntimeService/PodSandboxStatus": Inline(pods.pod_sandbox_status),
        "RuntimeService/ListPodSandbox": Inline(pods.list_pod_sandbox),
        "RuntimeService/StreamPodSandboxes": pods.stream_pod_sandboxes,
        "RuntimeService/CreateContainer": bounded(containers.create_container),
        "RuntimeService/StartContainer": bounded(containers.start_container),
        "RuntimeService/StopContainer": bounded(containers.stop_container,
                                                 unbounded_if=waits_for_exit),
        "RuntimeService/RemoveContainer": bounded(containers.remove_container),
        "RuntimeService/ContainerStatus": Inline(containers.container_status),
        "RuntimeService/ListContainers": Inline(containers.list_containers),
        "RuntimeService/StreamContainers": containers.stream_containers,
        "RuntimeService/ExecSync": containers.exec_sync,
        "RuntimeService/ReopenContainerLog": containers.reopen_container_log,
        "RuntimeService/UpdateContainerResources": containers.update_container_resources,
        "RuntimeService/Exec": Inline(exec.exec_),
        "RuntimeService/Attach": Inline(exec.attach),
        "RuntimeService/PortForward": Inline(exec.port_forward),
        "RuntimeService/ContainerStats": st.container_stats,
        "RuntimeService/ListContainerStats": st.list_container_stats,
        "RuntimeService/StreamContainerStats": st.stream_container_stats,
        "RuntimeService/PodSandboxStats": st.pod_sandbox_stats,
        "RuntimeService/ListPodSandboxStats": st.list_pod_sandbox_stats,
        "RuntimeService/StreamPodSandboxStats": st.stream_pod_sandbox_stats,
        "RuntimeService/ListMetricDescriptors": Inline(st.list_metric_descriptors),
        "RuntimeService/ListPodSandboxMetrics": st.list_pod_sandbox_metrics,
        "RuntimeService/StreamPodSandboxMetrics": st.stream_pod_sandbox_metrics,
        "RuntimeService/UpdatePodSandboxResources": pods.update_pod_sandbox_resources,
        "RuntimeService/GetContainerEvents": events.get_container_events,
        "RuntimeService/CheckpointContainer": checkpoints.checkpoint_container,
        "ImageService/PullImage": lambda rt, req: rt.images.PullImage(req),
        "ImageService/ListImages": Inline(lambda rt, req: rt.images.ListImages(req)),
        "ImageService/StreamImages": lambda rt, req: rt.images.StreamImages(req),
        "ImageService/ImageStatus": Inline(lambda rt, req: rt.images.ImageStatus(req)),
        "ImageService/RemoveImage": lambda rt, req: rt.images.RemoveImage(req),
        "ImageService/ImageFsInfo": lambda rt, req: rt.images.ImageFsInfo(req),
    }


def pod_network(config: Config, store: Store, paths: Paths) -> tuple[Any, str]:
    """CNI when a network config exists in the CNI dir, else the built-in bridge."""
    conf_dir = Path(config.network.cni_conf_dir)
    if conf_dir.is_dir() and any(
        p.suffix in (".conflist", ".conf", ".json") for p in conf_dir.iterdir()
    ):
        network = CniNetwork(
            conf_dir=conf_dir,
            bin_dirs=[Path(d) for d in config.network.cni_bin_dirs],
            cache_dir=paths.root / "cni" / "results",
        )
        return network, "cni"
    bridge = BridgeConfig(
        name=config.network.bridge,
        subnet=config.network.subnet,
        gateway=config.network.gateway or None,
        mtu=config.network.mtu,
        masquerade=config.network.masquerade,
    )
    return BridgeNetwork(bridge, store), "bridge"


def streaming_server(rt: Runtime) -> StreamingServer:
    cfg = rt.config.streaming
    tls = (cfg.tls_cert, cfg.tls_key) if cfg.tls_cert else None
    limits = cfg.limits()
    return StreamingServer(exec.ShimBackend(rt, limits), address=cfg.address, port=cfg.port,
                           tls=tls, limits=limits)


def own_oom_score_adj() -> int:
    """Without CAP_SYS_RESOURCE nothing we start may go below our own value."""
    try:
        return int(Path("/proc/self/oom_score_adj").read_text())
    except (OSError, ValueError):
        return 0


def open_runtime(config: Config) -> Runtime:
    paths = Paths.from_config(config)
    paths.create_dirs()
    store = Store(paths.db)
    rt = Runtime(config=config, store=store, paths=paths, faults=Faults.from_env())
    rt.handlers.create_roots()
    rt.registry.load()
    rt.started_at = time.time()
    rt.events = events.EventHub()
    rt.oom_score_adj_floor = own_oom_score_adj()
    rt.network, rt.network_kind = pod_network(config, store, paths)
    rt.images = ImageService(
        store,
        paths.root,
        config.images,
        sandbox_image=config.sandbox_image,
        containers_dir=paths.writable_layers,
        live_snapshots=lambda: (
            {s for c in rt.containers.values() for s in c.snapshots} | rt.removals.snapshots()
        ),
        faults=rt.faults,
    )

    async def on_exit(pod_id: str, event: ProcessState) -> None:
        await exits.on_exit(rt, pod_id, event)

    rt.shims = ShimRegistry(
        log_level=config.log_level, on_exit=on_exit,
        on_lost=lambda pod_id: exits.on_shim_lost(rt, pod_id),
        zygote_socket=paths.state / "zygote.sock", page_merging=config.shim_page_merging,
        pods_dir=paths.pods,
        # The bridge plumbs a spare's netns ahead; CNI plugins need the pod's name.
        network_ahead=rt.network if isinstance(rt.network, BridgeNetwork) else None,
    )
    pods.ensure_pause_rootfs(rt)
    return rt


def bind_socket_path(path: Path) -> None:
    """Prepares the socket's directory and removes a stale socket. A directory flatpod makes
    is root's only (0700); one that exists is the operator's (`--socket /run/x.sock`) and
    keeps its mode: the socket itself is 0600 from the moment it exists (serve's umask)."""
    if not path.parent.is_dir():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
        else:
            raise SystemExit(f"flatpod: {path} exists and is not a socket; refusing to replace it")
    except FileNotFoundError:
        pass


def event_loop_factory(config: Config) -> Callable[[], asyncio.AbstractEventLoop]:
    """The loop `event_loop` names (ARCHITECTURE.md, "Inside flatpod serve", says why each)."""
    if config.event_loop == "uvloop":
        try:
            import uvloop
        except ImportError as err:
            raise ConfigError(
                "config key 'event_loop' is \"uvloop\", but the uvloop package is not installed"
            ) from err
        return uvloop.new_event_loop
    return asyncio.new_event_loop


def freeze_startup_heap() -> None:
    """Puts what startup built (modules, grpc, protobuf descriptors: nearly all of the heap)
    out of the cyclic collector's reach, so that a full collection walks only what was made
    since. Under churn a full collection paused the loop for 34-47 ms, and 4-6 ms once frozen
    (ARCHITECTURE.md, "Inside flatpod serve"). Before recovery: the records it builds die with
    their pods, and frozen objects in a cycle would never be freed.
    FLATPOD_GC=default skips it, for an A/B (`hack/bench --ab-env FLATPOD_GC=default`)."""
    if os.environ.get("FLATPOD_GC") == "default":
        return
    gc.collect()
    gc.freeze()


def run(config: Config) -> None:
    """Serves until SIGTERM or SIGINT, on the configured event loop."""
    with asyncio.Runner(loop_factory=event_loop_factory(config)) as runner:
        runner.run(serve(config))


async def serve(config: Config) -> None:
    rt = open_runtime(config)
    await rt.images.start()
    await rt.shims.start()
    freeze_startup_heap()
    await recovery.recover(rt)
    rt.streaming = streaming_server(rt)
    await rt.streaming.start()
    metrics = MetricsEndpoint.for_runtime(rt) if config.metrics_address else None
    slots = LifecycleSlots(config.max_concurrent_lifecycle_calls)
    server = build_server(rt, rpc_handlers(slots), metrics.observe if metrics else None,
                          config.grpc_server)
    socket_path = config.socket_path
    bind_socket_path(socket_path)
    # The socket gives full control of the node: root only, also in the instant between
    # bind() and the chmod, in a directory others may search.
    previous_umask = os.umask(0o177)
    try:
        await server.start(socket_path)
    finally:
        os.umask(previous_umask)
    os.chmod(socket_path, 0o600)
    if metrics is not None:
        await metrics.start(config.metrics_address)
    log.info("serving CRI on %s (root %s, state %s)", socket_path, rt.paths.root, rt.paths.state)

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    if os.environ.get("FLATPOD_MEMDUMP"):  # debug only: see sandbox/memdump.py
        from sandbox import memdump

        memdump.install(loop, Path(os.environ["FLATPOD_MEMDUMP"]))
    await stopping.wait()

    log.info("stopping: pods keep running")
    await server.stop(grace=5)
    if metrics is not None:
        await metrics.stop()
    await rt.streaming.stop()
    # Before the shims close (a pod's cleanup shuts its shim down) and the store closes
    # under their journal.
    await rt.removals.drain(timeout=5)
    await rt.shims.close()
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    rt.store.close()
    log.info("stopped")
