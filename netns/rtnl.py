"""The few rtnetlink requests the bridge network makes, on one raw netlink socket.

Why not pyroute2: its synchronous API runs an asyncio loop and a request object per call, so
one link lookup cost 4-10 ms of Python (GIL held) on this machine and opening an IPRoute 6 ms;
a pod's network setup and teardown made about twenty of them. Worker threads holding the GIL
that long made every RPC wait behind them (kubelet's relist under churn). Here a request is
a few struct packs, one send and one receive: tens of microseconds.

A socket belongs to the network namespace of the thread that opened it, so open one inside
`run_in_netns` to work in a pod's namespace.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from types import TracebackType

# linux/netlink.h, linux/rtnetlink.h, linux/if_link.h, linux/veth.h
NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_GET_STRICT_CHK = 12
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
RTM_NEWADDR = 20
RTM_GETADDR = 22
RTM_NEWROUTE = 24
IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_MASTER = 10
IFLA_LINKINFO = 18
IFLA_NET_NS_FD = 28
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
VETH_INFO_PEER = 1
IFA_ADDRESS = 1
IFA_LOCAL = 2
RTA_OIF = 4
RTA_GATEWAY = 5
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE = 0
RTN_UNICAST = 1
IFF_UP = 0x1

_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst/src len, tos, table, proto, scope, type, flags
_RTATTR = struct.Struct("=HH")  # length, type
_ERROR = struct.Struct("=i")
_U32 = struct.Struct("=I")
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


def _align(length: int) -> int:
    return (length + 3) & ~3


def attr(kind: int, payload: bytes) -> bytes:
    """One rtattr, padded to 4 bytes."""
    length = _RTATTR.size + len(payload)
    return _RTATTR.pack(length, kind) + payload + b"\0" * (_align(length) - length)


def _string(value: str) -> bytes:
    return value.encode() + b"\0"


def attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    """The (type, payload) of each rtattr in `data` (the nested flag bit cleared)."""
    offset = 0
    while offset + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size:
            return
        yield kind & 0x3FFF, data[offset + _RTATTR.size:offset + length]
        offset += _align(length)


def _decode_link(payload: bytes) -> Link:
    _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(payload)
    name, kind, master, mtu = "", None, 0, 0
    for key, value in attrs(payload[_IFINFOMSG.size:]):
        if key == IFLA_IFNAME:
            name = value.rstrip(b"\0").decode()
        elif key == IFLA_MTU:
            mtu = _U32.unpack_from(value)[0]
        elif key == IFLA_MASTER:
            master = _U32.unpack_from(value)[0]
        elif key == IFLA_LINKINFO:
            for info_key, info in attrs(value):
                if info_key == IFLA_INFO_KIND:
                    kind = info.rstrip(b"\0").decode()
    return Link(index=index, name=name, kind=kind, master=master, mtu=mtu,
                up=bool(flags & IFF_UP))


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
        self._sock.settimeout(_ANSWER_TIMEOUT_S)  # the kernel answers at once; never hang

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ---- the wire ---------------------------------------------------------------------------

    def _send(self, msg_type: int, flags: int, body: bytes) -> int:
        self._seq += 1
        header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, flags, self._seq, 0)
        self._sock.send(header + body)
        return self._seq

    def _messages(self, seq: int) -> Iterator[tuple[int, int, bytes]]:
        """(type, flags, payload) of each answer to request `seq`, as they arrive."""
        while True:
            data = self._sock.recv(_RECV_BYTES)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, msg_type, flags, msg_seq, _port = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    break
                payload = data[offset + _NLMSGHDR.size:offset + length]
                offset += _align(length)
                if msg_seq == seq:
                    yield msg_type, flags, payload

    def request(self, what: str, msg_type: int, flags: int, body: bytes) -> list[bytes]:
        """Sends one request and returns the payloads answered before its ack (none for a
        change, one for a get); a dump (NLM_F_DUMP) ends at NLMSG_DONE instead."""
        dump = flags & NLM_F_DUMP == NLM_F_DUMP
        seq = self._send(msg_type, NLM_F_REQUEST | flags | (0 if dump else NLM_F_ACK), body)
        found: list[bytes] = []
        for answer_type, _flags, payload in self._messages(seq):
            if answer_type == NLMSG_DONE:
                return found
            if answer_type == NLMSG_ERROR:
                code = -_ERROR.unpack_from(payload)[0]
                if code:
                    raise OSError(code, f"netlink {what}: {os.strerror(code)}")
                return found
            found.append(payload)
        raise AssertionError("unreachable")  # _messages only ends by raising

    # ---- links ------------------------------------------------------------------------------

    def link(self, name: str) -> Link | None:
        """The link named `name`, None if there is none (the kernel looks it up)."""
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attr(IFLA_IFNAME, _string(name))
        return self._get_link(f"get link {name}", body)

    def link_by_index(self, index: int) -> Link | None:
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0)
        return self._get_link(f"get link {index}", body)

    def _get_link(self, what: str, body: bytes) -> Link | None:
        try:
            found = self.request(what, RTM_GETLINK, 0, body)
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise
        return _decode_link(found[0]) if found else None

    def add_bridge(self, name: str, mtu: int) -> None:
        body = (_IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
                + attr(IFLA_IFNAME, _string(name)) + attr(IFLA_MTU, _U32.pack(mtu))
                + attr(IFLA_LINKINFO, attr(IFLA_INFO_KIND, _string("bridge"))))
        self.request(f"add bridge {name}", RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)

    def add_veth(self, name: str, peer: str, peer_netns_fd: int) -> None:
        """A veth pair: `name` here, `peer` in the namespace of the open file `peer_netns_fd`."""
        peer_info = (_IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
                     + attr(IFLA_IFNAME, _string(peer))
                     + attr(IFLA_NET_NS_FD, _U32.pack(peer_netns_fd)))
        info = attr(IFLA_INFO_KIND, _string("veth")) + attr(
            IFLA_INFO_DATA, attr(VETH_INFO_PEER, peer_info))
        body = (_IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
                + attr(IFLA_IFNAME, _string(name)) + attr(IFLA_LINKINFO, info))
        self.request(f"add veth {name}", RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)

    def set_link(self, index: int, *, up: bool = False, mtu: int = 0, master: int = 0) -> None:
        """Brings the link up (when `up`), sets its MTU and its master (when not 0)."""
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, IFF_UP if up else 0,
                               IFF_UP if up else 0)
        if mtu:
            body += attr(IFLA_MTU, _U32.pack(mtu))
        if master:
            body += attr(IFLA_MASTER, _U32.pack(master))
        self.request(f"set link {index}", RTM_NEWLINK, 0, body)

    def delete_link(self, index: int) -> None:
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0)
        self.request(f"delete link {index}", RTM_DELLINK, 0, body)

    # ---- addresses and routes ---------------------------------------------------------------

    def add_address(self, index: int, address: IPv4Address, prefixlen: int) -> None:
        """As `ip addr add`: EEXIST when the link has it already."""
        packed = address.packed
        body = (_IFADDRMSG.pack(socket.AF_INET, prefixlen, 0, RT_SCOPE_UNIVERSE, index)
                + attr(IFA_LOCAL, packed) + attr(IFA_ADDRESS, packed))
        self.request(f"add address {address}/{prefixlen} to link {index}", RTM_NEWADDR,
                     NLM_F_CREATE | NLM_F_EXCL, body)

    def addresses(self, index: int) -> list[str]:
        """The IPv4 addresses of link `index`."""
        body = _IFADDRMSG.pack(socket.AF_INET, 0, 0, 0, index)
        found = []
        for payload in self.request(f"list addresses of link {index}", RTM_GETADDR,
                                    NLM_F_DUMP, body):
            _family, _prefix, _flags, _scope, link = _IFADDRMSG.unpack_from(payload)
            if link != index:  # a kernel without strict checking dumps every link's
                continue
            for key, value in attrs(payload[_IFADDRMSG.size:]):
                if key == IFA_ADDRESS:
                    found.append(str(IPv4Address(value)))
        return found

    def add_default_route(self, gateway: IPv4Address, oif: int) -> None:
        """0.0.0.0/0 via `gateway` on link `oif`: EEXIST when there is one."""
        body = (_RTMSG.pack(socket.AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT,
                            RT_SCOPE_UNIVERSE, RTN_UNICAST, 0)
                + attr(RTA_GATEWAY, gateway.packed) + attr(RTA_OIF, _U32.pack(oif)))
        self.request(f"add default route via {gateway}", RTM_NEWROUTE,
                     NLM_F_CREATE | NLM_F_EXCL, body)


def loopback_up() -> None:
    """Brings `lo` (ifindex 1 in every namespace) up in the calling thread's namespace."""
    with Rtnl() as rtnl:
        rtnl.set_link(1, up=True)
