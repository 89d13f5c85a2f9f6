"""Print the README table: which bind rules the kernel matrix covers, and
by how many scenarios.

Generated from the parametrize ids of tests/kernel/test_explainer_matrix.py
(``group/name=>verdict.rule.rule``), so it cannot drift from the cases:

    python tests/kernel/coverage_table.py > /tmp/explainer-coverage.md
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

from test_explainer_matrix import CASES  # noqa: E402

from tracer.bindrules import RULE_TEXT, Rule  # noqa: E402

UNCOVERED = {
    Rule.REUSEPORT_IN_GROUP: "not reachable through a Request: the new socket would have to be "
                             "in a reuseport group before its bind",
}

# The checks the kernel makes before it looks at the port (tracer/bindcheck.py),
# each with its errno, in the explanation's ``reasons[].rule``.
ADMISSION = {
    "privileged_port": ("EACCES", "the port is below `net.ipv4.ip_unprivileged_port_start` and "
                                  "the process lacks CAP_NET_BIND_SERVICE"),
    "address_not_local": ("EADDRNOTAVAIL", "the address is not one of the namespace's (and no "
                                           "IP_FREEBIND, IP_TRANSPARENT or ip_nonlocal_bind)"),
    "address_tentative": ("EADDRNOTAVAIL", "an IPv6 address still in duplicate address detection"),
    "link_local_needs_device": ("EINVAL", "an IPv6 link-local address without a device"),
    "mapped_on_v6only": ("EINVAL", "a v4-mapped address on an IPV6_V6ONLY socket"),
    "multicast_stream": ("EINVAL", "an IPv6 multicast address on a TCP socket"),
    "device_gone": ("ENODEV", "the socket's bound device no longer exists"),
}


def parse(test_id: str) -> tuple[str, str, list[str]]:
    """(group, verdict, rules) of one parametrize id: the verdict is
    ``free``, ``conflict`` or the errno of a refusal before the port."""
    left, _, verdict = test_id.partition("=>")
    expect, *rules = verdict.split(".")
    return left.split("/", 1)[0], expect, rules


def kind(expect: str) -> str:
    return expect if expect in ("free", "conflict") else "refused"


def table(ids: list[str]) -> str:
    parsed = [parse(i) for i in ids]
    by_rule: Counter[str] = Counter()
    groups_of: dict[str, set[str]] = {}
    for group, _, rules in parsed:
        for r in rules:
            by_rule[r] += 1
            groups_of.setdefault(r, set()).add(group)
    kinds = Counter(kind(e) for _, e, _ in parsed)
    lines = [
        f"Kernel-proven explainer scenarios: {len(ids)} ({kinds['conflict']} conflicts, "
        f"{kinds['refused']} refused before the port, {kinds['free']} free).",
        "",
        "| rule | errno | what the kernel refuses | scenarios | areas |",
        "|---|---|---|---:|---|",
    ]
    for name, (errno_name, why) in ADMISSION.items():
        lines.append(f"| `{name}` | {errno_name} | {why} | {by_rule.get(name, 0)} | "
                     f"{', '.join(sorted(groups_of.get(name, ())))} |")
    for rule in Rule:
        n = by_rule.get(rule.value, 0)
        why = RULE_TEXT[rule] + (f" ({UNCOVERED[rule]})" if not n and rule in UNCOVERED else "")
        if rule == Rule.EPHEMERAL:
            why += " (port 0: `ephemeral.free == 0`, no per-socket blockers)"
        lines.append(f"| `{rule.value}` | EADDRINUSE | {why} | {n} | "
                     f"{', '.join(sorted(groups_of.get(rule.value, ())))} |")
    lines.append(f"| *(free)* | | no reason: the kernel accepts the bind | {kinds['free']} | "
                 f"{', '.join(sorted({g for g, e, _ in parsed if e == 'free'}))} |")
    lines += ["", "| area | scenarios | conflict | refused | free |",
              "|---|---:|---:|---:|---:|"]
    for group in dict.fromkeys(g for g, _, _ in parsed):
        rows = Counter(kind(e) for g, e, _ in parsed if g == group)
        lines.append(f"| {group} | {sum(rows.values())} | {rows['conflict']} | "
                     f"{rows['refused']} | {rows['free']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(table([c.id for c in CASES]))
