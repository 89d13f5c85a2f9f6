"""``portscope export`` against a real Prometheus server, and its label bound.

A Prometheus (Debian package ``prometheus``, installed by scripts/setup)
scrapes the exporter every second on loopback; an EADDRINUSE provoked in a
private network namespace must show up in a PromQL query through
Prometheus's HTTP API. Then 10,000 distinct failing ports must leave at most
N+1 values of the ``port`` label, summing to exactly 10,000.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from tests.needs import missing
from tracer.cgroups import cgroup2_root

ROOT = Path(__file__).resolve().parents[2]
PORTSCOPE = [sys.executable, "-m", "tracer.cli"]
TOP = 50


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback only
        return r.read().decode()


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stderr.read() if proc.stderr else ""
            pytest.fail(f"{what}: the process exited ({proc.returncode}): {out}")
        try:
            last = predicate()
            if last:
                return last
        except OSError as exc:
            last = exc
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what} (last: {last!r})")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def exporter(root: None) -> Iterator:  # type: ignore[type-arg]
    started: list[subprocess.Popen] = []

    def start(*extra: str) -> str:
        port = free_port()
        proc = subprocess.Popen(
            [*PORTSCOPE, "export", "--listen", f"127.0.0.1:{port}", "--interval", "2", *extra],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        started.append(proc)
        url = f"http://127.0.0.1:{port}/metrics"
        wait_for(lambda: "portscope_probe_plan_info" in http_get(url), 60, "the exporter", proc)
        return url

    try:
        yield start
    finally:
        for proc in started:
            stop(proc)


def in_private_netns(code: str) -> None:
    subprocess.run(["unshare", "-n", sys.executable, "-c", code], check=True, timeout=120)


EADDRINUSE_ONCE = """
import ctypes, socket
ctypes.CDLL(None).prctl(15, b"psexport", 0, 0, 0)  # PR_SET_NAME: a comm of our own
a = socket.socket(); a.bind(("127.0.0.1", {port})); a.listen()
b = socket.socket()
try:
    b.bind(("127.0.0.1", {port}))
except OSError as exc:
    assert exc.errno == 98, exc
else:
    raise SystemExit("the second bind succeeded")
"""


def test_prometheus_scrapes_eaddrinuse(exporter, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    prom = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not os.path.exists(prom):
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"],
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
                       capture_output=True, check=False)
    if not os.path.exists(prom):
        missing("needs the prometheus server (Debian package prometheus; scripts/setup installs it)")
    metrics_url = exporter()
    target = urllib.parse.urlparse(metrics_url).netloc
    prom_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: portscope\n    scrape_interval: 1s\n"
        f"    static_configs:\n      - targets: ['{target}']\n")
    server = subprocess.Popen(
        [prom, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    api = f"http://127.0.0.1:{prom_port}/api/v1"
    try:
        def target_up() -> bool:
            doc = json.loads(http_get(f"{api}/targets"))
            return any(t["health"] == "up" for t in doc["data"]["activeTargets"])

        wait_for(target_up, 60, "Prometheus to scrape the exporter", server)
        port = free_port()
        in_private_netns(EADDRINUSE_ONCE.format(port=port))
        query = urllib.parse.quote(
            f'sum(portscope_failures_total{{errno="EADDRINUSE",call="bind",port="{port}",'
            f'comm="psexport"}})')

        def counted() -> float:
            doc = json.loads(http_get(f"{api}/query?query={query}"))
            assert doc["status"] == "success", doc
            result = doc["data"]["result"]
            return float(result[0]["value"][1]) if result else 0.0

        try:
            found = wait_for(counted, 30, f"the EADDRINUSE on port {port} in Prometheus")
        except BaseException:
            exposed = [line for line in http_get(metrics_url).splitlines()
                       if f'port="{port}"' in line or "lost" in line]
            print(f"exporter's own exposition for port {port}: {exposed}")
            raise
        assert found == 1.0
    finally:
        stop(server)


def refused_storm(names: list[str], ports: range) -> str:
    """A script that, for each command name in turn (PR_SET_NAME), connect()s
    to every port of ``ports`` on loopback, where nothing listens: each call
    fails with ECONNREFUSED."""
    return f"""
import ctypes, socket
libc = ctypes.CDLL(None)
for name in {names!r}:
    libc.prctl(15, name.encode(), 0, 0, 0)
    for port in range({ports.start}, {ports.stop}):
        s = socket.socket()
        try:
            s.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            pass
        else:
            raise SystemExit(f"port {{port}} accepted")
        finally:
            s.close()
