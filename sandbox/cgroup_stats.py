"""One cgroup's usage figures, read from its directories on cgroup v1 or v2.

Every reader takes directories, never a cgroup path: finding where a cgroup lives on disk
(cgroupfs path, systemd slice, hybrid mounts) is the caller's business (stats.cgroup_dirs).
The figures are what kubelet's summary API and cAdvisor's metrics are made of; where cAdvisor
(through runc's cgroup library) defines a figure, it is computed the same way, so the CRI
metrics match /metrics/cadvisor on a containerd or CRI-O node:

- cpu: v2 `cpu.stat` (usage/user/system in µs); v1 `cpuacct.usage` and `cpuacct.stat`
  (user/system in clock ticks), throttling from `cpu.stat` in both.
- memory: v2 `memory.current`, `memory.stat` (anon, file, file_mapped, active_file,
  inactive_file, pgfault, ...), `memory.peak`, `memory.events`; v1 `memory.usage_in_bytes`,
  `memory.stat` (total_*), `memory.max_usage_in_bytes`, `memory.failcnt`. Working set is usage
  minus inactive file pages, floored at 0, on both (kubelet's eviction signal).
- block I/O: v2 `io.stat`; v1 `blkio.throttle.io_service_bytes_recursive` and
  `io_serviced_recursive` (every bio, whatever the I/O scheduler), else the bfq ones.
- pressure (PSI): `cpu.pressure`, `memory.pressure`, `io.pressure` wherever the kernel has them,
  which is the v2 directory (on a hybrid host, the cgroup's directory in the unified mount).

Kernel files are read bounded and parsed leniently: a missing file, or a line that does not
parse, leaves that figure at its default instead of failing the whole sample. Only a cgroup
that does not exist (its cpu accounting file is missing) raises, as FileNotFoundError.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

NS_PER_S = 1_000_000_000
NS_PER_US = 1_000
# The longest cgroup file read here is io.stat, about 100 bytes per device; memory.stat is
# about 2 KiB. 64 KiB holds hundreds of devices and stops a runaway file from costing more.
MAX_FILE_BYTES = 64 * 1024
# v1 writes "no limit" as LONG_MAX rounded down to a page; cAdvisor treats anything above
# 2^62 as unlimited too.
V1_UNLIMITED = 1 << 62
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # cpuacct.stat's unit (USER_HZ)
PROC = Path("/proc")
SYS_DEV_BLOCK = Path("/sys/dev/block")


# --- bounded, lenient parsing ----------------------------------------------------------------


def read_small(file: Path | str) -> str | None:
    """The start of a small kernel file, or None when it cannot be read (absent, gone, or a
    read the kernel refuses, as some refuse PSI reads when it is off)."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    chunks, size = [], 0
    try:
        while size < MAX_FILE_BYTES:  # seq files hand out about a page per read
            chunk = os.read(fd, MAX_FILE_BYTES - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    return b"".join(chunks).decode("ascii", "replace")


def _read(d: Path, name: str) -> str | None:
    """A file of cgroup directory `d` (a string join: a sample reads about 25 of them)."""
    return read_small(f"{d}/{name}")


def keyed_ints(text: str | None) -> dict[str, int]:
    """`key value` lines (cpu.stat, memory.stat, memory.events, ...); other lines are skipped."""
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2:
            value = _int(parts[1])
            if value is not None:
                out[parts[0]] = value
    return out


def single_int(text: str | None) -> int | None:
    """A one-number file; None for "max", "-1" style limits, empty or unparsable contents."""
    if text is None:
        return None
    value = _int(text.strip())
    return value if value is not None and value >= 0 else None


def _int(word: str) -> int | None:
    try:
        return int(word)
    except ValueError:
        return None


@dataclass(frozen=True)
class PsiData:
    total_us: int  # stall time since the cgroup was created
    avg10: float
    avg60: float
    avg300: float


@dataclass(frozen=True)
class Pressure:
    """One `*.pressure` file: `some` (at least one task stalled), `full` (all of them)."""

    some: PsiData | None
    full: PsiData | None


def parse_pressure(text: str | None) -> Pressure | None:
    """`some avg10=0.00 avg60=0.00 avg300=0.00 total=0` and the same for `full`."""
    lines: dict[str, PsiData] = {}
    for line in (text or "").splitlines():
        kind, _, rest = line.partition(" ")
        data = _psi_line(rest)
        if kind in ("some", "full") and data is not None:
            lines[kind] = data
    if not lines:
        return None
    return Pressure(some=lines.get("some"), full=lines.get("full"))


def _psi_line(rest: str) -> PsiData | None:
    values = keyed_values("\n".join(rest.split()))
    try:
        return PsiData(total_us=int(values["total"]), avg10=float(values["avg10"]),
                       avg60=float(values["avg60"]), avg300=float(values["avg300"]))
    except (KeyError, ValueError):
        return None


# --- block devices ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockDevice:
    major: int
    minor: int
    name: str  # "/dev/vda1", or "major:minor" when the kernel names no node


@dataclass(frozen=True)
class DeviceIo:
    """Block I/O of a cgroup on one device, by operation as cAdvisor names them."""

    device: BlockDevice
    bytes: Mapping[str, int] = field(default_factory=dict)  # "Read", "Write", (v1) "Sync", ...
    ios: Mapping[str, int] = field(default_factory=dict)


def device_name(major: int, minor: int, sys_dev_block: Path = SYS_DEV_BLOCK) -> str:
    uevent = keyed_values(read_small(f"{sys_dev_block}/{major}:{minor}/uevent"))
    name = uevent.get("DEVNAME")
    return f"/dev/{name}" if name else f"{major}:{minor}"


def keyed_values(text: str | None) -> dict[str, str]:
    """`KEY=value` lines (uevent); lines without `=` are skipped."""
    out: dict[str, str] = {}
    for line in (text or "").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key] = value
    return out


