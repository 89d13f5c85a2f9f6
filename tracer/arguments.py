"""The values a user types on the command line, each checked once, here.

Every type is an ``argparse`` ``type=`` function: it returns the value, or
raises ``argparse.ArgumentTypeError`` with one sentence that says what is
accepted. Numbers are bounded by what the kernel or the host can take (a
pid fits the kernel's pid range, a ring buffer what one map can hold, an
interval what a sleep can wait), so that an absurd value is refused here
instead of wrapping around (``--pid 4294967297`` used to trace pid 1) or
failing deep inside (``--interval inf``, ``--ring-size 4G``).

Digits are ASCII digits only: ``int()`` also reads ``"٨٠"``, ``" 80 "`` and
``"8_0"`` as 80.
"""

from __future__ import annotations

import argparse
import errno as errno_mod
import ipaddress
import math
import re
import time
from typing import Callable

Invalid = argparse.ArgumentTypeError

PID_MAX = 4194304  # PID_MAX_LIMIT on 64-bit kernels
UID_MAX = (1 << 32) - 2  # (uid_t)-1 means "no uid"
NETNS_INODE_MAX = (1 << 32) - 1
RING_MIN, RING_MAX = 4096, 1 << 30  # a BPF ring buffer: pages, at most 1 GiB here
DAY = 86400.0
YEAR = 365 * DAY
COMM_MAX = 15  # TASK_COMM_LEN - 1: the kernel cuts longer names

_DIGITS = re.compile(r"[0-9]+\Z")
_NUMBER = re.compile(r"[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?\Z")


def _integer(text: str) -> int | None:
    return int(text) if _DIGITS.match(text) else None


# A service name as /etc/services spells them (http, https, ssh, kerberos-adm).
_SERVICE = re.compile(r"[A-Za-z][A-Za-z0-9._+-]{0,63}\Z")


def port_number(text: str) -> int:
    """A port: a number from 1 to 65535, ``:PORT`` as ss writes it, or a
    service name of /etc/services (``http``: its TCP port, else its UDP one)."""
    number = text[1:] if text.startswith(":") else text
    port = _integer(number)
    if port is None and _SERVICE.match(number):
        port = _service_port(number)
    if port is None or not 1 <= port <= 65535:
        raise Invalid(f"invalid port {text!r}: a port is a number from 1 to 65535, :PORT, "
                      "or a service name of /etc/services such as http")
    return port


def _service_port(name: str) -> int | None:
    import socket

    for protocol in ("tcp", "udp"):
        try:
            return socket.getservbyname(name, protocol)
        except OSError:
            continue
    return None


def port_or_zero(text: str) -> int:
    """A port, or 0 for any ephemeral port (``why 0``)."""
    return 0 if text == "0" else port_number(text)


def pid_number(text: str) -> int:
    pid = _integer(text)
    if pid is None or not 1 <= pid <= PID_MAX:
        raise Invalid(f"invalid pid {text!r}: a process id is a number from 1 to {PID_MAX}")
    return pid


def bounded_int(low: int, high: int, what: str = "value") -> Callable[[str], int]:
    """An integer from ``low`` to ``high``."""
    def parse(text: str) -> int:
        value = _integer(text)
        if value is None or not low <= value <= high:
            raise Invalid(f"invalid {what} {text!r}: expected a whole number from {low} to {high}")
        return value
    parse.__name__ = what.replace(" ", "_")
    return parse


positive_int = bounded_int(1, 10**12, "count")
netns_inode = bounded_int(1, NETNS_INODE_MAX, "namespace inode")


def seconds(low: float, high: float, what: str = "duration") -> Callable[[str], float]:
    """A number of seconds, ``low`` < value <= ``high`` (finite: ``inf`` and
    ``nan`` are not durations)."""
    def parse(text: str) -> float:
        value = float(text) if _NUMBER.match(text) else math.nan
        if not (low < value <= high):
            raise Invalid(f"invalid {what} {text!r}: expected seconds above {low:g}, at most "
                          f"{_span(high)}")
        return value
    parse.__name__ = what.replace(" ", "_")
    return parse


interval = seconds(0.0, DAY, "interval")
run_time = seconds(0.0, YEAR, "duration")
race_window = seconds(0.0, DAY, "window")


def speed(text: str) -> float:
    value = float(text) if _NUMBER.match(text) else math.nan
    if not 0.01 <= value <= 100000:
        raise Invalid(f"invalid speed {text!r}: expected a factor from 0.01 to 100000")
    return value


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def duration(text: str) -> float:
    """'90', '90s', '10m', '2h', '7d', '1w' -> seconds (at most ten years)."""
    unit = _UNITS.get(text[-1:].lower())
    body = text[:-1] if unit else text
    value = float(body) * (unit or 1) if _NUMBER.match(body) else math.nan
    if not 0 < value <= 10 * YEAR:
        raise Invalid(f"invalid duration {text!r}: use seconds or a s/m/h/d/w suffix, e.g. 7d "
                      "(at most ten years)")
    return value


