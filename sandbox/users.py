"""Users and groups of a container image, and the CRI rules for picking the process identity.

The image rootfs is untrusted: its /etc/passwd may be a symlink to /../../etc/shadow of the
host. Files are therefore opened with every path component resolved *inside* the rootfs
(symlinks re-rooted at the rootfs, ".." clamped at its root), one O_NOFOLLOW step at a time
from a directory fd, so nothing outside the rootfs can be reached even by a racing rename.
"""

from __future__ import annotations

import enum
import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

# Linux gives up after 40 symlinks in one lookup; so do we.
MAX_SYMLINKS = 40
# Bound what we read from an untrusted file: a passwd file of gigabytes is an attack, not a user db.
MAX_DB_BYTES = 4 * 1024 * 1024


class UserError(ValueError):
    """The requested user or group cannot be resolved against the image."""


class GroupsPolicy(enum.IntEnum):
    """Mirror of CRI SupplementalGroupsPolicy (Merge = 0, Strict = 1)."""

    MERGE = 0
    STRICT = 1


@dataclass(frozen=True)
class PasswdEntry:
    name: str
    uid: int
    gid: int
    home: str


@dataclass(frozen=True)
class GroupEntry:
    name: str
    gid: int
    members: tuple[str, ...]


@dataclass(frozen=True)
class ResolvedUser:
    uid: int
    gid: int
    additional_gids: tuple[int, ...]
    username: str | None = None
    home: str | None = None


def _open_component(dir_fd: int, name: str) -> int:
    return os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def open_in_root(root: Path, rel: str) -> int:
    """Open `rel` for reading with all symlinks resolved within `root`; returns an fd.

    Raises FileNotFoundError when the path (or a link target) does not exist in the root.
    """
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    stack: list[int] = [root_fd]  # fds of the directories walked so far; [0] is the root
    pending = [p for p in rel.split("/") if p not in ("", ".")]
    pending.reverse()
    links = 0
    try:
        while pending:
            part = pending.pop()
            if part == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                continue
            fd = _open_component(stack[-1], part)
            st = os.fstat(fd)
            if _is_symlink(st.st_mode):
                target = os.readlink(part, dir_fd=stack[-1])
                os.close(fd)
                links += 1
                if links > MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, "too many symlinks", rel)
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                more = [p for p in target.split("/") if p not in ("", ".")]
                pending.extend(reversed(more))
                continue
            if pending and not _is_dir(st.st_mode):
                os.close(fd)
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", rel)
            stack.append(fd)
        if len(stack) == 1:
            raise IsADirectoryError(errno.EISDIR, "is the root", rel)
        # Re-open the final O_PATH fd for reading through /proc: no path lookup happens.
        return os.open(f"/proc/self/fd/{stack[-1]}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        for fd in stack:
            os.close(fd)


def _is_symlink(mode: int) -> bool:
    return (mode & 0o170000) == 0o120000


def _is_dir(mode: int) -> bool:
    return (mode & 0o170000) == 0o040000


def read_in_root(root: Path, rel: str) -> str | None:
    """Text of a regular file inside the rootfs, or None when it does not exist."""
    try:
        fd = open_in_root(root, rel)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    with os.fdopen(fd, "rb") as f:
        if (os.fstat(f.fileno()).st_mode & 0o170000) != 0o100000:
            return None
        return f.read(MAX_DB_BYTES).decode("utf-8", errors="replace")


def parse_passwd(text: str) -> list[PasswdEntry]:
    entries = []
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) < 4 or line.startswith("#"):
            continue
        try:
            uid, gid = int(parts[2]), int(parts[3])
        except ValueError:
            continue
        home = parts[5] if len(parts) > 5 else ""
        entries.append(PasswdEntry(name=parts[0], uid=uid, gid=gid, home=home))
    return entries