def filesystem_device(path: Path, sys_dev_block: Path = SYS_DEV_BLOCK) -> BlockDevice | None:
    """The block device holding `path`; None for overlayfs, tmpfs and other anonymous ones."""
    try:
        dev = path.stat().st_dev
    except OSError:
        return None
    major, minor = os.major(dev), os.minor(dev)
    if not (sys_dev_block / f"{major}:{minor}").exists():
        return None
    return BlockDevice(major, minor, device_name(major, minor, sys_dev_block))


def whole_disk(dev: BlockDevice, sys_dev_block: Path = SYS_DEV_BLOCK) -> BlockDevice:
    """The disk a partition belongs to (I/O is accounted against the disk); else `dev`."""
    node = sys_dev_block / f"{dev.major}:{dev.minor}"
    if not (node / "partition").exists():
        return dev
    parent = _device((read_small(node.resolve().parent / "dev") or "").strip())
    if parent is None:
        return dev
    return BlockDevice(*parent, device_name(*parent, sys_dev_block))


def parse_io_stat(text: str | None) -> dict[tuple[int, int], tuple[dict[str, int], dict[str, int]]]:
    """v2 `io.stat`: `8:16 rbytes=1459200 wbytes=314773504 rios=192 wios=353 dbytes=0 dios=0`.

    Mapped as runc maps it onto v1's tables: rbytes/wbytes are Read/Write bytes, rios/wios
    Read/Write operations; discard and iocost fields are not part of them.
    """
    out: dict[tuple[int, int], tuple[dict[str, int], dict[str, int]]] = {}
    for line in (text or "").splitlines():
        words = line.split()
        dev = _device(words[0]) if words else None
        if dev is None:
            continue
        nbytes, ios = out.setdefault(dev, ({}, {}))
        for item in words[1:]:
            key, _, raw = item.partition("=")
            value = _int(raw)
            target = {"rbytes": (nbytes, "Read"), "wbytes": (nbytes, "Write"),
                      "rios": (ios, "Read"), "wios": (ios, "Write")}.get(key)
            if target is not None and value is not None:
                target[0][target[1]] = value
    return out


def parse_blkio(text: str | None) -> dict[tuple[int, int], dict[str, int]]:
    """v1 `blkio.*_recursive`: `8:0 Read 4096` lines, then a `Total N` line."""
    out: dict[tuple[int, int], dict[str, int]] = {}
    for line in (text or "").splitlines():
        words = line.split()
        dev = _device(words[0]) if len(words) == 3 else None
        value = _int(words[2]) if dev is not None else None
        if dev is not None and value is not None:
            out.setdefault(dev, {})[words[1]] = value
    return out


def _device(word: str) -> tuple[int, int] | None:
    major, sep, minor = word.partition(":")
    if not sep or not major.isdigit() or not minor.isdigit():
        return None
    return int(major), int(minor)


