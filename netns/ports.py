"""Host port mappings (hostPort) with iptables DNAT in the nat table.

Why iptables (here iptables-nft) and not a private nft table: kube-proxy and the CNI portmap
plugin program the same `ip nat` table through iptables, so our rules sit in one ordered rule
set with theirs, show up in `iptables-save`, and work unchanged on iptables-legacy hosts. Each
pod's rules are added in one atomic `iptables-restore --noflush` transaction.

Layout (all in table nat):
  PREROUTING/OUTPUT --(dst-type LOCAL)--> FLATPOD-HOSTPORTS --(one jump per pod)--> FPHP-<hash>
  FPHP-<hash>: one DNAT per mapping, host_ip:host_port -> pod_ip:container_port
  POSTROUTING --> FLATPOD-HP-MASQ: per mapping, MASQUERADE of 127.0.0.0/8 (hairpin from the
  host's loopback, together with route_localnet on the bridge) and of the pod itself (a pod
  reaching its own hostPort).
Every per-pod rule carries the comment `flatpod-pod=<pod id>`, so teardown removes exactly that
pod's rules, and list_owners() finds leaks.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Protocol = Literal["tcp", "udp", "sctp"]
_PROTOCOLS = ("tcp", "udp", "sctp")
_POD_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_COMMENT_PREFIX = "flatpod-pod="
_OWNER_IN_RULE = re.compile(r'--comment "?' + re.escape(_COMMENT_PREFIX) + r'([^"\s]+)"?')
_MAX_CHAIN_LEN = 28  # xtables limit on chain names
_IPTABLES_WAIT = ["-w", "5"]


class IptablesError(RuntimeError):
    """An iptables command failed; the message carries its argv and stderr."""


@dataclass(frozen=True)
class PortMapping:
    """Expose container_port of the pod on host_port of the host (host_ip "" means any)."""

    protocol: Protocol
    container_port: int
    host_port: int
    host_ip: str = ""

    def __post_init__(self) -> None:
        if self.protocol not in _PROTOCOLS:
            raise ValueError(f"unsupported protocol {self.protocol!r}")
        for port in (self.container_port, self.host_port):
            if not 0 < port < 65536:
                raise ValueError(f"port out of range: {port}")
        if self.host_ip not in ("", "0.0.0.0", "::"):
            ipaddress.IPv4Address(self.host_ip)  # raises ValueError; IPv6 hostIP unsupported

    @property
    def bound_host_ip(self) -> str | None:
        """The specific host address, or None for any address."""
        return None if self.host_ip in ("", "0.0.0.0", "::") else self.host_ip


def check_pod_id(pod_id: str) -> str:
    """Pod ids end up in rule comments and restore input: allow only a safe character set."""
    if not _POD_ID.match(pod_id):
        raise ValueError(f"invalid pod id {pod_id!r}")
    return pod_id


def run_iptables(args: Sequence[str], *, binary: str = "iptables") -> str:
    argv = [binary, *_IPTABLES_WAIT, *args]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise IptablesError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def _restore(lines: Sequence[str]) -> None:
    text = "*nat\n" + "".join(line + "\n" for line in lines) + "COMMIT\n"
    argv = ["iptables-restore", *_IPTABLES_WAIT, "--noflush"]
    proc = subprocess.run(argv, input=text, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise IptablesError(f"iptables-restore failed: {proc.stderr.strip()}\ninput:\n{text}")


def _rule_exists(chain: str, rule: Sequence[str]) -> bool:
    proc = subprocess.run(
        ["iptables", *_IPTABLES_WAIT, "-t", "nat", "-C", chain, *rule],
        capture_output=True,
        check=False,
    )
    return proc.returncode == 0


def _chain_exists(chain: str) -> bool:
    proc = subprocess.run(
        ["iptables", *_IPTABLES_WAIT, "-t", "nat", "-S", chain],
        capture_output=True,
        check=False,
    )
    return proc.returncode == 0


def _ensure_chain(chain: str) -> None:
    if not _chain_exists(chain):
        try:
            run_iptables(["-t", "nat", "-N", chain])
        except IptablesError:
            if not _chain_exists(chain):  # lost a race with a concurrent creator: fine
                raise


def _ensure_jump(from_chain: str, rule: Sequence[str]) -> None:
    if not _rule_exists(from_chain, rule):
        run_iptables(["-t", "nat", "-A", from_chain, *rule])


@dataclass(frozen=True)
class HostPortChains:
    """Chain names; tests use their own so they never touch the real ones."""

    dnat: str = "FLATPOD-HOSTPORTS"
    masq: str = "FLATPOD-HP-MASQ"
    pod_prefix: str = "FPHP-"

    def pod_chain(self, pod_id: str) -> str:
        digest = hashlib.sha256(pod_id.encode()).hexdigest()
        return (self.pod_prefix + digest)[: min(_MAX_CHAIN_LEN, len(self.pod_prefix) + 16)]

    def _entry_jumps(self) -> list[tuple[str, list[str]]]:
        local_only = ["-m", "addrtype", "--dst-type", "LOCAL"]
        return [
            ("PREROUTING", [*local_only, "-j", self.dnat]),
            ("OUTPUT", [*local_only, "-j", self.dnat]),
            ("POSTROUTING", ["-j", self.masq]),
        ]


def ensure_base_chains(chains: HostPortChains) -> None:
    """Create the top chains and the jumps into them from the built-in chains (idempotent)."""
    _ensure_chain(chains.dnat)
    _ensure_chain(chains.masq)
    for builtin, rule in chains._entry_jumps():
        _ensure_jump(builtin, rule)


def remove_base_chains(chains: HostPortChains) -> None:
    """Remove the entry jumps and the (flushed) top chains; for tests and uninstall."""
    for builtin, rule in chains._entry_jumps():
        while _rule_exists(builtin, rule):
            run_iptables(["-t", "nat", "-D", builtin, *rule])
    for chain in (chains.dnat, chains.masq):
        if _chain_exists(chain):
            run_iptables(["-t", "nat", "-F", chain])
            run_iptables(["-t", "nat", "-X", chain])


def _mapping_rules(
    pod_id: str, pod_ip: str, mapping: PortMapping, chains: HostPortChains
) -> list[str]:
    comment = f"-m comment --comment {_COMMENT_PREFIX}{pod_id}"
    proto = f"-p {mapping.protocol} -m {mapping.protocol}"
    dest = f"-d {mapping.bound_host_ip}/32 " if mapping.bound_host_ip else ""
    pod_chain = chains.pod_chain(pod_id)
    target = f"{pod_ip}:{mapping.container_port}"
    to_pod = f"-d {pod_ip}/32 {proto} --dport {mapping.container_port}"
    return [
        f"-A {pod_chain} {dest}{proto} --dport {mapping.host_port} {comment}"
        f" -j DNAT --to-destination {target}",
        f"-A {chains.masq} -s 127.0.0.0/8 {to_pod} {comment} -j MASQUERADE",
        f"-A {chains.masq} -s {pod_ip}/32 {to_pod} {comment} -j MASQUERADE",
    ]


def enable_route_localnet(interface: str) -> None:
    """Let packets from 127.0.0.0/8 (DNAT'ed host-loopback clients) be routed out `interface`."""
    with open(f"/proc/sys/net/ipv4/conf/{interface}/route_localnet", "w") as knob:
        knob.write("1")


def install(
    pod_id: str,
    pod_ip: str,
    mappings: Sequence[PortMapping],
    chains: HostPortChains | None = None,
) -> None:
    """Install `mappings` for the pod, replacing any rules it had before (one transaction)."""
    chains = chains or HostPortChains()
    check_pod_id(pod_id)
    ipaddress.IPv4Address(pod_ip)
    remove_all_for(pod_id, chains)
    if not mappings:
        return
    ensure_base_chains(chains)
    pod_chain = chains.pod_chain(pod_id)
    lines = [f":{pod_chain} - [0:0]"]
    for mapping in mappings:
        lines += _mapping_rules(pod_id, pod_ip, mapping, chains)
    lines.append(
        f"-A {chains.dnat} -m comment --comment {_COMMENT_PREFIX}{pod_id} -j {pod_chain}"
    )
    _restore(lines)


@dataclass(frozen=True)
class _NatSnapshot:
    """The nat table as `iptables -S` prints it: one exec instead of one per chain."""

    chains: frozenset[str]
    rules: tuple[str, ...]

    def rules_of(self, chain: str) -> list[str]:
        head = f"-A {chain} "
        return [rule for rule in self.rules if rule.startswith(head)]


def _snapshot() -> _NatSnapshot:
    lines = run_iptables(["-t", "nat", "-S"]).splitlines()
    chains = {line.split()[1] for line in lines if line.startswith(("-N ", "-P "))}
    rules = tuple(line for line in lines if line.startswith("-A "))
    return _NatSnapshot(frozenset(chains), rules)


def _owner(rule: str) -> str | None:
    match = _OWNER_IN_RULE.search(rule)
    return match.group(1) if match else None


def remove_all_for(pod_id: str, chains: HostPortChains | None = None) -> None:
    """Remove every hostport rule and the chain of `pod_id`; idempotent."""
    chains = chains or HostPortChains()
    check_pod_id(pod_id)
    snapshot = _snapshot()
    deletions = [
        "-D" + rule[2:]
        for chain in (chains.dnat, chains.masq)
        for rule in snapshot.rules_of(chain)
        if _owner(rule) == pod_id
    ]
    pod_chain = chains.pod_chain(pod_id)
    if pod_chain in snapshot.chains:
        deletions += [f"-F {pod_chain}", f"-X {pod_chain}"]
    if deletions:
        _restore(deletions)


def list_owners(chains: HostPortChains | None = None) -> set[str]:
    """Pod ids that have hostport rules installed (for leak checks)."""
    chains = chains or HostPortChains()
    owners = set()
    snapshot = _snapshot()
    for chain in (chains.dnat, chains.masq):
        for rule in snapshot.rules_of(chain):
            owner = _owner(rule)
            if owner is not None:
                owners.add(owner)
    return owners
