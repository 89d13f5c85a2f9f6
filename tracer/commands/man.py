"""``portscope man``: its options."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    sub.add_parser(
        "man",
        help="print the manual page (roff): portscope man | man -l -",
        description="Print portscope's manual page in roff, written from its own argument "
                    "parser: every command with its options and examples, the exit statuses "
                    "and the environment variables. scripts/setup installs it, so that "
                    "'man portscope' finds it.",
        epilog="examples:\n"
               "  portscope man | man -l -            read it without installing it\n"
               "  portscope man > /usr/local/share/man/man1/portscope.1\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
