"""Fault injection: named steps at which a test can make the daemon die, or a step fail.

`FLATPOD_CRASH_AT=run_pod:after_network` (or several names, comma separated) makes the daemon
`os._exit(137)` when it reaches that step: no `finally`, no undo, no flush, exactly what a
`kill -9` or an OOM kill leaves behind, at a chosen instant instead of a random one. Recovery
is then tested against every half-made state the code can really produce.

`FLATPOD_FAIL_AT=run_pod:after_pins,undo:network` makes those steps raise an OSError
instead, once each, and the daemon lives on: `undo:<what>` names an undo step (sandbox/undo.py),
so a test can make the cleanup of a failed creation fail and prove that nothing is lost
track of; a retry then passes the point.

The variables are read once, at startup, into the Runtime, so no module holds state and a
daemon started without them pays one set lookup per step (an empty frozenset: nothing else).
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

log = logging.getLogger("flatpod.faults")

ENV = "FLATPOD_CRASH_AT"
FAIL_ENV = "FLATPOD_FAIL_AT"
# The exit status of a process killed by SIGKILL, as a shell reports it.
CRASH_STATUS = 137

# Every step a test may name: a typo in a test must fail loudly, not silently never crash.
POINTS = frozenset({
    "run_pod:after_reserve",
    "run_pod:after_netns",
    "run_pod:after_network",
    "run_pod:after_cgroup",
    "run_pod:after_shim",
    "run_pod:after_pause_start",
    "run_pod:after_pins",
    "create_container:after_reserve",
    "create_container:after_rootfs",
    "create_container:after_shim_create",
    "start_container:before_runc_start",
    "start_container:after_runc_start",
    "stop_pod:after_containers",
    "stop_pod:after_pause",
    "stop_pod:after_network",
    "remove_pod:before_cleanup",
    "remove_pod:midway",
    "remove_pod:after_cgroup",
    "remove_container:before_cleanup",
    "pull_image:after_first_blob",
    "remove_image:before_gc",
})

# The undo steps a test may make fail (FLATPOD_FAIL_AT only), as pods.py and containers.py
# name them.
UNDO_POINTS = frozenset(f"undo:{what}" for what in (
    "pod dir", "shm", "userns", "netns", "network", "cgroup", "bundle", "shim", "pause", "pins",
    "dirs", "rootfs", "runc",
))


class UnknownFaultPoint(ValueError):
    pass


class InjectedFailure(OSError):
    """What a step named in FLATPOD_FAIL_AT raises: a plain OSError, as a real one would."""


@dataclass(frozen=True)
class Faults:
    """The steps this daemon dies at; empty in production."""

    crash_at: frozenset[str] = field(default_factory=frozenset)
    fail_at: frozenset[str] = field(default_factory=frozenset)
    # The fail points already passed: each fails once (a set, so the Faults stays frozen).
    failed: set[str] = field(default_factory=set, compare=False, hash=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Faults:
        crash_at = _names(env, ENV, POINTS)
        fail_at = _names(env, FAIL_ENV, POINTS | UNDO_POINTS)
        if crash_at:
            log.warning("fault injection armed: the daemon dies at %s", sorted(crash_at))
        if fail_at:
            log.warning("fault injection armed: steps fail at %s", sorted(fail_at))
        return cls(crash_at, fail_at)

    def point(self, name: str) -> None:
        """Dies here, at once, if this step was named; fails here if it was named to fail
        (the first time); otherwise does nothing."""
        if name in self.fail_at and name not in self.failed:
            self.failed.add(name)
            log.warning("fault injection: failing at %s", name)
            raise InjectedFailure(errno.EIO, f"injected failure at {name}")
        if name in self.crash_at:
            log.warning("fault injection: dying at %s", name)
            for handler in logging.getLogger().handlers:
                handler.flush()
            sys.stderr.flush()
            os._exit(CRASH_STATUS)


def _names(env: Mapping[str, str], variable: str, known: frozenset[str]) -> frozenset[str]:
    names = frozenset(n.strip() for n in env.get(variable, "").split(",") if n.strip())
    unknown = names - known
    if unknown:
        raise UnknownFaultPoint(f"{variable} names unknown fault points: {sorted(unknown)}")
    return names
