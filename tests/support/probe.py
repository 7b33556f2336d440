"""A concurrent CRI client in a process of its own, as kubelet is: ListPodSandbox every 20 ms
and the daemon's RSS, until stdin closes; then one JSON line of what it saw. Its own process,
so the attacking test's threads and GIL cannot slow its calls down.

    python -m tests.support.probe SOCKET DAEMON_PID
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

from cri_api import api_pb2 as pb
from tests.cri import CriClient


def daemon_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise KeyError("VmRSS")


def main(socket: str, pid: int) -> None:
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    client = CriClient(Path(socket), timeout=30)
    latencies: list[float] = []
    rss_before = rss_peak = daemon_rss(pid)
    print("ready", flush=True)
    try:
        while not stop.is_set():
            started = time.perf_counter()
            client.ListPodSandbox(pb.ListPodSandboxRequest())
            latencies.append(time.perf_counter() - started)
            rss_peak = max(rss_peak, daemon_rss(pid))
            stop.wait(0.02)
    finally:
        client.close()
    rss_peak = max(rss_peak, daemon_rss(pid))
    print(json.dumps({"latencies": latencies, "rss_before": rss_before,
                      "rss_peak": rss_peak}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
