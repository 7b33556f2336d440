"""Users and groups of a container image, and the CRI rules for picking the process identity.

The image rootfs is untrusted: its /etc/passwd may be a symlink to /../../etc/shadow of the
host. Files are therefore opened with every path component resolved *inside* the rootfs
(symlinks re-rooted at the rootfs, ".." clamped at its root), one O_NOFOLLOW step at a time
from a directory fd, so nothing outside the rootfs can be reached even by a racing rename.
Only a regular file of at most MAX_DB_BYTES is read: a FIFO or a device is refused from its
O_PATH fd before it is opened, and the read has a deadline.
"""

from __future__ import annotations

import enum
import errno
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.errors import FailedPrecondition

# Linux gives up after 40 symlinks in one lookup; so do we.
MAX_SYMLINKS = 40
# A user database of more than 1 MiB is an attack, not a user db (Debian's is ~1.5 KiB; a
# directory-backed host with 5,000 users is ~400 KiB). Larger fails, it is never truncated.
MAX_DB_BYTES = 1024 * 1024
# Reading at most MAX_DB_BYTES of a regular file on the node's own disk takes milliseconds; a
# read still going after this long is a stuck disk, and the worker thread gives up.
READ_DEADLINE_SECONDS = 5.0
READ_CHUNK = 64 * 1024


class UserError(ValueError):
    """The requested user or group cannot be resolved against the image."""


class UnsafeImageFile(FailedPrecondition):
    """A file flatpod reads from an image is not a regular file of a sane size."""


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
        # The O_PATH fd's type is the inode's: a FIFO or a device is refused before it is ever
        # opened (opening either can block or reach a driver). The re-open through /proc does
        # no path lookup, and O_NONBLOCK keeps it from waiting for anything.
        mode = os.fstat(stack[-1]).st_mode
        if not stat.S_ISREG(mode):
            raise UnsafeImageFile(
                f"the image's /{rel} is a {_kind(mode)}, not a regular file: refused"
            )
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
        return os.open(f"/proc/self/fd/{stack[-1]}", flags)
    finally:
        for fd in stack:
            os.close(fd)


def _is_symlink(mode: int) -> bool:
    return (mode & 0o170000) == 0o120000


def _is_dir(mode: int) -> bool:
    return (mode & 0o170000) == 0o040000


def open_to_group(path: Path, host_gid: int) -> None:
    """Lets the pod's user namespace traverse `path` (a bundle or pod dir), and nobody else.

    runc mounts the rootfs and the pod's files from inside the namespace, where host root's
    dirs are "others'". 0711 would open them to every host user too, and below them are the
    rootfs with the image's device nodes and setuid files: so the dir is group-owned by the
    gid the namespace's root has on the host, 0710."""
    os.chown(path, 0, host_gid)
    os.chmod(path, 0o710)


def _kind(mode: int) -> str:
    kinds = (
        (stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"),
    )
    return next((name for test, name in kinds if test(mode)), "special file")


def read_in_root(
    root: Path, rel: str, deadline_seconds: float = READ_DEADLINE_SECONDS
) -> str | None:
    """Text of a regular file inside the rootfs, or None when it does not exist.

    Anything but a regular file of at most MAX_DB_BYTES, or a read that outlasts the
    deadline, raises UnsafeImageFile naming the file: a user db silently ignored or cut short
    would run the container as a different user than the image says."""
    try:
        fd = open_in_root(root, rel)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except IsADirectoryError:
        raise UnsafeImageFile(f"the image's /{rel} is a directory, not a regular file") from None
    deadline = time.monotonic() + deadline_seconds
    with os.fdopen(fd, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_DB_BYTES:
            raise UnsafeImageFile(
                f"the image's /{rel} has {size} bytes, more than the {MAX_DB_BYTES} "
                "flatpod reads from an image"
            )
        chunks: list[bytes] = []
        total = 0
        while chunk := f.read(READ_CHUNK):
            total += len(chunk)
            if total > MAX_DB_BYTES:  # it grew since fstat (a writable layer in use)
                raise UnsafeImageFile(f"the image's /{rel} grew past {MAX_DB_BYTES} bytes")
            if time.monotonic() > deadline:
                raise UnsafeImageFile(
                    f"reading the image's /{rel} took more than {deadline_seconds:g}s"
                )
            chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


def parse_passwd(text: str) -> list[PasswdEntry]:
    entries = []
    for parts, (uid, gid) in _id_lines(text, min_fields=4, id_fields=(2, 3)):
        home = parts[5] if len(parts) > 5 else ""
        entries.append(PasswdEntry(name=parts[0], uid=uid, gid=gid, home=home))
    return entries


def parse_group(text: str) -> list[GroupEntry]:
    entries = []
    for parts, (gid,) in _id_lines(text, min_fields=3, id_fields=(2,)):
        members = tuple(m for m in parts[3].split(",") if m) if len(parts) > 3 else ()
        entries.append(GroupEntry(name=parts[0], gid=gid, members=members))
    return entries


def _id_lines(
    text: str, min_fields: int, id_fields: tuple[int, ...]
) -> Iterator[tuple[list[str], tuple[int, ...]]]:
    """The fields of each line of an /etc/passwd- or /etc/group-style file, with its numeric
    ids (`id_fields`). Comments, lines of fewer than `min_fields` fields and lines whose id
    is not a number are skipped."""
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) < min_fields or line.startswith("#"):
            continue
        try:
            ids = tuple(int(parts[i]) for i in id_fields)
        except ValueError:
            continue
        yield parts, ids


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
