"""hack/grpc-floor: what one cheap CRI call costs a gRPC server, flatpod's against bare servers
of several arrangements and containerd, each asked by the same client in a process of its own.

Three roles, one module:
* `serve VARIANT SOCKET`: a server variant (below) answering Version and ImageStatus from
  constant answers, so that only the gRPC stack and its arrangement are measured;
* `client SOCKET METHOD CALLS WARMUP IMAGE`: the Python client, one channel, calls back to
  back, each call's wall time in ms on a line (the Go client prints the same);
* the driver: starts every target, then rounds; each round asks every target once (the order
  rotates and flips, so load drift hits all), and notes the server's CPU time per call.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

from benchlib.cri import LOOKUP_IMAGE, describe
from benchlib.stats import Series
from cri_api import api_pb2 as pb

HACK = Path(__file__).resolve().parents[1]
REPO = HACK.parent
METHODS: dict[str, tuple[str, str, type[Message]]] = {
    "version": ("runtime.v1.RuntimeService", "Version", pb.VersionRequest),
    "imagestatus": ("runtime.v1.ImageService", "ImageStatus", pb.ImageStatusRequest)}
SERVER_START_TIMEOUT = 30.0

# What the bare servers answer: flatpod's Version, and an ImageStatus of the lookup image
# about the size of flatpod's and containerd's (~400 bytes).
VERSION = pb.VersionResponse(version="0.1.0", runtime_name="flatpod", runtime_version="0.1.0",
                             runtime_api_version="v1")
IMAGE_STATUS = pb.ImageStatusResponse(image=pb.Image(
    id="sha256:" + "ab" * 32, repo_tags=[LOOKUP_IMAGE],
    repo_digests=["registry.k8s.io/docker/library/busybox@sha256:" + "cd" * 32],
    size=4_500_000, uid=pb.Int64Value(value=0), spec=pb.ImageSpec(image="sha256:" + "ab" * 32)))


# ---- the server variants ------------------------------------------------------------------


@dataclass
class Variant:
    """`kind[+modifier...]`: kind is `generic` (grpc.aio, a generic handler), `registered`
    (grpc.aio, add_registered_method_handlers), `server.py` (sandbox/server.py's build_server
    with constant handlers: flatpod's own HTTP/2 server, or grpc.aio with the modifier
    `grpcio`), `sync` (grpc.server on a thread pool). Modifiers: `asyncio`
    (default uvloop), `switch=S` (sys.setswitchinterval), `gc=N` (gc.set_threshold(N): the
    allocations between young collections), `cpus=A:B` (the server's threads on those CPUs
    only), `threads=N` (sync's pool, default 4),
    `opt:KEY=VALUE` (a server option; integer values as integers), `env:K=V` (the server's
    environment), `tree=DIR` (import sandbox/ from another checkout, for an A/B of server.py)."""

    spec: str
    kind: str = "generic"
    loop: str = "uvloop"
    switch_interval: float | None = None
    gc_threshold: int | None = None
    cpus: set[int] = field(default_factory=set)
    threads: int = 4
    options: list[tuple[str, str | int]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    tree: str = ""
    server_kind: str = "flatpod"  # server.py's grpc_server

    @classmethod
    def parse(cls, spec: str) -> Variant:
        kind, *mods = spec.split("+")
        if kind not in ("generic", "registered", "server.py", "sync"):
            raise ValueError(f"variant {spec!r}: unknown kind {kind!r}")
        variant = cls(spec, kind)
        for mod in mods:
            if mod in ("asyncio", "uvloop"):
                variant.loop = mod
            elif mod.startswith("switch="):
                variant.switch_interval = float(mod.removeprefix("switch="))
            elif mod.startswith("gc="):
                variant.gc_threshold = int(mod.removeprefix("gc="))
            elif mod.startswith("cpus="):
                variant.cpus = {int(c) for c in mod.removeprefix("cpus=").split(":")}
            elif mod.startswith("threads="):
                variant.threads = int(mod.removeprefix("threads="))
            elif mod.startswith("opt:"):
                key, _, value = mod.removeprefix("opt:").partition("=")
                variant.options.append((key, int(value) if value.lstrip("-").isdigit()
                                        else value))
            elif mod.startswith("env:"):
                key, _, value = mod.removeprefix("env:").partition("=")
                variant.env[key] = value
            elif mod == "grpcio":
                variant.server_kind = mod
            elif mod.startswith("tree="):
                variant.tree = mod.removeprefix("tree=")
            else:
                raise ValueError(f"variant {spec!r}: unknown modifier {mod!r}")
        return variant


async def _version(request: pb.VersionRequest, context: Any) -> bytes:
    return VERSION.SerializeToString()


async def _image_status(request: pb.ImageStatusRequest, context: Any) -> bytes:
    return IMAGE_STATUS.SerializeToString()


def _sync_version(request: pb.VersionRequest, context: Any) -> bytes:
    return VERSION.SerializeToString()


def _sync_image_status(request: pb.ImageStatusRequest, context: Any) -> bytes:
    return IMAGE_STATUS.SerializeToString()


def _method_handlers(sync: bool) -> dict[str, dict[str, grpc.RpcMethodHandler[Any, Any]]]:
    """Service -> method -> handler: answers are bytes already (no response serializer)."""
    by_service: dict[str, dict[str, grpc.RpcMethodHandler[Any, Any]]] = {}
    funcs = {"version": _sync_version if sync else _version,
             "imagestatus": _sync_image_status if sync else _image_status}
    for key, (service, method, request) in METHODS.items():
        by_service.setdefault(service, {})[method] = grpc.unary_unary_rpc_method_handler(
            funcs[key], request_deserializer=request.FromString)
    return by_service


def _add_handlers(server: Any, variant: Variant) -> None:
    for service, methods in _method_handlers(variant.kind == "sync").items():
        if variant.kind == "registered":
            server.add_registered_method_handlers(service, methods)
        else:
            server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(service, methods),))


async def _serve_aio(variant: Variant, socket: str) -> None:
    if variant.kind == "server.py":
        from sandbox.server import build_server

        async def version(runtime: Any, request: Any) -> pb.VersionResponse:
            return pb.VersionResponse(version="0.1.0", runtime_name="flatpod",
                                      runtime_version="0.1.0", runtime_api_version="v1")

        async def image_status(runtime: Any, request: Any) -> bytes:
            return IMAGE_STATUS.SerializeToString()

        own = build_server(None, {"RuntimeService/Version": version,
                                  "ImageService/ImageStatus": image_status},
                           kind=variant.server_kind)
        await own.start(Path(socket))
        await asyncio.Event().wait()  # until the bench kills it
        return
    else:
        server = grpc.aio.server(options=variant.options)
        _add_handlers(server, variant)
    server.add_insecure_port(f"unix://{socket}")
    await server.start()
    await server.wait_for_termination()


def serve(variant_spec: str, socket: str) -> None:
    variant = Variant.parse(variant_spec)
    if variant.switch_interval is not None:
        sys.setswitchinterval(variant.switch_interval)
    if variant.cpus:
        os.sched_setaffinity(0, variant.cpus)  # before grpc starts its threads: they inherit it
    if variant.gc_threshold is not None:
        gc.set_threshold(variant.gc_threshold)
    if variant.kind == "sync":
        server = grpc.server(ThreadPoolExecutor(variant.threads), options=variant.options)
        _add_handlers(server, variant)
        server.add_insecure_port(f"unix://{socket}")
        server.start()
        server.wait_for_termination()
        return
    factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    if variant.loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_serve_aio(variant, socket))


# ---- the Python client --------------------------------------------------------------------


def client(socket: str, method: str, calls: int, warmup: int, image: str) -> None:
    service, name, request_type = METHODS[method]
    channel = grpc.insecure_channel(f"unix://{socket}")
    call = channel.unary_unary(f"/{service}/{name}", request_serializer=lambda m: m,
                               response_deserializer=None)
    request = (pb.ImageStatusRequest(image=pb.ImageSpec(image=image)) if method == "imagestatus"
               else request_type()).SerializeToString()
    for _ in range(warmup):
        call(request, timeout=10)
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        call(request, timeout=10)
        samples.append(time.perf_counter() - started)
    channel.close()
    sys.stdout.write("".join(f"{s * 1000:.4f}\n" for s in samples))


# ---- the driver -----------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    socket: Path
    pid: Callable[[], int]
    methods: tuple[str, ...] = tuple(METHODS)
    process: subprocess.Popen[bytes] | None = None
    samples: dict[str, Series] = field(default_factory=dict)
    round_medians: dict[str, list[float]] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)


def process_cpu_seconds(pid: int) -> float:
    """CPU time of every live thread of `pid` so far (schedstat: ns, where /proc/PID/stat
    counts 10 ms ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            continue  # the thread ended meanwhile
    return total / 1e9


def start_variant(spec: str, socket: Path, log: Path) -> subprocess.Popen[bytes]:
    variant = Variant.parse(spec)
    env = dict(os.environ, **variant.env)
    env["PYTHONPATH"] = os.pathsep.join([str(HACK), variant.tree or str(REPO)])
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, str(HACK / "grpc-floor"), "serve", spec,
                                 str(socket)], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)