LAST_TIME = 253402300799.0  # 9999-12-31 23:59:59 UTC: the last second a calendar shows
TIMES = ("an ISO time (2026-11-21T06:00, local time unless a zone is given), seconds since "
         "the epoch, or a time ago: 30s, 10m, 2h, 1d")


def point_in_time(text: str, now: float | None = None) -> float:
    """An ISO 8601 time ('2026-11-21T06:00', '2026-11-21 06:00:05+00:00';
    without a zone: local time), seconds since the epoch (above 1e8), or a
    time ago ('10m', '2h', '1d'), as seconds since the epoch, from 1970 to
    the year 9999."""
    from datetime import datetime

    now = time.time() if now is None else now
    t = text.strip()
    try:
        if _NUMBER.match(t) and float(t) > 1e8:
            value = float(t)
        elif _NUMBER.match(t) or (t[-1:].lower() in _UNITS and _NUMBER.match(t[:-1])):
            value = now - duration(t)
        else:
            value = datetime.fromisoformat(t[:-1] + "+00:00" if t.endswith(("Z", "z")) else t).timestamp()
    except (Invalid, ValueError, OverflowError, OSError):
        value = math.nan
    if not 0 <= value <= LAST_TIME:
        raise Invalid(f"invalid time {text!r}: use {TIMES} (from 1970 to the year 9999)")
    return value


def _span(value: float) -> str:
    for unit, size in (("years", YEAR), ("day", DAY)):
        if value >= size and value % size == 0:
            n = value / size
            return f"{n:g} {unit if unit == 'years' or n != 1 else 'day'}"
    return f"{value:g}"


