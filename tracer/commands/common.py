"""What several commands' options share: the probe options, the namespace
and protocol choices, the exit-status epilog."""

from __future__ import annotations

import argparse

from ..arguments import netns_spec, ring_size

PLANS = ("auto", "fentry", "kprobe", "tracepoint")
STATES = ("listen", "established", "time_wait", "close", "syn_sent", "syn_recv", "fin_wait1",
          "fin_wait2", "close_wait", "last_ack", "closing")

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