def parse_group(text: str) -> list[GroupEntry]:
    entries = []
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) < 3 or line.startswith("#"):
            continue
        try:
            gid = int(parts[2])
        except ValueError:
            continue
        members = tuple(m for m in parts[3].split(",") if m) if len(parts) > 3 else ()
        entries.append(GroupEntry(name=parts[0], gid=gid, members=members))
    return entries


def _parse_id(text: str) -> int | None:
    return int(text) if text.isdigit() else None


@dataclass(frozen=True)
class UserDb:
    """The image's users and groups (empty when the image has no /etc/passwd or /etc/group)."""

    users: tuple[PasswdEntry, ...] = ()
    groups: tuple[GroupEntry, ...] = field(default=())

    @classmethod
    def from_rootfs(cls, rootfs: Path) -> UserDb:
        passwd = read_in_root(rootfs, "etc/passwd") or ""
        group = read_in_root(rootfs, "etc/group") or ""
        return cls(tuple(parse_passwd(passwd)), tuple(parse_group(group)))

    def user_by_name(self, name: str) -> PasswdEntry | None:
        return next((u for u in self.users if u.name == name), None)

    def user_by_uid(self, uid: int) -> PasswdEntry | None:
        return next((u for u in self.users if u.uid == uid), None)

    def group_by_name(self, name: str) -> GroupEntry | None:
        return next((g for g in self.groups if g.name == name), None)

    def member_gids(self, username: str) -> list[int]:
        """Gids of the groups that list `username` as a member (the /etc/group part of Merge)."""
        return [g.gid for g in self.groups if username in g.members]

    def _lookup_user(self, spec: str) -> tuple[int, int, PasswdEntry | None]:
        """uid, primary gid and entry for a user part ("name" or "uid")."""
        uid = _parse_id(spec)
        if uid is not None:
            entry = self.user_by_uid(uid)
            # A uid unknown to the image is valid: gid 0, as docker and containerd do.
            return uid, entry.gid if entry else 0, entry
        entry = self.user_by_name(spec)
        if entry is None:
            raise UserError(f"user {spec!r} not found in the image's /etc/passwd")
        return entry.uid, entry.gid, entry

    def _lookup_group(self, spec: str) -> int:
        gid = _parse_id(spec)
        if gid is not None:
            return gid
        entry = self.group_by_name(spec)
        if entry is None:
            raise UserError(f"group {spec!r} not found in the image's /etc/group")
        return entry.gid

    def resolve(
        self,
        user_spec: str,
        run_as_user: int | None = None,
        run_as_username: str = "",
        run_as_group: int | None = None,
        supplemental_groups: tuple[int, ...] | list[int] = (),
        policy: GroupsPolicy = GroupsPolicy.MERGE,
    ) -> ResolvedUser:
        """The process identity following containerd's CRI rules.

        `user_spec` is the image config's User ("name", "uid", "uid:gid", "name:group").
        run_as_user wins over run_as_username, which wins over the image's User; run_as_group
        replaces the primary group and is only valid with a user. Merge adds the groups of
        /etc/group that list the user; Strict uses only the primary gid and supplemental_groups.
        """
        if run_as_user is not None:
            user_part, group_part = str(run_as_user), ""
        elif run_as_username:
            user_part, group_part = run_as_username, ""
        elif user_spec:
            user_part, _, group_part = user_spec.partition(":")
        else:
            user_part, group_part = "0", ""
        if run_as_group is not None:
            if run_as_user is None and not run_as_username:
                raise UserError("run_as_group is specified without run_as_user or run_as_username")
            group_part = str(run_as_group)
        uid, gid, entry = self._lookup_user(user_part or "0")
        if group_part:
            gid = self._lookup_group(group_part)
        gids: list[int] = [gid]
        if policy == GroupsPolicy.MERGE and entry is not None:
            gids += self.member_gids(entry.name)
        gids += [int(g) for g in supplemental_groups]
        return ResolvedUser(
            uid=uid,
            gid=gid,
            additional_gids=tuple(dict.fromkeys(gids)),
            username=entry.name if entry else None,
            home=entry.home if entry else None,
        )
