"""What a network namespace has: its devices, its addresses and its local
routes, read with rtnetlink dumps (what ``ip link``, ``ip addr`` and ``ip
route show table local`` print), on the calling thread's namespace.

The kernel decides whether an address can be bound from these: IPv4 looks
the address up in the local routing table (so a ``local 10.0.0.0/24`` route
makes every address of it bindable, and an address on a device that is down
has no local route yet), IPv6 in the list of addresses (where a tentative
one, still in duplicate address detection, does not count). tracer.bindcheck
applies those rules; this module only reads.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from typing import Iterator

NETLINK_ROUTE = 0
NLM_F_REQUEST, NLM_F_DUMP = 0x01, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWLINK, RTM_GETLINK = 16, 18
RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_NEWROUTE, RTM_GETROUTE = 24, 26

IFLA_IFNAME, IFLA_MASTER, IFLA_LINKINFO = 3, 10, 18
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
IFLA_VRF_TABLE = 1
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
RTA_DST, RTA_OIF, RTA_TABLE = 1, 4, 15
IFF_UP = 0x1

IFA_F_TENTATIVE, IFA_F_OPTIMISTIC, IFA_F_DADFAILED = 0x40, 0x04, 0x08
RT_TABLE_LOCAL = 255
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RT_SCOPE_HOST = 0, 253, 254
ROUTE_TYPES = {1: "unicast", 2: "local", 3: "broadcast", 4: "anycast", 5: "multicast",
               6: "blackhole", 7: "unreachable", 8: "prohibit", 9: "throw", 10: "nat"}

_NLMSGHDR = struct.Struct("=IHHII")
_NLATTR = struct.Struct("=HH")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")


@dataclass(frozen=True, slots=True)
class Device:
    index: int
    name: str
    up: bool
    master: int  # ifindex of its VRF (or bridge, bond) master, 0 if none
    kind: str  # "vrf", "veth", "dummy", ... ("" for a physical device)
    vrf_table: int  # for a VRF: its routing table


@dataclass(frozen=True, slots=True)
class Address:
    family: str  # ipv4 | ipv6
    address: str
    prefix: int
    device: int
    scope: int  # RT_SCOPE_*: 0 global, 253 link, 254 host
    flags: int  # IFA_F_*

    @property
    def tentative(self) -> bool:
        """Still in duplicate address detection (optimistic ones are usable),
        or failed it: the kernel will not let a socket bind to it."""
        return bool(self.flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED)) and not (
            self.flags & IFA_F_OPTIMISTIC and not self.flags & IFA_F_DADFAILED)


@dataclass(frozen=True, slots=True)
class Route:
    """A route of a local table (the kernel's RT_TABLE_LOCAL, or a VRF's)."""

    table: int
    type: str  # local | broadcast | ...
    network: ipaddress.IPv4Network
    device: int


def read() -> tuple[dict[int, Device], list[Address], list[Route]]:
    """The calling thread's namespace: devices, addresses, IPv4 local routes."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        devices = {d.index: d for d in _devices(sock)}
        addresses = list(_addresses(sock))
        vrf_tables = {d.vrf_table for d in devices.values() if d.vrf_table}
        routes = [r for r in _routes(sock) if r.table == RT_TABLE_LOCAL or r.table in vrf_tables]
    return devices, addresses, routes


# ---- the dumps ----------------------------------------------------------------


def _dump(sock: socket.socket, kind: int, body: bytes, reply: int) -> Iterator[bytes]:
    """Every message of one dump, as its payload (after the netlink header)."""
    sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
              + body)
    while True:
        data = sock.recv(1 << 16)
        offset = 0
        while offset + _NLMSGHDR.size <= len(data):
            length, msg, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
            if length < _NLMSGHDR.size:
                raise OSError(errno.EPROTO, "malformed rtnetlink message")
            payload = data[offset + _NLMSGHDR.size:offset + length]
            offset += (length + 3) & ~3
            if msg == NLMSG_DONE:
                return
            if msg == NLMSG_ERROR:
                (status,) = struct.unpack_from("=i", payload)
                if status:
                    raise OSError(-status, f"rtnetlink dump: {os.strerror(-status)}")
                return
            if msg == reply:
                yield payload


def _attributes(data: bytes, offset: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while offset + _NLATTR.size <= len(data):
        length, kind = _NLATTR.unpack_from(data, offset)
        if length < _NLATTR.size:
            break
        out[kind & 0x3FFF] = data[offset + _NLATTR.size:offset + length]  # without NLA_F_NESTED
        offset += (length + 3) & ~3
    return out


def _u32(raw: bytes | None) -> int:
    return struct.unpack_from("=I", raw)[0] if raw and len(raw) >= 4 else 0


def _text(raw: bytes | None) -> str:
    return (raw or b"").split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _devices(sock: socket.socket) -> Iterator[Device]:
    request = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    for payload in _dump(sock, RTM_GETLINK, request, RTM_NEWLINK):
        _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(payload)
        attrs = _attributes(payload, _IFINFOMSG.size)
        info = _attributes(attrs.get(IFLA_LINKINFO, b""), 0)
        kind = _text(info.get(IFLA_INFO_KIND))
        data = _attributes(info.get(IFLA_INFO_DATA, b""), 0) if kind == "vrf" else {}
        yield Device(index, _text(attrs.get(IFLA_IFNAME)), bool(flags & IFF_UP),
                     _u32(attrs.get(IFLA_MASTER)), kind, _u32(data.get(IFLA_VRF_TABLE)))


def _addresses(sock: socket.socket) -> Iterator[Address]:
    for payload in _dump(sock, RTM_GETADDR, _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0),
                         RTM_NEWADDR):
        family, prefix, flags, scope, index = _IFADDRMSG.unpack_from(payload)
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        attrs = _attributes(payload, _IFADDRMSG.size)
        raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
        if raw is None:
            continue
        if IFA_FLAGS in attrs:  # the 32-bit flags (the header's are 8 bits)
            flags = _u32(attrs[IFA_FLAGS])
        yield Address("ipv4" if family == socket.AF_INET else "ipv6",
                      socket.inet_ntop(family, raw), prefix, index, scope, flags)


def _routes(sock: socket.socket) -> Iterator[Route]:
    for payload in _dump(sock, RTM_GETROUTE, _RTMSG.pack(socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0),
                         RTM_NEWROUTE):
        family, dst_len, _src, _tos, table, _proto, _scope, kind, _flags = \
            _RTMSG.unpack_from(payload)
        if family != socket.AF_INET:
            continue
        attrs = _attributes(payload, _RTMSG.size)
        table = _u32(attrs.get(RTA_TABLE)) or table
        dst = attrs.get(RTA_DST, b"\0\0\0\0")
        network = ipaddress.IPv4Network((socket.inet_ntop(socket.AF_INET, dst[:4]), dst_len),
                                        strict=False)
        yield Route(table, ROUTE_TYPES.get(kind, str(kind)), network, _u32(attrs.get(RTA_OIF)))