def _devices(by_dev: Mapping[tuple[int, int], tuple[Mapping[str, int], Mapping[str, int]]],
             sys_dev_block: Path) -> tuple[DeviceIo, ...]:  # fmt: skip
    return tuple(
        DeviceIo(BlockDevice(major, minor, device_name(major, minor, sys_dev_block)), dict(b),
                 dict(i))
        for (major, minor), (b, i) in sorted(by_dev.items())
    )


# --- the figures -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuFigures:
    usage_ns: int = 0
    user_ns: int = 0
    system_ns: int = 0
    periods: int = 0  # CFS enforcement periods elapsed (only counted under a quota)
    throttled_periods: int = 0
    throttled_ns: int = 0


@dataclass(frozen=True)
class MemoryFigures:
    usage: int = 0
    rss: int = 0  # anonymous memory (v1 total_rss, v2 anon)
    cache: int = 0  # page cache (v1 total_cache, v2 file)
    mapped_file: int = 0
    active_file: int = 0
    inactive_file: int = 0
    kernel: int | None = None  # v1 memory.kmem.usage_in_bytes, v2 memory.stat kernel
    max_usage: int = 0  # v1 max_usage_in_bytes, v2 memory.peak (kernel 5.19+)
    failcnt: int = 0  # times the limit was hit: v1 memory.failcnt, v2 memory.events max
    page_faults: int = 0
    major_page_faults: int = 0
    limit: int | None = None  # None: unlimited
    swap_usage: int | None = None  # None: no swap accounting
    swap_limit: int | None = None  # swap alone; None: unlimited

    @property
    def working_set(self) -> int:
        """What kubelet evicts on and cAdvisor reports: usage less inactive file pages."""
        return max(0, self.usage - self.inactive_file)


@dataclass(frozen=True)
class CgroupSpec:
    """The limits cAdvisor reports as container_spec_*, read back from the cgroup files."""

    cpu_shares: int = 0  # v1 cpu.shares; v2 cpu.weight mapped back onto shares
    cpu_period: int = 0
    cpu_quota: int | None = None  # None: no quota
    memory_limit: int = 0  # 0: unlimited, as cAdvisor writes it
    memory_swap_limit: int = 0  # v1 memory+swap (memsw), v2 memory.swap.max
    memory_reservation: int = 0  # v1 soft limit, v2 memory.min


@dataclass(frozen=True)
class CgroupFigures:
    cpu: CpuFigures
    memory: MemoryFigures
    spec: CgroupSpec
    io: tuple[DeviceIo, ...] = ()
    oom_kills: int = 0
    threads: int = 0  # pids.current: tasks, so threads too
    threads_max: int = 0  # pids.max; 0: unlimited, as cAdvisor writes it
    cpu_pressure: Pressure | None = None
    memory_pressure: Pressure | None = None
    io_pressure: Pressure | None = None


@dataclass(frozen=True)
class V1Dirs:
    """A cgroup on a v1 (or hybrid) host: its directory in each controller's hierarchy."""

    by_controller: Mapping[str, Path]
    unified: Path | None = None  # its directory in the v2 mount of a hybrid host (PSI lives there)

    def get(self, controller: str) -> Path | None:
        return self.by_controller.get(controller)


def read_pressures(d: Path | None) -> tuple[Pressure | None, Pressure | None, Pressure | None]:
    """(cpu, memory, io) pressure in directory `d`; None for each file the kernel lacks."""
    if d is None:
        return None, None, None
    return (parse_pressure(_read(d, "cpu.pressure")),
            parse_pressure(_read(d, "memory.pressure")),
            parse_pressure(_read(d, "io.pressure")))


def read_v2(d: Path, sys_dev_block: Path = SYS_DEV_BLOCK) -> CgroupFigures:
    """Every figure of the v2 cgroup in directory `d`."""
    cpu_text = _read(d, "cpu.stat")
    if cpu_text is None:  # present in every v2 cgroup, whatever its controllers
        raise FileNotFoundError(f"no cgroup at {d} (cpu.stat is missing)")
    cpu = keyed_ints(cpu_text)
    cpu_psi, memory_psi, io_psi = read_pressures(d)
    events = keyed_ints(_read(d, "memory.events"))
    return CgroupFigures(
        cpu=CpuFigures(
            usage_ns=cpu.get("usage_usec", 0) * NS_PER_US,
            user_ns=cpu.get("user_usec", 0) * NS_PER_US,
            system_ns=cpu.get("system_usec", 0) * NS_PER_US,
            periods=cpu.get("nr_periods", 0),
            throttled_periods=cpu.get("nr_throttled", 0),
            throttled_ns=cpu.get("throttled_usec", 0) * NS_PER_US,
        ),
        memory=_memory_v2(d, events),
        spec=_spec_v2(d),
        io=_devices(parse_io_stat(_read(d, "io.stat")), sys_dev_block),
        oom_kills=events.get("oom_kill", 0),
        threads=single_int(_read(d, "pids.current")) or 0,
        threads_max=single_int(_read(d, "pids.max")) or 0,
        cpu_pressure=cpu_psi,
        memory_pressure=memory_psi,
        io_pressure=io_psi,
    )


