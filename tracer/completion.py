"""``portscope completion SHELL``: print the shell's completion script."""

from __future__ import annotations

import argparse
import sys

from .errors import ExitStatus


def run(args: argparse.Namespace) -> ExitStatus:
    """Written from the parser each time: nothing to keep in step."""
    from . import manual
    from .cli import build_parser

    root = manual.walk(build_parser())
    write = {"bash": manual.bash_completion, "zsh": manual.zsh_completion}[args.shell]
    sys.stdout.write(write(root))
    return ExitStatus.OK