def start_command(command: str, socket: Path, log: Path) -> subprocess.Popen[bytes]:
    """An outside server (e.g. a reference one kept out of the repo): `{socket}` in its command
    line is replaced by the socket path."""
    argv = [arg.replace("{socket}", str(socket)) for arg in shlex.split(command)]
    with log.open("ab") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_socket(target: Target, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while not target.socket.exists():
        if target.process is not None and target.process.poll() is not None:
            raise RuntimeError(f"{target.name} exited: {log.read_text(errors='replace')[-800:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{target.name}: no socket after {SERVER_START_TIMEOUT:.0f} s")
        time.sleep(0.02)


def client_argv(args: argparse.Namespace, target: Target, method: str) -> list[str]:
    if args.go_client:
        return [args.go_client, "-socket", str(target.socket), "-method", method,
                "-calls", str(args.calls), "-warmup", str(args.warmup), "-image", args.image]
    return [sys.executable, str(HACK / "grpc-floor"), "client", str(target.socket), method,
            str(args.calls), str(args.warmup), args.image]


def measure(args: argparse.Namespace, target: Target, method: str) -> None:
    pid = target.pid()
    cpu_before = process_cpu_seconds(pid)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HACK), str(REPO)]))
    result = subprocess.run(client_argv(args, target, method), capture_output=True, text=True,
                            env=env, timeout=600, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"client against {target.name} {method}: {result.stderr[-800:]}")
    cpu = process_cpu_seconds(pid) - cpu_before
    samples = [float(line) for line in result.stdout.split()]
    target.samples.setdefault(method, Series()).samples.extend(samples)
    target.round_medians.setdefault(method, []).append(statistics.median(samples))
    target.cpu_seconds[method] = target.cpu_seconds.get(method, 0.0) + cpu
    target.calls[method] = target.calls.get(method, 0) + args.calls + args.warmup


