"""``portscope groups``: its options."""

from __future__ import annotations

import argparse

from ..arguments import interval, port_number, positive_int
from .common import PLANS, add_engine_choice, add_filter_options, add_protocol_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    groups = sub.add_parser(
        "groups",
        help="SO_REUSEPORT groups: how connections and datagrams are spread over members",
        description="Show every SO_REUSEPORT group (TCP listeners and UDP sockets) with its "
                    "members and their owners, and count in the kernel what each member "
                    "receives: connections (TCP) or datagrams (UDP) delivered, per second, "
                    "accept-queue depth and backlog, share of the group's traffic, and the "
                    "group's imbalance (max/min share, coefficient of variation, chi-square "
                    "test against an even split: p < 0.01 means the imbalance is not noise). "
                    "Counting starts when the command starts: without --watch it samples "
                    "for one --interval and prints once. Members joining and leaving are "
                    "shown as events.",
        epilog="examples:\n"
               "  portscope groups                  every group, sampled for one second\n"
               "  portscope groups 8080 --watch     live view of the group(s) on port 8080\n"
               "  portscope groups 53 --udp --interval 5\n"
               "  portscope groups --watch --json   one JSON object per refresh\n"
               "  portscope groups --unit nginx     the groups nginx.service's processes hold\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    groups.add_argument("port", nargs="?", type=port_number, metavar="PORT",
                        help="only groups on this local port (filtered in the kernel)")
    add_protocol_options(groups, "groups")
    no_remote = "not for groups (an error): members have no remote end"
    add_filter_options(groups, notes={
        "dport": no_remote, "dst": no_remote,
        "pid": "a group is shown whole when one of its members' holders matches (as for "
               "--comm, --uid and --unit)"})
    groups.add_argument("--watch", action="store_true",
                        help="refresh every --interval until Ctrl-C")
    groups.add_argument("--interval", type=interval, default=1.0, metavar="SECONDS",
                        help="sampling time, and refresh interval with --watch (default 1)")
    groups.add_argument("--count", type=positive_int, metavar="N",
                        help="with --watch: stop after N refreshes (the first is shown at start)")
    groups.add_argument("-v", "--verbose", action="store_true",
                        help="who serves each group, with command line and executable")
    groups.add_argument("--json", action="store_true",
                        help="one JSON object per refresh (keys documented in the README)")
    gprobes = groups.add_argument_group("probes")
    add_engine_choice(gprobes)
    gprobes.add_argument("--plan", choices=PLANS, default="auto",
                         help="probe plan (default: the best one this kernel allows): "
                              "tracepoint counts at sk_data_ready (kernel 6.6+), fentry and "
                              "kprobe at reuseport_select_sock")
    gprobes.add_argument("--btf", metavar="FILE",
                         help="BTF of the running kernel, for kernels without "
                              "/sys/kernel/btf/vmlinux")
