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


def parse(test_id: str) -> tuple[str, str, list[str]]:
    """(group, verdict, rules) of one parametrize id."""
    left, _, verdict = test_id.partition("=>")
    expect, *rules = verdict.split(".")
    return left.split("/", 1)[0], expect, rules


def table(ids: list[str]) -> str:
    parsed = [parse(i) for i in ids]
    by_rule: Counter[str] = Counter()
    groups_of: dict[str, set[str]] = {}
    for group, _, rules in parsed:
        for r in rules:
            by_rule[r] += 1
            groups_of.setdefault(r, set()).add(group)
    free = sum(1 for _, expect, _ in parsed if expect == "free")
    lines = [
        f"Kernel-proven explainer scenarios: {len(ids)} "
        f"({len(ids) - free} conflicts, {free} free).",
        "",
        "| rule (`blockers[].rule`) | what the kernel refuses | scenarios | areas |",
        "|---|---|---:|---|",
    ]
    for rule in Rule:
        n = by_rule.get(rule.value, 0)
        why = RULE_TEXT[rule] + (f" ({UNCOVERED[rule]})" if not n and rule in UNCOVERED else "")
        if rule == Rule.EPHEMERAL:
            why += " (port 0: `ephemeral.free == 0`, no per-socket blockers)"
        lines.append(f"| `{rule.value}` | {why} | {n} | "
                     f"{', '.join(sorted(groups_of.get(rule.value, ())))} |")
    lines.append(f"| *(free)* | no blocker: the kernel accepts the bind | {free} | "
                 f"{', '.join(sorted({g for g, e, _ in parsed if e == 'free'}))} |")
    lines += ["", "| area | scenarios | conflict | free |", "|---|---:|---:|---:|"]
    for group in dict.fromkeys(g for g, _, _ in parsed):
        rows = [e for g, e, _ in parsed if g == group]
        lines.append(f"| {group} | {len(rows)} | {rows.count('conflict')} | {rows.count('free')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(table([c.id for c in CASES]))
