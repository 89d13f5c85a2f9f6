"""What the kernel checks before it looks at the port: may this socket bind
this address at all?

bind() refuses for other reasons than a taken port, and it checks them
first, in an order that differs between the families (``__inet_bind`` in
net/ipv4/af_inet.c, ``__inet6_bind`` in net/ipv6/af_inet6.c):

* IPv4: the address must be the namespace's (EADDRNOTAVAIL), then a port
  below ``net.ipv4.ip_unprivileged_port_start`` needs CAP_NET_BIND_SERVICE
  (EACCES).
* IPv6: a TCP socket cannot bind a multicast address (EINVAL), then the
  privileged port (EACCES), then: a v4-mapped address is refused to a
  v6-only socket (EINVAL) and checked like IPv4; a link-local address needs
  a device (EINVAL); a device that is gone is ENODEV; and the address must
  be the namespace's (EADDRNOTAVAIL).

"The namespace's" is not the same question for both. IPv4 looks the
address up in the local routing table (``inet_addr_type_table``: the table
of the socket's VRF, else the local table; 255.255.255.255 is broadcast,
224.0.0.0/4 multicast, both accepted): a ``local 10.0.0.0/24`` route makes
all of it bindable, and an address keeps its local route while its device
is down. IPv6 looks in the list of addresses
(``ipv6_chk_addr``): not a tentative one (duplicate address detection not
finished, or failed), one of the same VRF, and with a device bound, one of
that device unless its scope is global. IP_FREEBIND, IP_TRANSPARENT and the
per-family sysctl ``ip_nonlocal_bind`` lift the address check.

Pure functions over :class:`NamespaceFacts` (read by :func:`read_facts`);
the explainer matrix (tests/kernel) proves each rule by doing the bind.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field

from .netns import PortRange
from .rtnetlink import (
    RT_SCOPE_HOST,
    RT_SCOPE_LINK,
    RT_TABLE_LOCAL,
    Address,
    Device,
    Route,
)


@dataclass(frozen=True)
class NamespaceFacts:
    """What a namespace's configuration says about binding, read once."""

    netns: int
    unprivileged_port_start: int  # net.ipv4.ip_unprivileged_port_start (IPv6 too)
    nonlocal_bind: dict[str, bool]  # net.ipv4.ip_nonlocal_bind, net.ipv6.ip_nonlocal_bind
    autobind_reuse: bool  # net.ipv4.ip_autobind_reuse
    port_range: PortRange
    devices: dict[int, Device] = field(default_factory=dict)
    addresses: tuple[Address, ...] = ()
    local_routes: tuple[Route, ...] = ()
    socket_port_range: bool = True  # the kernel has IP_LOCAL_PORT_RANGE (6.3+)

    def device_name(self, index: int) -> str:
        dev = self.devices.get(index)
        return dev.name if dev else f"#{index}"

    def device_index(self, name: str) -> int | None:
        """The index of the device named ``name`` (or numbered so), None
        when the namespace has none."""
        for index, dev in self.devices.items():
            if dev.name == name or (name.isdigit() and index == int(name)):
                return index
        return None

    def local_addresses(self, family: str) -> list[str]:
        return [a.address for a in self.addresses if a.family == family]


@dataclass(frozen=True)
class Question:
    """The bind as these checks see it."""

    family: str  # ipv4 | ipv6 (of the socket)
    protocol: str  # tcp | udp
    addr: str
    port: int
    bound_dev_if: int = 0
    v6only: bool = False
    freebind: bool = False
    transparent: bool = False
    cap_net_bind_service: bool = False


@dataclass(frozen=True)
class Refusal:
    """A reason the kernel refuses before the port is considered."""

    errno: str  # EACCES | EADDRNOTAVAIL | EINVAL | ENODEV
    rule: str
    facts: dict[str, object]


def admission(q: Question, facts: NamespaceFacts) -> Refusal | None:
    """The first check the kernel would refuse ``q`` at, or None."""
    checks = _IPV6_ORDER if q.family == "ipv6" else _IPV4_ORDER
    for check in checks:
        refusal = check(q, facts)
        if refusal is not None:
            return refusal
    return None


# ---- the checks -------------------------------------------------------------------


