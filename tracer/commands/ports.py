"""``portscope ports``: its options."""

from __future__ import annotations

import argparse

from ..arguments import port_number
from .common import STATES, add_netns_option, add_protocol_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    ports = sub.add_parser(
        "ports",
        help="every TCP/UDP socket, in every network namespace, with owners and flags",
        description="List sockets from netlink sock_diag in every network namespace, with "
                    "the flags ss cannot show (SO_REUSEADDR, SO_REUSEPORT and the reuseport "
                    "group, IPV6_V6ONLY, bound device) and every process holding each socket. "
                    "QUEUE is recv/send, or for listeners accept-queue depth/backlog.",
        epilog="examples:\n"
               "  portscope ports 8080              who holds port 8080, anywhere\n"
               "  portscope ports --state listen    every listener\n"
               "  portscope ports 53 --udp --json   for scripts\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ports.add_argument("ports", nargs="*", type=port_number, metavar="PORT",
                       help="local ports to show (default: all)")
    add_protocol_options(ports, "sockets")
    ports.add_argument("--state", action="append", choices=STATES, type=str.lower,
                       metavar="STATE", help="only this state (repeatable): "
                       + ", ".join(STATES))
    add_netns_option(ports)
    ports.add_argument("--json", action="store_true", help="machine-readable output")
