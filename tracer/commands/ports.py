"""``portscope ports``: its options."""

from __future__ import annotations

import argparse

from ..arguments import port_number
from .common import add_filter_options, add_protocol_options, add_size_options, add_state_option


def add_parser(sub: argparse._SubParsersAction) -> None:
    ports = sub.add_parser(
        "ports",
        help="every TCP/UDP socket, in every network namespace, with owners and flags",
        description="List sockets from netlink sock_diag in every network namespace, with "
                    "the flags ss cannot show (SO_REUSEADDR, SO_REUSEPORT and the reuseport "
                    "group, IPV6_V6ONLY, bound device) and every process holding each socket. "
                    "QUEUE is recv/send, or for listeners accept-queue depth/backlog. An "
                    "unconnected UDP socket's state is shown UNCONN, as ss shows it; --json "
                    "keeps the kernel's name, CLOSE.",
        epilog="examples:\n"
               "  portscope ports 8080              who holds port 8080, anywhere\n"
               "  portscope ports --state listen    every listener\n"
               "  portscope ports 53 --udp --json   for scripts\n"
               "  portscope ports --state estab --dst 10.0.0.0/8 --comm nginx\n"
               "                                    nginx's connections to 10/8\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ports.add_argument("ports", nargs="*", type=port_number, metavar="PORT",
                       help="local ports to show (default: all; with --sport: the ports both name)")
    add_protocol_options(ports, "sockets")
    add_state_option(ports)
    add_filter_options(ports, notes={
        "pid": "a socket no process holds (TIME_WAIT) matches the process that closed it, "
               "when a portscope collector recorded it (as for --comm, --uid, --unit)",
        "dport": "never with only --state listen (a listener has no remote end)"})
    add_size_options(ports, 100, "show the first N lines (default 100), the rest counted; "
                     "sockets alike but for the remote port (a server's clients, their "
                     "TIME_WAIT) are one line: REMOTE 10.0.0.7:* x2,999",
                     "every socket on its own line (--json always gives every one)")
    ports.add_argument("-v", "--verbose", action="store_true",
                       help="each owner's command line and executable under its socket")
    ports.add_argument("--json", action="store_true", help="machine-readable output")
