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

from .arguments import (
    bounded_int, comm_name, duration, errno_code, interval, journal_size, netns_inode,
    netns_spec, pid_number, point_in_time, port_range_value, port_number, port_or_zero, positive_int, race_window, ring_size,
    run_time, speed, text_value,
)
from .arguments import address as ip_address
from .errors import ExitStatus, PortscopeError
from . import runtime
from .text import printable

PLANS = ("auto", "fentry", "kprobe", "tracepoint")
STATES = ("listen", "established", "time_wait", "close", "syn_sent", "syn_recv", "fin_wait1",
          "fin_wait2", "close_wait", "last_ack", "closing")

EPILOG = """\
exit status:
  0  success            1  runtime failure      2  bad arguments or input
  3  not permitted (not root, lockdown)          4  kernel lacks a feature
  5  portscope why: the bind would fail
"""


def _listen_address(text: str) -> tuple[str, int]:
    from .export import parse_listen

    return parse_listen(text)


NETNS_FORMS = "an inode number, an ip-netns name, a path, or pid:PID"


def _add_netns_option(p: argparse.ArgumentParser, default: str = "all") -> None:
    p.add_argument("--netns", metavar="NS", type=netns_spec,
                   help=f"one network namespace: {NETNS_FORMS} (default: {default})")


def _add_protocol_options(p: argparse.ArgumentParser, what: str) -> None:
    proto = p.add_mutually_exclusive_group()
    proto.add_argument("--tcp", action="store_true", help=f"TCP {what} only")
    proto.add_argument("--udp", action="store_true", help=f"UDP {what} only")


ENGINE_HELP = ("how the probes are built: libbpf loads the CO-RE object shipped with portscope "
               "(default; needs the kernel's BTF), bcc compiles the same probes here against "
               "the running kernel's headers (for kernels without BTF; needs python3-bpfcc and "
               "linux-headers; no fentry plan)")


