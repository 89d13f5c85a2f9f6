"""The ``portscope`` command line: argument definitions and error handling.

Each subcommand lives in its own module and returns an :class:`ExitStatus`.
Errors reach the user as one sentence on stderr (``portscope: ...``) and a
meaningful exit code; ``--debug`` adds the traceback and libbpf's log.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Callable, Sequence

from .errors import ExitStatus, PortscopeError

PLANS = ("auto", "fentry", "kprobe", "tracepoint")

EPILOG = """\
exit status:
  0  success            1  runtime failure      2  bad arguments or input
  3  not permitted (not root, lockdown)          4  kernel lacks a feature
"""


def port_number(text: str) -> int:
    try:
        port = int(text, 10)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: a port is a number from 1 to 65535")
    return port


def errno_code(text: str) -> int:
    """'EADDRINUSE' or 98."""
    import errno

    code = getattr(errno, text.upper(), None) if not text.isdigit() else int(text)
    if not isinstance(code, int) or code not in errno.errorcode:
        raise argparse.ArgumentTypeError(f"unknown errno {text!r}: use a name like EADDRINUSE")
    return code


def positive_int(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a positive integer")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: expected seconds > 0")
    return value


def byte_size(text: str) -> int:
    """'8M', '512K', '1G' or a plain number of bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    body, unit = (text[:-1], units[text[-1].upper()]) if text[-1:].upper() in units else (text, 1)
    try:
        value = int(body) * unit
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use bytes or a K/M/G suffix, e.g. 8M")
    return value


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("probes")
    g.add_argument("--plan", choices=PLANS, default="auto",
                   help="probe plan: fentry, kprobe or tracepoint (default: the best one "
                        "this kernel allows; see 'portscope doctor')")
    g.add_argument("--btf", metavar="FILE",
                   help="BTF of the running kernel, for kernels without /sys/kernel/btf/vmlinux")
    g.add_argument("--ring-size", type=byte_size, default=8 << 20, metavar="SIZE",
                   help="ring buffer size (default 8M); raise it if events are reported lost")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="portscope",
        description="Who holds a port, and why did bind() fail? Kernel-level tracing of "
                    "port ownership (run as root).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks and libbpf's log on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    trace = sub.add_parser(
        "trace",
        help="stream failing bind()/listen()/connect() calls, live",
        description="Stream every bind(), listen() and connect() on the host that fails "
                    "(or, with --all, every one), with the address it asked for, the socket's "
                    "options at that moment, and who called it. Stop with Ctrl-C.",
        epilog="examples:\n"
               "  portscope trace                     every failure, host-wide\n"
               "  portscope trace --port 8080 --all   every call touching port 8080\n"
               "  portscope trace --json | jq .       one JSON object per line\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    f = trace.add_argument_group("filters")
    f.add_argument("--port", type=port_number, help="only calls asking for or holding this port")
    f.add_argument("--pid", type=positive_int, help="only this process (thread group id)")
    f.add_argument("--comm", help="only tasks with this command name (as in /proc/PID/comm)")
    f.add_argument("--errno", type=errno_code, action="append", metavar="NAME",
                   help="only calls that failed with this error (repeatable), "
                        "e.g. --errno EADDRINUSE --errno EADDRNOTAVAIL")
    which = f.add_mutually_exclusive_group()
    which.add_argument("--errors-only", dest="all", action="store_false",
                       help="only failed calls (the default)")
    which.add_argument("--all", dest="all", action="store_true",
                       help="successful calls too")
    # Both flags share one destination; without this the store_false of
    # --errors-only would make "all" the default.
    trace.set_defaults(all=False)
    o = trace.add_argument_group("output")
    o.add_argument("--json", action="store_true",
                   help="one JSON object per line (keys documented in the README)")
    o.add_argument("--count", type=positive_int, metavar="N", help="stop after N events")
    o.add_argument("--duration", type=positive_float, metavar="SECONDS",
                   help="stop after this many seconds")
    _add_engine_options(trace)

    doctor = sub.add_parser(
        "doctor",
        help="what this kernel allows, and which probe plan portscope picks",
        description="Check root, BTF, tracefs, lockdown and libbpf, then load each probe "
                    "plan for real and report which works and why.",
    )
    doctor.add_argument("--json", action="store_true", help="machine-readable report")
    doctor.add_argument("--btf", metavar="FILE", help="BTF file to use instead of the kernel's")
    return parser


def _commands() -> dict[str, Callable[[argparse.Namespace], ExitStatus]]:
    # Imported lazily: `portscope --help` must not pay for loading libbpf.
    from . import doctor, trace

    return {"trace": trace.run, "doctor": doctor.run}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return ExitStatus.USAGE
    try:
        return int(_commands()[args.command](args))
    except PortscopeError as exc:
        if args.debug:
            traceback.print_exc()
            log = getattr(exc, "log", "")
            if log:
                print(log, file=sys.stderr)
        print(f"portscope: {exc}", file=sys.stderr)
        return int(exc.status)
    except KeyboardInterrupt:
        return int(ExitStatus.INTERRUPTED)
    except BrokenPipeError:
        # The reader went away (`| head`): not an error worth a sentence.
        sys.stderr.close()
        return int(ExitStatus.OK)



if __name__ == "__main__":
    sys.exit(main())
