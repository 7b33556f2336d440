"""What the shim zygote preloads: what it must not import, and what it leaves behind."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from shim.client import fork_shim, start_zygote, zygote_call
from tests.daemon import TIME_SCALE

REPO = Path(__file__).resolve().parent.parent


def _run_in_fresh_python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env=env, timeout=60).stdout


def test_preload_imports_no_threading_and_no_subprocess() -> None:
    """threading's at-fork hook runs in every forked shim and un-shares ~0.5 MiB per shim;
    subprocess is what used to import it."""
    out = _run_in_fresh_python(
        "import sys\n"
        "from shim import zygote\n"
        "zygote.preload()\n"
        "print(sorted(m for m in ('threading', 'subprocess') if m in sys.modules))\n")
    assert out.strip() == "[]"


def test_preload_imports_every_module_of_the_shims_protocol() -> None:
    """A module a shim imports after the fork is private to that shim, not shared: the op
    handlers and what they share must be loaded by the zygote."""
    wanted = sorted(f"shim.{path.stem}" for path in (REPO / "shim").glob("ops_*.py"))
    assert len(wanted) >= 3, wanted
    out = _run_in_fresh_python(
        "import sys\n"
        "from shim import zygote\n"
        "zygote.preload()\n"
        f"print([m for m in {[*wanted, 'shim.state']!r} if m not in sys.modules])\n")
    assert out.strip() == "[]"


def test_preload_leaves_no_fd_and_no_child() -> None:
    """The warm-up runs a throwaway Shim and /bin/true: nothing of it may reach a shim."""
    out = _run_in_fresh_python(
        "import os\n"
        "before = sorted(os.listdir('/proc/self/fd'))\n"
        "from shim import zygote\n"
        "zygote.preload()\n"
        "after = sorted(os.listdir('/proc/self/fd'))\n"
        "try:\n"
        "    os.waitpid(-1, os.WNOHANG)\n"
        "    children = 'some'\n"
        "except ChildProcessError:\n"
        "    children = 'none'\n"
        "print(before == after, children)\n")
    assert out.split() == ["True", "none"]


def test_preload_leaves_no_free_chunk_inside_the_malloc_heap() -> None:
    """A shim's large allocations must come from the heap's top, not from holes on pages
    it shares with the zygote (shim/zygote.py _fill_malloc_holes). mallinfo2: fordblks is
    all free space, keepcost the top chunk's; imports leave about 1 MiB between them."""
    out = _run_in_fresh_python(
        "from shim import zygote\n"
        "from shim.server import load_libc\n"
        "libc = load_libc()\n"
        "if not hasattr(libc, 'mallinfo2'):\n"
        "    print('skip')\n"
        "else:\n"
        "    zygote.preload()\n"
        "    libc.mallinfo2.restype = zygote._Mallinfo2\n"
        "    info = libc.mallinfo2()\n"
        "    print(info.fordblks - info.keepcost)\n")
    if out.strip() == "skip":
        pytest.skip("not glibc 2.33 or later")
    # Below the 32 bytes of the smallest chunk, per size: nothing a shim could allocate.
    assert int(out) < 4096, out


def test_spawn_args_match_the_shim_command_line() -> None:
    out = _run_in_fresh_python(
        "from shim import zygote, __main__ as m\n"
        "request = {'pod_id': 'p', 'dir': '/d', 'runc_root': '/r', 'log_level': 'debug',\n"
        "           'runc': '/usr/bin/crun', 'runc_args': ['--debug', '--x=y']}\n"
        "built = vars(zygote.spawn_args(request))\n"
        "parsed = vars(m.parse_args(['--pod-id', 'p', '--dir', '/d', '--runc-root', '/r',\n"
        "                            '--log-level', 'debug', '--foreground',\n"
        "                            '--runc', '/usr/bin/crun',\n"
        "                            '--runc-arg=--debug', '--runc-arg=--x=y']))\n"
        "assert built['runc_args'] == ['--debug', '--x=y'], built\n"
        "print(built == parsed)\n")
    assert out.strip() == "True"


def test_marking_skips_a_mapping_unmapped_meanwhile() -> None:
    """The allocator may unmap an arena between reading /proc/self/maps and marking it: that
    mapping is skipped (ENOMEM), the rest are still marked."""
    out = _run_in_fresh_python(
        "import ctypes, mmap\n"
        "from pathlib import Path\n"
        "from shim import ksm\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "libc.mmap.restype = ctypes.c_void_p\n"
        "libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,\n"
        "                      ctypes.c_int, ctypes.c_long]\n"
        "libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]\n"
        "libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]\n"
        "size = 1 << 20\n"
        "doomed = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE,\n"
        "                   mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)\n"
        "refused = []\n"
        "def madvise(address, length, advice):\n"
        "    if address <= doomed < address + length:\n"
        "        libc.munmap(doomed, size)\n"
        "    if libc.madvise(address, length, advice) != 0:\n"
        "        refused.append(ctypes.get_errno())\n"
        "        raise OSError(refused[-1], 'madvise')\n"
        "marked = ksm.mark_mergeable(madvise)\n"
        "heap = Path('/proc/self/smaps').read_text().split('[heap]\\n', 1)[1]\n"
        "flags = next(l for l in heap.splitlines() if l.startswith('VmFlags:'))\n"
        "print(refused, marked > 0, ' mg' in flags)\n")
    assert out.split() == ["[12]", "True", "True"]  # 12: ENOMEM


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name: state, ppid, pgrp, session, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


async def _fork_one_shim_and_stop_it(state: str) -> tuple[int, list[str], list[str]]:
    """The zygote's pid, a shim's stat fields while it serves, and the stat fields left of
    it once it has exited ([] when nothing is: reaped)."""
    zygote_socket = os.path.join(state, "zygote.sock")
    await start_zygote(zygote_socket, timeout=30 * TIME_SCALE)
    try:
        zygote = int((await zygote_call(zygote_socket, "ping", timeout=30 * TIME_SCALE))["pid"])
        client, pid = await fork_shim(zygote_socket, "reap-test", os.path.join(state, "pod"),
                                      os.path.join(state, "runc"), timeout=30 * TIME_SCALE)
        assert (await client.shim_state()).pid == pid, "the zygote's answer names the shim"
        serving = _stat_fields(pid)
        await client.shutdown()
        deadline = time.monotonic() + 10 * TIME_SCALE  # generous: a loaded 2-core machine
        left = serving
        while left and left[0] != "Z" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            try:
                left = _stat_fields(pid)
            except FileNotFoundError:
                left = []
        if left and left[0] == "Z":  # a zombie stays: give the reaping a moment all the same
            await asyncio.sleep(0.5)
            left = _stat_fields(pid) if os.path.exists(f"/proc/{pid}") else []
        return zygote, serving, left
    finally:
        await zygote_call(zygote_socket, "stop", timeout=30 * TIME_SCALE)


def test_a_shim_is_the_zygote_s_child_and_leaves_no_zombie() -> None:
    """One fork per shim: the zygote's child, leading a session of its own; the zygote
    ignores SIGCHLD, so a shim that exits is reaped by the kernel, not left a zombie."""
    state = tempfile.mkdtemp(prefix="fpt-reap-", dir="/run")  # a short unix socket path
    try:
        zygote, serving, left = asyncio.run(_fork_one_shim_and_stop_it(state))
    finally:
        shutil.rmtree(state, ignore_errors=True)
    _, ppid, pgrp, session = serving[:4]
    assert int(ppid) == zygote, serving
    assert int(session) == int(pgrp) != zygote, "a session of its own, not the zygote's"
    assert left == [], f"the exited shim is left as {left[:2]}"
