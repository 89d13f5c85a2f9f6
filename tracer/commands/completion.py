"""``portscope completion``: its options."""

from __future__ import annotations

import argparse

SHELLS = ("bash", "zsh")


def add_parser(sub: argparse._SubParsersAction) -> None:
    completion = sub.add_parser(
        "completion",
        help="eval \"$(portscope completion bash)\" in ~/.bashrc: bash (or zsh) completion",
        description="Print the bash or zsh completion script, written from portscope's own "
                    "argument parser (commands, options, their choices, and the ip-netns names "
                    "of /run/netns for --netns). scripts/setup installs both where bash and zsh "
                    "find them.",
        epilog="examples:\n"
               "  eval \"$(portscope completion bash)\"      in ~/.bashrc\n"
               "  source <(portscope completion zsh)      in ~/.zshrc, after compinit\n"
               "  portscope completion zsh > ~/.zfunc/_portscope   with ~/.zfunc on $fpath\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    completion.add_argument("shell", choices=SHELLS, metavar="SHELL",
                            help="the shell: " + " or ".join(SHELLS))
