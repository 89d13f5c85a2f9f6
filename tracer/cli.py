"""The ``portscope`` command line: argument definitions and error handling.

Each subcommand lives in its own module and returns an :class:`ExitStatus`.
Errors reach the user as one sentence on stderr (``portscope: ...``) and a
meaningful exit code; ``--debug`` adds the traceback and libbpf's log.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from typing import Callable, NoReturn, Sequence

from . import runtime
from .commands import COMMANDS
from .colour import CHOICES
from .commands.common import EPILOG
from .errors import ExitStatus, PortscopeError
from .text import printable


class BadArguments(Exception):
    """What argparse would print before exiting; main() makes it one sentence."""

    def __init__(self, message: str, prog: str) -> None:
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """argparse, whose errors become one sentence like every other error
    (``portscope: argument --port: invalid port 'x': ... (see 'portscope
    trace --help')``, exit status 2), escaped: it quotes what was typed."""

    def error(self, message: str) -> NoReturn:
        raise BadArguments(message, self.prog)


RUN_IN_COMMANDS = ("ui",)


def _version() -> str:
    """The installed distribution's version ("unknown" when run from a
    checkout that was never installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("portscope")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="portscope",
        description="Who holds a port, and why did bind() fail? Kernel-level tracing of "
                    "port ownership (run as root).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks and libbpf's log on errors")
    parser.add_argument("--version", action="version", version=f"portscope {_version()}")
    parser.add_argument("--color", choices=CHOICES, default="auto",
                        help="colour errnos, verdicts and fixes in text output: auto (the "
                             "default: on a terminal, unless NO_COLOR is set or TERM is dumb), "
                             "always (even into a pipe, for less -R) or never; --json and "
                             "trace -o FILE are never coloured")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _command(name: str) -> Callable[[argparse.Namespace], ExitStatus]:
    # Only the chosen command's module is imported: `trace` starts fast and
    # needs nothing beyond libbpf, `--help` loads only the option modules.
    # A command whose running is no library's (ui) runs from its option module.
    try:
        module = importlib.import_module(f".commands.{name}" if name in RUN_IN_COMMANDS else f".{name}",
                                         __package__)
    except ModuleNotFoundError as exc:  # psutil, prometheus_client: an incomplete install
        raise PortscopeError(f"portscope {name} needs the Python package {exc.name}, which is not "
                             "installed: install portscope with scripts/setup") from exc
    return module.run


def main(argv: Sequence[str] | None = None) -> int:
    runtime.install_default()  # SIGTERM and SIGHUP stop a command as Ctrl-C does
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except BadArguments as exc:
        _error(f"{exc} (see '{exc.prog} --help')")
        return int(ExitStatus.USAGE)
    if not args.command:
        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            parser.print_help()
            return ExitStatus.USAGE
        # On a terminal, no command opens the live UI.
        args = parser.parse_args(["ui", *(["--debug"] if args.debug else [])])
    if getattr(args, "engine", None) and args.command != "doctor":
        # Every probe the command loads (events, groups) uses that engine.
        from .engine import choose_engine

        choose_engine(args.engine)
    try:
        status = int(_command(args.command)(args))
        sys.stdout.flush()  # a full disk shows here, not in the interpreter's exit
        return status
    except PortscopeError as exc:
        if args.debug:
            traceback.print_exc()
            log = getattr(exc, "log", "")
            if log:
                print(log, file=sys.stderr)
        _error(str(exc))
        return int(exc.status)
    except KeyboardInterrupt:
        return int(ExitStatus.INTERRUPTED)
    except BrokenPipeError:
        # The reader went away (`| head`): not an error worth a sentence.
        _discard_stdout()
        return int(ExitStatus.OK)
    except OSError as exc:  # writing stdout or stderr failed (a full disk)
        _discard_stdout()
        _error(f"cannot write the output: {exc.strerror or exc}")
        return int(ExitStatus.ERROR)
    except Exception as exc:  # noqa: BLE001 - a bug: still one sentence, never a traceback
        if args.debug:
            traceback.print_exc()
        _error(f"internal error ({type(exc).__name__}: {exc}); run with --debug for the "
               "traceback, and please report it")
        return int(ExitStatus.ERROR)


def _error(sentence: str) -> None:
    try:
        print(f"portscope: {printable(sentence)}", file=sys.stderr, flush=True)
    except OSError:
        pass  # stderr itself is gone: the exit status still tells


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's own flush at exit
    does not fail a second time (and print a traceback-like warning)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
