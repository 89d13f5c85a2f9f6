"""``portscope doctor``: its options."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
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
