"""hack/bench's command line: start the runtimes, run the workloads, print the table."""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from benchlib import floor, stats
from benchlib.bigimage import ensure_pushed
from benchlib.cri import BUSYBOX, LOOKUP_IMAGE, describe
from benchlib.runtimes import Containerd, Flatpod, Runtime
from benchlib.stats import Report
from benchlib.workloads import (
    CONTAINER_FLOOR,
    CONTAINER_FLOOR_RUNC,
    FLOOR_SERIES,
    MS,
    POD_FLOOR,
    RELIST_INTERVAL_S,
    Plan,
    run_at_scale,
    run_churn,
    run_latencies,
    run_lookups,
)
from shim import ksm

WORKLOADS = ("runpod", "create-start", "stop-remove", "concurrent", "lookups", "relist",
             "stats", "memory", "restart", "pull", "churn", "floor")
AT_SCALE = {"relist", "stats", "memory", "restart"}
FLOOR_KEYS = {POD_FLOOR, CONTAINER_FLOOR, CONTAINER_FLOOR_RUNC}  # printed under the table


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hack/bench", description=__doc__)
    parser.add_argument("--flatpod", action="store_true", help="measure flatpod (from this repo)")
    parser.add_argument("--containerd", action="store_true",
                        help="measure containerd (../shared/conformance/containerd.sh)")
    parser.add_argument("--event-loops", default="",
                        help="flatpod's event_loop: one (asyncio or uvloop), or both "
                        "comma-separated for an A/B of two flatpods in the same run")
    parser.add_argument("--ab-env", default="",
                        help="NAME=VALUE: an A/B of two flatpods in the same run, the second "
                        "with this in its environment (e.g. FLATPOD_GC=default)")
    parser.add_argument("--ab-config", default="",
                        help="KEY=VALUE: an A/B of two flatpods in the same run, the second "
                        "with this top-level config key (e.g. grpc_server=grpcio)")
    parser.add_argument("--runs", type=int, default=20, help="samples per latency (20)")
    parser.add_argument("--heavy-runs", type=int, default=5,
                        help="samples of the 20-pod burst and of the 100 MB pull (5)")
    parser.add_argument("--pods", type=pod_counts, default=[100],
                        help="pods for the at-scale figures, 2 containers each (100); a "
                        "comma-separated list (50,100,250) measures each size in turn and "
                        "adds a growth table")
    parser.add_argument("--no-ksm", action="store_true",
                        help="memory figures without ksmd only: never start ksmd, skip its "
                        "settling (up to 300 s)")
    parser.add_argument("--churn-clients", type=int, default=8,
                        help="clients cycling pod lifecycles in the churn workload (8)")
    parser.add_argument("--churn-seconds", type=float, default=60.0,
                        help="how long the churn workload runs per runtime (60)")
    parser.add_argument("--churn-rounds", type=int, default=1,
                        help="churn runs per runtime, interleaved, the order flipping (1)")
    parser.add_argument("--relist-interval", type=float, default=RELIST_INTERVAL_S,
                        help="seconds between the churn's relists (1: kubelet's pace)")
    parser.add_argument("--no-churn-floor", action="store_true",
                        help="no idle flatpod probed beside the churn (the floor)")
    parser.add_argument("--only", default="",
                        help="comma-separated subset of: " + ",".join(WORKLOADS))
    parser.add_argument("--json", type=Path, help="write every raw sample here")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    args = parser.parse_args(argv)
    if not (args.flatpod or args.containerd):
        parser.error("give --flatpod and/or --containerd")
    only = {w for w in args.only.split(",") if w} or set(WORKLOADS)
    unknown = only - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
    args.only = only
    if args.churn_rounds < 1 or args.relist_interval <= 0:
        parser.error("--churn-rounds: at least 1; --relist-interval: above 0")
    args.event_loops = [loop for loop in args.event_loops.split(",") if loop] or [""]
    if not set(args.event_loops) <= {"asyncio", "uvloop", ""}:
        parser.error(f"--event-loops: asyncio or uvloop, got {args.event_loops}")
    if args.ab_env and "=" not in args.ab_env:
        parser.error(f"--ab-env: NAME=VALUE, got {args.ab_env!r}")
    if args.ab_config and "=" not in args.ab_config:
        parser.error(f"--ab-config: KEY=VALUE, got {args.ab_config!r}")
    if sum((bool(args.ab_env), bool(args.ab_config), len(args.event_loops) > 1)) > 1:
        parser.error("--ab-env, --ab-config and two --event-loops: one A/B at a time")
    return args


