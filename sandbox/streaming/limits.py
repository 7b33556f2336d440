"""What one streaming client may cost the node: the bounds of the streaming server.

Anyone with pods/exec, pods/attach or pods/portforward reaches this server through the API
server and kubelet, which pass frames through unchanged, so every size, count and wait that a
client controls has a bound here. The defaults are the `[streaming]` defaults of config.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

KIB = 1024
MIB = 1024 * KIB


@dataclass(frozen=True)
class StreamLimits:
    # Open TCP connections to the streaming server, node-wide (each session is one).
    max_connections: int = 128
    # Concurrent exec+attach sessions per container; port-forward connections per pod.
    max_sessions_per_container: int = 32
    # From accept to the end of the HTTP upgrade (TLS handshake and request head included).
    handshake_timeout_seconds: float = 10.0
    # A SPDY SYN_STREAM/SYN_REPLY/HEADERS block after zlib inflation. Go's net/http allows
    # 1 MiB of request head; kubelet's clients send a few hundred bytes per stream.
    max_header_block_bytes: int = 256 * KIB
    # Any SPDY frame's payload (client-go writes data frames of at most 32 KiB).
    max_frame_bytes: int = 1 * MIB
    # SPDY streams open at once on one connection (port-forward uses two per connection).
    max_streams_per_connection: int = 256
    # A WebSocket message, and so each of its fragments.
    max_websocket_message_bytes: int = 1 * MIB
    # A forwarded connect that the pod does not complete in this time fails.
    port_forward_connect_timeout_seconds: float = 5.0
    # Port-forward connects in progress into one pod at a time; more fail at once.
    max_port_forward_connects_per_pod: int = 16


# Fixed bounds that follow from the configurable ones or from the protocols.
# Unconsumed client data held for one SPDY stream, and for a whole connection, before the
# frame reader stops reading the socket (clients ignore SPDY windows; see spdy.py).
MAX_BUFFERED_PER_STREAM = 256 * KIB
MAX_BUFFERED_PER_CONNECTION = 1 * MIB
# Fragments of one WebSocket message (empty continuation frames cost a frame each).
MAX_WEBSOCKET_FRAGMENTS = 1024
# A resize channel's pending bytes without a complete {"Width":..,"Height":..} object.
MAX_RESIZE_PENDING = 4 * KIB
# Frames parsed back to back before the reader lets the event loop run other work.
FRAMES_PER_YIELD = 64
# Seconds to wait for a closing connection (TLS may never answer).
CLOSE_TIMEOUT = 2.0


async def close_writer(writer: asyncio.StreamWriter) -> None:
    """Closes a connection, waiting for it at most CLOSE_TIMEOUT; a failure to close is
    the connection's end too, so it is not raised."""
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT)


class SlotsFull(Exception):
    """A key already holds as many slots as its limit allows."""

    def __init__(self, held: int) -> None:
        super().__init__(f"{held} already in use")
        self.held = held


@dataclass
class KeyedSlots:
    """How many of something are in progress per key (a container, a pod), with a cap."""

    limit: int
    _held: dict[str, int] = field(default_factory=dict)

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        """One slot of `key` for the block; SlotsFull if all of them are taken."""
        held = self._held.get(key, 0)
        if held >= self.limit:
            raise SlotsFull(held)
        self._held[key] = held + 1
        try:
            yield
        finally:
            left = self._held[key] - 1
            if left:
                self._held[key] = left
            else:
                del self._held[key]
