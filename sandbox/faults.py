"""Fault injection: named steps at which a test can make the daemon die.

`FLATPOD_CRASH_AT=run_pod:after_network` (or several names, comma separated) makes the daemon
`os._exit(137)` when it reaches that step: no `finally`, no undo, no flush, exactly what a
`kill -9` or an OOM kill leaves behind, at a chosen instant instead of a random one. Recovery
is then tested against every half-made state the code can really produce.

The variable is read once, at startup, into the Runtime, so no module holds state and a
daemon started without it pays one set lookup per step (an empty frozenset: nothing else).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

log = logging.getLogger("flatpod.faults")

ENV = "FLATPOD_CRASH_AT"
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
    "remove_pod:midway",
    "remove_container:before_cleanup",
    "pull_image:after_first_blob",
})


class UnknownFaultPoint(ValueError):
    pass


@dataclass(frozen=True)
class Faults:
    """The steps this daemon dies at; empty in production."""

    crash_at: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Faults:
        names = frozenset(n.strip() for n in env.get(ENV, "").split(",") if n.strip())
        unknown = names - POINTS
        if unknown:
            raise UnknownFaultPoint(f"{ENV} names unknown fault points: {sorted(unknown)}")
        if names:
            log.warning("fault injection armed: the daemon dies at %s", sorted(names))
        return cls(names)

    def point(self, name: str) -> None:
        """Dies here, at once, if this step was named; otherwise does nothing."""
        if name in self.crash_at:
            log.warning("fault injection: dying at %s", name)
            for handler in logging.getLogger().handlers:
                handler.flush()
            sys.stderr.flush()
            os._exit(CRASH_STATUS)
