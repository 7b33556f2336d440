"""Seccomp profiles: flatpod's RuntimeDefault profile and Localhost profile loading.

The RuntimeDefault profile follows what containerd and moby allow: everything else fails with
EPERM. It is data (SyscallRule records below) rendered into an OCI `linux.seccomp` object; the
rules that hinge on a capability are only emitted when the container holds it, so that e.g. an
unprivileged container cannot even try `mount` or `unshare`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EPERM = 1
ENOSYS = 38
# CLONE_NEWNS|CLONE_NEWCGROUP|CLONE_NEWUTS|CLONE_NEWIPC|CLONE_NEWUSER|CLONE_NEWPID|CLONE_NEWNET
CLONE_NAMESPACE_FLAGS = 0x7E020000

ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "x86_64": ("SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"),
    "aarch64": ("SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"),
}


class SeccompError(ValueError):
    """A seccomp profile cannot be produced or loaded."""


@dataclass(frozen=True)
class ArgCondition:
    index: int
    value: int
    op: str
    value_two: int = 0

    def to_oci(self) -> dict[str, Any]:
        return {"index": self.index, "value": self.value, "valueTwo": self.value_two, "op": self.op}


@dataclass(frozen=True)
class SyscallRule:
    """Syscalls allowed (or answered with an errno) under conditions.

    `needs_cap`: emitted only when the container has this capability.
    `unless_cap`: emitted only when the container lacks it (the restricted variant).
    `arches`: emitted only for these architectures (empty = all).
    """

    names: tuple[str, ...]
    needs_cap: str | None = None
    unless_cap: str | None = None
    args: tuple[ArgCondition, ...] = ()
    errno: int | None = None
    arches: tuple[str, ...] = ()

    def applies(self, caps: frozenset[str], arch: str) -> bool:
        if self.needs_cap is not None and self.needs_cap not in caps:
            return False
        if self.unless_cap is not None and self.unless_cap in caps:
            return False
        return not self.arches or arch in self.arches

    def to_oci(self) -> dict[str, Any]:
        rule: dict[str, Any] = {"names": list(self.names)}
        if self.errno is None:
            rule["action"] = "SCMP_ACT_ALLOW"
        else:
            rule["action"] = "SCMP_ACT_ERRNO"
            rule["errnoRet"] = self.errno
        if self.args:
            rule["args"] = [a.to_oci() for a in self.args]
        return rule


# Syscalls every container may make: the common allowlist of containerd/moby's default profile.
# ptrace is here because kernels >= 4.8 (our floor) no longer let it bypass seccomp.
def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# io_uring is left out, as containerd and moby now do (it bypasses seccomp for its operations).
BASE_ALLOWED: tuple[str, ...] = _words(
    """
