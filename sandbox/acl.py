"""POSIX access ACLs on directories, written as the `system.posix_acl_access` xattr.

The kernel's format (include/uapi/linux/posix_acl_xattr.h): a little-endian u32 version (2),
then one 8-byte entry per ACL entry: u16 tag, u16 permissions, u32 id (named entries only).
Written here with os.setxattr rather than through setfacl: one syscall per directory, no
extra package, and the daemon never parses a tool's output. The filesystems a state dir lives
on take it: tmpfs with CONFIG_TMPFS_POSIX_ACL (Debian 12's kernel has it), ext4, xfs, btrfs.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

XATTR = "system.posix_acl_access"
VERSION = 2
NO_ID = 0xFFFFFFFF  # the id field of the unnamed entries
_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")
EXECUTE = 0o1


class Tag(IntEnum):
    """Entry tags, in the order the kernel requires them."""

    USER_OBJ = 0x01
    USER = 0x02
    GROUP_OBJ = 0x04
    GROUP = 0x08
    MASK = 0x10
    OTHER = 0x20


@dataclass(frozen=True, order=True)
class Entry:
    tag: Tag
    id: int = NO_ID
    perm: int = 0


class AclError(OSError):
    """An ACL flatpod cannot read or write; the message names the directory."""


def encode(entries: Iterable[Entry]) -> bytes:
    return _HEADER.pack(VERSION) + b"".join(
        _ENTRY.pack(e.tag, e.perm, e.id) for e in sorted(entries)
    )


def decode(data: bytes) -> list[Entry]:
    if len(data) < _HEADER.size or (len(data) - _HEADER.size) % _ENTRY.size:
        raise ValueError(f"an ACL xattr of {len(data)} bytes is not whole entries")
    (version,) = _HEADER.unpack_from(data)
    if version != VERSION:
        raise ValueError(f"ACL xattr version {version}, not {VERSION}")
    return [Entry(Tag(tag), ident, perm)
            for tag, perm, ident in _ENTRY.iter_unpack(data[_HEADER.size:])]


def read(path: Path) -> list[Entry]:
    """The extended ACL of `path`; [] when it has none (its mode bits are all there is)."""
    try:
        return decode(os.getxattr(path, XATTR, follow_symlinks=False))
    except OSError as err:
        if err.errno == errno.ENODATA:
            return []
        raise AclError(err.errno, f"reading the ACL of {path}: {err.strerror}") from err


def named_groups(path: Path) -> set[int]:
    return {e.id for e in read(path) if e.tag is Tag.GROUP}


def owner_only_but_traversable_by(path: Path, gids: Iterable[int]) -> None:
    """`path` (a dir) is its owner's (rwx), and each of `gids` may traverse it (--x, never
    list it); nobody else has anything. With no gids it has no ACL at all, mode 0700.

    The whole ACL is written in one setxattr, so it is never half of an old and a new set; the
    kernel keeps the mode's group bits equal to the mask (--x), so a later chmod 0700 masks
    every named entry, and this is what restores them."""
    named = sorted(set(gids))
    try:
        if not named:
            try:
                os.removexattr(path, XATTR, follow_symlinks=False)
            except OSError as err:  # none there, or a filesystem without ACLs
                if err.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                    raise
            os.chmod(path, 0o700)
            return
        os.setxattr(path, XATTR, encode([
            Entry(Tag.USER_OBJ, perm=0o7), Entry(Tag.GROUP_OBJ), Entry(Tag.OTHER),
            Entry(Tag.MASK, perm=EXECUTE), *(Entry(Tag.GROUP, gid, EXECUTE) for gid in named),
        ]), follow_symlinks=False)
    except OSError as err:
        raise AclError(err.errno, f"setting the ACL of {path}: {err.strerror}") from err
