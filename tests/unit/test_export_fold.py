"""The exporter's folding, as properties: whatever label sets arrive, in
whatever order, every scrape has at most --max-series series, they sum to
the exact total, and no series ever goes down (a Prometheus counter)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tracer.series import OTHER, FoldedCounter, cap_series, label_value

LABELS = ("call", "errno", "port", "comm", "netns")
event = st.tuples(st.sampled_from(["bind", "connect"]), st.sampled_from(["EADDRINUSE", "EACCES"]),
                  st.integers(1, 80).map(str), st.integers(0, 70).map(lambda n: f"c{n}"),
                  st.sampled_from(["1", "2", "3"]))


@given(st.lists(st.lists(st.tuples(event, st.integers(1, 5)), max_size=60), max_size=8),
       st.integers(2, 40), st.integers(1, 10))
def test_bounded_exact_and_monotonic(batches, max_series, top) -> None:  # type: ignore[no-untyped-def]
    c = FoldedCounter(LABELS, {"port": top, "comm": top, "netns": top}, max_series)
    seen: dict[tuple[str, ...], int] = {}
    for batch in batches:
        for labels, n in batch:
            c.add(labels, n)
        samples = dict(c.samples())
        assert len(samples) <= max_series
        assert sum(samples.values()) == c.total
        for key, before in seen.items():
            if key in samples:
                assert samples[key] >= before, f"{key} went down"
        # A series that left was folded into a wider one, never dropped: the
        # all-"other" series holds at least what every vanished one had.
        gone = sum(v for k, v in seen.items() if k not in samples)
        assert samples.get((OTHER,) * len(LABELS), 0) + sum(
            v for k, v in samples.items() if OTHER in k) >= gone
        seen = samples


@given(st.lists(st.tuples(st.tuples(st.text(max_size=3)), st.floats(0, 100)), max_size=50),
       st.integers(2, 10))
def test_gauges_are_capped_with_exact_sums(samples, max_series) -> None:  # type: ignore[no-untyped-def]
    capped = cap_series(samples, max_series)
    assert len(capped) <= max_series
    assert abs(sum(v for _, v in capped) - sum(v for _, v in samples)) < 1e-6


def test_label_values_are_utf8() -> None:
    assert label_value("nginx") == "nginx"
    assert label_value("a\udcffb") == "a\\xffb"
    label_value("a\udcffb").encode("utf-8")