def byte_size(text: str, low: int = 1, high: int = 1 << 50, what: str = "size") -> int:
    """'8M', '512K', '1G' or a plain number of bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    body, unit = (text[:-1], units[text[-1].upper()]) if text[-1:].upper() in units else (text, 1)
    value = _integer(body)
    if value is None or not low <= value * unit <= high:
        raise Invalid(f"invalid {what} {text!r}: use bytes or a K/M/G suffix, e.g. 8M "
                      f"(from {_bytes(low)} to {_bytes(high)})")
    return value * unit


def _bytes(n: int) -> str:
    for suffix, size in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{suffix}"
    return str(n)


def ring_size(text: str) -> int:
    return byte_size(text, RING_MIN, RING_MAX, "ring buffer size")


def journal_size(text: str) -> int:
    return byte_size(text, 64 << 10, 1 << 50, "journal size")


def errno_code(text: str) -> int:
    """'EADDRINUSE' or 98."""
    code = _integer(text) if text[:1].isdigit() else getattr(errno_mod, text.upper(), None)
    if not isinstance(code, int) or code not in errno_mod.errorcode:
        raise Invalid(f"unknown errno {text!r}: use a name like EADDRINUSE")
    return code


def comm_name(text: str) -> str:
    if not text or len(text.encode("utf-8", "surrogateescape")) > COMM_MAX:
        raise Invalid(f"invalid command name {text!r}: the kernel keeps 1 to {COMM_MAX} bytes of "
                      "a process's name (as in /proc/PID/comm)")
    return text


def port_range_value(text: str) -> tuple[int, int]:
    """'40000-40100': a range of ports, low to high."""
    low, sep, high = text.partition("-")
    lo, hi = _integer(low), _integer(high)
    if not sep or lo is None or hi is None or not 1 <= lo <= hi <= 65535:
        raise Invalid(f"invalid port range {text!r}: give LOW-HIGH, ports from 1 to 65535")
    return lo, hi


def netns_spec(text: str) -> str:
    """A namespace as the user names it; checked against the host later
    (tracer.inventory.select_namespaces), refused here only when empty."""
    if not text.strip() or "\x00" in text:  # no path holds a NUL
        raise Invalid(f"invalid --netns {text!r}: give an inode number, an ip-netns name, a "
                      "path to a namespace file, or pid:PID")
    return text


def address(text: str) -> str:
    """An IPv4 or IPv6 address, as the kernel takes it."""
    import socket

    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, text)
            return text
        except (OSError, ValueError):
            continue
    raise Invalid(f"invalid address {text!r}: give an IPv4 or IPv6 address")


def text_value(what: str) -> Callable[[str], str]:
    """Free text (a device or user name) that must not be empty."""
    def parse(text: str) -> str:
        if not text.strip():
            raise Invalid(f"invalid {what} '': it must not be empty")
        return text
    parse.__name__ = what.replace(" ", "_")
    return parse


# ---- the filters of the listing commands (tracer/filters.py applies them) ----------

# The kernel's state names (as --json prints them) and what ss(8) calls them,
# each to the kernel states it means. ss's groups as its scan_state() defines
# them: connected is every state but LISTEN and CLOSE, synchronized is
# connected but SYN_SENT, bucket the minisockets (SYN_RECV, TIME_WAIT), big
# every state but those two.
KERNEL_STATES = ("ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2", "TIME_WAIT",
                 "CLOSE", "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING")
_CONNECTED = tuple(s for s in KERNEL_STATES if s not in ("LISTEN", "CLOSE"))
SS_STATES: dict[str, tuple[str, ...]] = {
    "estab": ("ESTABLISHED",), "established": ("ESTABLISHED",),
    "syn-sent": ("SYN_SENT",), "syn-recv": ("SYN_RECV",), "syn-rcv": ("SYN_RECV",),
    "fin-wait-1": ("FIN_WAIT1",), "fin-wait-2": ("FIN_WAIT2",), "time-wait": ("TIME_WAIT",),
    "unconn": ("CLOSE",), "unconnected": ("CLOSE",), "close": ("CLOSE",), "closed": ("CLOSE",),
    "close-wait": ("CLOSE_WAIT",), "last-ack": ("LAST_ACK",), "listen": ("LISTEN",),
    "listening": ("LISTEN",), "closing": ("CLOSING",),
    "all": KERNEL_STATES, "connected": _CONNECTED,
    "synchronized": tuple(s for s in _CONNECTED if s != "SYN_SENT"),
    "bucket": ("SYN_RECV", "TIME_WAIT"),
    "big": tuple(s for s in KERNEL_STATES if s not in ("SYN_RECV", "TIME_WAIT")),
}
STATE_NAMES = {**{s.lower(): (s,) for s in KERNEL_STATES}, **SS_STATES}


def state_names(text: str) -> tuple[str, ...]:
    """A socket state, case-insensitively: the kernel's name (``time_wait``),
    ss's (``time-wait``, ``estab``, ``unconn``) or one of ss's groups
    (``connected``): the kernel states it means."""
    states = STATE_NAMES.get(text.lower())
    if states is None:
        raise Invalid(f"unknown state {text!r}: use a kernel state name (listen, established, "
                      "time_wait, ...), a name ss uses (estab, time-wait, unconn, ...) or one "
                      "of its groups (connected, synchronized, bucket, big, all)")
    return states


def address_prefix(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An address, or a prefix (``10.0.0.0/8``, ``fd00::/8``), as ss's
    ``src``/``dst`` take them; ``[::1]`` as ss prints it. An IPv4-mapped
    IPv6 address or prefix (``::ffff:10.0.0.1``) is its IPv4 form, so that it
    matches a dual-stack socket's view of an IPv4 peer and the other way round."""
    body = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        if not body or body.strip() != body:
            raise ValueError(text)
        net = ipaddress.ip_network(body, strict=False)
    except ValueError:
        raise Invalid(f"invalid address {text!r}: give an IPv4 or IPv6 address, optionally with "
                      "a prefix length (10.0.0.0/8, ::1, fd00::/8)") from None
    mapped = ipaddress.ip_network("::ffff:0:0/96")
    if net.version == 6 and net.prefixlen >= 96 and net.subnet_of(mapped):  # type: ignore[arg-type]
        v4 = net.network_address.ipv4_mapped
        return ipaddress.ip_network(f"{v4}/{net.prefixlen - 96}")
    return net


_USER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9._-]{0,31}\$?\Z")


def uid_value(text: str) -> int:
    """A user id (0 to 4294967294) or the name of a user of this host."""
    uid = _integer(text)
    if uid is None and _USER_NAME.match(text):
        import pwd

        try:
            uid = pwd.getpwnam(text).pw_uid
        except KeyError:
            uid = None
    if uid is None or not 0 <= uid <= UID_MAX:
        raise Invalid(f"invalid uid {text!r}: give a number from 0 to {UID_MAX} or the name of "
                      "a user of this host")
    return uid


_UNIT = re.compile(r"[A-Za-z0-9:_.@\\-]{1,255}\Z")


def unit_name(text: str) -> str:
    """A systemd unit as its name is written (``nginx.service``,
    ``session-3.scope``; ``nginx`` means ``nginx.service``)."""
    if not _UNIT.match(text):
        raise Invalid(f"invalid unit {text!r}: a systemd unit name such as nginx.service "
                      "(letters, digits and :_.@\\- only)")
    return text
