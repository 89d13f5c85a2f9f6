"""What several commands' options share: the probe options, the filters
(ss's, on every listing command), the protocol choices, the exit-status
epilog."""

from __future__ import annotations

import argparse

from ..arguments import (
    KERNEL_STATES,
    SS_STATES,
    address_prefix,
    comm_name,
    netns_spec,
    pid_number,
    port_number,
    positive_int,
    ring_size,
    state_names,
    uid_value,
    unit_name,
)

PLANS = ("auto", "fentry", "kprobe", "tracepoint")
STATES = tuple(s.lower() for s in KERNEL_STATES)

EPILOG = """\
exit status:
  0  success            1  runtime failure      2  bad arguments or input
  3  not permitted (not root, lockdown)          4  kernel lacks a feature
  5  portscope why: the bind would fail
"""


def listen_address(text: str) -> tuple[str, int]:
    from ..export import parse_listen

    return parse_listen(text)


NETNS_FORMS = "an inode number, an ip-netns name, a path, or pid:PID"


def add_netns_option(p: argparse.ArgumentParser, default: str = "all") -> None:
    p.add_argument("--netns", metavar="NS", type=netns_spec,
                   help=f"one network namespace: {NETNS_FORMS} (default: {default})")


FILTERS_TITLE = "filters (as ss has them: every option given must match; one repeated " \
    "matches any of its values)"


def add_filter_options(p: argparse.ArgumentParser, group: argparse._ArgumentGroup | None = None,
                       netns_default: str = "all", notes: dict[str, str] | None = None,
                       ) -> argparse._ArgumentGroup:
    """The filters every listing command takes (tracer/filters.py applies
    them: ``Filter.from_args``), in the group ``group`` or a new one.
    ``notes``: what an option means for this command, or why it cannot
    apply, added to its help."""
    notes = notes or {}
    f = group or p.add_argument_group(FILTERS_TITLE)

    def add(flag: str, help: str, **kwargs: object) -> None:
        note = notes.get(flag.lstrip("-"))
        f.add_argument(flag, action="append", help=help + (f"; {note}" if note else ""),
                       **kwargs)  # type: ignore[arg-type]

    add("--sport", "local (source) port, as PORT, :PORT or a service name",
        type=port_number, metavar="PORT")
    add("--dport", "remote (destination) port; a socket with no remote end never matches",
        type=port_number, metavar="PORT")
    add("--src", "local address or prefix: 10.0.0.0/8, ::1 (an IPv4-mapped ::ffff:a.b.c.d is "
        "a.b.c.d; 0.0.0.0 and :: match wildcard sockets only)", type=address_prefix,
        metavar="ADDR[/LEN]")
    add("--dst", "remote address or prefix, as --src", type=address_prefix,
        metavar="ADDR[/LEN]")
    add("--pid", "held by this process (thread group id)", type=pid_number, metavar="PID")
    add("--comm", "held by a process with this command name (/proc/PID/comm, 1 to 15 bytes)",
        type=comm_name, metavar="COMM")
    add("--uid", "owned by this user (number or name): the socket's uid, or its holder's",
        type=uid_value, metavar="UID")
    add("--unit", "held by a process of this systemd unit (nginx.service; nginx is "
        "nginx.service), as the owners' unit in --json", type=unit_name, metavar="UNIT")
    add("--netns", f"in this network namespace: {NETNS_FORMS} (default: {netns_default})",
        type=netns_spec, metavar="NS")
    return f


SS_NAMES = ", ".join(SS_STATES)


def add_size_options(p: argparse.ArgumentParser, top: int, top_help: str,
                     all_help: str) -> None:
    """--top N (default ``top``) or --all: how much of a big answer text
    output shows (--json always gives everything)."""
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--top", type=positive_int, default=top, metavar="N", help=top_help)
    shown.add_argument("--all", action="store_true", help=all_help)


def add_state_option(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--state", action="append", type=state_names, metavar="STATE",
                   help="only sockets in this state (repeatable), case-insensitive: the "
                        f"kernel's names ({', '.join(STATES)}) or ss's ({SS_NAMES}: "
                        "connected is every state but listen and close, synchronized is "
                        "connected but syn-sent, bucket is syn-recv and time-wait, big every "
                        "state but those two)")


def add_protocol_options(p: argparse.ArgumentParser, what: str) -> None:
    proto = p.add_mutually_exclusive_group()
    proto.add_argument("--tcp", action="store_true", help=f"TCP {what} only")
    proto.add_argument("--udp", action="store_true", help=f"UDP {what} only")


ENGINE_HELP = ("how the probes are built: libbpf loads the CO-RE object shipped with portscope "
               "(default; needs the kernel's BTF), bcc compiles the same probes here against "
               "the running kernel's headers (for kernels without BTF; needs python3-bpfcc and "
               "linux-headers; no fentry plan)")


def add_engine_choice(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--engine", choices=("libbpf", "bcc"), help=ENGINE_HELP)


def add_engine_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("probes")
    add_engine_choice(g)
    g.add_argument("--plan", choices=PLANS, default="auto",
                   help="probe plan: fentry, kprobe or tracepoint (default: the best one "
                        "this kernel allows; see 'portscope doctor')")
    g.add_argument("--btf", metavar="FILE",
                   help="BTF of the running kernel, for kernels without /sys/kernel/btf/vmlinux")
    g.add_argument("--ring-size", type=ring_size, default=8 << 20, metavar="SIZE",
                   help="ring buffer size, 4K to 1G (default 8M); raise it if events are reported lost")
