"""``portscope report``: its options."""

from __future__ import annotations

import argparse

from ..arguments import netns_inode, point_in_time, port_number, race_window


def add_parser(sub: argparse._SubParsersAction) -> None:
    report = sub.add_parser(
        "report",
        help="postmortem of a journal: conflicts, ownership changes, port hijack findings",
        description="Read a journal written by 'portscope record' and print the findings (a "
                    "process of another user trying to join a reuseport group; a process of "
                    "another executable or cgroup joining one; a UDP port shared across "
                    "executables or users; a port taken by another executable just after its "
                    "owner closed it; a specific-address socket shadowing a wildcard one; a "
                    "reuseport BPF program attached to a group that had none), each with the "
                    "events and snapshots that show it, then a timeline of conflicts and "
                    "ownership changes per port.",
        epilog="examples:\n"
               "  portscope report /var/lib/portscope/journal.db\n"
               "  portscope report journal.db --since 2h --port 8080\n"
               "  portscope report journal.db --since 2026-11-21T06:00 --json | jq .findings\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument("file", metavar="FILE", help="the journal")
    report.add_argument("--since", metavar="T", type=point_in_time, help="only what happened from T on: an ISO time "
                        "(2026-11-21T06:00, local time unless a zone is given), seconds since the "
                        "epoch, or a time ago: 30s, 10m, 2h, 1d")
    report.add_argument("--port", type=port_number, help="only this port")
    report.add_argument("--netns", type=netns_inode, metavar="INODE",
                        help="only this network namespace (its inode, as in the events)")
    report.add_argument("--race-window", type=race_window, default=5.0, metavar="SECONDS",
                        help="a port taken by another executable within this long after its "
                             "owner closed it is a restart race (default 5)")
    report.add_argument("--json", action="store_true",
                        help='{"journal": {...}, "findings": [...], "timeline": [...]}')