def privileged_port(q: Question, facts: NamespaceFacts) -> Refusal | None:
    """inet_port_requires_bind_service(): a port below the namespace's
    ip_unprivileged_port_start needs CAP_NET_BIND_SERVICE in the user
    namespace that owns the network namespace."""
    start = facts.unprivileged_port_start
    if q.port and q.port < start and not q.cap_net_bind_service:
        return Refusal("EACCES", "privileged_port",
                       {"port": q.port, "unprivileged_port_start": start})
    return None


def _nonlocal(q: Question, facts: NamespaceFacts, family: str) -> bool:
    return q.freebind or q.transparent or facts.nonlocal_bind.get(family, False)


def _vrf(facts: NamespaceFacts, index: int) -> Device | None:
    """l3mdev_master_dev_rcu(): the VRF device a device is, or is enslaved
    to; None when it is in none."""
    dev = facts.devices.get(index)
    if dev is not None and dev.kind != "vrf":
        dev = facts.devices.get(dev.master)
    return dev if dev is not None and dev.kind == "vrf" else None


def _l3mdev_table(facts: NamespaceFacts, index: int) -> int:
    """l3mdev_fib_table_by_index(): the table of the device's VRF; 0 when it
    is in none (then the local table is used)."""
    vrf = _vrf(facts, index)
    return vrf.vrf_table if vrf else 0


def local_route(ip: ipaddress.IPv4Address, facts: NamespaceFacts, table: int) -> Route | None:
    """The longest route of ``table`` (the local table's: local, broadcast)
    that holds ``ip``."""
    best: Route | None = None
    for route in facts.local_routes:
        if route.table == table and ip in route.network:
            if best is None or route.network.prefixlen > best.network.prefixlen:
                best = route
    return best


def ipv4_address_type(addr: str, facts: NamespaceFacts, table: int, device: int = 0) -> str:
    """__inet_dev_addr_type(): broadcast, multicast, or what the longest
    matching route of the table says (local, broadcast, ...); unicast when
    none matches. With ``device``, a route through another device is unicast."""
    ip = ipaddress.IPv4Address(addr)
    # ipv4_is_zeronet() is 0.0.0.0 alone since Linux 5.3 (0.0.0.0/8 unicast).
    if int(ip) == 0 or ip == ipaddress.IPv4Address("255.255.255.255"):
        return "broadcast"
    if ip.is_multicast:
        return "multicast"
    best = local_route(ip, facts, table)
    if best is None or (device and best.device != device):
        return "unicast"
    return best.type


def _ipv4_refusal(q: Question, facts: NamespaceFacts, addr: str, dev: int) -> Refusal | None:
    """inet_addr_valid_or_nonlocal(): the wildcard, a local, multicast or
    broadcast address, or a socket allowed a non-local one."""
    table = _l3mdev_table(facts, q.bound_dev_if) or RT_TABLE_LOCAL
    kind = ipv4_address_type(addr, facts, table, dev)
    if addr == "0.0.0.0" or kind in ("local", "multicast", "broadcast"):
        return None
    if _nonlocal(q, facts, "ipv4"):
        return None
    detail: dict[str, object] = {"address": addr, "family": "ipv4", "table": table}
    configured = [a for a in facts.addresses if a.family == "ipv4" and a.address == addr]
    if configured:  # on a device, but not in the table this socket looks in: another VRF's
        detail["other_vrf"] = facts.device_name(configured[0].device)
    detail["local_addresses"] = facts.local_addresses("ipv4")
    return Refusal("EADDRNOTAVAIL", "address_not_local", detail)


def ipv4_address(q: Question, facts: NamespaceFacts) -> Refusal | None:
    return _ipv4_refusal(q, facts, q.addr, 0)


def multicast_stream(q: Question, facts: NamespaceFacts) -> Refusal | None:
    if q.protocol == "tcp" and ipaddress.IPv6Address(q.addr).is_multicast:
        return Refusal("EINVAL", "multicast_stream", {"address": q.addr})
    return None


def _device_gone(q: Question, facts: NamespaceFacts) -> Refusal | None:
    if q.bound_dev_if and q.bound_dev_if not in facts.devices:
        return Refusal("ENODEV", "device_gone", {"bound_dev_if": q.bound_dev_if})
    return None


def _needs_scope(ip: ipaddress.IPv6Address) -> bool:
    """__ipv6_addr_needs_scope_id(): link-local unicast, and multicast of
    interface-local or link-local scope."""
    if ip.is_link_local:
        return True
    return ip.is_multicast and (ip.packed[1] & 0x0F) in (1, 2)


