"""Reuseport groups of real servers under real load: nginx (worker
processes, ``listen ... reuseport``), haproxy (threads, one ``bind`` per
thread) and a pre-forking Python server (blocking accept), from Debian's
packages, each in a private network namespace, loaded by ``wrk`` and ``ab``.

In all three every member socket is held by several processes (or by one
process's many threads); ``groups`` must name the one that takes its
connections. The truth comes from outside portscope: the connections each
worker holds during a keep-alive load (``ss -tnp``), nginx's stub_status
accepts, haproxy's per-listener session counts, each Python child's own
count. A member whose worker is stopped must be flagged within 2 s.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import Netns
from servers import HAProxy, Nginx, PreforkServer, established_by_pid, run_client, start_client

from tests.needs import SLOWDOWN, missing

from tracer.errors import PlanUnavailable
from tracer.records import Group, GroupsReading
from tracer.reuseport import GroupWatcher

ROOT = Path(__file__).resolve().parents[2]
PORT = 41100
STATUS_PORT = 41101
WRK_NO_PROBE = Path(__file__).resolve().parent / "wrk_no_probe.lua"
FLAG_WITHIN = 2.0  # seconds from SIGSTOP to a flagged member (the bound)

pytestmark = pytest.mark.counts_groups


def open_watcher(ns: Netns) -> GroupWatcher:
    try:
        return GroupWatcher(port=PORT, netns=ns.path, protocols=("tcp",))
    except PlanUnavailable as exc:
        missing(f"reuseport counting is not possible with this plan here: {exc}")
        raise


def the_group(snap: GroupsReading) -> Group:
    found = [g for g in snap.groups if g.port == PORT and g.protocol == "tcp"]
    assert len(found) == 1, snap.to_json()
    return found[0]


def read_until(watcher: GroupWatcher, ready, timeout: float = 30.0) -> GroupsReading:
    deadline = time.monotonic() + timeout * SLOWDOWN
    while True:
        snap = watcher.read()
        if ready(snap) or time.monotonic() > deadline:
            return snap
        time.sleep(0.1)


def served_by(group: Group) -> dict[int, int]:
    """Member inode -> the one pid that takes its connections."""
    out = {}
    for m in group.members:
        pids = {a.owner.pid for a in m.acceptors}
        assert len(pids) == 1, f"member {m.inode}: acceptors {m.acceptors}, holders {m.pids}"
        out[m.inode] = pids.pop()
    return out


def test_nginx_workers_named_and_counted_exactly(netns: Netns) -> None:
    with Nginx(netns, PORT, STATUS_PORT, workers=4) as nginx, open_watcher(netns) as watcher:
        workers = nginx.workers()
        assert len(workers) == 4
        group = the_group(watcher.read())
        # Every member is held by the master and all four workers ...
        assert group.size == 4
        assert all(sorted(m.pids) == sorted([nginx.pid, *workers]) for m in group.members)
        # ... and taken by exactly one worker, a different one for each.
        takers = served_by(group)
        assert sorted(takers.values()) == workers

        # Keep-alive load: wrk holds its 32 connections for the whole run,
        # and each worker holds the ones it accepted. (wrk's own check that
        # the address answers, one more connection closed at once, is
        # turned off: every connection the kernel delivers stays held.)
        before = nginx.accepts()
        wrk = start_client(netns, "wrk", "-t", "2", "-c", "32", "-d", f"{6 * SLOWDOWN:.0f}s",
                           "-s", str(WRK_NO_PROBE), f"http://127.0.0.1:{PORT}/")
        try:
            snap = read_until(watcher, lambda s: the_group(s).delivered >= 32)
            held = established_by_pid(netns, PORT)
            group = the_group(watcher.read())
        finally:
            out, _ = wrk.communicate(timeout=60 * SLOWDOWN)
        assert "requests in" in out, out
        assert sum(held.values()) == 32, held
        for m in group.members:
            assert m.delivered == held.get(served_by(group)[m.inode], 0), (m, held)
        assert nginx.accepts() - before - 1 == group.delivered == 32
        assert snap.health.get("acceptors_unread", 0) == 0

        # Connection-per-request load: nginx's own count of accepts.
        before = nginx.accepts()
        start = group.delivered
        result = run_client(netns, "ab", "-q", "-n", "3000", "-c", "16",
                            f"http://127.0.0.1:{PORT}/")
        assert result.returncode == 0, result.stdout + result.stderr
        group = the_group(read_until(
            watcher, lambda s: the_group(s).delivered - start >= 3000))
        assert nginx.accepts() - before - 1 == group.delivered - start
        assert all(m.status == "ok" for m in group.members), group.to_json()


def test_nginx_stopped_worker_flagged_within_two_seconds(netns: Netns) -> None:
    with Nginx(netns, PORT, STATUS_PORT, workers=4, backlog=64) as nginx:
        with open_watcher(netns) as watcher:
            takers = served_by(the_group(watcher.read()))
        cmd = [sys.executable, "-m", "tracer.cli", "groups", str(PORT), "--netns", netns.name,
               "--tcp", "--json", "--watch", "--interval", "0.5"]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            json.loads(proc.stdout.readline())  # the counters are attached
            victim_inode, victim = next(iter(sorted(takers.items())))
            os.kill(victim, signal.SIGSTOP)
            stopped_at = time.time()
            # Load that reaches every member, the stopped one's connections
            # waiting in its queue until ab gives up on them.
            ab = start_client(netns, "ab", "-q", "-n", "2000", "-c", "32", "-s", "5", "-r",
                              f"http://127.0.0.1:{PORT}/")
            flagged = None
            deadline = time.monotonic() + 30 * SLOWDOWN
            while flagged is None and time.monotonic() < deadline:
                doc = json.loads(proc.stdout.readline())
                (group,) = [g for g in doc["groups"] if g["port"] == PORT]
                member = {m["inode"]: m for m in group["members"]}[victim_inode]
                if doc["time"] >= stopped_at and member["status"] != "ok":
                    flagged = (doc, group, member)
            assert flagged is not None, "the stopped worker's member was never flagged"
            doc, group, member = flagged
            assert doc["time"] - stopped_at <= FLAG_WITHIN * SLOWDOWN, doc["time"] - stopped_at
            assert member["status"] == "stopped", member
            assert [a["pid"] for a in member["acceptors"]] == [victim]
            assert str(victim) in member["problems"][0]
            others = [m for m in group["members"] if m["inode"] != victim_inode]
            assert all(m["status"] == "ok" for m in others), others
            assert any("stopped" in c for c in group["balance"]["causes"])

            # Its queue grows while it accepts nothing; once it runs again
            # it drains its queue and is ok.
            time.sleep(1.0 * SLOWDOWN)
            os.kill(victim, signal.SIGCONT)
            ab.communicate(timeout=60 * SLOWDOWN)
            ok = False
            deadline = time.monotonic() + 30 * SLOWDOWN
            while not ok and time.monotonic() < deadline:
                doc = json.loads(proc.stdout.readline())
                (group,) = [g for g in doc["groups"] if g["port"] == PORT]
                ok = all(m["status"] == "ok" and m["queue"] == 0 for m in group["members"])
            assert ok, group
        finally:
            try:
                os.kill(nginx.workers()[0], signal.SIGCONT)
            except (ProcessLookupError, IndexError):
                pass
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=60)


def test_haproxy_threads_named_and_counted_exactly(netns: Netns) -> None:
    with HAProxy(netns, PORT, threads=4) as haproxy, open_watcher(netns) as watcher:
        group = the_group(watcher.read())
        assert group.size == 4
        # One process holds every member; one thread of it waits on each.
        assert all(m.pids == [haproxy.pid] for m in group.members)
        tids = {m.inode: {a.tid for a in m.acceptors} for m in group.members}
        assert all(len(t) == 1 for t in tids.values()), tids
        assert sorted(t for ts in tids.values() for t in ts) == haproxy.threads()

        before = haproxy.sessions_by_listener()
        start = group.delivered
        result = run_client(netns, "ab", "-q", "-n", "3000", "-c", "16",
                            f"http://127.0.0.1:{PORT}/")
        assert result.returncode == 0, result.stdout + result.stderr
        after = haproxy.sessions_by_listener()
        accepted = sorted(after[b] - before.get(b, 0) for b in after)
        group = the_group(read_until(
            watcher, lambda s: the_group(s).delivered - start >= sum(accepted)))
        # Each listener's sessions are one member's deliveries.
        assert sorted(m.delivered for m in group.members) == accepted, (accepted, group.to_json())


def test_prefork_children_named_and_counted_exactly(netns: Netns) -> None:
    with PreforkServer(netns, PORT, count=3) as server, open_watcher(netns) as watcher:
        kids = server.children()
        group = the_group(watcher.read())
        assert all(sorted(m.pids) == sorted([server.pid, *kids]) for m in group.members)
        takers = served_by(group)
        assert sorted(takers.values()) == kids
        assert all(a.how == "accept" for m in group.members for a in m.acceptors)

        # The children's counts include the connection that checked the
        # server was up, before the watcher started counting.
        base = server.served()
        result = run_client(netns, "ab", "-q", "-n", "1500", "-c", "8",
                            f"http://127.0.0.1:{PORT}/")
        assert result.returncode == 0, result.stdout + result.stderr
        served = {pid: n - base[pid] for pid, n in server.served().items()}
        group = the_group(read_until(
            watcher, lambda s: the_group(s).delivered >= sum(served.values())))
        assert sum(served.values()) >= 1500
        for m in group.members:
            assert m.delivered == served[takers[m.inode]], (m, served)


def groups_json(ns: Netns, port: int) -> dict:
    """One ``portscope groups --json`` run (a process of its own)."""
    out = subprocess.run([sys.executable, "-m", "tracer.cli", "groups", str(port), "--netns",
                          ns.name, "--tcp", "--json", "--interval", "0.2"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120 * SLOWDOWN)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def test_group_id_is_the_same_across_runs_and_server_restarts(netns: Netns) -> None:
    """The id comes from what makes the group (namespace, protocol, family,
    address, port, device, uid), not from the kernel's address of it: two
    runs of portscope, and a restarted server's new sockets, give one id;
    another port gives another."""
    ids = []
    for _ in range(2):
        with Nginx(netns, PORT, STATUS_PORT, workers=2):
            first = groups_json(netns, PORT)
            second = groups_json(netns, PORT)
        (a,), (b,) = first["groups"], second["groups"]
        assert a["id"] == b["id"] and a["members"] != [] and a["size"] == 2
        ids.append(a["id"])
    assert ids[0] == ids[1]
    with Nginx(netns, PORT + 10, STATUS_PORT, workers=2):
        (other,) = groups_json(netns, PORT + 10)["groups"]
    assert other["id"] != ids[0]


def test_export_flags_the_stopped_worker(netns: Netns) -> None:
    """``portscope export``: the member whose worker is stopped has
    portscope_reuseport_member_served 0, with its worker and status as
    labels, and the others 1 (what an alert on it needs)."""
    import urllib.request

    with Nginx(netns, PORT, STATUS_PORT, workers=3, backlog=32) as nginx:
        listen_port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "tracer.cli", "export", "--listen",
                                 f"127.0.0.1:{listen_port}", "--interval", "0.5"], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{listen_port}/metrics"

        def scrape() -> str:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - loopback
                    return r.read().decode()
            except OSError:
                return ""

        try:
            deadline = time.monotonic() + 60 * SLOWDOWN
            while "portscope_reuseport_member_served{" not in scrape():
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.3)
            victim = nginx.workers()[0]
            os.kill(victim, signal.SIGSTOP)
            run_client(netns, "ab", "-q", "-n", "300", "-c", "12", "-s", "2", "-r",
                       f"http://127.0.0.1:{PORT}/")
            deadline = time.monotonic() + 30 * SLOWDOWN

            def flagged(text: str) -> bool:
                return any(f'acceptor="nginx[{victim}]"' in line and 'status="stopped"} 0.0' in line
                           for line in text.splitlines())

            while not flagged(text := scrape()):
                assert time.monotonic() < deadline, text
                time.sleep(0.3)
            lines = [line for line in text.splitlines()
                     if line.startswith("portscope_reuseport_member_served{")
                     and f'local="127.0.0.1:{PORT}"' in line]
            assert len(lines) == 3, lines
            assert sum(line.endswith(" 1.0") for line in lines) == 2, lines
        finally:
            os.kill(nginx.workers()[0], signal.SIGCONT)
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)


def test_journal_keeps_who_accepts_on_each_nginx_listener(netns: Netns, tmp_path: Path) -> None:
    """``portscope record``: each nginx listener's snapshot owners are the
    master and every worker, and exactly one of them, a worker, is marked
    as the one that accepts; a different worker for each member. Read back
    from the journal file, as ``report`` and ``replay`` read it."""
    from tracer.journal.reader import JournalReader

    journal = tmp_path / "journal.db"
    with Nginx(netns, PORT, STATUS_PORT, workers=3) as nginx:
        started = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "tracer.cli", "record", "-o", str(journal),
                                 "--snapshot-interval", "0.5"], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60 * SLOWDOWN
            while not _snapshots_after(journal, started + 1.0):
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.2)
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        workers, master = set(nginx.workers()), nginx.pid
        listeners = [s for s in JournalReader(str(journal)).sockets_seen_since(0, port=PORT)
                     if s["state"] == "LISTEN" and s["netns"] == netns.inode]
    assert len(listeners) == 3, listeners
    takers = []
    for sock in listeners:
        owners = {o["pid"]: o.get("accepts") for o in sock["owners"]}
        assert set(owners) == workers | {master}, sock["owners"]
        accepting = [pid for pid, accepts in owners.items() if accepts]
        assert len(accepting) == 1 and accepting[0] in workers, sock["owners"]
        assert all(accepts is False for pid, accepts in owners.items() if pid != accepting[0])
        takers.append(accepting[0])
    assert sorted(takers) == sorted(workers), "each worker takes one member"


def _snapshots_after(journal: Path, t: float) -> bool:
    """Whether the journal has a snapshot taken after ``t`` (time.time())."""
    from tracer.journal.reader import JournalReader
    from tracer.journal.schema import JournalBusy, JournalError

    try:
        return any(s["time"] > t for s in JournalReader(str(journal)).snapshots())
    except (JournalError, JournalBusy):  # not created yet, its schema not written yet, locked
        return False


def free_port() -> int:
    """A TCP port free on the host's loopback now (for the exporter)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