def _add_engine_choice(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--engine", choices=("libbpf", "bcc"), help=ENGINE_HELP)


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("probes")
    _add_engine_choice(g)
    g.add_argument("--plan", choices=PLANS, default="auto",
                   help="probe plan: fentry, kprobe or tracepoint (default: the best one "
                        "this kernel allows; see 'portscope doctor')")
    g.add_argument("--btf", metavar="FILE",
                   help="BTF of the running kernel, for kernels without /sys/kernel/btf/vmlinux")
    g.add_argument("--ring-size", type=ring_size, default=8 << 20, metavar="SIZE",
                   help="ring buffer size, 4K to 1G (default 8M); raise it if events are reported lost")


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
               "  portscope trace --json | jq .       one JSON object per line\n"
               "  portscope trace --json -o /var/log/portscope.jsonl   JSON lines to a file\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    f = trace.add_argument_group("filters")
    f.add_argument("--port", type=port_number, help="only calls asking for or holding this port")
    f.add_argument("--pid", type=pid_number, help="only this process (thread group id)")
    f.add_argument("--comm", type=comm_name,
                   help="only tasks with this command name (as in /proc/PID/comm, 1 to 15 bytes)")
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
    o.add_argument("-o", "--output", metavar="FILE",
                   help="write the events to FILE instead of stdout (appended, one line per "
                        "event, flushed at once; with --json: JSON lines for Vector or Fluent Bit)")
    o.add_argument("--no-explain", action="store_true",
                   help="do not name the blocking sockets of each EADDRINUSE (by default "
                        "the port's inventory is taken at the moment of the failure)")
    o.add_argument("--count", type=positive_int, metavar="N", help="stop after N events")
    o.add_argument("--duration", type=run_time, metavar="SECONDS",
                   help="stop after this many seconds")
    _add_engine_options(trace)

    ports = sub.add_parser(
        "ports",
        help="every TCP/UDP socket, in every network namespace, with owners and flags",
        description="List sockets from netlink sock_diag in every network namespace, with "
                    "the flags ss cannot show (SO_REUSEADDR, SO_REUSEPORT and the reuseport "
                    "group, IPV6_V6ONLY, bound device) and every process holding each socket. "
                    "QUEUE is recv/send, or for listeners accept-queue depth/backlog.",
        epilog="examples:\n"
               "  portscope ports 8080              who holds port 8080, anywhere\n"
               "  portscope ports --state listen    every listener\n"
               "  portscope ports 53 --udp --json   for scripts\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ports.add_argument("ports", nargs="*", type=port_number, metavar="PORT",
                       help="local ports to show (default: all)")
    _add_protocol_options(ports, "sockets")
    ports.add_argument("--state", action="append", choices=STATES, type=str.lower,
                       metavar="STATE", help="only this state (repeatable): "
                       + ", ".join(STATES))
    _add_netns_option(ports)
    ports.add_argument("--json", action="store_true", help="machine-readable output")

    why = sub.add_parser(
        "why",
        help="would a bind to PORT succeed now? if not, who blocks it, under which rule",
        description="Check a bind() (or, with --listen, a listen()) against the namespace and "
                    "the sockets that exist now, with the kernel's own rules and in its order: "
                    "whether the address is the namespace's (EADDRNOTAVAIL), whether the port "
                    "needs CAP_NET_BIND_SERVICE (EACCES), which sockets take the port "
                    "(EADDRINUSE), owned by whom, why, and which changes would make it work. "
                    "Exit status 5 when it would fail.",
        epilog="examples:\n"
               "  portscope why 80                        could a server bind 0.0.0.0:80?\n"
               "  portscope why 8080 --reuseaddr          ... with SO_REUSEADDR\n"
               "  portscope why 443 --addr :: --v6only    an IPv6-only listener\n"
               "  portscope why 9000 --reuseport --user app   join a reuseport group as app\n"
               "  portscope why 0                         is any ephemeral port left?\n"
               "  portscope why 80 --user www-data        a privileged port, without the capability\n"
               "  portscope why 8443 --addr 10.0.0.9      an address this host may not have (yet)\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    why.add_argument("port", type=port_or_zero, metavar="PORT",
                     help="the port to bind (0: any ephemeral port)")
    why.add_argument("--addr", type=ip_address, help="the address to bind (default: the wildcard 0.0.0.0, "
                     "or :: with --ipv6)")
    why.add_argument("--ipv6", action="store_true", help="an IPv6 socket (implied by an IPv6 --addr)")
    why.add_argument("--udp", action="store_true", help="a UDP socket (default TCP)")
    why.add_argument("--reuseaddr", action="store_true", help="with SO_REUSEADDR")
    why.add_argument("--reuseport", action="store_true", help="with SO_REUSEPORT")
    why.add_argument("--v6only", action="store_true", help="with IPV6_V6ONLY")
    why.add_argument("--device", metavar="DEV", type=text_value("device"), help="with SO_BINDTODEVICE (name or index)")
    why.add_argument("--user", metavar="USER", type=text_value("user"), help="as this user (name or uid; default: "
                     "yours); matters for SO_REUSEPORT")
    why.add_argument("--listen", action="store_true",
                     help="ask about listen() on a socket already bound to the address")
    why.add_argument("--freebind", action="store_true",
                     help="with IP_FREEBIND: an address the namespace does not have is allowed")
    why.add_argument("--transparent", action="store_true",
                     help="with IP_TRANSPARENT (needs CAP_NET_ADMIN): any address is allowed")
    why.add_argument("--bind-address-no-port", action="store_true",
                     help="with IP_BIND_ADDRESS_NO_PORT: a bind to port 0 takes no port (it is "
                          "chosen at connect())")
    why.add_argument("--port-range", type=port_range_value, metavar="LO-HI",
                     help="with IP_LOCAL_PORT_RANGE (kernel 6.3+): port 0 picks in LO-HI "
                          "(within the namespace's range)")
    why.add_argument("--cgroup", metavar="PATH", type=text_value("cgroup"),
                     help="the cgroup2 path the process runs in, e.g. /system.slice/nginx.service "
                          "(default: portscope's own): BPF programs attached there or above "
                          "(cgroup/bind4, bind6, post_bind4, post_bind6) are named")
    why.add_argument("--cap-net-bind-service", action=argparse.BooleanOptionalAction,
                     default=None, help="whether the process has CAP_NET_BIND_SERVICE (default: "
                     "root has it, other users do not); matters below "
                     "net.ipv4.ip_unprivileged_port_start")
    _add_netns_option(why, default="portscope's own")
    why.add_argument("--json", action="store_true", help='{"verdict": "free"|"conflict"|'
                     '"refused", "errno", "reasons": [...], "blockers": [...], "fixes": [...], '
                     '"notes": [...]}: each reason, fix and note has a kind and its parameters '
                     'beside its sentence')

    timewait = sub.add_parser(
        "timewait",
        help="TIME_WAIT sockets: by port, remote or the process that closed them; "
             "ephemeral-port pressure",
        description="Group the TIME_WAIT sockets by local port, remote endpoint, or the "
                    "process that closed the connection first (known for connections closed "
                    "while a portscope collector was running: trace, record, or timewait "
                    "--watch), with the time they have left; and show, per source address "
                    "and destination, how much of ip_local_port_range is in use, since that "
                    "is what makes connect() fail with EADDRNOTAVAIL.",
        epilog="examples:\n"
               "  portscope timewait                 every TIME_WAIT socket, by local port\n"
               "  portscope timewait 443 --by remote who we talked to on 443\n"
               "  portscope timewait --by process --watch\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    timewait.add_argument("port", nargs="?", type=port_number, metavar="PORT",
                          help="only TIME_WAIT sockets on this local port")
    timewait.add_argument("--by", choices=("port", "remote", "process"), default="port",
                          help="how to group (default: port)")
    _add_netns_option(timewait)
    timewait.add_argument("--watch", action="store_true",
                          help="record closes while running and refresh (Ctrl-C to stop)")
    timewait.add_argument("--interval", type=interval, default=1.0, metavar="SECONDS",
                          help="refresh interval with --watch (default 1)")
    timewait.add_argument("--json", action="store_true", help="machine-readable output")

    groups = sub.add_parser(
        "groups",
        help="SO_REUSEPORT groups: how connections and datagrams are spread over members",
        description="Show every SO_REUSEPORT group (TCP listeners and UDP sockets) with its "
                    "members and their owners, and count in the kernel what each member "
                    "receives: connections (TCP) or datagrams (UDP) delivered, per second, "
                    "accept-queue depth and backlog, share of the group's traffic, and the "
                    "group's imbalance (max/min share, coefficient of variation, chi-square "
                    "test against an even split: p < 0.01 means the imbalance is not noise). "
                    "Counting starts when the command starts: without --watch it samples "
                    "for one --interval and prints once. Members joining and leaving are "
                    "shown as events.",
        epilog="examples:\n"
               "  portscope groups                  every group, sampled for one second\n"
               "  portscope groups 8080 --watch     live view of the group(s) on port 8080\n"
               "  portscope groups 53 --udp --interval 5\n"
               "  portscope groups --watch --json   one JSON object per refresh\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    groups.add_argument("port", nargs="?", type=port_number, metavar="PORT",
                        help="only groups on this local port (filtered in the kernel)")
    _add_protocol_options(groups, "groups")
    _add_netns_option(groups)
    groups.add_argument("--watch", action="store_true",
                        help="refresh every --interval until Ctrl-C")
    groups.add_argument("--interval", type=interval, default=1.0, metavar="SECONDS",
                        help="sampling time, and refresh interval with --watch (default 1)")
    groups.add_argument("--count", type=positive_int, metavar="N",
                        help="with --watch: stop after N refreshes (the first is shown at start)")
    groups.add_argument("--json", action="store_true",
                        help="one JSON object per refresh (keys documented in the README)")
    gprobes = groups.add_argument_group("probes")
    _add_engine_choice(gprobes)
    gprobes.add_argument("--plan", choices=PLANS, default="auto",
                         help="probe plan (default: the best one this kernel allows): "
                              "tracepoint counts at sk_data_ready (kernel 6.6+), fentry and "
                              "kprobe at reuseport_select_sock")
    gprobes.add_argument("--btf", metavar="FILE",
                         help="BTF of the running kernel, for kernels without "
                              "/sys/kernel/btf/vmlinux")

    export = sub.add_parser(
        "export",
        help="serve Prometheus metrics: failures by errno/port/comm/netns, TIME_WAIT, "
             "reuseport groups, ephemeral ports, lost events",
        description="Serve Prometheus metrics over HTTP (/metrics): failed bind()/listen()/"
                    "connect() calls by errno, port, comm and network namespace; TIME_WAIT "
                    "sockets by port; reuseport groups, their members and what each was "
                    "delivered; ephemeral ports in use against the range; lost events; the "
                    "probe plan. The number of series is bounded whatever a busy or hostile "
                    "host does (any local user chooses the names and ports that fail): port, "
                    "comm and netns values beyond the top N (--top) are folded into "
                    "\"other\", and no metric has more than --max-series series (beyond it, "
                    "the rest is one series whose labels are all \"other\"); the series "
                    "always sum to the exact totals. Stop with Ctrl-C or SIGTERM.",
        epilog="examples:\n"
               "  portscope export                          http://127.0.0.1:9977/metrics\n"
               "  portscope export --listen 0.0.0.0:9977    for a Prometheus elsewhere\n"
               "  portscope export --top 20 --interval 30   fewer series, rarer inventories\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("--listen", type=_listen_address, default="127.0.0.1:9977",
                        metavar="ADDR:PORT",
                        help="where to serve /metrics (default 127.0.0.1:9977; [::]:PORT for IPv6)")
    export.add_argument("--top", type=bounded_int(1, 1000, "top"), default=50, metavar="N",
                        help="keep the N most frequent ports, comms and netns as their own "
                             "label values, fold the rest into \"other\" (default 50)")
    export.add_argument("--max-series", type=bounded_int(2, 100000, "series bound"), default=500,
                        metavar="S", help="at most S series per metric, whatever the combination "
                                          "of label values (default 500)")
    export.add_argument("--interval", type=interval, default=15.0, metavar="SECONDS",
                        help="how often TIME_WAIT, ephemeral ports and reuseport groups are "
                             "read (default 15; a slow read makes the next one wait longer)")
    export.add_argument("--no-groups", action="store_true",
                        help="do not count reuseport deliveries (loads no counting probes)")
    _add_engine_options(export)

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
    _add_engine_options(ui)

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
    _add_engine_options(record)

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

    doctor = sub.add_parser(
        "doctor",
        help="what this kernel allows, and which probe plan portscope picks",
        description="Check root, BTF, tracefs, lockdown and libbpf, then load each probe "
                    "plan for real and report which works and why.",
    )
    doctor.add_argument("--json", action="store_true", help="machine-readable report")
    doctor.add_argument("--btf", metavar="FILE", help="BTF file to use instead of the kernel's")
    doctor.add_argument("--engine", choices=("libbpf", "bcc"), default="libbpf",
                        help="bcc: also compile, load and attach each plan with bcc (seconds "
                             "each); by default only whether bcc could run is reported")
    return parser


def _command(name: str) -> Callable[[argparse.Namespace], ExitStatus]:
    # Only the chosen command's module is imported: `trace` starts fast and
    # needs nothing beyond libbpf, `--help` loads nothing at all.
    try:
        module = importlib.import_module(f".{name}", __package__)
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
        os.environ["PORTSCOPE_ENGINE"] = args.engine
    try:
        status = int(run_ui(args) if args.command == "ui" else _command(args.command)(args))
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


def run_ui(args: argparse.Namespace) -> ExitStatus:
    """The terminal UI over the live collector (or a recording). The
    collector starts first, so that "not root" or "no BTF" is one sentence
    on the terminal, not a screen; the UI knows nothing of the kernel."""
    from .state import StateModel

    model = StateModel()
    if args.replay:
        from .recording import Replay

        source = Replay(model, args.replay)  # a bad file is one sentence, before the screen
        source.check()
        source.play(args.speed)
    else:
        from .collector import LiveCollector
        from .engine import UI_CLOSERS, EngineConfig
        from .plans import Plan

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


if __name__ == "__main__":
    sys.exit(main())
