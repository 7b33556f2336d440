"""What the shim zygote preloads: what it must not import, and what it leaves behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _run_in_fresh_python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env=env, timeout=60).stdout


def test_preload_imports_no_threading_and_no_subprocess() -> None:
    """threading's at-fork hook runs in every forked shim (twice: the intermediate child
    too) and un-shares ~0.5 MiB per shim; subprocess is what used to import it."""
    out = _run_in_fresh_python(
        "import sys\n"
        "from shim import zygote\n"
        "zygote.preload()\n"
        "print(sorted(m for m in ('threading', 'subprocess') if m in sys.modules))\n")
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


def test_spawn_args_match_the_shim_command_line() -> None:
    out = _run_in_fresh_python(
        "from shim import zygote, __main__ as m\n"
        "request = {'pod_id': 'p', 'dir': '/d', 'runc_root': '/r', 'log_level': 'debug'}\n"
        "built = vars(zygote.spawn_args(request))\n"
        "parsed = vars(m.parse_args(['--pod-id', 'p', '--dir', '/d', '--runc-root', '/r',\n"
        "                            '--log-level', 'debug', '--foreground']))\n"
        "print(built == parsed)\n")
    assert out.strip() == "True"
