"""The unix socket's listener: one `Http2Connection` per accepted client."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from sandbox.http2.connection import Application, Http2Connection, Limits


class Http2Server:
    def __init__(self, app: Application, limits: Limits | None = None) -> None:
        self.app = app
        self.limits = limits or Limits()
        self.connections: set[Http2Connection] = set()
        self._server: asyncio.Server | None = None

    def _connection(self) -> Http2Connection:
        conn = Http2Connection(self.app, self.limits, self.connections.discard)
        self.connections.add(conn)
        return conn

    async def start(self, socket_path: Path) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(self._connection, str(socket_path))

    async def stop(self, grace: float) -> None:
        """No new connections or streams; open calls get `grace` seconds to finish."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.go_away()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.connections and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.abort()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1)