def run_rounds(args: argparse.Namespace, targets: list[Target]) -> None:
    for round_no in range(args.rounds):
        order = targets[round_no % len(targets):] + targets[:round_no % len(targets)]
        if round_no % 2:
            order.reverse()
        for method in args.methods:
            for target in order:
                if method in target.methods:
                    measure(args, target, method)
        print(f"[grpc-floor {time.strftime('%H:%M:%S')}] round {round_no + 1}/{args.rounds}, "
              f"load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)


def print_table(args: argparse.Namespace, targets: list[Target], load: tuple[float, float]) -> None:
    reference = next((t for t in targets if t.name == "containerd"), None)
    client_name = "Go (grpc-go)" if args.go_client else "Python (grpcio sync)"
    print(f"\nper-call wall time, ms: {args.rounds} rounds x {args.calls} calls "
          f"(+{args.warmup} warm-up) per target, client {client_name}; "
          f"load {load[0]:.2f} -> {load[1]:.2f}")
    print(f"{'target':<44} {'method':<12} {'median':>7} {'p90':>7} {'rounds':>13} "
          f"{'srv cpu us':>10} {'x ctrd':>7}")
    for method in args.methods:
        for target in targets:
            series = target.samples.get(method)
            if series is None or not series.samples:
                continue
            med, p90 = series.median() or 0.0, series.p90() or 0.0
            rounds = target.round_medians[method]
            cpu = target.cpu_seconds[method] / target.calls[method] * 1e6
            ratio = ""
            ref = reference.samples.get(method) if reference else None
            if ref is not None and ref.samples:
                ratio = f"{med / (ref.median() or 1.0):.2f}"
            print(f"{target.name:<44} {method:<12} {med:7.3f} {p90:7.3f} "
                  f"{min(rounds):6.3f}-{max(rounds):6.3f} {cpu:10.0f} {ratio:>7}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="grpc-floor")
    parser.add_argument("--variants", default="generic",
                        help="comma-separated server variants (Variant's doc); '' for none")
    parser.add_argument("--server", action="append", default=[], metavar="NAME=COMMAND",
                        help="an outside server; {socket} in COMMAND is its socket path")
    parser.add_argument("--flatpod", action="store_true", help="flatpod serve of this checkout")
    parser.add_argument("--flatpod-env", action="append", default=[], metavar="K=V",
                        help="one more flatpod serve with this variable set (an A/B)")
    parser.add_argument("--containerd", action="store_true",
                        help="the conformance harness's containerd, the reference")
    parser.add_argument("--methods", default="version,imagestatus")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--go-client", default="", help="path of the Go client binary")
    parser.add_argument("--image", default=LOOKUP_IMAGE)
    args = parser.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; known: {sorted(METHODS)}")
    return args


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        serve(argv[1], argv[2])
        return 0
    if argv[:1] == ["client"]:
        client(argv[1], argv[2], int(argv[3]), int(argv[4]), argv[5])
        return 0
    args = parse_args(argv)
    # /run: short socket paths; the runtimes' roots go below it too and are removed at the end
    work = Path(tempfile.mkdtemp(prefix="fp-grpc-floor-", dir="/run"))
    targets: list[Target] = []
    runtimes: list[Any] = []
    load_start = os.getloadavg()[0]
    try:
        targets += start_runtimes(args, work, runtimes)
        for index, spec in enumerate(s for s in args.variants.split(",") if s):
            targets.append(start_target(spec, work / f"v{index}.sock", work / f"v{index}.log",
                                        start_variant))
        for index, named in enumerate(args.server):
            name, _, command = named.partition("=")
            targets.append(start_target(command, work / f"s{index}.sock",
                                        work / f"s{index}.log", start_command, name))
        run_rounds(args, targets)
        print_table(args, targets, (load_start, os.getloadavg()[0]))
    finally:
        for target in targets:
            if target.process is not None:
                target.process.terminate()
                target.process.wait(10)
        for runtime in runtimes:
            for item in runtime.stop():
                print(f"LEFTOVER {runtime.name}: {item}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
    return 0


def start_target(spec: str, socket: Path, log: Path,
                 start: Callable[[str, Path, Path], subprocess.Popen[bytes]],
                 name: str = "") -> Target:
    process = start(spec, socket, log)
    target = Target(name or spec, socket, lambda: process.pid, process=process)
    wait_for_socket(target, log)
    return target


def start_runtimes(args: argparse.Namespace, work: Path, runtimes: list[Any]) -> list[Target]:
    """flatpod and containerd as hack/bench starts them, the lookup image pulled into each;
    one more flatpod per `--flatpod-env`, started with that variable (its own root, bridge
    and subnet)."""
    from benchlib.runtimes import Containerd, Flatpod

    targets = []
    chosen: list[tuple[Any, dict[str, str]]] = []
    flatpods: list[dict[str, str]] = [{}] if args.flatpod else []
    flatpods += [dict([setting.split("=", 1)]) for setting in args.flatpod_env]
    for slot, env in enumerate(flatpods):
        (work / f"flatpod{slot}").mkdir()
        flatpod = Flatpod(work / f"flatpod{slot}", slot=slot)
        flatpod.name = " ".join(["flatpod", *(f"{k}={v}" for k, v in env.items())])
        chosen.append((flatpod, env))
    if args.containerd:
        chosen.append((Containerd(work), {}))
    for runtime, env in chosen:
        runtimes.append(runtime)
        saved = dict(os.environ)
        os.environ.update(env)  # Flatpod spawns its daemon with this process's environment
        try:
            runtime.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        if "imagestatus" in args.methods:
            if isinstance(runtime, Containerd):
                runtime.remember_image(args.image)
            try:
                runtime.cri.pull(args.image)
            except grpc.RpcError as err:
                raise RuntimeError(f"{runtime.name}: pull {args.image}: {describe(err)}") from err
        runtime.close()
        targets.append(Target(runtime.name, runtime.socket, runtime.daemon_pid))
    return targets

