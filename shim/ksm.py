"""The kernel's same-page merging (KSM) for the shims' memory.

A shim forked from the zygote shares the zygote's pages copy-on-write, but CPython writes to
every object it touches (reference counts, pymalloc pool headers), so each shim soon holds
private copies of about 1.65 MiB of zygote pages. Measured: about 45% of those copies are
byte-identical to the zygote's page (an incref undone by a decref, a block allocated and
freed), and most of the rest are identical from one shim to the next. KSM finds such pages
and maps one read-only copy in their place: a shim's private memory falls to about
0.25 MiB (hack/shim-memory --ksm; hack/bench at 100 pods: 0.24 MiB USS, 0.40 MiB PSS, with
ksmd at about 2% of one CPU at the kernel's default scan rate).

Only memory marked MADV_MERGEABLE is scanned: the zygote marks its own writable private
mappings before it forks, and the mark is inherited by the shims' copies of them. Nothing
of a container is ever marked (runc and the containers are exec'd: a new address space),
so containers share no page with each other or with flatpod through this.

ksmd itself runs when /sys/kernel/mm/ksm/run is 1; `start_ksmd` turns it on when it is 0
(2 means an administrator asked for everything to be unmerged, and is left alone).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

KSM_RUN = Path("/sys/kernel/mm/ksm/run")
MADV_MERGEABLE = 12
# Per-thread or kernel-provided: never worth merging.
_SKIPPED = (b"[stack]", b"[vvar]", b"[vdso]", b"[vsyscall]")

# libc's madvise(address, length, advice), raising OSError (with errno) when it fails.
Madvise = Callable[[int, int, int], None]


def mark_mergeable(madvise: Madvise) -> int:
    """Marks this process's writable private mappings (heap, anonymous memory, libraries'
    data) MADV_MERGEABLE; returns how many bytes were marked. Raises OSError (EINVAL) when
    the kernel has no KSM."""
    marked = 0
    with open("/proc/self/maps", "rb") as maps:
        lines = maps.read().splitlines()
    for line in lines:
        fields = line.split(None, 5)
        if fields[1] != b"rw-p" or (len(fields) > 5 and fields[5].strip() in _SKIPPED):
            continue
        start, end = (int(bound, 16) for bound in fields[0].split(b"-"))
        try:
            madvise(start, end - start, MADV_MERGEABLE)
        except OSError as err:
            # The allocator may have unmapped an arena since the maps were read (this loop
            # allocates too): that mapping is gone, the others are still to be marked.
            if err.errno == errno.ENOMEM:
                continue
            raise
        marked += end - start
    return marked


def ksmd_state() -> str | None:
    """"0" (stopped), "1" (running) or "2" (unmerging); None when the kernel has no KSM."""
    try:
        return KSM_RUN.read_text().strip()
    except OSError:
        return None


def start_ksmd() -> bool:
    """Turns ksmd on if it is stopped; True if this call started it."""
    if ksmd_state() != "0":
        return False
    set_ksmd_state("1")
    return True


def set_ksmd_state(state: str) -> None:
    """Writes /sys/kernel/mm/ksm/run: "1" runs ksmd, "0" stops it (merged pages stay
    merged), "2" stops it and unmerges everything."""
    fd = os.open(KSM_RUN, os.O_WRONLY)
    try:
        os.write(fd, state.encode())
    finally:
        os.close(fd)