accept accept4 access adjtimex alarm bind brk cachestat capget capset chdir chmod chown chown32
clock_adjtime clock_adjtime64 clock_getres clock_getres_time64 clock_gettime clock_gettime64
clock_nanosleep clock_nanosleep_time64 close close_range connect copy_file_range creat dup dup2
dup3 epoll_create epoll_create1 epoll_ctl epoll_ctl_old epoll_pwait epoll_pwait2 epoll_wait
epoll_wait_old eventfd eventfd2 execve execveat exit exit_group faccessat faccessat2 fadvise64
fadvise64_64 fallocate fanotify_mark fchdir fchmod fchmodat fchmodat2 fchown fchown32 fchownat
fcntl fcntl64 fdatasync fgetxattr flistxattr flock fork fremovexattr fsetxattr fstat fstat64
fstatat64 fstatfs fstatfs64 fsync ftruncate ftruncate64 futex futex_requeue futex_time64
futex_wait futex_waitv futex_wake futimesat getcpu getcwd getdents getdents64 getegid getegid32
geteuid geteuid32 getgid getgid32 getgroups getgroups32 getitimer getpeername getpgid getpgrp
getpid getppid getpriority getrandom getresgid getresgid32 getresuid getresuid32 getrlimit
get_robust_list getrusage getsid getsockname getsockopt get_thread_area gettid gettimeofday
getuid getuid32 getxattr inotify_add_watch inotify_init inotify_init1 inotify_rm_watch
io_cancel ioctl io_destroy io_getevents io_pgetevents io_pgetevents_time64 ioprio_get
ioprio_set io_setup io_submit ipc kill
landlock_add_rule landlock_create_ruleset landlock_restrict_self lchown lchown32 lgetxattr link
linkat listen listxattr llistxattr _llseek lremovexattr lseek lsetxattr lstat lstat64 madvise
map_shadow_stack membarrier memfd_create memfd_secret mincore mkdir mkdirat mknod mknodat mlock
mlock2 mlockall mmap mmap2 mprotect mq_getsetattr mq_notify mq_open mq_timedreceive
mq_timedreceive_time64 mq_timedsend mq_timedsend_time64 mq_unlink mremap msgctl msgget msgrcv
msgsnd msync munlock munlockall munmap name_to_handle_at nanosleep newfstatat _newselect open
openat openat2 pause pidfd_open pidfd_send_signal pipe pipe2 pkey_alloc pkey_free pkey_mprotect
poll ppoll ppoll_time64 prctl pread64 preadv preadv2 prlimit64 process_mrelease pselect6
pselect6_time64 ptrace pwrite64 pwritev pwritev2 read readahead readlink readlinkat readv recv
recvfrom recvmmsg recvmmsg_time64 recvmsg remap_file_pages removexattr rename renameat
renameat2 restart_syscall rmdir rseq rt_sigaction rt_sigpending rt_sigprocmask rt_sigqueueinfo
rt_sigreturn rt_sigsuspend rt_sigtimedwait rt_sigtimedwait_time64 rt_tgsigqueueinfo
sched_getaffinity sched_getattr sched_getparam sched_get_priority_max sched_get_priority_min
sched_getscheduler sched_rr_get_interval sched_rr_get_interval_time64 sched_setaffinity
sched_setattr sched_setparam sched_setscheduler sched_yield seccomp select semctl semget semop
semtimedop semtimedop_time64 send sendfile sendfile64 sendmmsg sendmsg sendto setfsgid
setfsgid32 setfsuid setfsuid32 setgid setgid32 setgroups setgroups32 setitimer setpgid
setpriority setregid setregid32 setresgid setresgid32 setresuid setresuid32 setreuid
setreuid32 setrlimit set_robust_list setsid setsockopt set_thread_area set_tid_address setuid
setuid32 setxattr shmat shmctl shmdt shmget shutdown sigaltstack signalfd signalfd4
sigprocmask sigreturn socket socketcall socketpair splice stat stat64 statfs statfs64 statx
symlink symlinkat sync sync_file_range syncfs sysinfo tee tgkill time timer_create
timer_delete timer_getoverrun timer_gettime timer_gettime64 timer_settime timer_settime64
timerfd_create timerfd_gettime timerfd_gettime64 timerfd_settime timerfd_settime64 times tkill
truncate truncate64 ugetrlimit umask uname unlink unlinkat utime utimensat utimensat_time64
utimes vfork vmsplice wait4 waitid waitpid write writev
"""
)

# personality(2) only with the personas containerd allows (linux, linux32, UNAME26 variants,
# and the query value 0xffffffff); anything else could weaken ASLR.
PERSONALITY_VALUES: tuple[int, ...] = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)

CONDITIONAL_RULES: tuple[SyscallRule, ...] = (
    *(
        SyscallRule(("personality",), args=(ArgCondition(0, v, "SCMP_CMP_EQ"),))
        for v in PERSONALITY_VALUES
    ),
    SyscallRule(("arch_prctl", "modify_ldt"), arches=("x86_64",)),
    SyscallRule(("open_by_handle_at",), needs_cap="CAP_DAC_READ_SEARCH"),
    SyscallRule(
        (
            "bpf",
            "clone",
            "clone3",
            "fanotify_init",
            "fsconfig",
            "fsmount",
            "fsopen",
            "fspick",
            "lookup_dcookie",
            "mount",
            "mount_setattr",
            "move_mount",
            "open_tree",
            "perf_event_open",
            "quotactl",
            "quotactl_fd",
            "setdomainname",
            "sethostname",
            "setns",
            "syslog",
            "umount",
            "umount2",
            "unshare",
        ),
        needs_cap="CAP_SYS_ADMIN",
    ),
    # Without CAP_SYS_ADMIN: clone only when no namespace flag is set ...
    SyscallRule(
        ("clone",),
        unless_cap="CAP_SYS_ADMIN",
        args=(ArgCondition(0, CLONE_NAMESPACE_FLAGS, "SCMP_CMP_MASKED_EQ", 0),),
        arches=("x86_64", "aarch64"),
    ),
    # ... and clone3 (whose flags live in a struct seccomp cannot read) answers ENOSYS, so that
    # libc falls back to clone, which the rule above can inspect.
    SyscallRule(("clone3",), unless_cap="CAP_SYS_ADMIN", errno=ENOSYS),
    SyscallRule(("reboot",), needs_cap="CAP_SYS_BOOT"),
    SyscallRule(("chroot",), needs_cap="CAP_SYS_CHROOT"),
    SyscallRule(("delete_module", "init_module", "finit_module"), needs_cap="CAP_SYS_MODULE"),
    SyscallRule(("acct",), needs_cap="CAP_SYS_PACCT"),
    SyscallRule(
        ("kcmp", "pidfd_getfd", "process_madvise", "process_vm_readv", "process_vm_writev"),
        needs_cap="CAP_SYS_PTRACE",
    ),
    SyscallRule(("iopl", "ioperm"), needs_cap="CAP_SYS_RAWIO"),
    SyscallRule(
        ("settimeofday", "stime", "clock_settime", "clock_settime64"), needs_cap="CAP_SYS_TIME"
    ),
    SyscallRule(("vhangup",), needs_cap="CAP_SYS_TTY_CONFIG"),
    SyscallRule(
        ("get_mempolicy", "mbind", "set_mempolicy", "set_mempolicy_home_node"),
        needs_cap="CAP_SYS_NICE",
    ),
    SyscallRule(("syslog",), needs_cap="CAP_SYSLOG"),
    SyscallRule(("bpf",), needs_cap="CAP_BPF"),
    SyscallRule(("perf_event_open",), needs_cap="CAP_PERFMON"),
)


def _normalise_caps(caps: Iterable[str]) -> frozenset[str]:
    upper = (c.upper() for c in caps)
    return frozenset(c if c.startswith("CAP_") else "CAP_" + c for c in upper)


def runtime_default_profile(arch: str = "x86_64", caps: Iterable[str] = ()) -> dict[str, Any]:
    """The RuntimeDefault profile as an OCI `linux.seccomp` object for a container with `caps`."""
    if arch not in ARCHITECTURES:
        raise SeccompError(f"seccomp: unsupported architecture {arch!r}")
    held = _normalise_caps(caps)
    rules = [SyscallRule(BASE_ALLOWED)]
    rules += [r for r in CONDITIONAL_RULES if r.applies(held, arch)]
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": EPERM,
        "architectures": list(ARCHITECTURES[arch]),
        "syscalls": [r.to_oci() for r in rules],
    }


def profile_for(caps: Iterable[str], arch: str = "x86_64") -> dict[str, Any]:
    """RuntimeDefault for a container holding `caps` (names with or without the CAP_ prefix)."""
    return runtime_default_profile(arch, caps)


# The profile format of moby/profiles, which containerd and CRI-O read: the OCI
# `linux.seccomp` object plus archMap, and per rule `name`, `comment`, `includes`, `excludes`.
PROFILE_KEYS = frozenset({
    "defaultAction", "defaultErrnoRet", "architectures", "archMap", "flags", "listenerPath",
    "listenerMetadata", "syscalls",
})
RULE_KEYS = frozenset({
    "names", "name", "action", "errnoRet", "args", "comment", "includes", "excludes",
})
FILTER_KEYS = frozenset({"caps", "arches", "minKernel"})
ARG_KEYS = frozenset({"index", "value", "valueTwo", "op"})
ARCH_MAP_KEYS = frozenset({"architecture", "subArchitectures"})
# A rule's includes/excludes name architectures as Go does (moby compares GOARCH).
GO_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}


@dataclass(frozen=True)
class ProfileTarget:
    """What a Localhost profile's conditional rules are judged against."""

    caps: frozenset[str]  # the container's bounding set, CAP_ names
    arch: str  # as uname says: x86_64, aarch64
    kernel: tuple[int, int]  # (major, minor) of the running kernel


