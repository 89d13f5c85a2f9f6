"""``portscope export``: its options."""

from __future__ import annotations

import argparse

from ..arguments import bounded_int, interval
from .common import add_engine_options, listen_address


def add_parser(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser(
        "export",
        help="serve Prometheus metrics: failures by errno/port/comm/netns, TIME_WAIT, "
             "reuseport groups, ephemeral ports, lost events",
        description="Serve Prometheus metrics over HTTP (/metrics): failed bind()/listen()/"
                    "connect() calls by errno, port, comm and network namespace; TIME_WAIT "
                    "sockets by port; reuseport groups, their members and what each was "
                    "delivered; ephemeral ports in use against the range; lost events; the "
                    "probe plan. The number of series is bounded whatever a busy or hostile "
                    "host does (any local user chooses the names and ports that fail): port, "
                    "comm and netns values beyond the top N (--top) are folded into "
                    "\"other\", and no metric has more than --max-series series (beyond it, "
                    "the rest is one series whose labels are all \"other\"); the series "
                    "always sum to the exact totals. Stop with Ctrl-C or SIGTERM.",
        epilog="examples:\n"
               "  portscope export                          http://127.0.0.1:9977/metrics\n"
               "  portscope export --listen 0.0.0.0:9977    for a Prometheus elsewhere\n"
               "  portscope export --top 20 --interval 30   fewer series, rarer inventories\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("--listen", type=listen_address, default="127.0.0.1:9977",
                        metavar="ADDR:PORT",
                        help="where to serve /metrics (default 127.0.0.1:9977; [::]:PORT for IPv6)")
    export.add_argument("--top", type=bounded_int(1, 1000, "top"), default=50, metavar="N",
                        help="keep the N most frequent ports, comms and netns as their own "
                             "label values, fold the rest into \"other\" (default 50)")
    export.add_argument("--max-series", type=bounded_int(2, 100000, "series bound"), default=500,
                        metavar="S", help="at most S series per metric, whatever the combination "
                                          "of label values (default 500)")
    export.add_argument("--interval", type=interval, default=15.0, metavar="SECONDS",
                        help="how often TIME_WAIT, ephemeral ports and reuseport groups are "
                             "read (default 15; a slow read makes the next one wait longer)")
    export.add_argument("--no-groups", action="store_true",
                        help="do not count reuseport deliveries (loads no counting probes)")
    add_engine_options(export)
