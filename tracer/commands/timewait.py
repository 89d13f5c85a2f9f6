"""``portscope timewait``: its options."""

from __future__ import annotations

import argparse

from ..arguments import interval, port_number
from .common import add_filter_options, add_size_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    timewait = sub.add_parser(
        "timewait",
        help="TIME_WAIT sockets: by port, remote or the process that closed them; "
             "ephemeral-port pressure",
        description="Group the TIME_WAIT sockets by local port, remote endpoint, or the "
                    "process that closed the connection first (known for connections closed "
                    "while a portscope collector was running: trace, record, or timewait "
                    "--watch), with the time they have left; and show, per source address "
                    "and destination, how much of ip_local_port_range is in use, since that "
                    "is what makes connect() fail with EADDRNOTAVAIL.",
        epilog="examples:\n"
               "  portscope timewait                 every TIME_WAIT socket, by local port\n"
               "  portscope timewait 443 --by remote who we talked to on 443, biggest first\n"
               "  portscope timewait --by process --watch\n"
               "  portscope timewait --dst 10.0.0.0/8 --dport 5432   towards the databases in 10/8\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    timewait.add_argument("port", nargs="?", type=port_number, metavar="PORT",
                          help="only TIME_WAIT sockets on this local port")
    timewait.add_argument("--by", choices=("port", "remote", "process"), default="port",
                          help="how to group (default: port)")
    add_filter_options(timewait, notes={
        "pid": "TIME_WAIT sockets have no process: the one that closed the connection, when a "
               "portscope collector recorded it (as for --comm, --uid and --unit)",
        "src": "also chooses the pressure lines (as --dst, --dport and --netns)"})
    add_size_options(timewait, 40, "show the N biggest groups, the rest summed on one line "
                     "(default 40)", "show every group")
    timewait.add_argument("--watch", action="store_true",
                          help="record closes while running and refresh (Ctrl-C to stop)")
    timewait.add_argument("--interval", type=interval, default=1.0, metavar="SECONDS",
                          help="refresh interval with --watch (default 1)")
    timewait.add_argument("--json", action="store_true", help="machine-readable output")
