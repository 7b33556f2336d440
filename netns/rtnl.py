"""The few rtnetlink requests the bridge network makes, on one raw netlink socket.

pyroute2 encodes every request and decodes every answer (its `ifinfmsg`, `ifaddrmsg`,
`rtmsg` and `MarshalRtnl`), so no message layout or attribute number is written here. The
transport is ours: a blocking NETLINK_ROUTE socket, one send and one receive per request.
pyroute2 0.9's own sockets (`IPRoute`) run an asyncio loop and a request object per call: an
`IPRoute()` cost ~6 ms and a link lookup ~9 ms of Python, GIL held, at load ~12, and a pod's
network setup and teardown made about twenty, which made every RPC wait behind the worker
threads (kubelet's relist under churn). Encoding and decoding alone is a fraction of that.

A socket belongs to the network namespace of the thread that opened it, so open one inside
`run_in_netns` to work in a pod's namespace.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from types import TracebackType

from pyroute2.netlink import (
    NETLINK_GET_STRICT_CHK,
    NETLINK_ROUTE,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    SOL_NETLINK,
)
from pyroute2.netlink.rtnl import (
    RTM_DELLINK,
    RTM_GETADDR,
    RTM_GETLINK,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWROUTE,
    rtprotos,
    rtscopes,
    rtypes,
)
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import IFF_UP, ifinfmsg
from pyroute2.netlink.rtnl.marshal import MarshalRtnl
from pyroute2.netlink.rtnl.rtmsg import rtmsg

# linux/rtnetlink.h values pyroute2 0.9 names nowhere.
RT_TABLE_MAIN = 254
RTEXT_FILTER_SKIP_STATS = 1 << 3  # IFLA_EXT_MASK: a link answer without its ~1 KiB of stats

_RECV_BYTES = 65536
_ANSWER_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    kind: str | None  # IFLA_INFO_KIND ("bridge", "veth"), None for a link without one
    master: int  # 0: none
    mtu: int
    up: bool


def _int(value: object) -> int:
    """An integer field or attribute of a decoded message (0 when it is absent)."""
    return value if isinstance(value, int) else 0


def _attrs(msg: ifinfmsg | ifaddrmsg, *names: str) -> dict[str, object]:
    """The decoded value of the first attribute of each name in `names` that `msg` has, in
    one pass over its attributes (pyroute2's get_attr walks them all per name; a link has
    forty)."""
    found: dict[str, object] = {}
    for slot in msg["attrs"]:
        name = slot[0]
        if name in names and name not in found:
            found[name] = slot[1]
    return found


def _link_of(answer: ifinfmsg) -> Link:
    attrs = _attrs(answer, "IFLA_IFNAME", "IFLA_MTU", "IFLA_MASTER", "IFLA_LINKINFO")
    info = attrs.get("IFLA_LINKINFO")
    kind = None if info is None else _attrs(info, "IFLA_INFO_KIND").get("IFLA_INFO_KIND")
    return Link(index=_int(answer["index"]), name=str(attrs.get("IFLA_IFNAME", "")),
                kind=kind if isinstance(kind, str) else None,
                master=_int(attrs.get("IFLA_MASTER")), mtu=_int(attrs.get("IFLA_MTU")),
                up=bool(_int(answer["flags"]) & IFF_UP))


def _ifinfmsg(index: int = 0, attrs: list[tuple[str, object]] | None = None,
              flags: int = 0) -> ifinfmsg:
    msg = ifinfmsg()
    msg["family"] = socket.AF_UNSPEC
    msg["index"] = index
    msg["flags"] = flags
    msg["change"] = flags
    msg["attrs"] = attrs or []
    return msg


class Rtnl:
    """One NETLINK_ROUTE socket in the calling thread's network namespace.

    Failures raise OSError with the kernel's errno (ENODEV, EEXIST...) and the request named.
    """

    def __init__(self) -> None:
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        try:
            self._sock.bind((0, 0))
            # Dumps filtered by the kernel (address dumps by interface), where it can.
            with contextlib.suppress(OSError):
                self._sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
        except BaseException:
            self._sock.close()
            raise
        self._seq = 0
        self._marshal = MarshalRtnl()
        self._sock.settimeout(_ANSWER_TIMEOUT_S)  # the kernel answers at once; never hang

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ---- the wire ---------------------------------------------------------------------------

    def _answers(self, seq: int) -> Iterator[ifinfmsg | ifaddrmsg]:
        """Each decoded answer to request `seq`, as they arrive."""
        while True:
            for answer in self._marshal.parse(self._sock.recv(_RECV_BYTES)):
                if answer["header"]["sequence_number"] == seq:
                    yield answer

    def _request(self, what: str, msg_type: int, flags: int,
                 msg: ifinfmsg | ifaddrmsg | rtmsg) -> list[ifinfmsg | ifaddrmsg]:
        """Sends `msg` and returns the answers before its ack (none for a change, one for a
        get); a dump (NLM_F_DUMP) ends at NLMSG_DONE instead."""
        dump = flags & NLM_F_DUMP == NLM_F_DUMP
        self._seq += 1
        msg["header"]["type"] = msg_type
        msg["header"]["flags"] = NLM_F_REQUEST | flags | (0 if dump else NLM_F_ACK)
        msg["header"]["sequence_number"] = self._seq
        msg.encode()
        self._sock.send(msg.data)
        found: list[ifinfmsg | ifaddrmsg] = []
        for answer in self._answers(self._seq):
            answer_type = answer["header"]["type"]
            if answer_type == NLMSG_DONE:
                return found
            if answer_type == NLMSG_ERROR:
                code = -_int(answer["error"])
                if code:
                    raise OSError(code, f"netlink {what}: {os.strerror(code)}")
                return found
            found.append(answer)
        raise AssertionError("unreachable")  # _answers only ends by raising

    # ---- links ------------------------------------------------------------------------------

    def link(self, name: str) -> Link | None:
        """The link named `name`, None if there is none (the kernel looks it up)."""
        return self._get_link(f"get link {name}", _ifinfmsg(attrs=[("IFLA_IFNAME", name)]))

    def link_by_index(self, index: int) -> Link | None:
        return self._get_link(f"get link {index}", _ifinfmsg(index))

    def _get_link(self, what: str, msg: ifinfmsg) -> Link | None:
        msg["attrs"].append(("IFLA_EXT_MASK", RTEXT_FILTER_SKIP_STATS))
        try:
            found = self._request(what, RTM_GETLINK, 0, msg)
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise
        return _link_of(found[0]) if found else None

    def add_bridge(self, name: str, mtu: int) -> None:
        msg = _ifinfmsg(attrs=[("IFLA_IFNAME", name), ("IFLA_MTU", mtu),
                               ("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND", "bridge")]})])
        self._request(f"add bridge {name}", RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, msg)

    def add_veth(self, name: str, peer: str, peer_netns_fd: int) -> None:
        """A veth pair: `name` here, `peer` in the namespace of the open file `peer_netns_fd`."""
        peer_info = {"attrs": [("IFLA_IFNAME", peer), ("IFLA_NET_NS_FD", peer_netns_fd)]}
        info = {"attrs": [("IFLA_INFO_KIND", "veth"),
                          ("IFLA_INFO_DATA", {"attrs": [("VETH_INFO_PEER", peer_info)]})]}
        msg = _ifinfmsg(attrs=[("IFLA_IFNAME", name), ("IFLA_LINKINFO", info)])
        self._request(f"add veth {name}", RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, msg)

    def set_link(self, index: int, *, up: bool = False, mtu: int = 0, master: int = 0) -> None:
        """Brings the link up (when `up`), sets its MTU and its master (when not 0)."""
        attrs: list[tuple[str, object]] = []
        if mtu:
            attrs.append(("IFLA_MTU", mtu))
        if master:
            attrs.append(("IFLA_MASTER", master))
        msg = _ifinfmsg(index, attrs, flags=IFF_UP if up else 0)
        self._request(f"set link {index}", RTM_NEWLINK, 0, msg)

    def delete_link(self, index: int) -> None:
        self._request(f"delete link {index}", RTM_DELLINK, 0, _ifinfmsg(index))

    # ---- addresses and routes ---------------------------------------------------------------

    def add_address(self, index: int, address: IPv4Address, prefixlen: int) -> None:
        """As `ip addr add`: EEXIST when the link has it already."""
        msg = ifaddrmsg()
        msg["family"] = socket.AF_INET
        msg["prefixlen"] = prefixlen
        msg["scope"] = rtscopes["RT_SCOPE_UNIVERSE"]
        msg["index"] = index
        msg["attrs"] = [("IFA_LOCAL", str(address)), ("IFA_ADDRESS", str(address))]
        self._request(f"add address {address}/{prefixlen} to link {index}", RTM_NEWADDR,
                      NLM_F_CREATE | NLM_F_EXCL, msg)

    def addresses(self, index: int) -> list[str]:
        """The IPv4 addresses of link `index` (a dump: the kernel has no get of one)."""
        msg = ifaddrmsg()
        msg["family"] = socket.AF_INET
        msg["index"] = index
        found = []
        for answer in self._request(f"list addresses of link {index}", RTM_GETADDR,
                                    NLM_F_DUMP, msg):
            if answer["index"] != index:  # a kernel without strict checking dumps every link's
                continue
            address = _attrs(answer, "IFA_ADDRESS").get("IFA_ADDRESS")
            if isinstance(address, str):
                found.append(address)
        return found

    def add_default_route(self, gateway: IPv4Address, oif: int) -> None:
        """0.0.0.0/0 via `gateway` on link `oif`: EEXIST when there is one."""
        msg = rtmsg()
        msg["family"] = socket.AF_INET
        msg["table"] = RT_TABLE_MAIN
        msg["proto"] = rtprotos["RTPROT_BOOT"]
        msg["scope"] = rtscopes["RT_SCOPE_UNIVERSE"]
        msg["type"] = rtypes["RTN_UNICAST"]
        msg["attrs"] = [("RTA_GATEWAY", str(gateway)), ("RTA_OIF", oif)]
        self._request(f"add default route via {gateway}", RTM_NEWROUTE,
                      NLM_F_CREATE | NLM_F_EXCL, msg)


def loopback_up() -> None:
    """Brings `lo` (ifindex 1 in every namespace) up in the calling thread's namespace."""
    with Rtnl() as rtnl:
        rtnl.set_link(1, up=True)