def _memory_v2(d: Path, events: Mapping[str, int]) -> MemoryFigures:
    stat = keyed_ints(_read(d, "memory.stat"))
    return MemoryFigures(
        usage=single_int(_read(d, "memory.current")) or 0,
        rss=stat.get("anon", 0),
        cache=stat.get("file", 0),
        mapped_file=stat.get("file_mapped", 0),
        active_file=stat.get("active_file", 0),
        inactive_file=stat.get("inactive_file", 0),
        kernel=stat.get("kernel"),
        max_usage=single_int(_read(d, "memory.peak")) or 0,
        failcnt=events.get("max", 0),
        page_faults=stat.get("pgfault", 0),
        major_page_faults=stat.get("pgmajfault", 0),
        limit=single_int(_read(d, "memory.max")),
        swap_usage=single_int(_read(d, "memory.swap.current")),
        swap_limit=single_int(_read(d, "memory.swap.max")),
    )


def weight_to_shares(weight: int) -> int:
    """cAdvisor's inverse of runc's shares→weight mapping ([1, 10000] onto [2, 262144])."""
    return 2 + (max(1, min(weight, 10000)) - 1) * 262142 // 9999


def _spec_v2(d: Path) -> CgroupSpec:
    weight = single_int(_read(d, "cpu.weight"))
    quota_word, _, period_word = (_read(d, "cpu.max") or "").strip().partition(" ")
    return CgroupSpec(
        cpu_shares=weight_to_shares(weight) if weight else 0,
        cpu_period=_int(period_word) or 0,
        cpu_quota=_int(quota_word),  # "max": None
        memory_limit=single_int(_read(d, "memory.max")) or 0,
        memory_swap_limit=single_int(_read(d, "memory.swap.max")) or 0,
        memory_reservation=single_int(_read(d, "memory.min")) or 0,
    )


def read_v1(dirs: V1Dirs, sys_dev_block: Path = SYS_DEV_BLOCK) -> CgroupFigures:
    """Every figure of a cgroup on a v1 host, from its directory in each hierarchy."""
    acct = dirs.get("cpuacct")
    usage = single_int(_read(acct, "cpuacct.usage")) if acct else None
    if usage is None:
        raise FileNotFoundError(f"no cgroup at {acct} (cpuacct.usage is missing)")
    ticks = keyed_ints(_read(acct, "cpuacct.stat")) if acct else {}
    cpu_dir, pids_dir = dirs.get("cpu"), dirs.get("pids")
    throttling = keyed_ints(_read(cpu_dir, "cpu.stat")) if cpu_dir else {}
    memory_dir, blkio_dir = dirs.get("memory"), dirs.get("blkio")
    cpu_psi, memory_psi, io_psi = read_pressures(dirs.unified)
    return CgroupFigures(
        cpu=CpuFigures(
            usage_ns=usage,
            user_ns=ticks.get("user", 0) * NS_PER_S // CLOCK_TICKS,
            system_ns=ticks.get("system", 0) * NS_PER_S // CLOCK_TICKS,
            periods=throttling.get("nr_periods", 0),
            throttled_periods=throttling.get("nr_throttled", 0),
            throttled_ns=throttling.get("throttled_time", 0),
        ),
        memory=_memory_v1(memory_dir) if memory_dir else MemoryFigures(),
        spec=_spec_v1(cpu_dir, memory_dir),
        io=_io_v1(blkio_dir, sys_dev_block) if blkio_dir else (),
        oom_kills=(keyed_ints(_read(memory_dir, "memory.oom_control")).get("oom_kill", 0)
                   if memory_dir else 0),
        threads=(single_int(_read(pids_dir, "pids.current")) or 0) if pids_dir else 0,
        threads_max=(single_int(_read(pids_dir, "pids.max")) or 0) if pids_dir else 0,
        cpu_pressure=cpu_psi,
        memory_pressure=memory_psi,
        io_pressure=io_psi,
    )