def _l3mdev(facts: NamespaceFacts, index: int) -> int:
    """The ifindex of the device's VRF, 0 if none."""
    vrf = _vrf(facts, index)
    return vrf.index if vrf else 0


def ipv6_address(q: Question, facts: NamespaceFacts) -> Refusal | None:
    ip = ipaddress.IPv6Address(q.addr)
    if ip.ipv4_mapped is not None:
        if q.v6only:
            return Refusal("EINVAL", "mapped_on_v6only", {"address": q.addr})
        gone = _device_gone(q, facts)
        if gone:
            return gone
        # The IPv4 rules, with the device: a local route through another
        # device does not count here (inet_addr_type_dev_table).
        return _ipv4_refusal(q, facts, str(ip.ipv4_mapped), q.bound_dev_if)
    if ip.is_unspecified:
        return None
    if _needs_scope(ip) and not q.bound_dev_if:
        return Refusal("EINVAL", "link_local_needs_device", {"address": q.addr})
    gone = _device_gone(q, facts)
    if gone:
        return gone
    if ip.is_multicast or _nonlocal(q, facts, "ipv6"):
        return None
    return _ipv6_presence(q, facts, ip)


def _ipv6_presence(q: Question, facts: NamespaceFacts, ip: ipaddress.IPv6Address) -> Refusal | None:
    """ipv6_chk_addr(net, addr, dev, 0): the address, not tentative, in the
    socket's VRF, on its device unless the address's scope is global."""
    vrf = _l3mdev(facts, q.bound_dev_if)
    seen: list[str] = []
    for a in facts.addresses:
        if a.family != "ipv6" or ipaddress.IPv6Address(a.address) != ip:
            continue
        if _l3mdev(facts, a.device) != vrf:
            seen.append("other_vrf")
        elif a.tentative:
            seen.append("tentative")
        elif q.bound_dev_if and a.device != q.bound_dev_if and a.scope in (RT_SCOPE_LINK,
                                                                           RT_SCOPE_HOST):
            seen.append("other_device")
        else:
            return None
    detail: dict[str, object] = {"address": q.addr, "family": "ipv6",
                                 "local_addresses": facts.local_addresses("ipv6")}
    if "tentative" in seen:
        return Refusal("EADDRNOTAVAIL", "address_tentative", detail)
    if seen:
        detail["where"] = seen[0]
    return Refusal("EADDRNOTAVAIL", "address_not_local", detail)


_IPV4_ORDER = (ipv4_address, privileged_port)
_IPV6_ORDER = (multicast_stream, privileged_port, ipv6_address)


# ---- reading a namespace's facts ---------------------------------------------------


def read_facts(netns_fd: int | None = None) -> NamespaceFacts:
    """The facts of the namespace open on ``netns_fd`` (None: our own)."""
    import os

    from . import rtnetlink
    from .netns import _read_port_range
    from .nsenter import in_netns

    def here() -> NamespaceFacts:
        devices, addresses, routes = rtnetlink.read()
        return NamespaceFacts(
            netns=os.stat("/proc/thread-self/ns/net").st_ino,
            unprivileged_port_start=_sysctl("net/ipv4/ip_unprivileged_port_start", 1024),
            nonlocal_bind={"ipv4": bool(_sysctl("net/ipv4/ip_nonlocal_bind", 0)),
                           "ipv6": bool(_sysctl("net/ipv6/ip_nonlocal_bind", 0))},
            autobind_reuse=bool(_sysctl("net/ipv4/ip_autobind_reuse", 0)),
            port_range=_read_port_range(), devices=devices, addresses=tuple(addresses),
            local_routes=tuple(routes), socket_port_range=has_socket_port_range())

    return here() if netns_fd is None else in_netns(netns_fd, here)


IP_LOCAL_PORT_RANGE = 51


@functools.lru_cache(maxsize=1)
def has_socket_port_range() -> bool:
    """Whether the kernel knows IP_LOCAL_PORT_RANGE (6.3 and later): asked by
    setting it on a throwaway socket."""
    import socket

    with socket.socket() as s:
        try:
            s.setsockopt(socket.IPPROTO_IP, IP_LOCAL_PORT_RANGE, 0)
            return True
        except OSError:
            return False


def _sysctl(name: str, default: int) -> int:
    """/proc/sys of the reading thread's namespace (a kernel without the
    sysctl behaves as its default)."""
    try:
        with open(f"/proc/sys/{name}") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return default
