"""The relist prober of the churn workload, run as its own process.

`python -m benchlib.relistprobe SOCKET SECONDS INTERVAL` sends kubelet's relist pair
(ListPodSandbox + ListContainers) every INTERVAL seconds for SECONDS over its own channel,
and prints each pair's wall time in ms, one JSON list on stdout.

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


def probe(socket: Path, seconds: float, interval: float) -> list[float]:
    cri = Cri(socket)
    try:
        cri.version(timeout=10.0)  # connected before the first timed pair
        samples: list[float] = []
        stop_at = time.monotonic() + seconds
        while time.monotonic() < stop_at:
            start = time.perf_counter()
            cri.list_pods()
            cri.list_containers()
            samples.append((time.perf_counter() - start) * MS)
            time.sleep(interval)
        return samples
    finally:
        cri.close()


def main(argv: list[str]) -> int:
    socket, seconds, interval = Path(argv[0]), float(argv[1]), float(argv[2])
    print(json.dumps(probe(socket, seconds, interval)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
