"""/proc readings: the process table, memory of one process, its cgroups."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    comm: str
    cmdline: tuple[str, ...]

    @property
    def argv0(self) -> str:
        return os.path.basename(self.cmdline[0]) if self.cmdline else ""

    def mentions(self, text: str) -> bool:
        return any(text in arg for arg in self.cmdline)


def _read_proc(pid: int) -> Proc | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    # comm is in parentheses and may hold spaces or ')': split after the last ')'.
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
    args = tuple(a.decode(errors="replace") for a in raw.split(b"\0") if a)
    return Proc(pid, ppid, comm, args)


def snapshot() -> dict[int, Proc]:
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            proc = _read_proc(int(entry))
            if proc is not None:
                table[proc.pid] = proc
    return table


def children(table: dict[int, Proc], pid: int) -> list[Proc]:
    return [p for p in table.values() if p.ppid == pid]


def smaps_rollup_kb(pid: int) -> dict[str, int]:
    """The kB fields of /proc/<pid>/smaps_rollup (Rss, Pss, Private_Dirty...)."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
            fields[parts[0][:-1]] = int(parts[1])
    return fields


def uss_pss_mib(pid: int) -> tuple[float, float]:
    """USS (pages only this process maps) and PSS (shared pages split among sharers)."""
    rollup = smaps_rollup_kb(pid)
    uss = rollup.get("Private_Clean", 0) + rollup.get("Private_Dirty", 0)
    return uss / 1024, rollup.get("Pss", 0) / 1024


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def in_cgroup_named(pid: int, name: str) -> bool:
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return False
    return any(f"/{name}/" in line or line.endswith(f"/{name}") for line in text.splitlines())


def ksm_full_scans() -> int:
    """How many full passes ksmd has made (0 without KSM)."""
    try:
        return int(Path("/sys/kernel/mm/ksm/full_scans").read_text())
    except OSError:
        return 0


def ksmd_cpu_seconds() -> float:
    """CPU time ksmd (a kernel thread) has used since boot; 0 without KSM."""
    for proc in snapshot().values():
        if proc.comm == "ksmd" and proc.ppid == 2:  # a child of kthreadd
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0
