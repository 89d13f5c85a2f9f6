"""The journal: a durable record of bind()/listen() activity and of who held
which port, for postmortems (``portscope record`` writes it, ``portscope
report`` reads it).

One SQLite file in WAL mode, so that a reader (``report``) never blocks the
writer and a writer killed at any moment (``kill -9``, power loss) leaves a
consistent file: every committed transaction is whole, the uncommitted tail
is rolled back on the next open. The writer commits at least every
``COMMIT_S`` seconds, which bounds what a crash can lose.

Schema (``PRAGMA user_version`` is the schema version, ``PRAGMA
application_id`` marks the file as a portscope journal):

* ``meta(key, value)``: created, host, creator;
* ``sessions``: one row per run of the recorder: start, clean end (NULL when
  it was killed), last heartbeat, probe plan, and the kernel-side counters
  (events emitted, lost because the ring buffer was full, untraced);
* ``events``: every bind/listen/connect failure and every bind/listen
  success and listener close, with the fields of ``CallEvent.to_json()`` as
  columns and the whole JSON object, the on-the-spot explanation of an
  EADDRINUSE (``blockers``, JSON) and the caller's executable, cgroup and
  command line read when the event was recorded;
* ``snapshots``: a periodic (and event-triggered) inventory of listeners,
  UDP sockets and bound sockets (never connections);
* ``snapshot_sockets``: what those snapshots saw, run-length encoded: one row
  per distinct socket state (address, options, reuseport group, owners),
  valid from ``first_snapshot`` to ``last_snapshot`` (NULL: until the last
  snapshot of its session). A socket that does not change costs nothing per
  snapshot;
* ``snapshot_programs`` (schema 3): the sk_lookup and cgroup sock_addr BPF
  programs the snapshots saw, with the processes holding them, run-length
  encoded the same way; ``snapshots.programs`` says which classes a snapshot
  looked for (NULL: none, as in every older journal). See
  tracer/journal/programs.py.

An older journal reads as it is (the columns and tables a later schema
added read as NULL and empty); a recorder appending to it adds them first.

The file is created mode 0600 before SQLite opens it (it holds command lines)
and kept bounded: the oldest data goes once the file exceeds ``max_size`` or
is older than ``retain`` (``auto_vacuum=INCREMENTAL`` gives the pages back).

Opening validates the file first and turns every bad file into one sentence
(exit status 2): not SQLite, truncated, damaged, another application's
database, or a newer schema than this portscope reads.
"""

from .reader import JournalReader
from .schema import (
    APPLICATION_ID,
    COLUMNS,
    SCHEMA_VERSION,
    JournalBusy,
    JournalError,
    JournalIOError,
)
from .writer import COMMIT_S, JournalWriter, check_target

__all__ = ["APPLICATION_ID", "COLUMNS", "COMMIT_S", "SCHEMA_VERSION", "JournalBusy", "JournalError",
           "JournalIOError", "JournalReader", "JournalWriter", "check_target"]
