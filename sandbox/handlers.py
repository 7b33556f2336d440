"""Runtime handlers: which OCI runtime, binary and --root, runs a pod and its containers.

kubelet names a handler per pod, a RuntimeClass's `handler` ("" for the default), and the
configuration maps each name to a runtime with runc's command line (`[runtimes.<name>]`). A
pod's handler is fixed when it is made: its shim gets that runtime's binary, root and global
options and keeps them for life, also across daemon restarts, and the daemon's own calls for
the pod (deleting state a dead shim left) use the same ones. Each handler has its own root,
so `<binary> --root <root> list` shows exactly that handler's containers.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netns import libc
from sandbox.config import Config
from sandbox.errors import FailedPrecondition, InvalidArgument
from sandbox.records import PodRecord
from shim.runc import Runc, RuncError

log = logging.getLogger("flatpod.handlers")
RUNC_VERSION_ANNOTATION = "org.opencontainers.runc.version"


@dataclass(frozen=True)
class Handler:
    name: str
    binary: str
    root: Path
    global_args: tuple[str, ...] = ()

    def runc(self, systemd_cgroup: bool = False) -> Runc:
        """The driver for this handler's runtime (shim/runc.py: the one door to it);
        `systemd_cgroup` for calls that change a systemd scope (`update`)."""
        extra = [*self.global_args, *(["--systemd-cgroup"] if systemd_cgroup else [])]
        # libc's posix_spawn through ctypes: the GIL is released while the child execs.
        return Runc(root=str(self.root), binary=self.binary, extra_global_args=extra,
                    posix_spawn=libc.posix_spawn)


@dataclass(frozen=True)
class Features:
    """What a runtime's `features` document says, as far as the CRI asks."""

    mount_options: frozenset[str] = frozenset()
    namespaces: frozenset[str] = frozenset()
    runc_version: str = ""  # runc's own annotation; "" for another runtime

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> Features:
        linux = doc.get("linux") or {}
        annotations = doc.get("annotations") or {}
        return cls(mount_options=frozenset(map(str, doc.get("mountOptions") or [])),
                   namespaces=frozenset(map(str, linux.get("namespaces") or [])),
                   runc_version=str(annotations.get(RUNC_VERSION_ANNOTATION, "")))


@dataclass
class RuntimeHandlers:
    by_name: dict[str, Handler]
    default: str
    # Where a handler that is no longer configured had its default root.
    state_dir: Path
    # Each runtime's features, probed once per daemon (as containerd does at start).
    _features: dict[str, Features] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Config) -> RuntimeHandlers:
        handlers = {
            name: Handler(name, table.runtime_path, Path(table.runtime_root),
                          tuple(table.global_args))
            for name, table in sorted(config.handlers().items())
        }
        return cls(handlers, config.default_runtime, Path(config.state_dir))

    @property
    def default_handler(self) -> Handler:
        return self.by_name[self.default]

    def for_request(self, name: str) -> Handler:
        """The handler a RunPodSandbox names; a clear error when it cannot run pods."""
        handler = self.by_name.get(name or self.default)
        if handler is None:
            raise InvalidArgument(
                f"runtime handler {name!r} is not configured (configured: "
                f"{', '.join(repr(n) for n in self.by_name)}; default {self.default!r})"
            )
        if not os.access(handler.binary, os.X_OK):
            raise FailedPrecondition(
                f"runtime handler {handler.name!r}: {handler.binary} is not an executable "
                "file (is it installed?)"
            )
        return handler

    def of_pod(self, pod: PodRecord | None) -> Handler:
        """The handler that runs `pod` (None: a container whose pod is gone, the default).

        A handler removed from the configuration while its pods live on still names their
        root, so they can be stopped and removed: its default root, with the default
        handler's binary.
        """
        if pod is None:
            return self.default_handler
        return self.named(pod.runtime_handler or self.default, f"pod {pod.short}")

    def named(self, name: str, whose: str) -> Handler:
        """The handler called `name`, which ran `whose` (as of_pod says, for one that is no
        longer configured)."""
        handler = self.by_name.get(name)
        if handler is None:
            handler = Handler(name, self.default_handler.binary, self.state_dir / name)
            log.warning(
                "%s: runtime handler %r is no longer configured; using %s --root %s",
                whose, name, handler.binary, handler.root,
            )
        return handler

    def is_configured(self, pod: PodRecord) -> bool:
        return (pod.runtime_handler or self.default) in self.by_name

    def create_roots(self) -> None:
        for handler in self.by_name.values():
            handler.root.mkdir(parents=True, exist_ok=True)
            os.chmod(handler.root, 0o700)

    def features(self, name: str) -> Features:
        """`<binary> features` of the handler; blocking (runs the binary once). A runtime
        that cannot tell (missing, or too old for `features`) supports nothing optional."""
        known = self._features.get(name)
        if known is None:
            try:
                known = Features.from_document(self.by_name[name].runc().features())
            except RuncError as err:
                log.warning("runtime handler %r: features unknown: %s", name, err)
                known = Features()
            self._features[name] = known
        return known
