"""The few mounts the runtime makes itself: a pod's /dev/shm tmpfs, the pause's rootfs of a
pod with a user namespace, and unmounting."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from netns.libc import MNT_DETACH, MS_BIND, mount, umount2

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32


def mount_tmpfs(target: Path, size: int, mode: int = 0o1777) -> None:
    target.mkdir(parents=True, exist_ok=True)
    mount(
        "shm", str(target), "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
        f"mode={mode:o},size={size}",
    )


def bind_executable_readonly(source: Path, target: Path) -> None:
    """`source` at `target`, read-only, nosuid, nodev, and executable whatever the mount
    `source` lies on says: a bind mount takes that mount's flags (a noexec /run's too) until
    the remount sets its own."""
    target.mkdir(exist_ok=True)
    mount(str(source), str(target), "none", MS_BIND)
    try:
        mount("none", str(target), "none", MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    except BaseException:
        unmount(target)
        raise


def unmount(target: Path) -> None:
    """Detaches whatever is mounted at `target`; nothing mounted, or no target, is fine."""
    try:
        umount2(str(target), MNT_DETACH)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOENT):
            raise


def is_mountpoint(path: Path) -> bool:
    return os.path.ismount(path)