def _v1_limit(d: Path, name: str) -> int | None:
    value = single_int(_read(d, name))
    return None if value is None or value >= V1_UNLIMITED else value


def _memory_v1(d: Path) -> MemoryFigures:
    stat = keyed_ints(_read(d, "memory.stat"))
    usage = single_int(_read(d, "memory.usage_in_bytes")) or 0
    limit = _v1_limit(d, "memory.limit_in_bytes")
    # v1 counts memory+swap together (memsw); swap alone is the difference.
    memsw = single_int(_read(d, "memory.memsw.usage_in_bytes"))
    memsw_limit = _v1_limit(d, "memory.memsw.limit_in_bytes")
    swap_limit = None
    if memsw_limit is not None and limit is not None:
        swap_limit = max(0, memsw_limit - limit)
    return MemoryFigures(
        usage=usage,
        rss=stat.get("total_rss", 0),
        cache=stat.get("total_cache", 0),
        mapped_file=stat.get("total_mapped_file", 0),
        active_file=stat.get("total_active_file", 0),
        inactive_file=stat.get("total_inactive_file", 0),
        kernel=single_int(_read(d, "memory.kmem.usage_in_bytes")),
        max_usage=single_int(_read(d, "memory.max_usage_in_bytes")) or 0,
        failcnt=single_int(_read(d, "memory.failcnt")) or 0,
        page_faults=stat.get("total_pgfault", 0),
        major_page_faults=stat.get("total_pgmajfault", 0),
        limit=limit,
        swap_usage=None if memsw is None else max(0, memsw - usage),
        swap_limit=swap_limit,
    )


def _spec_v1(cpu: Path | None, memory: Path | None) -> CgroupSpec:
    quota = _int((_read(cpu, "cpu.cfs_quota_us") or "").strip()) if cpu else None
    return CgroupSpec(
        cpu_shares=(single_int(_read(cpu, "cpu.shares")) or 0) if cpu else 0,
        cpu_period=(single_int(_read(cpu, "cpu.cfs_period_us")) or 0) if cpu else 0,
        cpu_quota=quota if quota is not None and quota >= 0 else None,
        memory_limit=(_v1_limit(memory, "memory.limit_in_bytes") or 0) if memory else 0,
        memory_swap_limit=(_v1_limit(memory, "memory.memsw.limit_in_bytes") or 0) if memory
        else 0,
        memory_reservation=(_v1_limit(memory, "memory.soft_limit_in_bytes") or 0) if memory
        else 0,
    )


def _io_v1(d: Path, sys_dev_block: Path) -> tuple[DeviceIo, ...]:
    for prefix in ("blkio.throttle.", "blkio.bfq."):
        nbytes = _read(d, f"{prefix}io_service_bytes_recursive")
        if nbytes is not None:
            ios = parse_blkio(_read(d, f"{prefix}io_serviced_recursive"))
            by_bytes = parse_blkio(nbytes)
            merged = {dev: (by_bytes.get(dev, {}), ios.get(dev, {}))
                      for dev in by_bytes.keys() | ios.keys()}
            return _devices(merged, sys_dev_block)
    return ()


# --- processes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessFigures:
    """What cAdvisor reads from /proc for a container's processes."""

    fds: int = 0
    sockets: int = 0
    open_files_soft_limit: int | None = None  # the root process's RLIMIT_NOFILE; None: unknown


def read_processes(pids: Iterable[int], root_pid: int, proc: Path = PROC) -> ProcessFigures:
    """Open fds and sockets of `pids`, and the soft open-files limit of `root_pid`.

    A process that exits while it is being read is skipped.
    """
    fds = sockets = 0
    for pid in pids:
        fd_dir = proc / str(pid) / "fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:
            continue
        fds += len(names)
        for name in names:
            try:
                if os.readlink(fd_dir / name).startswith("socket:"):
                    sockets += 1
            except OSError:
                continue
    limit = open_files_soft_limit(read_small(proc / str(root_pid) / "limits")) if root_pid else None
    return ProcessFigures(fds=fds, sockets=sockets, open_files_soft_limit=limit)


def open_files_soft_limit(limits: str | None) -> int | None:
    """The soft value of `/proc/<pid>/limits`' "Max open files" line; None if unlimited."""
    for line in (limits or "").splitlines():
        if line.startswith("Max open files"):
            words = line[len("Max open files"):].split()
            return single_int(words[0]) if len(words) == 3 else None
    return None