def kernel_version(release: str) -> tuple[int, int]:
    """(major, minor) from a release like "6.18.0-1-amd64"."""
    head = release.split("-")[0].split(".")
    try:
        return int(head[0]), int(head[1]) if len(head) > 1 else 0
    except ValueError:
        raise SeccompError(f"seccomp: cannot read the kernel version {release!r}") from None


def load_localhost_profile(
    path: Path | str, caps: Iterable[str] = (), arch: str = "x86_64",
    kernel: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """A Localhost profile: a JSON file on the host in the OCI or moby seccomp format,
    rendered for a container holding `caps` on `arch`. Every key is understood or refused:
    nothing in a profile is silently dropped."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise SeccompError(f"seccomp: localhost profile {str(p)!r} not found") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SeccompError(f"seccomp: cannot load localhost profile {str(p)!r}: {e}") from None
    if not isinstance(data, dict) or "defaultAction" not in data:
        raise SeccompError(f"seccomp: localhost profile {str(p)!r} has no defaultAction")
    target = ProfileTarget(_normalise_caps(caps), arch,
                           kernel or kernel_version(os.uname().release))
    try:
        return moby_to_oci(data, target)
    except SeccompError as e:
        raise SeccompError(f"seccomp: localhost profile {str(p)!r}: {e}") from None


def moby_to_oci(data: dict[str, Any], target: ProfileTarget) -> dict[str, Any]:
    """The OCI object for a moby-format profile, as moby's setupSeccomp builds it: archMap
    gives the native architecture and its sub-architectures; a rule applies only if its
    `includes` all hold (every cap held, the arch listed, the kernel at least minKernel) and
    none of its `excludes` does (any cap held, the arch listed, the kernel at least
    minKernel)."""
    _known_keys(data, PROFILE_KEYS, "profile")
    out = {k: v for k, v in data.items() if k not in ("archMap", "syscalls")}
    if "archMap" in data:
        if data.get("architectures"):
            raise SeccompError("both architectures and archMap are given")
        out["architectures"] = _native_arches(data["archMap"], target.arch)
    rules = data.get("syscalls") or []
    if not isinstance(rules, list):
        raise SeccompError("syscalls: not a list")
    syscalls = []
    for i, rule in enumerate(rules):
        where = f"syscalls[{i}]"
        if not isinstance(rule, dict):
            raise SeccompError(f"{where}: not an object")
        _known_keys(rule, RULE_KEYS, where)
        args = rule.get("args") or []
        if not isinstance(args, list):
            raise SeccompError(f"{where}.args: not a list")
        for n, arg in enumerate(args):
            _known_keys(arg, ARG_KEYS, f"{where}.args[{n}]")
        if not _applies(rule, target, where):
            continue
        names = rule.get("names") or []
        if "name" in rule:
            if names:
                raise SeccompError(f"{where}: both name and names are given")
            names = [rule["name"]]
        converted = {k: v for k, v in rule.items()
                     if k not in ("name", "comment", "includes", "excludes")}
        converted["names"] = names
        syscalls.append(converted)
    if syscalls or "syscalls" in data:
        out["syscalls"] = syscalls
    return out


def _known_keys(obj: Any, allowed: frozenset[str], where: str) -> None:
    if not isinstance(obj, dict):
        raise SeccompError(f"{where}: not an object")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise SeccompError(f"{where}: unknown field {unknown[0]!r} (known: "
                           f"{', '.join(sorted(allowed))})")


def _native_arches(arch_map: Any, arch: str) -> list[str]:
    if not isinstance(arch_map, list):
        raise SeccompError("archMap: not a list")
    native = ARCHITECTURES.get(arch, (f"SCMP_ARCH_{arch.upper()}",))[0]
    arches: list[str] = []
    for i, entry in enumerate(arch_map):
        _known_keys(entry, ARCH_MAP_KEYS, f"archMap[{i}]")
        if entry.get("architecture") == native:
            arches += [native, *(entry.get("subArchitectures") or [])]
    return arches


def _applies(rule: dict[str, Any], target: ProfileTarget, where: str) -> bool:
    excludes, includes = rule.get("excludes"), rule.get("includes")
    if excludes is not None:
        caps, arches, min_kernel = _filter(excludes, f"{where}.excludes")
        if _arch_listed(arches, target.arch) or caps & target.caps:
            return False
        if min_kernel is not None and target.kernel >= min_kernel:
            return False
    if includes is not None:
        caps, arches, min_kernel = _filter(includes, f"{where}.includes")
        if arches and not _arch_listed(arches, target.arch):
            return False
        if not caps <= target.caps:
            return False
        if min_kernel is not None and target.kernel < min_kernel:
            return False
    return True


def _filter(obj: Any, where: str) -> tuple[frozenset[str], list[str], tuple[int, int] | None]:
    _known_keys(obj, FILTER_KEYS, where)
    caps, arches = obj.get("caps") or [], obj.get("arches") or []
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
        raise SeccompError(f"{where}.caps: not a list of capability names")
    if not isinstance(arches, list) or not all(isinstance(a, str) for a in arches):
        raise SeccompError(f"{where}.arches: not a list of architectures")
    min_kernel = None
    if obj.get("minKernel") is not None:
        text = obj["minKernel"]
        parts = text.split(".") if isinstance(text, str) else []
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise SeccompError(f"{where}.minKernel: {text!r} is not a version like 5.8")
        min_kernel = (int(parts[0]), int(parts[1]))
    return _normalise_caps(caps), arches, min_kernel


def _arch_listed(arches: list[str], arch: str) -> bool:
    return arch in arches or GO_ARCH.get(arch, arch) in arches
