"""Thin ctypes bindings for the few libc calls flatpod makes itself (mount, umount2, unshare,
setns, posix_spawn); the one binding that netns/ and the runtime share."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Mapping, Sequence
from functools import cache

CLONE_NEWNET = 0x40000000
MS_BIND = 4096
POSIX_SPAWN_SETSIGDEF = 0x04
# glibc's posix_spawn_file_actions_t is 80 bytes, posix_spawnattr_t 336: room to spare.
_SPAWN_FILE_ACTIONS_BYTES = 256
_SPAWN_ATTR_BYTES = 1024
_SIGSET_BYTES = 128
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


def posix_spawn(path: str, argv: Sequence[str], env: Mapping[str, str],
                dup2: Sequence[tuple[int, int]], default_signals: Sequence[int]) -> int:
    """Starts `path` (no PATH search) with each (fd, target) of `dup2` dup'ed onto target and
    `default_signals` back at their default action; the child's pid.

    Why not os.posix_spawn: CPython holds the GIL through the call, and glibc's posix_spawn
    returns only once the child has exec'd (a vfork). On a loaded machine that took 1 ms
    typically and up to 100 ms (measured: a runc spawn), and every other thread, the event
    loop's included, waited. A foreign call through ctypes releases the GIL.
    """
    libc = _libc()
    actions = ctypes.create_string_buffer(_SPAWN_FILE_ACTIONS_BYTES)
    attr = ctypes.create_string_buffer(_SPAWN_ATTR_BYTES)
    _check_code(libc.posix_spawn_file_actions_init(actions), "posix_spawn_file_actions_init")
    try:
        _check_code(libc.posix_spawnattr_init(attr), "posix_spawnattr_init")
        try:
            for fd, target in dup2:
                _check_code(libc.posix_spawn_file_actions_adddup2(actions, fd, target),
                            "posix_spawn_file_actions_adddup2")
            _close_the_rest(libc, actions, max((t for _, t in dup2), default=2) + 1)
            signals = ctypes.create_string_buffer(_SIGSET_BYTES)
            libc.sigemptyset(signals)
            for signum in default_signals:
                libc.sigaddset(signals, int(signum))
            _check_code(libc.posix_spawnattr_setsigdefault(attr, signals),
                        "posix_spawnattr_setsigdefault")
            _check_code(libc.posix_spawnattr_setflags(attr, ctypes.c_short(
                POSIX_SPAWN_SETSIGDEF)), "posix_spawnattr_setflags")
            c_argv = (ctypes.c_char_p * (len(argv) + 1))(*(os.fsencode(a) for a in argv), None)
            c_env = (ctypes.c_char_p * (len(env) + 1))(
                *(os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()), None)
            pid = ctypes.c_int(0)
            _check_code(libc.posix_spawn(ctypes.byref(pid), os.fsencode(path), actions, attr,
                                         c_argv, c_env), f"posix_spawn {path}", path)
            return pid.value
        finally:
            libc.posix_spawnattr_destroy(attr)
    finally:
        libc.posix_spawn_file_actions_destroy(actions)


def _close_the_rest(libc: ctypes.CDLL, actions: ctypes.Array[ctypes.c_char],
                    first: int) -> None:
    """The child keeps only the fds below `first`: those `dup2` placed. Every fd flatpod
    opens is close-on-exec, but one its own parent passed it inheritable is not, nor one
    that uvloop's subprocess spawn makes inheritable for an instant while a worker thread
    spawns runc. glibc before 2.34 has no closefrom action: the child then inherits those."""
    if hasattr(libc, "posix_spawn_file_actions_addclosefrom_np"):
        _check_code(libc.posix_spawn_file_actions_addclosefrom_np(actions, first),
                    "posix_spawn_file_actions_addclosefrom_np")


def _check_code(code: int, what: str, path: str | None = None) -> None:
    """For the calls that answer an errno value rather than set errno."""
    if code != 0:
        raise OSError(code, f"{what}: {os.strerror(code)}", path)
