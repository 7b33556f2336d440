"""IPv4 address management over a pluggable lease book.

The runtime implements LeaseBook on its SQLite store; JsonFileLeaseBook keeps netns/ usable on
its own (tests, tools). allocate() only relies on try_claim() being atomic, so two pods racing
for the same address can never both win.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Protocol


class LeaseBook(Protocol):
    """Persistent ip -> owner records, one table per network name."""

    def leased(self, network: str) -> dict[str, str]:
        """All leases of `network` as ip -> owner."""
        ...

    def try_claim(self, network: str, ip: str, owner: str) -> bool:
        """Atomically record `ip` for `owner`; False if the ip is already taken."""
        ...

    def release(self, network: str, owner: str) -> None:
        """Drop every lease of `owner` in `network`; idempotent."""
        ...

    def owned_by(self, network: str, owner: str) -> list[str]:
        """The ips `owner` holds in `network`."""
        ...


class AddressPoolExhausted(RuntimeError):
    """No free address is left in the subnet."""


Leases = dict[str, dict[str, str]]  # network -> ip -> owner


class JsonFileLeaseBook:
    """A LeaseBook in one JSON file, serialized by an flock on a sibling lock file.

    Safe across threads and processes: each operation opens its own lock file description, and
    the file is replaced atomically (write to temp + rename) so a crash never leaves half a file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the flock

    def _load(self) -> Leases:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        return {str(net): {str(ip): str(o) for ip, o in ips.items()} for net, ips in data.items()}

    def _store(self, leases: Leases) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".")
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(leases, out, sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise

    def leased(self, network: str) -> dict[str, str]:
        with self._locked():
            return dict(self._load().get(network, {}))

    def try_claim(self, network: str, ip: str, owner: str) -> bool:
        with self._locked():
            leases = self._load()
            table = leases.setdefault(network, {})
            if ip in table:
                return table[ip] == owner
            table[ip] = owner
            self._store(leases)
            return True

    def release(self, network: str, owner: str) -> None:
        with self._locked():
            leases = self._load()
            table = leases.get(network, {})
            kept = {ip: o for ip, o in table.items() if o != owner}
            if len(kept) != len(table):
                leases[network] = kept
                self._store(leases)

    def owned_by(self, network: str, owner: str) -> list[str]:
        with self._locked():
            table = self._load().get(network, {})
            return sorted((ip for ip, o in table.items() if o == owner), key=IPv4Address)


def default_gateway(subnet: IPv4Network) -> IPv4Address:
    """The first host address, the conventional bridge/gateway address."""
    return subnet.network_address + 1


def _candidates(subnet: IPv4Network, gateway: IPv4Address) -> Iterator[IPv4Address]:
    # hosts() already leaves out the network and broadcast addresses (for prefixes < 31).
    return (ip for ip in subnet.hosts() if ip != gateway)


def allocate(
    book: LeaseBook,
    network_name: str,
    subnet: IPv4Network | str,
    gateway: IPv4Address | str | None,
    owner: str,
) -> IPv4Interface:
    """Lease the next free address of `subnet` to `owner` and return it with the prefix.

    Idempotent: an owner that already holds an address in this subnet gets it back. Callers
    must not run allocate() for the *same* owner concurrently (the runtime serializes per pod).
    """
    net = IPv4Network(subnet)
    gw = IPv4Address(gateway) if gateway is not None else default_gateway(net)
    for held in book.owned_by(network_name, owner):
        if IPv4Address(held) in net:
            return IPv4Interface(f"{held}/{net.prefixlen}")
    taken = book.leased(network_name)
    for ip in _candidates(net, gw):
        if str(ip) in taken:
            continue
        # Someone may have claimed it since the snapshot: try_claim is the arbiter.
        if book.try_claim(network_name, str(ip), owner):
            return IPv4Interface(f"{ip}/{net.prefixlen}")
    raise AddressPoolExhausted(f"no free address left in {net} for network {network_name}")