def pod_counts(text: str) -> list[int]:
    try:
        counts = [int(n) for n in text.split(",") if n]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--pods: not a list of numbers: {text!r}") from None
    if not counts or any(n < 1 for n in counts):
        raise argparse.ArgumentTypeError(f"--pods: give pod counts of at least 1: {text!r}")
    return counts


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}] {message}",
          file=sys.stderr, flush=True)


def start_all(runtimes: list[Runtime]) -> None:
    for runtime in runtimes:
        log(f"starting {runtime.name}")
        runtime.start()
        log(f"{runtime.name}: {runtime.cri.version()} on {runtime.socket}")
        if isinstance(runtime, Containerd):
            runtime.remember_image(BUSYBOX)
        runtime.cri.pull(BUSYBOX)


def stop_all(runtimes: list[Runtime], report: Report) -> bool:
    clean = True
    for runtime in runtimes:
        log(f"stopping {runtime.name}")
        try:
            left = runtime.stop()
        except Exception as err:
            left = [f"stop failed: {describe(err)}"]
        for item in left:
            report.notes.append(f"LEFTOVER {runtime.name}: {item}")
        if left:
            clean = False
        else:
            report.notes.append(f"{runtime.name}: stopped, nothing left behind "
                                "(processes, cgroups, netns, mounts checked)")
    return clean


def run_floor(report: Report, runs: int) -> None:
    series = report.figure(POD_FLOOR, "floor: runc create+start catatonit alone",
                           "ms").of(FLOOR_SERIES)
    try:
        series.samples = [s * MS for s in floor.runc_floor(runs)]
    except Exception as err:
        series.error = describe(err)


def run_workloads(report: Report, runtimes: list[Runtime], plan: Plan, only: set[str],
                  pod_sizes: list[int], idle: Runtime | None) -> None:
    if "pull" in only:
        log("pushing the big image (once)")
        plan.big_image = ensure_pushed()
        for runtime in runtimes:
            if isinstance(runtime, Containerd):
                runtime.remember_image(plan.big_image)
    log("latencies")
    run_latencies(report, runtimes, plan, only)
    if "lookups" in only:
        log("lookups")
        for runtime in runtimes:
            if isinstance(runtime, Containerd):
                runtime.remember_image(LOOKUP_IMAGE)
        run_lookups(report, runtimes, plan)
    if "churn" in only:
        log(f"churn: {plan.churn_clients} clients for {plan.churn_seconds:.0f} s each, "
            f"{plan.churn_rounds} round(s)")
        run_churn(report, runtimes, plan, idle)
    if only & AT_SCALE:
        for pods in pod_sizes:
            log(f"at scale: {pods} pods")
            run_at_scale(report, runtimes, replace(plan, pods=pods), only)
    if "floor" in only:
        log("runc floor")
        run_floor(report, plan.runs)


def print_report(report: Report, runtimes: list[Runtime]) -> None:
    names = [r.name for r in runtimes]
    floors = {f.key: f.of(FLOOR_SERIES) for f in report.figures if f.key in FLOOR_KEYS}
    figures = [f for f in report.figures if f.key not in FLOOR_KEYS]
    print(stats.format_table(Report(figures=figures), names))
    if len(report.meta["pods"]) > 1:
        print()
        print(stats.format_growth(report, names, report.meta["pods"]))
    pod_floor = floors.get(POD_FLOOR)
    if pod_floor is not None and pod_floor.samples:
        print(f"\nfloor, runc create+start of catatonit alone: median {pod_floor.median():.1f} ms, "
              f"p90 {pod_floor.p90():.1f} ms ({len(pod_floor.samples)} runs)")
    ctr_floor = floors.get(CONTAINER_FLOOR)
    if ctr_floor is not None and ctr_floor.samples:
        print(container_floor_line(report, names, ctr_floor, floors[CONTAINER_FLOOR_RUNC]))
    for line in stats.format_errors(report) + report.notes:
        print(line)
    meta = report.meta
    print(f"load avg (1 min) at start {meta['load_start']:.2f}, at end {meta['load_end']:.2f}; "
          f"runs {meta['runs']}, heavy runs {meta['heavy_runs']}, pods {meta['pods']}, "
          f"wall {meta['wall_s']:.0f} s")


