"""``portscope trace``: its options."""

from __future__ import annotations

import argparse

from ..arguments import errno_code, port_number, positive_int, run_time
from .common import FILTERS_TITLE, add_engine_options, add_filter_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    trace = sub.add_parser(
        "trace",
        help="stream failing bind()/listen()/connect() calls, live",
        description="Stream every bind(), listen() and connect() on the host that fails "
                    "(or, with --all, every one), with the address it asked for, the socket's "
                    "options at that moment, and who called it. Stop with Ctrl-C.",
        epilog="examples:\n"
               "  portscope trace                     every failure, host-wide\n"
               "  portscope trace --port 8080 --all   every call touching port 8080\n"
               "  portscope trace --json | jq .       one JSON object per line\n"
               "  portscope trace --json -o /var/log/portscope.jsonl   JSON lines to a file\n"
               "  portscope trace --netns web --dport 5432 --all   connects to port 5432 in netns web\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    f = trace.add_argument_group(FILTERS_TITLE)
    f.add_argument("--port", type=port_number,
                   help="only calls asking for or holding this port, local or remote (filtered "
                        "in the kernel)")
    add_filter_options(trace, group=f, notes={
        "sport": "the port a bind() or listen() asks for or holds, a connect()'s local port",
        "dport": "a connect()'s destination port (bind and listen have none)",
        "src": "the address a bind() asks for or holds, a connect()'s local address",
        "dst": "a connect()'s destination",
        "pid": "the caller (one --pid is filtered in the kernel)",
        "comm": "the calling task",
        "uid": "the caller's uid or the socket's",
        "unit": "the caller's, from its cgroup",
        "netns": "the socket's; a name is resolved once, at start"})
    f.add_argument("--errno", type=errno_code, action="append", metavar="NAME",
                   help="only calls that failed with this error (repeatable), "
                        "e.g. --errno EADDRINUSE --errno EADDRNOTAVAIL")
    which = f.add_mutually_exclusive_group()
    # Only failed calls is the default: --errors-only changes nothing. It is
    # left out of --help and still accepted, so that scripts passing it run.
    which.add_argument("--errors-only", dest="all", action="store_false", help=argparse.SUPPRESS)
    which.add_argument("--all", dest="all", action="store_true",
                       help="successful calls too")
    # Both flags share one destination; without this the store_false of
    # --errors-only would make "all" the default.
    trace.set_defaults(all=False)
    o = trace.add_argument_group("output")
    o.add_argument("--json", action="store_true",
                   help="one JSON object per line (keys documented in the README)")
    o.add_argument("-v", "--verbose", action="store_true",
                   help="the caller's command line and executable under each event "
                        "(text only; --json has the caller's unit, container and pod)")
    o.add_argument("-o", "--output", metavar="FILE",
                   help="write the events to FILE instead of stdout (appended, one line per "
                        "event, flushed at once; with --json: JSON lines for Vector or Fluent Bit)")
    o.add_argument("--no-explain", action="store_true",
                   help="do not name the blocking sockets of each EADDRINUSE (by default "
                        "the port's inventory is taken at the moment of the failure)")
    o.add_argument("--count", type=positive_int, metavar="N", help="stop after N events")
    o.add_argument("--duration", type=run_time, metavar="SECONDS",
                   help="stop after this many seconds")
    add_engine_options(trace)
