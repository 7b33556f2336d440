"""Pin namespaces as bind mounts of their nsfs files, so they outlive the processes in them.

create_netns() unshares CLONE_NEWNET on a dedicated short-lived thread (a netns is per-thread),
bind-mounts /proc/thread-self/ns/net onto the target and lets the thread end. Compared with
forking a child (what `ip netns add` and pyroute2 do) this avoids fork() in a multi-threaded
gRPC process and costs a thread start instead of a process; the calling thread never changes
namespace, so a failure cannot leave a server thread in the wrong netns.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from pathlib import Path

from netns import libc
from netns.enter import run_in_netns
from netns.rtnl import loopback_up

NETNS_RUN_DIR = Path("/run/netns")
_NSFS_PROBE = "/proc/self/ns/net"
# How many stacked mounts unpin() peels off before giving up (a retry can mount twice).
_MAX_STACKED_MOUNTS = 8


def pod_netns_path(pod_id: str) -> Path:
    """Where flatpod pins a pod's network namespace: named from the pod id, so that a spare
    shim's netns (sandbox/shims.py) and a half-made pod's can be found from the id alone."""
    return NETNS_RUN_DIR / f"flatpod-{pod_id[:24]}"


def ensure_shared_mount_dir(directory: Path) -> None:
    """Make `directory` a shared-propagation mount point, as `ip netns add` does for /run/netns.

    Pins made under it then propagate to (and get unmounted in) mount namespaces that were
    cloned from ours, instead of keeping the namespace alive there after unpin().
    """
    directory.mkdir(parents=True, exist_ok=True)
    try:
        libc.mount("none", str(directory), "none", libc.MS_SHARED | libc.MS_REC)
        return
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: not a mount point yet
            raise
    libc.mount(str(directory), str(directory), "none", libc.MS_BIND | libc.MS_REC)
    libc.mount("none", str(directory), "none", libc.MS_SHARED | libc.MS_REC)


def is_pinned(path: Path) -> bool:
    """True if `path` is a namespace file (nsfs), i.e. something is pinned there."""
    try:
        # All namespace files live on the single nsfs superblock, so they share one st_dev.
        return os.stat(path).st_dev == os.stat(_NSFS_PROBE).st_dev
    except FileNotFoundError:
        return False


def touch_pin_target(target: Path) -> None:
    """The empty file a namespace is pinned on. Made ahead where it can be: on a file system
    that is not tmpfs (this host's /run is ext4) a create costs 0.15-0.35 ms, and three pins
    made after the pause starts took ~2 ms with their files, 0.15 ms without."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o444)
    os.close(fd)


def pin_namespace(source: Path, target: Path) -> None:
    """Bind-mount the namespace file `source` (e.g. /proc/<pid>/ns/ipc) onto `target`."""
    touch_pin_target(target)
    try:
        libc.mount(str(source), str(target), "none", libc.MS_BIND)
    except BaseException:
        _unlink_quietly(target)
        raise


def create_netns(path: Path) -> None:
    """Create a new network namespace pinned at `path`, with loopback up inside.

    Raises FileExistsError if something is already pinned there.
    """
    run_in_netns(Path(_NSFS_PROBE), lambda: create_netns_here(path))


def create_netns_here(path: Path) -> None:
    """create_netns(), made by moving the calling thread into the new namespace, where it
    stays: only for a thread of its own that ends after its work (enter.on_own_thread),
    which saves create_netns's second thread and its hand-offs. On failure nothing is left.
    """
    if path.parent == NETNS_RUN_DIR:
        ensure_shared_mount_dir(NETNS_RUN_DIR)
    if is_pinned(path):
        raise FileExistsError(errno.EEXIST, "namespace already pinned", str(path))
    touch_pin_target(path)
    try:
        libc.unshare(libc.CLONE_NEWNET)
        libc.mount("/proc/thread-self/ns/net", str(path), "none", libc.MS_BIND)
        loopback_up()  # this thread is in the new namespace: no second thread to enter it
    except BaseException:
        unpin(path)
        raise


def unpin(target: Path) -> None:
    """Unmount (lazily) and remove a pinned namespace file. Missing or unmounted is fine."""
    for _ in range(_MAX_STACKED_MOUNTS):
        if not is_pinned(target):
            break
        try:
            libc.umount2(str(target), libc.MNT_DETACH)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOENT):
                raise
            break
    _unlink_quietly(target)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def loopback_socket_probe(path: Path) -> bool:
    """True if a TCP socket can bind 127.0.0.1 inside the namespace (lo is up)."""

    def probe() -> bool:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", 0))
            except OSError:
                return False
            return True

    return run_in_netns(path, probe)