"""


# 10,000 connect() calls to 10,000 distinct ports: each on its own port.
REFUSED_STORM = ("import subprocess\nsubprocess.run(['ip', 'link', 'set', 'lo', 'up'], check=True)\n"
                 + refused_storm(["psfold"], range(20000, 30000)))


def _failures(text: str, comm: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    ports: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "portscope_failures":
            continue
        for sample in family.samples:
            if sample.name == "portscope_failures_total" and sample.labels["comm"] == comm:
                port = sample.labels["port"]
                ports[port] = ports.get(port, 0.0) + sample.value
    return ports


def test_port_labels_are_bounded(exporter) -> None:  # type: ignore[no-untyped-def]
    url = exporter("--no-groups", "--top", str(TOP))
    in_private_netns(REFUSED_STORM)

    def all_counted() -> dict[str, float] | None:
        ports = _failures(http_get(url), "psfold")
        return ports if sum(ports.values()) >= 10_000 else None

    ports = wait_for(all_counted, 60, "10,000 failures in the exposition")
    text = http_get(url)
    assert "portscope_events_lost_total 0.0" in text, "events were lost: the count is not exact"
    ports = _failures(text, "psfold")
    assert sum(ports.values()) == 10_000
    assert len(ports) <= TOP + 1, f"{len(ports)} port label values"
    assert "other" in ports
    # Every failing port took part, and the folded ones are all in "other".
    assert ports["other"] == 10_000 - sum(v for p, v in ports.items() if p != "other")
    assert all(20000 <= int(p) < 30000 for p in ports if p != "other")
    # Across every comm too: the whole exposition has at most TOP+1 port values.
    from prometheus_client.parser import text_string_to_metric_families

    values = {s.labels["port"] for f in text_string_to_metric_families(text)
              if f.name == "portscope_failures" for s in f.samples}
    assert len(values) <= TOP + 1


# An unprivileged user (nobody) in a private netns: 60 comm names, each
# failing to connect to the same 60 ports (3,600 distinct label sets).
CROSS_PRODUCT = refused_storm([f"psx{n:02d}" for n in range(60)], range(21000, 21060))


def test_series_are_bounded_whatever_the_label_combination(exporter) -> None:  # type: ignore[no-untyped-def]
    """Per-label folding alone left 51 x 51 series for this; the per-metric
    bound leaves at most --max-series, summing exactly."""
    from prometheus_client.parser import text_string_to_metric_families

    max_series = 100
    url = exporter("--no-groups", "--top", str(TOP), "--max-series", str(max_series))
    setpriv = shutil.which("setpriv")
    if not setpriv:
        missing("needs setpriv (util-linux) to run the storm as an unprivileged user")
    subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up && exec \"$0\" \"$@\"",
                    setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
                    sys.executable, "-c", CROSS_PRODUCT], check=True, timeout=120)

    def failures() -> list:  # type: ignore[type-arg]
        return [s for f in text_string_to_metric_families(http_get(url))
                if f.name == "portscope_failures" for s in f.samples
                if s.name == "portscope_failures_total"]

    def mine(samples: list) -> float:  # type: ignore[type-arg]
        return sum(s.value for s in samples
                   if s.labels["comm"].startswith("psx") or s.labels["comm"] == "other")

    samples = wait_for(lambda: (lambda s: s if mine(s) >= 3600 else None)(failures()), 60,
                       "3,600 failures in the exposition")
    assert len(samples) <= max_series, f"{len(samples)} series"
    assert mine(samples) == 3600  # exact: nothing lost in the folding
    assert any(all(v == "other" for k, v in s.labels.items() if k in ("port", "comm", "netns"))
               for s in samples)


def test_folding_keeps_counters_monotonic_and_sums_exact() -> None:
    from tracer.series import OTHER, FoldedCounter

    c = FoldedCounter(("port",), {"port": 2})
    for port, n in (("1", 5), ("2", 4), ("3", 1)):
        c.add((port,), n)
    first = dict(c.samples())
    assert first == {("1",): 5, ("2",): 4, (OTHER,): 1}
    c.add(("3",), 10)  # 3 overtakes 2: 2 is folded into other, 3 gets a series
    second = dict(c.samples())
    assert sum(second.values()) == c.total == 20
    assert second[(OTHER,)] == 1 + 4  # 2's count moved into other
    assert ("2",) not in second and second[("3",)] == 10
    for key, value in first.items():
        assert second.get(key, second[(OTHER,)]) >= value


def trace_one_failure_to(out: Path, script: str) -> str:
    """`portscope trace --json --output OUT` for one event of the comm
    ``psexport``, with ``script`` run in a private netns once tracing; its stdout."""
    proc = subprocess.Popen([*PORTSCOPE, "trace", "--json", "--output", str(out), "--comm",
                             "psexport", "--count", "1", "--duration", "60"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: "tracing with" in (proc.stderr.readline() or ""), 60, "trace", proc)
        in_private_netns(script)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        stop(proc)
    return stdout


def test_trace_json_lines_to_a_file(root: None, tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    out.write_text('{"earlier": true}\n')
    port = free_port()
    stdout = trace_one_failure_to(out, EADDRINUSE_ONCE.format(port=port))
    assert stdout == ""  # everything went to the file
    lines = out.read_text().splitlines()
    assert json.loads(lines[0]) == {"earlier": True}  # appended, not truncated
    ev = json.loads(lines[1])
    assert (ev["port"], ev["result"], ev["comm"]) == (port, "EADDRINUSE", "psexport")
    assert {"unit", "container", "pod"} <= set(ev)
    assert ev["container"] is None and ev["pod"] is None


def test_events_carry_pod_and_container_from_the_cgroup(root: None, tmp_path: Path) -> None:
    """A process placed in a cgroup laid out the way kubelet and containerd
    lay them out: its events name the pod and the container."""
    base = cgroup2_root()
    if base is None or not os.access(base, os.W_OK):
        missing("needs a writable cgroup v2 hierarchy")
    pod = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
    container = "4f1e7c2a9b3d" + "0" * 52
    path = Path(base) / "kubepods.slice" / f"kubepods-pod{pod.replace('-', '_')}.slice" \
        / f"cri-containerd-{container}.scope"
    path.mkdir(parents=True)
    out = tmp_path / "events.jsonl"
    port = free_port()
    join = f"open({str(path / 'cgroup.procs')!r}, 'w').write(str(__import__('os').getpid()))\n"
    try:
        trace_one_failure_to(out, join + EADDRINUSE_ONCE.format(port=port))
    finally:
        for p in (path, path.parent, path.parent.parent):
            try:
                p.rmdir()
            except OSError:
                pass
    ev = json.loads(out.read_text().splitlines()[0])
    assert (ev["container"], ev["pod"]) == (container[:12], pod)
    assert ev["unit"] == f"cri-containerd-{container}.scope"
