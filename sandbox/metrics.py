"""The opt-in Prometheus endpoint (`metrics_address`): flatpod's own health, not pods' usage.

It serves RPC latency per method and status code, pods and containers by state, and the
number of shims. Pods' and containers' resource usage is kubelet's to export (from CRI stats,
see stats.py), so it is not repeated here.

The registry belongs to this endpoint, not to prometheus-client's global default: tests and
embedders may run several runtimes in one process. The endpoint is a small asyncio server on
the daemon's own loop: collecting reads `rt.pods` and `rt.containers`, which only the loop
may touch, and a scrape costs microseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from sandbox.runtime import Runtime

log = logging.getLogger("flatpod.metrics")

# From 1 ms (a List) to a minute (a pull or a slow stop), roughly doubling.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
                   60)
# A scraper sends a few hundred bytes of headers; anything much longer is not one.
MAX_REQUEST_BYTES = 16 * 1024
READ_TIMEOUT_S = 5.0


@dataclass(eq=False)  # the registry keys collectors by identity
class RuntimeCollector(Collector):
    """Pods, containers and shims, counted at scrape time from the runtime's own records."""

    rt: Runtime

    def collect(self) -> Iterator[Metric]:
        pods = GaugeMetricFamily("flatpod_pod_sandboxes", "Pod sandboxes by state.",
                                 labels=["state"])
        for state, n in sorted(Counter(p.state for p in self.rt.pods.values()).items()):
            pods.add_metric([state], n)
        yield pods
        ctrs = GaugeMetricFamily("flatpod_containers", "Containers by state.", labels=["state"])
        for ctr_state, n in sorted(Counter(c.state for c in self.rt.containers.values()).items()):
            ctrs.add_metric([ctr_state], n)
        yield ctrs
        shims = len(self.rt.shims.clients) if self.rt.shims is not None else 0
        yield GaugeMetricFamily("flatpod_shims", "Pod shims connected.", value=shims)
        if self.rt.images is not None:
            yield CounterMetricFamily(
                "flatpod_image_pulled_bytes", "Bytes downloaded from registries.",
                value=self.rt.images.pulled.total,
            )


@dataclass
class MetricsEndpoint:
    registry: CollectorRegistry
    rpc_seconds: Histogram
    server: asyncio.Server | None = field(default=None)

    @classmethod
    def for_runtime(cls, rt: Runtime) -> MetricsEndpoint:
        registry = CollectorRegistry()
        rpc_seconds = Histogram(
            "flatpod_rpc_duration_seconds", "CRI RPC latency, by method and gRPC status code.",
            ["method", "code"], registry=registry, buckets=LATENCY_BUCKETS,
        )
        registry.register(RuntimeCollector(rt))
        return cls(registry, rpc_seconds)

    def observe(self, method: str, seconds: float, code: grpc.StatusCode) -> None:
        """build_server's observer: called once per finished RPC."""
        self.rpc_seconds.labels(method=method, code=code.name).observe(seconds)

    async def start(self, address: str) -> None:
        host, port = split_address(address)
        self.server = await asyncio.start_server(
            self._answer, host, port, limit=MAX_REQUEST_BYTES
        )
        bound = [str(sock.getsockname()[:2]) for sock in self.server.sockets]
        log.info("serving metrics on http://%s/metrics (listening on %s)", address,
                 ", ".join(bound))

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One HTTP/1.0-style exchange: GET /metrics, then close."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            if method != "GET" or path != "/metrics":
                writer.write(_response(404, "text/plain", b"not found: try /metrics\n"))
            else:
                writer.write(_response(200, CONTENT_TYPE_LATEST, generate_latest(self.registry)))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ConnectionError, UnicodeDecodeError):
            pass  # a client that hung up or did not speak HTTP: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


def _response(status: int, content_type: str, body: bytes) -> bytes:
    reason = {200: "OK", 404: "Not Found"}[status]
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


def split_address(address: str) -> tuple[str | None, int]:
    """"127.0.0.1:9110" or "[::1]:9110" -> (host, port). ":9110" -> (None, port): every
    interface, IPv4 and IPv6, as Go's ":port" (asyncio binds each address family)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics_address {address!r} must be host:port")
    return host.strip("[]") or None, int(port)
