"""A finding of the hijack rules (tracer/hijack.py): what happened to a port,
who did it, to whom, and the journal's rows that show it, with its JSON
codec (``report --json``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

KINDS = ("reuseport_other_uid", "reuseport_foreign_member", "udp_shared", "restart_race",
         "wildcard_shadowed", "reuseport_bpf_attached", "device_shadow", "transparent_listener",
         "sk_lookup_attached", "sock_addr_attached")


@dataclass
class Finding:
    kind: str  # one of KINDS
    time: float
    netns: int
    protocol: str
    port: int
    pids: list[int]  # who did it
    owners: list[int]  # whom it was done to
    summary: str
    evidence: list[dict[str, Any]] = field(default_factory=list)  # events and snapshot rows
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "time": self.time, "netns": self.netns,
                "protocol": self.protocol, "port": self.port, "pids": self.pids,
                "owners": self.owners, "summary": self.summary, "evidence": self.evidence,
                "notes": self.notes}

    @classmethod
    def from_json(cls, d: object) -> "Finding":
        """The inverse of :meth:`to_json`; ValueError when it is not one."""
        if not isinstance(d, dict) or d.get("kind") not in KINDS:
            raise ValueError("not a finding")
        ints = [d.get(k) for k in ("netns", "port")]
        lists = [d.get(k) for k in ("pids", "owners", "evidence", "notes")]
        if not all(type(i) is int for i in ints) or not all(isinstance(v, list) for v in lists) \
                or not isinstance(d.get("time"), (int, float)) \
                or not isinstance(d.get("summary"), str) or not isinstance(d.get("protocol"), str):
            raise ValueError("a finding's fields have the wrong type")
        return cls(d["kind"], float(d["time"]), d["netns"], d["protocol"], d["port"],
                   list(d["pids"]), list(d["owners"]), d["summary"], list(d["evidence"]),
                   list(d["notes"]))
