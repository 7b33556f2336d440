"""The workloads. Each takes samples from every runtime in turn, swapping the order on each
round, so that load drift on a shared machine hits both runtimes alike."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from benchlib import floor, procs
from benchlib.cri import (
    CALL_TIMEOUT,
    LOOKUP_IMAGE,
    describe,
    sleeper_config,
    status_code,
)
from benchlib.runtimes import REPO, Runtime
from benchlib.stats import Report, Series
from cri_api import api_pb2 as pb
from shim import ksm

MS = 1000.0
FLOOR_SERIES = "runc"  # the floors' samples, a series beside the runtimes'
POD_FLOOR = "floor"
CONTAINER_FLOOR = "floor-ctr"
CONTAINER_FLOOR_RUNC = "floor-ctr-runc"
# A page is merged once ksmd has seen it unchanged on two full passes; measured with
# hack/shim-memory --ksm, two passes leave some shims unmerged and four merge them all.
KSM_SETTLE_PASSES = 4
KSM_SETTLE_LIMIT_S = 300.0
Sampler = Callable[[Runtime], float]
HACK = REPO / "hack"
RELIST_INTERVAL_S = 1.0  # as kubelet's PLEG relists
RELIST_PROBER_GRACE_S = 120.0  # after the clients stop: one relist, however slow


def at_scale(key: str, pods: int) -> str:
    """The key of an at-scale figure: one per pod count (`--pods 50,100,250`)."""
    return f"{key}@{pods}"


@dataclass
class Plan:
    runs: int  # samples of each latency
    heavy_runs: int  # samples of the concurrent start and the big pull
    pods: int  # the scale of the relist, stats and memory figures
    containers_per_pod: int = 2
    concurrent_pods: int = 20
    setup_threads: int = 4
    big_image: str = ""
    churn_clients: int = 8
    churn_seconds: float = 60.0
    churn_rounds: int = 1  # each runtime churns this often, the order flipping every round
    relist_interval: float = RELIST_INTERVAL_S
    page_merging: bool = True  # also measure the shims once ksmd has merged them
    load: dict[str, list[float]] = field(default_factory=dict)


def _take(series: Series, runtime: Runtime, sample: Sampler, scale: float) -> None:
    try:
        series.samples.append(sample(runtime) * scale)
    except grpc.RpcError as err:
        if status_code(err) == grpc.StatusCode.UNIMPLEMENTED:
            series.unsupported = True
        else:
            series.error = describe(err)
    except Exception as err:  # a failing runtime is reported, the others go on
        series.error = describe(err)


def alternate(report: Report, key: str, title: str, unit: str, runtimes: list[Runtime],
              runs: int, sample: Sampler, scale: float = MS,
              beside: Callable[[], None] | None = None) -> None:
    """`runs` rounds of one sample per runtime; `beside` (a floor's sampler) takes one more
    sample in each round, after the runtimes and then before them, in turn."""
    figure = report.figure(key, title, unit)

    def taker(runtime: Runtime) -> Callable[[], None]:
        def take() -> None:
            series = figure.of(runtime.name)
            if series.error is None and not series.unsupported:
                _take(series, runtime, sample, scale)
        return take

    takers = [taker(runtime) for runtime in runtimes] + ([beside] if beside else [])
    for i in range(runs):
        for take in takers if i % 2 == 0 else takers[::-1]:
            take()


def reset(runtimes: list[Runtime]) -> None:
    """Between workloads: no bench pod left over from a failed sample skews the next one."""
    for runtime in runtimes:
        with contextlib.suppress(grpc.RpcError):
            runtime.remove_bench_pods()


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


# ---- single-pod latencies --------------------------------------------------------------------


def sample_run_pod(runtime: Runtime) -> float:
    config = runtime.new_pod_config()
    start = time.perf_counter()
    pod_id = runtime.run_pod(config)
    elapsed = time.perf_counter() - start
    runtime.cri.stop_and_remove_pod(pod_id)
    return elapsed


def create_start_sampler(pods: dict[str, tuple[str, pb.PodSandboxConfig]]) -> Sampler:
    """CreateContainer + StartContainer into one long-lived pod per runtime."""
    def sample(runtime: Runtime) -> float:
        if runtime.name not in pods:
            config = runtime.new_pod_config()
            pods[runtime.name] = (runtime.run_pod(config), config)
        pod_id, config = pods[runtime.name]
        start = time.perf_counter()
        ctr_id = runtime.cri.create_and_start(pod_id, config, sleeper_config())
        elapsed = time.perf_counter() - start
        runtime.cri.kill_and_remove_container(ctr_id)
        return elapsed
    return sample


def container_floor_sampler(report: Report,
                            stack: contextlib.ExitStack) -> Callable[[], None] | None:
    """The container floor's sampler, interleaved with Create+Start's samples (its pause is
    made here and removed when `stack` closes); None, with the error noted, if it cannot be
    set up."""
    total = report.figure(CONTAINER_FLOOR, "container floor: overlay mount + runc run --detach "
                          "into a pause's namespaces", "ms").of(FLOOR_SERIES)
    runc = report.figure(CONTAINER_FLOOR_RUNC, "container floor: runc run --detach alone",
                         "ms").of(FLOOR_SERIES)
    try:
        made = stack.enter_context(floor.ContainerFloor())
    except Exception as err:
        total.error = describe(err)
        return None

    def sample() -> None:
        if total.error is not None:
            return
        try:
            taken = made.sample()
        except Exception as err:
            total.error = describe(err)
            return
        total.samples.append(taken.total_s * MS)
        runc.samples.append(taken.runc_s * MS)
    return sample


def sample_stop_remove(runtime: Runtime) -> float:
    config = runtime.new_pod_config()
    pod_id = runtime.run_pod(config)
    runtime.cri.create_and_start(pod_id, config, sleeper_config())
    return timed(lambda: runtime.cri.stop_and_remove_pod(pod_id))


def concurrent_sampler(count: int) -> Sampler:
    def sample(runtime: Runtime) -> float:
        configs = [runtime.new_pod_config() for _ in range(count)]
        with ThreadPoolExecutor(count) as pool:
            start = time.perf_counter()
            ids = list(pool.map(runtime.run_pod, configs))
            elapsed = time.perf_counter() - start
            list(pool.map(runtime.cri.stop_and_remove_pod, ids))
        return elapsed
    return sample


# flatpod deletes a removed image's blobs and snapshots after RemoveImage answers (containerd
# before): the timed pull must start from a node that has none of them left, as on
# containerd, not keep the ones the collection has not reached yet. Its collection of the
# ~100 MB image takes well under this.
SETTLE_AFTER_REMOVE = 1.0


def pull_sampler(image: str) -> Sampler:
    def sample(runtime: Runtime) -> float:
        runtime.cri.remove_image(image)
        time.sleep(SETTLE_AFTER_REMOVE)
        return timed(lambda: runtime.cri.pull(image))
    return sample


# ---- lookups, as critest -benchmark times them ------------------------------------------------


def status_pod_sampler(runtime: Runtime) -> float:
    """PodSandboxStatus, verbose, right after the RunPodSandbox that made the pod (critest's
    PodLifecycle shape); the pod is removed untimed."""
    pod_id = runtime.run_pod(runtime.new_pod_config())
    elapsed = timed(lambda: runtime.cri.runtime.PodSandboxStatus(
        pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True), timeout=CALL_TIMEOUT))
    runtime.cri.stop_and_remove_pod(pod_id)
    return elapsed


def status_container_sampler(pods: dict[str, tuple[str, pb.PodSandboxConfig]]) -> Sampler:
    """ContainerStatus, verbose, right after StartContainer (critest's ContainerOps shape),
    in one long-lived pod per runtime; the container is removed untimed."""
    def sample(runtime: Runtime) -> float:
        if runtime.name not in pods:
            config = runtime.new_pod_config()
            pods[runtime.name] = (runtime.run_pod(config), config)
        pod_id, config = pods[runtime.name]
        ctr_id = runtime.cri.create_and_start(pod_id, config, sleeper_config())
        elapsed = timed(lambda: runtime.cri.runtime.ContainerStatus(
            pb.ContainerStatusRequest(container_id=ctr_id, verbose=True), timeout=CALL_TIMEOUT))
        runtime.cri.kill_and_remove_container(ctr_id)
        return elapsed
    return sample


def sample_status_image(runtime: Runtime) -> float:
    """ImageStatus by tag right after the PullImage that brought the image (critest's
    ImageLifecycle shape); removed before the pull, untimed."""
    runtime.cri.remove_image(LOOKUP_IMAGE)
    runtime.cri.pull(LOOKUP_IMAGE)
    return timed(lambda: runtime.cri.has_image(LOOKUP_IMAGE))


def sample_list_images(runtime: Runtime) -> float:
    return timed(lambda: runtime.cri.images.ListImages(pb.ListImagesRequest(),
                                                       timeout=CALL_TIMEOUT))


def sample_version(runtime: Runtime) -> float:
    """The gRPC floor: the cheapest answer a runtime has."""
    return timed(runtime.cri.version)


def run_lookups(report: Report, runtimes: list[Runtime], plan: Plan) -> None:
    alternate(report, "status-pod", "PodSandboxStatus verbose, after RunPodSandbox", "ms",
              runtimes, plan.runs, status_pod_sampler)
    reset(runtimes)
    pods: dict[str, tuple[str, pb.PodSandboxConfig]] = {}
    alternate(report, "status-ctr", "ContainerStatus verbose, after StartContainer", "ms",
              runtimes, plan.runs, status_container_sampler(pods))
    reset(runtimes)
    alternate(report, "status-image", "ImageStatus by tag, after PullImage", "ms",
              runtimes, plan.runs, sample_status_image)
    alternate(report, "list-images", "ListImages", "ms", runtimes, plan.runs * 5,
              sample_list_images)
    alternate(report, "version", "Version (the gRPC floor)", "ms", runtimes, plan.runs * 5,
              sample_version)


# ---- relist under churn ------------------------------------------------------------------------


def churn(report: Report, runtime: Runtime, plan: Plan, idle: Runtime | None = None) -> None:
    """`plan.churn_clients` clients cycle whole pod lifecycles (run, create+start, stop,
    remove) for `plan.churn_seconds` while kubelet's relist pair runs once a second: the
    lifecycles per second, and each relist's latency (its p95 is the figure to watch: one
    event loop busy with lifecycle work makes the relist wait behind it). The relist is
    timed by a process of its own (benchlib/relistprobe.py), not by a thread beside the
    clients, whose GIL it would wait for. `idle`: a flatpod with pods but no churn, sent the
    same relist back to back with the churned runtime's, each round: the machine's floor."""
    stop_at = time.monotonic() + plan.churn_seconds
    done: list[int] = []

    def cycle(_: int) -> None:
        count = 0
        while time.monotonic() < stop_at:
            config = runtime.new_pod_config()
            pod_id = runtime.run_pod(config)
            runtime.cri.create_and_start(pod_id, config, sleeper_config())
            runtime.cri.stop_and_remove_pod(pod_id)
            count += 1
        done.append(count)

    relist = report.figure("churn-relist", f"relist under churn ({plan.churn_clients} clients "
                           "cycling pods), each relist", "ms").of(runtime.name)
    probed = [runtime] if idle is None else [runtime, idle]
    prober = start_relist_prober(probed, plan.churn_seconds, plan.relist_interval)
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(plan.churn_clients) as pool:
            cyclers = [pool.submit(cycle, i) for i in range(plan.churn_clients)]
            for cycler in cyclers:
                cycler.result()
    finally:
        samples = relist_samples(prober)
        relist.samples += samples[0]
        if idle is not None:
            report.figure("churn-relist-idle", f"the same relist of an idle flatpod "
                          f"({plan.churn_clients} pods) in the same seconds: the floor",
                          "ms").of(runtime.name).samples += samples[1]
    rate = sum(done) / (time.monotonic() - started)
    report.figure("churn-rate", "pod lifecycles completed per second under churn (higher is "
                  "better)", "/s").of(runtime.name).samples.append(rate)


def start_relist_prober(runtimes: list[Runtime], seconds: float,
                        interval: float) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join((str(HACK), str(REPO))))
    return subprocess.Popen(
        [sys.executable, "-m", "benchlib.relistprobe", str(seconds), str(interval),
         *(str(runtime.socket) for runtime in runtimes)],
        stdout=subprocess.PIPE, text=True, env=env)


def relist_samples(prober: subprocess.Popen[str]) -> list[list[float]]:
    """The prober's samples (ms) per socket, once it has finished; an error naming its exit
    status."""
    try:
        out, _ = prober.communicate(timeout=RELIST_PROBER_GRACE_S)
    except subprocess.TimeoutExpired:
        prober.kill()
        prober.wait()
        raise
    if prober.returncode != 0:
        raise RuntimeError(f"relist prober exited with status {prober.returncode}")
    samples: list[list[float]] = json.loads(out)
    return samples


def start_idle_pods(idle: Runtime, pods: int) -> None:
    """As many pods as the churn keeps in flight, each with one running container."""
    for _ in range(pods):
        config = idle.new_pod_config()
        idle.cri.create_and_start(idle.run_pod(config), config, sleeper_config())


def run_churn(report: Report, runtimes: list[Runtime], plan: Plan,
              idle: Runtime | None = None) -> None:
    """`plan.churn_rounds` rounds, each runtime in turn, the order flipping every round."""
    if idle is not None:
        start_idle_pods(idle, plan.churn_clients)
    for round_ in range(plan.churn_rounds):
        for runtime in runtimes if round_ % 2 == 0 else runtimes[::-1]:
            try:
                churn(report, runtime, plan, idle)
            except Exception as err:  # a failing runtime is reported, the others go on
                report.figure("churn-rate", "pod lifecycles per second under churn", "/s").of(
                    runtime.name).error = describe(err)
            reset(runtimes)


def run_latencies(report: Report, runtimes: list[Runtime], plan: Plan, only: set[str]) -> None:
    if "runpod" in only:
        alternate(report, "runpod", "RunPodSandbox", "ms", runtimes, plan.runs, sample_run_pod)
        reset(runtimes)
    if "create-start" in only:
        pods: dict[str, tuple[str, pb.PodSandboxConfig]] = {}
        with contextlib.ExitStack() as stack:
            beside = (container_floor_sampler(report, stack) if "floor" in only else None)
            alternate(report, "create-start", "CreateContainer+StartContainer (sleep)", "ms",
                      runtimes, plan.runs, create_start_sampler(pods), beside=beside)
        reset(runtimes)
    if "stop-remove" in only:
        alternate(report, "stop-remove", "StopPodSandbox+RemovePodSandbox (1 ctr)", "ms",
                  runtimes, plan.runs, sample_stop_remove)
        reset(runtimes)
    if "concurrent" in only:
        n = plan.concurrent_pods
        alternate(report, "concurrent", f"{n} RunPodSandbox concurrently, wall", "ms",
                  runtimes, plan.heavy_runs, concurrent_sampler(n))
        reset(runtimes)
    if "pull" in only and plan.big_image:
        alternate(report, "pull", "PullImage ~100 MB, 6 layers (after RemoveImage)", "ms",
                  runtimes, plan.heavy_runs, pull_sampler(plan.big_image))


# ---- at scale: relist, stats, memory ---------------------------------------------------------


def scale_up(runtime: Runtime, plan: Plan) -> float:
    def one_pod(_: int) -> None:
        config = runtime.new_pod_config()
        pod_id = runtime.run_pod(config)
        for _k in range(plan.containers_per_pod):
            runtime.cri.create_and_start(pod_id, config, sleeper_config())

    with ThreadPoolExecutor(plan.setup_threads) as pool:
        return timed(lambda: list(pool.map(one_pod, range(plan.pods))))


def sample_relist(runtime: Runtime) -> float:
    start = time.perf_counter()
    runtime.cri.list_pods()
    runtime.cri.list_containers()
    return time.perf_counter() - start


def sample_stats(runtime: Runtime) -> float:
    return timed(runtime.cri.list_container_stats)


def settle_page_merging(report: Report) -> None:
    """Waits for ksmd to make four full passes, so that shims are measured as they stay
    once merged (measure_memory_both_ways starts ksmd); notes what ksmd cost."""
    if ksm.ksmd_state() != "1":
        report.notes.append("ksmd is not running: shim pages are measured unmerged")
        return
    first, cpu_before, began = procs.ksm_full_scans(), procs.ksmd_cpu_seconds(), time.monotonic()
    while (procs.ksm_full_scans() < first + KSM_SETTLE_PASSES
           and time.monotonic() - began < KSM_SETTLE_LIMIT_S):
        time.sleep(1)
    elapsed = time.monotonic() - began
    cpu = procs.ksmd_cpu_seconds() - cpu_before
    report.notes.append(
        f"ksmd: {procs.ksm_full_scans() - first} full passes in {elapsed:.0f} s before the memory "
        f"figures, using {100 * cpu / elapsed:.1f}% of one CPU meanwhile")


def measure_memory_both_ways(report: Report, runtimes: list[Runtime], plan: Plan) -> None:
    """Shim memory as flatpod leaves it by default (ksmd is the operator's: stopped here, the
    shims' pages stay unmerged), then with ksmd started by the bench and settled (unless
    `--no-ksm`); main() stops ksmd again if it was stopped before."""
    if ksm.ksmd_state() == "0":
        for runtime in runtimes:
            measure_shims(report, runtime, runtime.pauses_and_shims(), plan.pods, "-no-ksmd",
                          " without ksmd")
        if not plan.page_merging:
            for runtime in runtimes:
                measure_helpers(report, runtime, plan.pods)
            return
        ksm.set_ksmd_state("1")
    elif ksm.ksmd_state() == "1":
        report.notes.append("ksmd was already running: no figures for shims without merging")
    settle_page_merging(report)
    for runtime in runtimes:
        measure_memory(report, runtime, plan.pods)


def measure_shims(report: Report, runtime: Runtime, pairs: list[tuple[int, int]], pods: int,
                  key_suffix: str = "", title_suffix: str = "") -> None:
    """USS and PSS per pod of the shims and pauses in `pairs` ((pause, shim) pids)."""
    figures = {
        "shim-uss": ("shim USS per pod", 0), "shim-pss": ("shim PSS per pod", 1),
        "pause-uss": ("pause USS per pod", 0), "pause-pss": ("pause PSS per pod", 1),
    }
    for key, (title, index) in figures.items():
        series = report.figure(at_scale(key + key_suffix, pods),
                               f"{title} at {pods} pods{title_suffix}", "MiB").of(runtime.name)
        for pause, shim in pairs:
            pid = shim if key.startswith("shim") else pause
            try:
                series.samples.append(procs.uss_pss_mib(pid)[index])
            except OSError as err:
                series.error = f"{pid}: {err}"


def measure_memory(report: Report, runtime: Runtime, pods: int) -> None:
    measure_shims(report, runtime, runtime.pauses_and_shims(), pods)
    measure_helpers(report, runtime, pods)


def measure_helpers(report: Report, runtime: Runtime, pods: int) -> None:
    """Notes the helpers' memory (flatpod's zygote) and how many shims were found."""
    pairs = runtime.pauses_and_shims()
    table = procs.snapshot()
    for role, pid in runtime.describe_processes(table, {s for _, s in pairs}).items():
        uss, pss = procs.uss_pss_mib(pid)
        report.notes.append(f"{runtime.name} helper {role}: USS {uss:.1f} MiB, "
                            f"PSS {pss:.1f} MiB, RSS {procs.rss_mib(pid):.1f} MiB")
    report.notes.append(f"{runtime.name}: {len(pairs)} pause/shim pairs found for {pods} pods, "
                        f"{len({s for _, s in pairs})} distinct shims")


def measure_restart(report: Report, runtime: Runtime, plan: Plan) -> None:
    """The daemon restarted with every pod running: seconds to its first answered RPC, then
    checks that every pod and container came back as it was (ready, running)."""
    series = report.figure(at_scale("restart", plan.pods), f"restart to first RPC at "
                           f"{plan.pods} pods, all recovered", "s").of(runtime.name)
    try:
        elapsed = runtime.restart()
    except Exception as err:
        series.error = describe(err)
        return
    if elapsed is None:
        series.unsupported = True
        return
    ready = [p for p in runtime.cri.list_pods() if p.state == pb.SANDBOX_READY]
    running = [c for c in runtime.cri.list_containers() if c.state == pb.CONTAINER_RUNNING]
    want = (plan.pods, plan.pods * plan.containers_per_pod)
    if (len(ready), len(running)) != want:
        series.error = (f"after the restart {len(ready)} pods ready and {len(running)} "
                        f"containers running, not {want[0]} and {want[1]}")
    series.samples.append(elapsed)


def measure_daemon_rss(report: Report, runtime: Runtime, pods: int) -> None:
    daemon = runtime.daemon_pid()
    title = f"daemon RSS at {pods} pods"
    report.figure(at_scale("daemon-rss", pods), title, "MiB").of(runtime.name).samples.append(
        procs.rss_mib(daemon) if daemon and os.path.exists(f"/proc/{daemon}") else 0.0)


def run_at_scale(report: Report, runtimes: list[Runtime], plan: Plan, only: set[str]) -> None:
    n_ctr = plan.pods * plan.containers_per_pod
    scale = f"{plan.pods} pods + {n_ctr} ctrs"
    live = []
    for runtime in runtimes:
        series = report.figure(at_scale("scale-up", plan.pods),
                               f"scale-up {scale} ({plan.setup_threads} thr)", "s").of(runtime.name)
        _take(series, runtime, lambda r: scale_up(r, plan), 1.0)
        if series.error is None:
            live.append(runtime)
    if "relist" in only:
        alternate(report, at_scale("relist", plan.pods),
                  f"ListPodSandbox+ListContainers at {scale}", "ms", live, plan.runs, sample_relist)
    if "stats" in only:
        alternate(report, at_scale("stats", plan.pods), f"ListContainerStats at {n_ctr} ctrs", "ms",
                  live, plan.runs, sample_stats)
    for runtime in live:  # one sample each, with every pod up (cheap: always)
        measure_daemon_rss(report, runtime, plan.pods)
    if "memory" in only:
        measure_memory_both_ways(report, live, plan)
    if "restart" in only:
        for runtime in live:
            measure_restart(report, runtime, plan)
    down = report.figure(at_scale("scale-down", plan.pods),
                         f"scale-down {scale} ({plan.setup_threads} thr)", "s")
    for runtime in runtimes:
        series = down.of(runtime.name)
        _take(series, runtime, lambda r: timed(r.remove_bench_pods), 1.0)
