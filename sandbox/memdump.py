"""Debug only: where the daemon's memory goes, for hack/soak --tracemalloc.

`flatpod serve` started with FLATPOD_MEMDUMP=<file> appends to <file>, on each SIGUSR1, its
RSS, what glibc malloc and pymalloc hold, and how object counts by type grew since the
previous SIGUSR1 (the first one is the baseline). With PYTHONTRACEMALLOC=<frames> as well,
also what grew by source line and the biggest growths by traceback (pymalloc's figures are
then unavailable: tracemalloc wraps the allocator). Finally it calls malloc_trim(0) and
reports the RSS again: memory that goes away then was free already (the allocator's
high-water mark), not leaked. The daemon imports this module only when the variable is set.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import gc
import os
import signal
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def malloc_summary(libc: ctypes.CDLL) -> str:
    """glibc's heap (every arena, plus mmapped chunks): in use and free."""
    libc.mallinfo2.restype = _MallInfo2
    m = libc.mallinfo2()
    return (
        f"malloc: in use {(m.uordblks + m.hblkhd) >> 10} KiB, free in arenas "
        f"{m.fordblks >> 10} KiB (heap {m.arena >> 10} KiB + mmapped {m.hblkhd >> 10} KiB)"
    )


def pymalloc_summary() -> str:
    """The arena lines of sys._debugmallocstats(), which only writes to fd 2."""
    if tracemalloc.is_tracing():
        return "pymalloc: unknown while tracemalloc wraps it"
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read().decode(errors="replace")
    keep = (
        "# arenas highwater mark",
        "# arenas allocated current",
        "# bytes in allocated blocks",
        "# bytes in available blocks",
        "# bytes lost to arena alignment",
    )
    return "pymalloc: " + "; ".join(
        " ".join(line.split()) for line in text.splitlines() if line.startswith(keep)
    )


def install(loop: asyncio.AbstractEventLoop, out: Path) -> None:
    libc = ctypes.CDLL(None)
    last: list[tuple[tracemalloc.Snapshot | None, collections.Counter[str]]] = []

    def dump() -> None:
        gc.collect()
        snap = None
        if tracemalloc.is_tracing():
            snap = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__)]
            )
        types = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
        current, peak = tracemalloc.get_traced_memory()
        threads = len(os.listdir("/proc/self/task"))
        traced = f"; traced {current >> 10} KiB (peak {peak >> 10} KiB)" if snap else ""
        lines = [
            f"--- {time.ctime()}: RSS {rss_kib() >> 10} MiB, {threads} threads{traced}",
            malloc_summary(libc),
            pymalloc_summary(),
        ]
        if last:
            old_snap, old_types = last[0]
            if snap is not None and old_snap is not None:
                lines.append("--- growth since the last dump, by line")
                lines += [str(s) for s in snap.compare_to(old_snap, "lineno")[:20]]
                lines.append("--- the 3 biggest by traceback")
                for s in snap.compare_to(old_snap, "traceback")[:3]:
                    lines += [str(s), *("    " + f for f in s.traceback.format())]
            lines.append("--- object counts by type (growth)")
            grown = types.copy()
            grown.subtract(old_types)
            lines += [f"{n:+d} {t}" for t, n in grown.most_common(15) if n]
        last[:] = [(snap, types)]
        libc.malloc_trim(0)
        lines.append(f"--- after malloc_trim(0): RSS {rss_kib() >> 10} MiB")
        with out.open("a") as f:
            f.write("\n".join(lines) + "\n")

    loop.add_signal_handler(signal.SIGUSR1, dump)
