"""``portscope export``: Prometheus metrics of what the probes see.

The collector loop is trace's (poll the ring buffer, decode, count); a
background thread refreshes the TIME_WAIT / ephemeral-port figures and the
reuseport groups (tracer/metrics.py, which also says what is exposed).
No host, busy or hostile, can blow up the number of series: each metric's
is bounded, with exact totals (tracer/series.py).
"""

from __future__ import annotations

import argparse
import ipaddress
import time

from .cgroups import CgroupIdentities
from .engine import Counters, Engine, EngineConfig, Need
from .errors import ExitStatus, PortscopeError, UsageError
from .events import Clock, decode
from .loader import open_engine
from .metrics import Metrics, Refresher
from .plans import Plan
from .runtime import COALESCE_S, POLL_MS, StopSignal, announce, report_losses, say
from .series import label_value

DEFAULT_LISTEN = "127.0.0.1:9977"
RERANK_S = 1.0


def parse_listen(text: str) -> tuple[str, int]:
    """'127.0.0.1:9977', '[::1]:9977', '0.0.0.0:9977' -> (address, port)."""
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text, 10)
        ipaddress.ip_address(host)
        if not sep or not 1 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid --listen {text!r}: use ADDRESS:PORT with an IP address and a port "
            "from 1 to 65535, e.g. 127.0.0.1:9977 or [::]:9977") from None
    return host, port


# ---- the command ------------------------------------------------------------------


def run(args: argparse.Namespace) -> ExitStatus:
    try:
        from prometheus_client import start_http_server
        from prometheus_client.registry import CollectorRegistry
    except ImportError as exc:
        raise PortscopeError(f"portscope export needs the prometheus-client package ({exc}): "
                             "install portscope with scripts/setup") from exc
    host, port = args.listen
    metrics = Metrics(args.top, args.max_series)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)  # type: ignore[arg-type]
    stop = StopSignal()
    plan = None if args.plan == "auto" else Plan(args.plan)
    engine = open_engine(EngineConfig(plan=plan, errors_only=True, ring_bytes=args.ring_size,
                                      btf_path=args.btf,
                                      groups=Need.OFF if args.no_groups else Need.OPTIONAL))
    refresher = None
    server = None
    try:
        metrics.plan = engine.plan_name
        metrics.attempts = [(a.plan.value, a.ok, a.reason) for a in engine.attempts]
        try:
            started = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        server = started[0] if isinstance(started, tuple) else None
        refresher = Refresher(metrics, args.interval, engine, not args.no_groups)
        announce(engine)
        if refresher.warning:
            say(refresher.warning)
        shown = f"[{host}]" if ":" in host else host
        say(f"metrics on http://{shown}:{port}/metrics")
        refresher.start()
        _collect(engine, metrics, stop)
    finally:
        if refresher is not None:
            refresher.stop()
        if server is not None:
            server.shutdown()
        engine.close()
    return ExitStatus.OK


def _collect(engine: Engine, metrics: Metrics, stop: StopSignal) -> None:
    clock = Clock()
    reported = Counters()
    next_check = time.monotonic() + RERANK_S

    identities = CgroupIdentities()

    def count(raws: list[bytes]) -> None:
        for raw in raws:
            ev = decode(raw, clock)
            if ev.errno:
                container = identities.get(ev.pid, ev.cgroup_id, ev.comm)["container"] or ""
                metrics.failures.add((ev.call, ev.errno_name or str(ev.errno), str(ev.port),
                                      label_value(ev.comm), str(ev.netns), container))

    while not stop.requested:
        raws = engine.poll(POLL_MS)
        count(raws)
        if raws:
            time.sleep(COALESCE_S)
        if time.monotonic() >= next_check:
            metrics.counters = engine.counters()
            reported = report_losses(metrics.counters, reported)
            metrics.failures.settle()
            next_check = time.monotonic() + RERANK_S
    count(engine.drain())
