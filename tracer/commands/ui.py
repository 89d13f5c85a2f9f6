"""``portscope ui`` (and ``portscope`` alone on a terminal): its options."""

from __future__ import annotations

import argparse

from .. import runtime
from ..arguments import speed
from ..errors import ExitStatus
from .common import add_engine_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    ui = sub.add_parser(
        "ui",
        help="the live terminal UI (what portscope opens with no arguments, on a terminal)",
        description="Watch the host live: conflicts as they happen with their explanation, "
                    "who holds which port, reuseport groups and their balance, TIME_WAIT "
                    "sockets and ephemeral-port pressure. Keys are shown at the bottom; q quits.",
        epilog="examples:\n"
               "  portscope                           the same as portscope ui\n"
               "  portscope ui --plan tracepoint\n"
               "  portscope ui --replay session.jsonl replay a recording (no root needed)\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ui.add_argument("--replay", metavar="FILE",
                    help="show a recording (JSON lines of portscope trace --json) instead of "
                         "the live host")
    ui.add_argument("--speed", type=speed, default=1.0, metavar="X",
                    help="replay speed (default 1: the recording's own pace)")
    add_engine_options(ui)


def run(args: argparse.Namespace) -> ExitStatus:
    """The terminal UI over the live collector (or a recording). The
    collector starts first, so that "not root" or "no BTF" is one sentence
    on the terminal, not a screen; the UI knows nothing of the kernel."""
    from ..state import StateModel

    model = StateModel()
    if args.replay:
        from ..recording import Replay

        source = Replay(model, args.replay)  # a bad file is one sentence, before the screen
        source.check()
        source.play(args.speed)
    else:
        from ..collector import LiveCollector
        from ..engine import UI_CLOSERS, EngineConfig
        from ..plans import Plan

        source = LiveCollector(model, EngineConfig(
            plan=None if args.plan == "auto" else Plan(args.plan), errors_only=True,
            ring_bytes=args.ring_size, btf_path=args.btf, closer_entries=UI_CLOSERS))
        source.start()
    try:
        # The terminal is given back and the probes detached however it ends.
        status = runtime.run_screen(model)
    finally:
        source.stop()
    # Textual has shown what went wrong, if anything did: the status says so.
    return ExitStatus.ERROR if status else ExitStatus.OK
