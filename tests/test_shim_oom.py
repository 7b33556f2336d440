"""OOM kills of a container whose systemd scope is already gone when the shim sees its exit.

systemd removes an emptied scope by itself; under a slow shim (the emulated CPU of the VM
stage) that happened before the exit was handled, and an OOM kill was reported as "Error".
The kernel's own files cannot be made to race here, so the cgroup files are laid out in a
temporary directory the way cgroup v2 shows them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from shim.server import _killed_in_a_removed_scope
from shim.state import Container, parent_oom_events, read_oom_kills_if_present

SIGKILLED = 137


def _events(path: Path, oom_kill: int) -> None:
    path.write_text(f"low 0\nhigh 0\nmax 3\noom 1\noom_kill {oom_kill}\noom_group_kill 0\n")


def _container(tmp_path: Path, parent_kills: int) -> tuple[Container, Path]:
    slice_dir = tmp_path / "kubepods-pod1.slice"
    scope = slice_dir / "flatpod-c1.scope"
    scope.mkdir(parents=True)
    _events(slice_dir / "memory.events", parent_kills)
    _events(scope / "memory.events", 0)
    container = Container(id="c1", bundle=str(tmp_path), pid=1, tty=False, stdin_once=False,
                          exit_file=str(tmp_path / "exit"), log=None, stdin=None,
                          oom_control=str(scope / "memory.events"), systemd_cgroup=True)
    container.oom_parent_kills_at_create = read_oom_kills_if_present(
        parent_oom_events(container.oom_control))
    return container, scope


def test_a_kill_counted_by_the_parent_after_the_scope_is_gone_is_an_oom_kill(
        tmp_path: Path) -> None:
    container, scope = _container(tmp_path, parent_kills=2)
    assert container.oom_parent_kills_at_create == 2
    _events(scope.parent / "memory.events", 3)
    shutil.rmtree(scope)
    assert _killed_in_a_removed_scope(container, SIGKILLED)


def test_no_new_kill_in_the_parent_or_another_exit_is_not_an_oom_kill(tmp_path: Path) -> None:
    container, scope = _container(tmp_path, parent_kills=2)
    shutil.rmtree(scope)
    assert not _killed_in_a_removed_scope(container, SIGKILLED)  # the parent's count is unchanged
    _events(scope.parent / "memory.events", 3)
    assert not _killed_in_a_removed_scope(container, 1)  # not killed by SIGKILL


def test_a_scope_still_there_answers_for_itself(tmp_path: Path) -> None:
    container, scope = _container(tmp_path, parent_kills=2)
    _events(scope.parent / "memory.events", 3)  # a sibling's kill, counted by the parent
    assert not _killed_in_a_removed_scope(container, SIGKILLED)
