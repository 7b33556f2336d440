"""The `flatpod` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from sandbox.config import ConfigError, load_config

# gRPC core reads its experiments and poll strategy from the environment once, when grpc is
# first imported.
# This module must therefore not import grpc (nor anything that does) at its top.
GRPC_EXPERIMENTS = "GRPC_EXPERIMENTS"
# Without its EventEngine listener, gRPC serves accepted connections the long-standing iomgr
# way: the thread that waits on the completion queue (grpc.aio's poller) also reads and writes
# the socket, instead of having each event handed over by an EventEngine thread. One thread
# wakeup less per completion: a relist pair (ListPodSandbox + ListContainers) measured ~8-10%
# faster and ~15% cheaper in server CPU (ARCHITECTURE.md, "Inside flatpod serve").
SERVER_EXPERIMENTS = "-event_engine_listener"
GRPC_POLL_STRATEGY = "GRPC_POLL_STRATEGY"
# gRPC's poll(2) engine instead of epoll1: the CRI server watches a handful of fds (its
# listener, kubelet's connection, a crictl's), and per call its threads made fewer futex
# wakeups (0.9 against 2.0 per Version call; 31 syscalls against 34.5, strace -c). flatpod
# serve against itself with epoll1, Go client, three runs of 16-24 interleaved rounds: server
# CPU per call 355 against 377 us (-6%), wall time within the noise (0.40 against 0.41 ms);
# on bare grpc.aio servers, 11 of 12 paired medians lower, by 3-17% (hack/grpc-floor;
# ARCHITECTURE.md, "Inside flatpod serve").
SERVER_POLL_STRATEGY = "poll"


class LogfmtFormatter(logging.Formatter):
    """One line per record, `key=value` pairs, so logs stay greppable and machine-readable."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = (
            f"time={stamp}.{int(record.msecs):03d}Z level={record.levelname.lower()} "
            f"logger={record.name} msg={json.dumps(record.getMessage())}"
        )
        if record.exc_info:
            line += f" error={json.dumps(self.formatException(record.exc_info))}"
        return line


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Their debug output is about their internals, not about pods: keep it out of ours.
    for noisy in ("asyncio", "grpc", "grpc._cython.cygrpc", "pyroute2"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    logging.getLogger("pyroute2.netlink.core").setLevel(logging.WARNING)


def choose_grpc_settings() -> None:
    """Before grpc is imported: flatpod's choices, unless the operator set their own."""
    os.environ.setdefault(GRPC_EXPERIMENTS, SERVER_EXPERIMENTS)
    os.environ.setdefault(GRPC_POLL_STRATEGY, SERVER_POLL_STRATEGY)


def build_parser() -> argparse.ArgumentParser:
    from sandbox.info import flatpod_version  # imports grpc: after choose_grpc_settings

    parser = argparse.ArgumentParser(
        prog="flatpod",
        description="A Kubernetes CRI runtime with flat pods: a pause container holds each "
        "pod's namespaces and its containers are peers that join them.",
    )
    parser.add_argument("--version", action="version", version=f"flatpod {flatpod_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="serve the CRI on a unix socket")
    serve.add_argument(
        "--config", type=Path, help="TOML config file (default /etc/flatpod/config.toml)"
    )
    serve.add_argument("--socket", help="CRI socket path (default <state-dir>/flatpod.sock)")
    serve.add_argument("--root-dir", help="persistent state (default /var/lib/flatpod)")
    serve.add_argument(
        "--state-dir", help="runtime state, gone after reboot (default /run/flatpod)"
    )
    serve.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="default info"
    )

    show = commands.add_parser("config", help="print the effective configuration as JSON")
    show.add_argument("--config", type=Path, help="TOML config file")
    return parser


def main(argv: list[str] | None = None) -> int:
    choose_grpc_settings()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    overrides = {}
    if args.command == "serve":
        overrides = {
            "socket": args.socket,
            "root_dir": args.root_dir,
            "state_dir": args.state_dir,
            "log_level": args.log_level,
        }
    try:
        config = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"flatpod: {err}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(json.dumps(json.loads(config.to_json()), indent=2))
        return 0
    setup_logging(config.log_level)
    from sandbox.daemon import run  # heavy imports (grpc) only for the daemon

    try:
        run(config)
    except ConfigError as err:
        print(f"flatpod: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
