"""Thin ctypes bindings for the few libc calls flatpod makes itself (mount, umount2, unshare,
setns); the one binding that netns/ and the runtime share."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import cache

CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MS_REC = 16384
MS_SHARED = 1 << 20
MNT_DETACH = 2


@cache
def _libc() -> ctypes.CDLL:
    # Loaded once and cached: the CDLL handle is immutable, so this is not mutable module state.
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.mount.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_ulong,
        ctypes.c_void_p,
    ]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    libc.unshare.argtypes = [ctypes.c_int]
    libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.syscall.restype = ctypes.c_long
    return libc


def _check(ret: int, what: str, path: str | None = None) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)


def mount(source: str, target: str, fstype: str, flags: int, data: str | None = None) -> None:
    ret = _libc().mount(
        source.encode(), target.encode(), fstype.encode(), flags,
        data.encode() if data is not None else None,
    )
    _check(ret, f"mount {source} -> {target}", target)


def umount2(target: str, flags: int) -> None:
    _check(_libc().umount2(target.encode(), flags), f"umount2 {target}", target)


def syscall(number: int, *args: object, what: str) -> int:
    """A raw system call (for those libc has no wrapper for, like open_tree); its result."""
    libc = _libc()
    ret = int(libc.syscall(ctypes.c_long(number), *args))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def unshare(flags: int) -> None:
    _check(_libc().unshare(flags), "unshare")


def setns(fd: int, nstype: int) -> None:
    _check(_libc().setns(fd, nstype), "setns")