def container_floor_line(report: Report, names: list[str], total: stats.Series,
                         runc: stats.Series) -> str:
    """The container floor, and each runtime's Create+Start (same rounds) as a multiple of it."""
    floor_ms = total.median() or 0.0
    line = (f"\ncontainer floor, overlay mount + runc run --detach into a pause's namespaces: "
            f"median {floor_ms:.1f} ms (runc run alone {runc.median() or 0.0:.1f}), p90 "
            f"{total.p90() or 0.0:.1f} ms ({len(total.samples)} runs, interleaved with "
            "Create+Start)")
    figure = next((f for f in report.figures if f.key == "create-start"), None)
    for name in names if figure is not None and floor_ms else []:
        median = figure.of(name).median() if figure is not None else None
        if median is not None:
            line += f"\n  {name} Create+Start {median:.1f} ms = {median / floor_ms:.2f}x the floor"
    return line


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fpbench-", dir="/var/tmp"))
    runtimes: list[Runtime] = []
    first_slot = secrets.randbelow(4)
    if args.flatpod:
        runtimes += [Flatpod(work, loop, first_slot + i)
                     for i, loop in enumerate(args.event_loops)]
        if args.ab_env:
            name, _, value = args.ab_env.partition("=")
            runtimes.append(Flatpod(work, args.event_loops[0], first_slot + 1, {name: value}))
        if args.ab_config:
            key, _, value = args.ab_config.partition("=")
            runtimes.append(Flatpod(work, args.event_loops[0], first_slot + 1,
                                    settings={key: value}))
    if args.containerd:
        runtimes.append(Containerd(work))
    # The churn's floor: a flatpod that only answers the relist (its own slot, after the A/B's).
    idle = (Flatpod(work, slot=first_slot + 2, name="flatpod-idle")
            if "churn" in args.only and not args.no_churn_floor else None)
    plan = Plan(runs=args.runs, heavy_runs=args.heavy_runs, pods=args.pods[0],
                churn_clients=args.churn_clients, churn_seconds=args.churn_seconds,
                churn_rounds=args.churn_rounds, relist_interval=args.relist_interval,
                page_merging=not args.no_ksm)
    report = Report(meta={"runs": args.runs, "heavy_runs": args.heavy_runs, "pods": args.pods,
                          "only": sorted(args.only), "load_start": os.getloadavg()[0],
                          "nproc": os.cpu_count()})
    began = time.monotonic()
    clean = False
    ksmd_before = ksm.ksmd_state()
    try:
        start_all(runtimes + ([idle] if idle is not None else []))
        run_workloads(report, runtimes, plan, args.only, args.pods, idle)
    except (Exception, KeyboardInterrupt) as err:
        report.notes.append(f"ABORTED: {describe(err)}")
    finally:
        clean = stop_all(runtimes + ([idle] if idle is not None else []), report)
        if ksmd_before == "0" and ksm.ksmd_state() == "1":  # flatpod started it
            ksm.set_ksmd_state("0")
            report.notes.append("ksmd stopped again, as it was before the bench")
        for runtime in runtimes:
            if isinstance(runtime, Flatpod) and report_has_errors(report):
                report.notes.append(f"flatpod log tail:\n{runtime.log_tail()}")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            report.notes.append(f"work dir kept: {work}")
    report.meta.update(load_end=os.getloadavg()[0], wall_s=time.monotonic() - began)
    print_report(report, runtimes)
    if args.json is not None:
        report.write_json(args.json)
    return 0 if clean else 1


def report_has_errors(report: Report) -> bool:
    return bool(stats.format_errors(report)) or any(
        n.startswith("ABORTED") for n in report.notes)
