"""``portscope man``: print the manual page."""

from __future__ import annotations

import argparse
import sys

from .errors import ExitStatus


def run(args: argparse.Namespace) -> ExitStatus:
    """Written from the parser each time, with the installed version."""
    from . import manual
    from .cli import _version, build_parser

    sys.stdout.write(manual.man_page(manual.walk(build_parser()), _version()))
    return ExitStatus.OK
