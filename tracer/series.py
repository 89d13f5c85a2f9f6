"""Bounded series: how the exporter keeps the number of Prometheus series
bounded whatever values the labels take (any local user chooses the comm
names and ports that fail), with totals that stay exact.

Two bounds:

* per label: ``port``, ``comm`` and ``netns`` values beyond the top N (by
  count, ``--top``, default 50) are folded into ``"other"``;
* per metric: at most ``--max-series`` series (default 500) whatever the
  combination of label values: beyond the top S-1 label sets, the rest are
  one series whose every label is ``"other"`` (60 comm names failing on 60
  ports each would otherwise be 51 x 51 series).

The rankings are redone at every scrape (and every second): a value entering
the top gets its own series starting at 0 from then on (its earlier count
stays in ``other``); one leaving it has its count added to ``other`` and its
series dropped. Every counter stays monotonic and the series always sum to
the exact total.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Generic, Iterable, TypeVar

K = TypeVar("K", str, tuple[str, ...])  # a label's value, or a whole label set

OTHER = "other"
DEFAULT_TOP = 50
DEFAULT_MAX_SERIES = 500
MAX_PENDING = 100_000  # distinct un-ranked label sets before an early re-rank
MAX_SEEN = 100_000  # distinct values ranked per label (beyond: the rarest are forgotten)


class Fold(Generic[K]):
    """The values of one label (or the label sets of one metric) that get
    their own series: the top ``top`` by count; every other is ``"other"``."""

    def __init__(self, top: int) -> None:
        self.top = top
        self.kept: set[K] = set()
        self.seen: Counter[K] = Counter()

    def count(self, value: K, n: int = 1) -> None:
        self.seen[value] += n
        if len(self.seen) > MAX_SEEN:
            self.seen = Counter(dict(self.seen.most_common(MAX_SEEN // 10)))

    def rank(self) -> tuple[set[K], set[K]]:
        """Recompute the top; return (promoted, evicted). Ties keep the
        values already kept, then the smallest value, so that the set does
        not churn."""
        order = sorted(self.seen.items(), key=lambda kv: (-kv[1], kv[0] not in self.kept, kv[0]))
        wanted = {v for v, _ in order[:self.top]}
        promoted, evicted = wanted - self.kept, self.kept - wanted
        self.kept = wanted
        return promoted, evicted

    def label(self, value: K) -> K | str:
        return value if value in self.kept else OTHER


class FoldedCounter:
    """Counts of label tuples, folded twice: some positions by :class:`Fold`
    (their top values), then the tuples themselves (the top
    ``max_series - 1``; the rest add up in one all-``"other"`` series).
    ``add`` is cheap (the loop calls it per event); ``samples`` re-ranks and
    returns at most ``max_series`` series. Thread-safe (scrapes come from
    the HTTP server's threads)."""

    def __init__(self, names: tuple[str, ...], folded: dict[str, int],
                 max_series: int = DEFAULT_MAX_SERIES) -> None:
        self.names = names
        self.folds: dict[int, Fold[str]] = {names.index(n): Fold(top) for n, top in folded.items()}
        self.series: Fold[tuple[str, ...]] = Fold(max(max_series - 1, 1))
        self.everything_else = (OTHER,) * len(names)
        self.values: dict[tuple[str, ...], int] = {}
        self._pending: Counter[tuple[str, ...]] = Counter()
        self._lock = threading.Lock()
        self.total = 0

    def add(self, labels: tuple[str, ...], n: int = 1) -> None:
        with self._lock:
            self._pending[labels] += n
            self.total += n
            if len(self._pending) > MAX_PENDING:
                self._settle()

    def settle(self) -> None:
        with self._lock:
            self._settle()

    def samples(self) -> list[tuple[tuple[str, ...], int]]:
        with self._lock:
            self._settle()
            return sorted(self.values.items())

    def _settle(self) -> None:
        for pos, fold in self.folds.items():
            per_value: Counter[str] = Counter()
            for labels, n in self._pending.items():
                per_value[labels[pos]] += n
            for value, n in per_value.items():
                fold.count(value, n)
            _, evicted = fold.rank()
            if evicted:
                # Their counts go to "other": no counter ever goes down.
                for labels in [k for k in self.values if k[pos] in evicted]:
                    self._move(labels, labels[:pos] + (OTHER,) + labels[pos + 1:])
        pending: Counter[tuple[str, ...]] = Counter()
        for labels, n in self._pending.items():
            pending[self._fold(labels)] += n
        for key, n in pending.items():
            self.series.count(key, n)
        self.series.rank()
        kept = self.series.kept
        for key in [k for k in self.values if k not in kept and k != self.everything_else]:
            self._move(key, self.everything_else)
        for key, n in pending.items():
            key = key if key in kept else self.everything_else
            self.values[key] = self.values.get(key, 0) + n
        self._pending.clear()

    def _move(self, key: tuple[str, ...], into: tuple[str, ...]) -> None:
        n = self.values.pop(key)
        self.values[into] = self.values.get(into, 0) + n

    def _fold(self, labels: tuple[str, ...]) -> tuple[str, ...]:
        if not self.folds:
            return labels
        out = list(labels)
        for pos, fold in self.folds.items():
            out[pos] = fold.label(out[pos])
        return tuple(out)


def cap_series(samples: Iterable[tuple[tuple[str, ...], float]],
               max_series: int) -> list[tuple[tuple[str, ...], float]]:
    """For gauges (nothing to keep monotonic): the ``max_series - 1`` largest
    series, and the rest summed in one series whose labels are all "other"."""
    ordered = sorted(samples, key=lambda kv: (-kv[1], kv[0]))
    if len(ordered) <= max_series:
        return ordered
    keep, rest = ordered[:max_series - 1], ordered[max_series - 1:]
    return keep + [((OTHER,) * len(rest[0][0]), sum(v for _, v in rest))]


def label_value(text: str) -> str:
    """A label value Prometheus can carry: UTF-8. Text read from the host
    keeps bytes that are not UTF-8 (tracer.text.system_text); those are shown
    as ``\\xNN`` here, the rest is exact (the exposition escapes quotes,
    backslashes and newlines itself)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def top_with_other(counts: Iterable[tuple[str, float]], top: int) -> list[tuple[str, float]]:
    """For gauges (no monotonicity to keep): the top values, and the rest
    summed as "other" when there is a rest."""
    ordered = sorted(counts, key=lambda kv: (-kv[1], kv[0]))
    out = list(ordered[:top])
    rest = sum(v for _, v in ordered[top:])
    if len(ordered) > top:
        out.append((OTHER, rest))
    return out


