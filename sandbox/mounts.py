"""The few mounts the runtime makes itself: a pod's /dev/shm tmpfs, and unmounting."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from netns.libc import MNT_DETACH, mount, umount2

MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8


def mount_tmpfs(target: Path, size: int, mode: int = 0o1777) -> None:
    target.mkdir(parents=True, exist_ok=True)
    mount(
        "shm", str(target), "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
        f"mode={mode:o},size={size}",
    )


def unmount(target: Path) -> None:
    """Detaches whatever is mounted at `target`; nothing mounted, or no target, is fine."""
    try:
        umount2(str(target), MNT_DETACH)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOENT):
            raise


def is_mountpoint(path: Path) -> bool:
    return os.path.ismount(path)
