"""The relist prober of the churn workload, run as its own process.

`python -m benchlib.relistprobe SECONDS INTERVAL SOCKET [SOCKET...]` sends kubelet's relist
pair (ListPodSandbox + ListContainers) to each socket every INTERVAL seconds for SECONDS,
each over its own channel, and prints each pair's wall time in ms: one JSON list per socket,
in a JSON list. With two sockets (the churned runtime and an idle flatpod, the floor) the
pairs go back to back, the order flipping every round, so both see the same moment's load.

Why a process of its own: the churn clients are threads of the bench's process; a prober
among them waits for their GIL (and their channel) between sending and reading, and the
runtime that completes more lifecycles makes the prober wait longer, whatever the runtime
itself answers. Here only the runtime (and the machine) are timed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from benchlib.cri import Cri

MS = 1000.0


def relist(cri: Cri) -> float:
    """One relist pair's wall time, ms."""
    start = time.perf_counter()
    cri.list_pods()
    cri.list_containers()
    return (time.perf_counter() - start) * MS


def probe(sockets: list[Path], seconds: float, interval: float) -> list[list[float]]:
    clients = [Cri(socket) for socket in sockets]
    try:
        for cri in clients:
            cri.version(timeout=10.0)  # connected before the first timed pair
        samples: list[list[float]] = [[] for _ in clients]
        order = list(range(len(clients)))
        stop_at = time.monotonic() + seconds
        while time.monotonic() < stop_at:
            for i in order:
                samples[i].append(relist(clients[i]))
            order.reverse()
            time.sleep(interval)
        return samples
    finally:
        for cri in clients:
            cri.close()


def main(argv: list[str]) -> int:
    seconds, interval = float(argv[0]), float(argv[1])
    print(json.dumps(probe([Path(a) for a in argv[2:]], seconds, interval)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
