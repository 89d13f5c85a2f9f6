"""The kernel's names for what the records hold, and how an endpoint is
written: one table each, read by every source and every sink."""

from __future__ import annotations

import errno as errno_mod
import ipaddress
import socket

from ..layout import PsOpt

FAMILIES = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6", socket.AF_UNSPEC: "unspec"}
PROTOCOLS = {
    socket.IPPROTO_TCP: "tcp",
    socket.IPPROTO_UDP: "udp",
    136: "udplite",
    132: "sctp",
    socket.IPPROTO_ICMP: "icmp",
    socket.IPPROTO_ICMPV6: "icmpv6",
    socket.IPPROTO_RAW: "raw",
    0: "ip",
}
# include/net/tcp_states.h
TCP_STATES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
    6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING",
    12: "NEW_SYN_RECV",
}
OPTION_NAMES = {
    int(PsOpt.REUSEADDR): "reuseaddr",
    int(PsOpt.REUSEPORT): "reuseport",
    int(PsOpt.V6ONLY): "v6only",
    int(PsOpt.FREEBIND): "freebind",
    int(PsOpt.TRANSPARENT): "transparent",
    int(PsOpt.BIND_ADDRESS_NO_PORT): "bind_address_no_port",
}


def errno_name(code: int) -> str | None:
    """'EADDRINUSE' for 98; None for 0."""
    if code == 0:
        return None
    return errno_mod.errorcode.get(code, f"E{code}")


def format_addr(family: str, addr: str, port: int) -> str:
    """An endpoint as every surface writes it: ``[::1]:80``, ``127.0.0.1:80``."""
    return f"[{addr}]:{port}" if family == "ipv6" else f"{addr}:{port}"


def split_endpoint(text: str) -> tuple[str, int]:
    """'[::1]:80' or '127.0.0.1:80' -> (address, port); ValueError otherwise."""
    addr, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text!r} is not an address and port")
    if addr.startswith("[") and addr.endswith("]"):
        addr = addr[1:-1]
    return addr, int(port)


def address_of_family(family: str, addr: object) -> bool:
    """An address the rules can compare: of its family, as the kernel writes it."""
    if not isinstance(addr, str):
        return False
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return family == ("ipv6" if ip.version == 6 else "ipv4")
