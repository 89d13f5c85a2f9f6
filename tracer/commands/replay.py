"""``portscope replay``: its options."""

from __future__ import annotations

import argparse

from ..arguments import point_in_time, speed


def add_parser(sub: argparse._SubParsersAction) -> None:
    replay = sub.add_parser(
        "replay",
        help="the terminal UI over a journal: step and seek through what was recorded",
        description="Open the terminal UI over a journal written by 'portscope record', as of "
                    "a position in time: the conflicts up to it (with the blockers recorded on "
                    "the spot) and who held which port and which reuseport groups existed, from "
                    "the snapshot taken at or before it. The status line shows the time and the "
                    "event n/N. Keys: space play/pause, left/right one event, [ ] (or "
                    "shift+left/right) one minute, home/end the start/end, +/- speed, q quits. "
                    "Needs read access to the file only.",
        epilog="examples:\n"
               "  portscope replay /var/lib/portscope/journal.db\n"
               "  portscope replay journal.db --from 2h --to 1h\n"
               "  portscope replay journal.db --from 2026-11-21T06:00 --speed 60\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    replay.add_argument("file", metavar="FILE", help="the journal")
    times = ("an ISO time (2026-11-21T06:00, local time unless a zone is given), seconds "
             "since the epoch, or a time ago: 30s, 10m, 2h, 1d")
    replay.add_argument("--from", dest="start", metavar="T", type=point_in_time,
                        help="start here (default: the first thing recorded): " + times)
    replay.add_argument("--to", dest="end", metavar="T", type=point_in_time,
                        help="end here (default: the last thing recorded): " + times)
    replay.add_argument("--speed", type=speed, default=1.0, metavar="X",
                        help="play at X times the recording's pace (default 1; + and - change it)")
