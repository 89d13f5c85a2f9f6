"""``portscope record``: its options."""

from __future__ import annotations

import argparse

from ..arguments import duration, interval, journal_size
from .common import add_engine_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    record = sub.add_parser(
        "record",
        help="write every event and periodic socket snapshots to a journal, headless",
        description="Record, until SIGTERM or Ctrl-C, every failing bind()/listen()/connect(), "
                    "every successful bind() and listen(), every listener close, and a snapshot "
                    "of every listener, UDP socket and bound socket with its owners (every "
                    "--snapshot-interval seconds, and soon after each bind, listen or close), "
                    "to an SQLite journal for 'portscope report'. The journal is mode 0600 "
                    "(it holds command lines), bounded by --max-size and --retain (the oldest "
                    "data goes first), and survives a crash: at most the last second is lost. "
                    "Meant to run as a systemd service (deploy/portscope-record.service).",
        epilog="examples:\n"
               "  portscope record                              /var/lib/portscope/journal.db\n"
               "  portscope record -o /tmp/j.db --max-size 64M --retain 2d\n"
               "  portscope report /var/lib/portscope/journal.db --since 1h\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    record.add_argument("-o", "--output", metavar="FILE", default="/var/lib/portscope/journal.db",
                        help="the journal (default /var/lib/portscope/journal.db); created, "
                             "or appended to if it exists")
    record.add_argument("--max-size", type=journal_size, default=256 << 20, metavar="SIZE",
                        help="drop the oldest data beyond this size (default 256M)")
    record.add_argument("--retain", type=duration, default=7 * 86400.0, metavar="DURATION",
                        help="drop data older than this, e.g. 12h, 7d (default 7d)")
    record.add_argument("--snapshot-interval", type=interval, default=2.0, metavar="SECONDS",
                        help="seconds between periodic socket snapshots (default 2)")
    record.add_argument("--no-explain", action="store_true",
                        help="do not record the blocking sockets of each EADDRINUSE")
    record.add_argument("--jsonl", metavar="FILE",
                        help="also write every event as a JSON line (trace --json's keys) to "
                             "FILE, appended and flushed per line, or to stdout with '-' "
                             "(for Vector or Fluent Bit)")
    add_engine_options(record)
