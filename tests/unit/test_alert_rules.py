"""deploy/portscope-alerts.yaml: valid for Prometheus (``promtool check
rules``), right about what fires and when (``promtool test rules`` on
tests/unit/alerts/portscope-alerts.test.yaml: series in, alerts out), and
written against the metrics and labels the exporter really serves."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.needs import missing
from tracer.engine import Counters
from tracer.metrics import Metrics
from tracer.records import Acceptor, Group, Member, Owner

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "portscope-alerts.yaml"
RULE_TESTS = Path(__file__).resolve().parent / "alerts" / "portscope-alerts.test.yaml"
SCRAPE_LABELS = {"instance", "job"}  # added by Prometheus to every series


def promtool() -> str:
    path = shutil.which("promtool")
    if not path:
        missing("needs promtool (Debian package prometheus; scripts/setup installs it)")
    return path or ""


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_rules_are_valid_for_prometheus() -> None:
    out = run("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules())} rules found" in out.stdout


def test_rules_fire_when_and_only_when_they_should() -> None:
    out = run("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_has_a_unit_test() -> None:
    tested = {t["alertname"] for group in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for t in group["alert_rule_test"]}
    assert tested == {r["alert"] for r in rules()}


@pytest.mark.parametrize("change", [(">= 5", ">= 50"), ("> 0.95", "> 0.995"),
                                    ("for: 5m", "for: 15m"), ('errno="EADDRINUSE"', 'errno="EACCES"')])
def test_the_unit_tests_catch_a_changed_rule(tmp_path: Path, change: tuple[str, str]) -> None:
    """The series-in, alerts-out tests fail when a threshold, a duration or
    a matcher of the rules changes: they pin what the rules do."""
    old, new = change
    text = RULES.read_text()
    assert old in text
    (tmp_path / "rules.yaml").write_text(text.replace(old, new, 1))
    tests = RULE_TESTS.read_text().replace("../../../deploy/portscope-alerts.yaml", "rules.yaml")
    (tmp_path / "tests.yaml").write_text(tests)
    out = run("test", "rules", "tests.yaml", cwd=tmp_path)
    assert out.returncode != 0 and "FAILED" in out.stdout + out.stderr, out.stdout


def served_exposition() -> dict[str, set[str]]:
    """Metric name -> label names, from the exporter's own exposition with
    a failure, lost events, port pressure and a group with a stopped member."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    metrics = Metrics(top=10)
    metrics.failures.add(("bind", "EADDRINUSE", "8080", "nginx", "4026531840", "5db952bf622d"))
    metrics.counters = Counters(emitted=10, lost=2, inflight_full=1)
    worker = Owner(pid=812, comm="nginx")
    member = Member(cookie=1, inode=70, state="LISTEN", owners=(worker,), delivered=5, rate=1.0,
                    window=5, share=1.0, queue=9, backlog=128,
                    acceptors=(Acceptor(worker, 812, "epoll"),), drops=3, status="stopped")
    group = Group(0x1A2B3C4D, 4026531840, "tcp", "ipv4", "127.0.0.1", 8080, 0, 1, False, [member],
                  10.0, None)
    metrics.set_refresh("groups", 0.01, groups=[group],
                        pressure=[("4026531840", "10.0.0.1", "10.0.0.5:443", 900, 1000)])
    registry = CollectorRegistry()
    registry.register(metrics)  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    served: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            served.setdefault(sample.name, set()).update(sample.labels)
    return served


def test_rules_use_only_metrics_and_labels_the_exporter_serves() -> None:
    served = served_exposition()
    for rule in rules():
        expr = rule["expr"]
        names = set(re.findall(r"\bportscope_\w+", expr))
        assert names or "up{" in expr, rule["alert"]
        for name in names:
            assert name in served, f"{rule['alert']}: {name} is not served"
        labels = set(re.findall(r"(\w+)\s*=~?\s*\"", expr))
        for by in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            labels |= {w.strip() for w in by.split(",")}
        labels |= set(re.findall(r"\$labels\.(\w+)", yaml.safe_dump(rule.get("annotations", {}))))
        known = set().union(*(served[n] for n in names)) if names else set()
        assert labels <= known | SCRAPE_LABELS, f"{rule['alert']}: {labels - known - SCRAPE_LABELS}"
