"""What the long-running commands share at run time: how they stop, how they
announce the probe plan, and how they report what the kernel side lost.

Stopping. SIGINT (Ctrl-C), SIGTERM (systemd, kubelet) and SIGHUP (the ssh
session went away) all mean the same: stop at a safe point, detach every
probe, remove the pinned map, close the journal's session, then exit. The
streaming commands (trace, record, export, groups --watch, timewait --watch,
the UI) poll :attr:`StopSignal.requested`; every other command is stopped by
:func:`install_default` (KeyboardInterrupt, so that its ``finally`` blocks
run). A second signal while stopping gives up at once.
"""

from __future__ import annotations

import signal
import sys
from typing import Callable, Protocol, Sequence

from .text import printable

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# How the streaming commands read the ring buffer: wait at most POLL_MS for
# an event, and after one, COALESCE_S more so that a burst is read in one go.
POLL_MS = 100
COALESCE_S = 0.005


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def install_default() -> None:
    """Every stop signal interrupts the command like Ctrl-C does (exit status
    130, cleanup in ``finally``), instead of killing it on the spot."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _interrupt)


class StopSignal:
    """The stop signals ask the loop to stop at a safe point, so that no
    event already read from the kernel is dropped half-way through a batch.
    ``on_stop`` (optional) is called from the handler, for a loop that
    waits elsewhere (the UI's). A second signal while stopping gives up."""

    def __init__(self, on_stop: Callable[[], None] | None = None) -> None:
        self.requested = False
        self.signal: int | None = None
        self.on_stop = on_stop
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt(signal.Signals(signum).name)
        self.requested = True
        self.signal = signum
        if self.on_stop is not None:
            self.on_stop()


def say(sentence: str) -> None:
    """A status or warning line on stderr (escaped: it may quote a name)."""
    print(f"portscope: {printable(sentence)}", file=sys.stderr, flush=True)


class _Named(Protocol):
    @property
    def value(self) -> str: ...


class _Attempt(Protocol):
    @property
    def plan(self) -> _Named: ...

    @property
    def ok(self) -> bool: ...

    @property
    def reason(self) -> str: ...


class _Traced(Protocol):
    """What announce() reads of an engine (tracer/engine.Engine)."""

    @property
    def attempts(self) -> Sequence[_Attempt]: ...

    @property
    def plan_name(self) -> str: ...

    @property
    def engine(self) -> str: ...

    @property
    def compat_callers(self) -> str: ...


def announce(engine: _Traced, verb: str = "tracing", tail: str = "Ctrl-C to stop") -> None:
    """Which plan runs, and why the better ones do not; and what it cannot see."""
    skipped = "; ".join(f"{a.plan.value}: {a.reason}" for a in engine.attempts if not a.ok)
    note = f" ({skipped})" if skipped else ""
    built = " (compiled here by bcc)" if engine.engine == "bcc" else ""
    say(f"{verb} with the {engine.plan_name} plan{built}{note}; {tail}")
    if engine.compat_callers.startswith("no: "):
        say(f"32-bit programs' calls are not seen: {engine.compat_callers.removeprefix('no: ')}")


class _Counters(Protocol):
    lost: int
    inflight_full: int


def report_losses(now: _Counters, before: _Counters) -> _Counters:
    """Say so, once per increase, when the kernel side dropped anything."""
    if now.lost > before.lost:
        say(f"{now.lost - before.lost} events lost: the ring buffer was full (raise --ring-size)")
    if now.inflight_full > before.inflight_full:
        say(f"{now.inflight_full - before.inflight_full} calls not traced: too many "
            "concurrent calls in flight")
    return now


class Output:
    """Where a command's lines go: stdout, or a file opened for appending and
    line-buffered (each line is on disk as soon as it is written, for Vector
    or Fluent Bit tailing it). A write that fails (a full disk, a file system
    gone read-only) becomes one sentence (exit status 1), at the write or at
    the close, never a traceback; a reader that went away (``| head``) is
    the end of the output, not an error (cli.main)."""

    def __init__(self, path: str | None) -> None:
        self.path = path if path and path != "-" else None
        self.name = self.path or "standard output"
        if self.path is None:
            self.stream = sys.stdout
            return
        from .errors import UsageError

        try:
            self.stream = open(self.path, "a", buffering=1, encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot write to {self.path}: {exc.strerror or exc}") from exc

    def write(self, text: str) -> None:
        self._guard(self.stream.write, text)

    def flush(self) -> None:
        self._guard(self.stream.flush)

    def isatty(self) -> bool:
        return self.stream.isatty()

    def close(self) -> None:
        """Flush and close (stdout stays open); raises the one sentence."""
        self._guard(self.stream.flush if self.path is None else self.stream.close)

    def _guard(self, fn: Callable[..., object], *args: object) -> None:
        from .errors import OutputFailed

        try:
            fn(*args)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise OutputFailed(f"cannot write to {self.name}: {exc.strerror or exc}") from exc

    def close_quietly(self) -> None:
        """Close when a first error is already on its way (it is the one to tell)."""
        try:
            self.close()
        except Exception:  # noqa: BLE001 - the first error is the one reported
            pass


# ---- the screen -------------------------------------------------------------

SCREEN_GROUP = "portscope.screen"  # the entry point the terminal UI registers (pyproject.toml)


def run_screen(source: object) -> int:
    """Show ``source`` (anything with ``snapshot()``: the live collector's
    model, a recording, a journal's replay) in the terminal UI until q or a
    stop signal; 0, or 1 when the UI ended on an error it has shown.

    The UI is found through its entry point rather than imported, so that
    this package depends on no screen (an image without Textual still runs
    every other command)."""
    from importlib.metadata import entry_points

    from .errors import PortscopeError

    found = list(entry_points(group=SCREEN_GROUP))
    if not found:
        raise PortscopeError("the terminal UI is not installed (no portscope.screen entry point): "
                             "install portscope with scripts/setup")
    try:
        make_app = found[0].load()
    except ImportError as exc:
        raise PortscopeError(f"the terminal UI needs the textual package ({exc}): "
                             "install portscope with scripts/setup") from exc
    # SIGTERM, SIGHUP (the ssh session closed) and SIGINT end it as q does.
    ending = _Ending()
    stop = StopSignal(on_stop=ending.arm)
    ending.stop = stop
    app = make_app(source, should_stop=lambda: stop.requested)
    # Textual's job-control handlers outlive the app: a SIGCONT that comes
    # after it (the kernel sends one with SIGHUP when the terminal goes away)
    # would try to take the terminal again, in the middle of the clean-up.
    kept = {sig: signal.getsignal(sig) for sig in (signal.SIGCONT, signal.SIGTSTP)}
    ending.watch_terminal()
    try:
        app.run()
    finally:
        ending.done.set()
        for sig, handler in kept.items():
            signal.signal(sig, handler)
    return 1 if app.return_code else 0


# How long the UI may take to end once it must. Ending writes to the
# terminal (leave the alternate screen, mouse reporting off); when the
# terminal is gone (the ssh session dropped, perhaps during a q), Textual's
# writer thread dies on the first write and its shutdown then waits for it
# for ever, with the probes still attached. And the process is not always
# told: the kernel hangs up the terminal's session leader (the shell), not
# always the program in it. So the terminal itself is watched, and from a
# hang-up or a stop signal on, the UI has this long to end: then the stop is
# signalled again, which gives up (StopSignal: KeyboardInterrupt) so that the
# command's own clean-up (probes detached, pinned map removed, journal
# closed) still runs; and if even that does not end it, the process exits.
GIVE_UP_S = 5.0


class _Ending:
    """The UI's way out when its terminal is gone (see GIVE_UP_S)."""

    def __init__(self) -> None:
        import threading

        self.done = threading.Event()  # the app has returned
        self.stop: StopSignal | None = None
        self._armed = threading.Lock()
        self._main = threading.main_thread().ident

    def watch_terminal(self) -> None:
        """A hang-up of the terminal (stdin) counts as SIGHUP."""
        import os
        import threading

        if os.isatty(0):
            threading.Thread(target=self._watch, name="portscope-hangup", daemon=True).start()

    def _watch(self) -> None:
        """Until the process exits: a hang-up while the UI runs asks it to
        stop; one after it (Textual's input thread, not a daemon, then spins
        on the dead terminal and the interpreter waits for it at exit) gives
        the process GIVE_UP_S to be gone."""
        import os
        import select
        import time

        poll = select.poll()
        poll.register(0, select.POLLHUP)
        while True:
            try:
                events = poll.poll(500)
            except OSError:
                return
            if any(ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL) for _, ev in events):
                break
        if not self.done.is_set():
            if self.stop is not None and not self.stop.requested:
                self.stop.requested, self.stop.signal = True, signal.SIGHUP
            self.arm()
        self.done.wait()
        # The command's clean-up runs after the app (probes detached, pinned
        # map removed); then nothing is left to wait for.
        time.sleep(2 * GIVE_UP_S)
        os._exit(128 + signal.SIGHUP)

    def arm(self) -> None:
        """From now on the UI has GIVE_UP_S to end (once, however often asked)."""
        import threading

        if self._armed.acquire(blocking=False):
            threading.Thread(target=self._give_up, name="portscope-give-up", daemon=True).start()

    def _give_up(self) -> None:
        import os

        signum = (self.stop.signal if self.stop else None) or signal.SIGHUP
        if self.done.wait(GIVE_UP_S):
            return
        assert self._main is not None
        signal.pthread_kill(self._main, signum)  # StopSignal: KeyboardInterrupt, clean-up runs
        if self.done.wait(GIVE_UP_S):
            return
        os._exit(128 + signum)  # not even that: at least do not stay
