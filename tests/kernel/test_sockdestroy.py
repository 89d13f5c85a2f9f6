"""What portscope says SOCK_DESTROY frees is what ``ss -K`` does on this kernel.

``tracer.sockdestroy`` asks the kernel, in a namespace of its own, whether
SOCK_DESTROY frees a TIME_WAIT socket and an orphaned one; the explainer
offers ``ss -K`` only where it does. Here the same two kinds of socket are
made by an actor in the test's namespace and destroyed with the real
``ss -K``: the kernel's answer must be the module's. (Debian 11's 5.10 keeps
both, 6.1 frees both: the kernel matrix sees each answer.)
"""

from __future__ import annotations

import subprocess
import time

from harness import Actor, Netns, pick_port

from tracer import sockdestroy
from tracer.inventory import take


def _states(ns: Netns, port: int, remote: int) -> list[str]:
    return [s.diag.state for s in take(port=port, protocols=("tcp",), netns=str(ns.inode)).sockets
            if s.diag.remote_port == remote]


def _kill_and_look(ns: Netns, port: int, remote: int) -> bool:
    """``ss -K`` on the pair; whether the socket is gone afterwards."""
    before = _states(ns, port, remote)
    assert before, "the socket to destroy is not there"
    subprocess.run(["ip", "netns", "exec", ns.name, "ss", "-K", "-tna",
                    f"( sport = :{port} and dport = :{remote} )"],
                   check=True, capture_output=True, timeout=30)
    deadline = time.monotonic() + 2.0
    while _states(ns, port, remote):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _connection(a: Actor, port: int, small_rcvbuf: bool = False) -> tuple[int, int, int]:
    lst = a.socket("tcp", "ipv4", reuseaddr=True)
    assert a.bind(lst, "127.0.0.1", port).ok
    assert a.listen(lst).ok
    cli = a.socket("tcp", "ipv4", **({"rcvbuf": 4096} if small_rcvbuf else {}))
    truth = a.connect(cli, "127.0.0.1", port)
    assert truth.ok
    conn = a.accept(lst)
    a.close(lst)
    return conn, cli, truth.bound_port


def test_destroying_time_wait_is_what_the_kernel_does(netns: Netns) -> None:
    a = Actor(netns)
    port = pick_port()
    conn, cli, client_port = _connection(a, port)
    a.close(conn)  # the server side closes first: it goes to TIME_WAIT
    a.close(cli)
    a.wait_tcp_states(port, lambda st: st == ["TIME_WAIT"])
    able = sockdestroy.destroyable()
    assert able is not None, "running as root, portscope could not ask the kernel"
    assert able.time_wait == _kill_and_look(netns, port, client_port)


def test_destroying_an_orphan_is_what_the_kernel_does(netns: Netns) -> None:
    a = Actor(netns)
    port = pick_port()
    conn, cli, client_port = _connection(a, port, small_rcvbuf=True)
    a.fill(conn)  # its FIN waits behind data the client does not read
    a.close(conn)
    a.wait_tcp_states(port, lambda st: "FIN_WAIT1" in st)
    able = sockdestroy.destroyable()
    assert able is not None, "running as root, portscope could not ask the kernel"
    assert able.orphan == _kill_and_look(netns, port, client_port)
