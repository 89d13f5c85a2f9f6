"""Small text renderings shared by the screens: bars, sparklines, numbers.
Pure functions over plain values (no widgets), tested on their own."""

from __future__ import annotations

from typing import Sequence

from tracer.records import Owner

SPARKS = "▁▂▃▄▅▆▇█"
EIGHTHS = " ▏▎▍▌▋▊▉"


def bar(value: float, peak: float, width: int) -> str:
    """A horizontal bar of ``width`` cells, full at ``peak``, in eighths."""
    if width <= 0:
        return ""
    if peak <= 0 or value <= 0:
        return " " * width
    cells = min(value / peak, 1.0) * width
    full = int(cells)
    part = int((cells - full) * 8)
    text = "█" * full + (EIGHTHS[part] if part and full < width else "")
    return text.ljust(width)


def sparkline(values: Sequence[float], width: int) -> str:
    """The last ``width`` values as block characters, scaled to their peak."""
    if width <= 0:
        return ""
    values = list(values)[-width:]
    if not values:
        return ""
    peak = max(values)
    if peak <= 0:
        return SPARKS[0] * len(values)
    return "".join(SPARKS[min(int(v / peak * (len(SPARKS) - 1) + 0.5), len(SPARKS) - 1)]
                   for v in values)


def count(n: int) -> str:
    """1234567 -> '1,234,567'."""
    return f"{n:,}"


def rate(r: float | None) -> str:
    if r is None:
        return "-"
    if r >= 100:
        return f"{r:,.0f}/s"
    return f"{r:.1f}/s"


def seconds_left(min_ms: int, max_ms: int) -> str:
    lo, hi = round(min_ms / 1000), round(max_ms / 1000)
    return f"{lo}s" if lo == hi else f"{lo}-{hi}s"


def share(s: float | None) -> str:
    return "-" if s is None else f"{s:.0%}"


CMDLINE_SHOWN = 100  # characters of a command line in a detail panel (two lines at 80x24)


def owner_facts(o: Owner) -> str:
    """``unit nginx.service · /usr/sbin/nginx -g daemon off;``: who a
    process is beyond comm[pid], for a detail panel. Not escaped (the
    panel escapes); "" when nothing is known."""
    unit, container, pod, exe, cmdline, problem = (o.unit, o.container, o.pod, o.exe,
                                                   o.cmdline, o.problem)
    parts = []
    if container:
        parts.append(f"container {container}" + (f" (pod {pod})" if pod else ""))
    elif unit:
        parts.append(f"unit {unit}")
    command = cmdline or exe
    if command:
        parts.append(command if len(command) <= CMDLINE_SHOWN
                     else command[:CMDLINE_SHOWN - 1] + "…")
    if problem and not command:
        parts.append(f"({problem})")
    return " · ".join(parts)
