"""The sentences beside the explainer's data: for each reason rule, fix
kind and note kind, the English an operator reads. Only people read these
(scripts read the kinds and parameters), so they may change freely; tests
never parse them."""

from __future__ import annotations


def _addr_detail(f: dict[str, object]) -> str:
    if f.get("other_vrf") or f.get("where") == "other_vrf":
        return "; it belongs to another VRF than the socket's"
    if f.get("where") == "other_device":
        return "; it is on another device than the one the socket is bound to"
    have = ", ".join(map(str, f.get("local_addresses") or [])) or "none"  # type: ignore[arg-type]
    return f" (its {f.get('family')} addresses: {have})"


REASON_TEXT = {
    "conflict": lambda f: f"the port is taken: {f['blockers']} socket(s) block this bind",
    "ports_exhausted": lambda f: (f"no port of the range {f['range'][0]}-{f['range'][1]} "  # type: ignore[index]
                                  f"({f['usable']} usable) is free for this socket"),
    "privileged_port": lambda f: (f"port {f['port']} is below net.ipv4.ip_unprivileged_port_start "
                                  f"({f['unprivileged_port_start']}) of this network namespace, "
                                  "and the process lacks CAP_NET_BIND_SERVICE"),
    "address_not_local": lambda f: (f"{f['address']} is not an address of this network "
                                    f"namespace{_addr_detail(f)}"),
    "address_tentative": lambda f: (f"{f['address']} is tentative: duplicate address detection "
                                    "has not finished (or failed)"),
    "multicast_stream": lambda f: f"a TCP socket cannot bind a multicast address ({f['address']})",
    "mapped_on_v6only": lambda f: (f"an IPV6_V6ONLY socket cannot bind a v4-mapped address "
                                   f"({f['address']})"),
    "link_local_needs_device": lambda f: (f"{f['address']} is link-local: binding it needs a "
                                          "device (SO_BINDTODEVICE or the address's scope id)"),
    "device_gone": lambda f: (f"the socket is bound to device #{f['bound_dev_if']}, which no "
                              "longer exists"),
    "bind_hook": lambda f: (
        "a BPF program refused it (EPERM): "
        + "; ".join(f"{h['name'] or 'unnamed'} (id {h['program_id']}) at cgroup/{h['hook']} on "
                    f"{h['cgroup']}" for h in f["hooks"])  # type: ignore[attr-defined]
        + " acts on the caller's binds"),
    "eperm_unexplained": lambda f: (
        "the bind was refused with EPERM, and no BPF program is attached on the caller's "
        "cgroup path: a security module (SELinux, AppArmor, a BPF LSM) refused it"),
    "four_tuple_taken": lambda f: (f"the socket is bound to {f['local']}, and a connection "
                                   f"{f['local']} <-> {f['remote']} exists already: the 4-tuple "
                                   "would repeat"),
    "ephemeral_exhausted": lambda f: (
        f"no local port is left towards {f['destination']}: {f['in_use']} of the "
        f"{f['capacity']} usable ports of {f['range'][0]}-{f['range'][1]} are in use towards it"  # type: ignore[index]
        + _holders_text(f)),
    "ephemeral_unexplained": lambda f: (
        f"the kernel found no local port towards {f['destination']}, though only "
        f"{f['in_use']} of {f['capacity']} usable ports are in use towards it now: they were "
        "freed since, or another source address was chosen" + _holders_text(f)),
}


def _holders_text(f: dict[str, object]) -> str:
    top = f.get("top_holders") or []
    if not top:
        return ""
    return "; most by " + ", ".join(f"{h['holder']} ({h['count']})" for h in top[:3])  # type: ignore[index,union-attr]

_OPTION_TEXT = {
    "IPV6_V6ONLY": " (leave IPv4 to the IPv4 socket)",
    "IP_FREEBIND": " (binds an address this namespace does not have yet)",
    "IPV6_FREEBIND": " (binds an address this namespace does not have yet)",
    "IP_BIND_ADDRESS_NO_PORT": (" (a client's bind then takes no port: it is chosen at "
                                "connect(), per destination)"),
}


def _option_text(p: dict[str, object]) -> str:
    if p.get("value") == 0:
        return f"clear {p['option']} on the new socket"
    return f"set {p['option']} on the new socket{_OPTION_TEXT.get(str(p['option']), '')}"


def _peer_text(p: dict[str, object]) -> str:
    peer = p.get("peer")
    if not isinstance(peer, dict):
        return ""
    who = ", ".join(map(str, peer.get("owners") or [])) or "no process"
    tail = (": it has not closed its end yet; when it does, this side moves to TIME_WAIT"
            if peer.get("state") == "CLOSE_WAIT" else "")
    return f"; the other end, {peer['local']}, is here too, {peer['state']}, held by {who}{tail}"


def _who(p: dict[str, object]) -> str:
    return ", ".join(map(str, p.get("owners") or [])) or "its holder"  # type: ignore[arg-type]


FIX_TEXT = {
    "option": _option_text,
    "uid": lambda p: (f"run the new socket's process as uid {p['uid']}, the owner of the "
                      "SO_REUSEPORT group (a group is for one user)"),
    "specific_address": lambda p: ("bind a specific address instead of the wildcard (not "
                                   + ", ".join(map(str, p["instead_of"])) + ")"),  # type: ignore[arg-type]
    "other_device": lambda p: ("bind the new socket to another device (SO_BINDTODEVICE): every "
                               "blocker is bound to a device"),
    "retry": lambda p: ("retry: every socket that blocked the call has closed since "
                        "(if this keeps happening, something binds the port briefly: "
                        "the blockers above say what)"),
    "wait": lambda p: (f"wait {p['seconds']} s: the kernel finishes the "
                       + "/".join(map(str, p["states"])) + " socket(s) on its own"),  # type: ignore[arg-type]
    "destroy_socket": lambda p: (f"or destroy the {p['state']} socket {p['local']} <-> "
                                 f"{p['remote']} now (ss -K, which needs CONFIG_INET_DIAG_DESTROY)"),
    "stop_holder": lambda p: f"stop or reconfigure {_who(p)}, which holds {p['state']} {p['local']}",
    "close_connection": lambda p: (f"{_who(p)} still holds the connection {p['local']} <-> "
                                   f"{p['remote']} without listening (a forked child of an "
                                   "earlier instance?): close it or stop that process"),
    "capability": lambda p: ("give the process CAP_NET_BIND_SERVICE (setcap "
                             "cap_net_bind_service=+ep on its executable, or "
                             "AmbientCapabilities=CAP_NET_BIND_SERVICE in its systemd unit)"),
    "sysctl": lambda p: (f"set {p['name']} = {p['value']} in this network namespace"
                         if p["value"] != "wider" else
                         f"widen {p['name']}, or close sockets that hold ports in it "
                         "(see portscope timewait)"),
    "port": lambda p: (f"bind a port from {p['at_least']} up (a lower one needs "
                       "CAP_NET_BIND_SERVICE)" if "at_least" in p else
                       "do not bind a port before connect() (port 0): the kernel then picks "
                       "one unused towards the destination"),
    "wait_dad": lambda p: (f"wait for duplicate address detection on {p['address']} to finish "
                           "(or add the address with nodad)"),
    "add_address": lambda p: (f"add {p['address']} to a device of this namespace (a floating "
                              "address that has not moved here yet?), or bind an address it has"),
    "device": lambda p: f"bind the socket to {p['device']}, the address's device",
    "protocol": lambda p: f"use {str(p['protocol']).upper()} for a multicast address",
    "socket_port_range": lambda p: (f"widen the socket's IP_LOCAL_PORT_RANGE to "
                                    f"{p['range'][0]}-{p['range'][1]}"),  # type: ignore[index]
    "source_address": lambda p: (f"connect from another source address too (each gives "
                                 f"another range of ports towards {p['destination']})"),
}

NOTE_TEXT = {
    "destroy_keeps": lambda p: (
        "this kernel cannot destroy " + "/".join(map(str, p["states"])) + " sockets: it keeps "  # type: ignore[arg-type]
        "them after SOCK_DESTROY (ss -K), as portscope saw when it asked it; waiting is the "
        "way"),
    "reuseaddr_alone_vs_time_wait": lambda p: (
        "SO_REUSEADDR on the new socket alone does not help here: the kernel also needs it on "
        "the socket that left the TIME_WAIT (Linux, unlike BSD)"),
    "reuseport_fast_path": lambda p: (
        "the kernel may still accept this bind: it skips the conflict check for a SO_REUSEPORT "
        f"socket of uid {p['uid']} when the last SO_REUSEPORT socket that got the port was of "
        "that uid and covered this address, as "
        + ", ".join(f"{s['local']} (inode {s['inode']})" for s in p["sockets"])  # type: ignore[attr-defined]
        + " does; which socket that was depends on the order of earlier binds, which cannot "
          "be seen"),
    "hidden_owner": lambda p: (
        f"the {p['state']} socket on {p['local']} (inode {p['inode']}) has an owner portscope "
        "cannot see: a process in another PID namespace, or one it could not read"),
    "unaccepted": lambda p: (
        f"the {p['state']} socket on {p['local']} is a connection not yet accepted: it goes "
        "away when its listener closes"),
    "orphan": lambda p: (
        f"the {p['state']} socket {p['local']} <-> {p['remote']} belongs to no process: it was "
        "closed (or its process died) and the kernel is finishing the close"
        + (f"; its timer ({p['timer']}) fires in {int(p['timer_ms']) / 1000:.0f} s"  # type: ignore[call-overload]
           if p.get("timer") else "") + _peer_text(p)),
    "closed_on_this_side": lambda p: (
        f"the {p['state']} socket {p['local']} <-> {p['remote']} was closed on this side"
        + _peer_text(p)),
    "flags_unknown": lambda p: (
        f"{p['sockets']} socket(s) on the port had no readable flags: they were treated as "
        "having no SO_REUSEADDR/SO_REUSEPORT"),
    "unreadable_owner": lambda p: (
        f"pid {p['pid']} ({p['comm']}) holds a blocker but could not be read ({p['problem']}): "
        "its executable and unit are unknown"),
    "bind_hook": lambda p: (
        "BPF programs act on this bind where it runs: "
        + "; ".join(f"{h['name'] or 'unnamed'} (id {h['program_id']}) at cgroup/{h['hook']} on "
                    f"{h['cgroup']}" for h in p["hooks"])  # type: ignore[attr-defined]
        + ": such a program may refuse it (EPERM) or rewrite its address and port, which "
          "portscope cannot predict (bpftool prog dump xlated id N shows what it does)"),
    "closer_unknown": lambda p: (
        f"who closed {p['sockets']} of these socket(s) is unknown: "
        + ("no portscope collector was running when they closed; run portscope record as a "
           "service (deploy/portscope-record.service) to know next time"
           if not p["collectors"] else
           "they closed before the running collectors' oldest record")),
    "no_port_at_bind": lambda p: (
        "with IP_BIND_ADDRESS_NO_PORT the bind takes no port: it is chosen at connect(), per "
        "destination (see portscope timewait for ephemeral-port pressure)"),
    "closed_since": lambda p: (
        f"the {p['state']} socket on {p['local']}"
        + (f" (inode {p['inode']})" if p.get("inode") else "")
        + (", bound by " + ", ".join(map(str, p["owners"])) if p.get("owners") else "")  # type: ignore[arg-type]
        + ", held the port when the kernel refused it (read by the probe then) and has "
          "closed since"),
    "blocker_not_kept": lambda p: (
        f"the probe kept {p['kept']} of the {'' if p['complete'] else 'at least '}{p['seen']} "
        "sockets on the port at the refusal, and none of those blocks this bind: the blocker "
        "was among the others, and has closed since"),
    "rules_disagree": lambda p: (
        f"the kernel refused the port while {p['sockets']} socket(s) held it, but by "
        "portscope's rules none of them blocks this bind: the rules miss a case here "
        "(please report it, with this event's JSON)"),
    "namespace_gone": lambda p: (
        "the network namespace is gone since (its last process exited): this is what the "
        "probe read in the kernel at the refusal"),
    "blocker_gone": lambda p: (
        "nothing blocks this bind any more: the blocker closed between the call and the look"),
    "answer_changed": lambda p: (
        f"the kernel said {p['observed']} at the call; the namespace now gives {p['now']}: "
        "it changed since (an address, a sysctl, a socket)"),
    "autobind_reuse_shares": lambda p: (
        f"no port is free outright; net.ipv4.ip_autobind_reuse lets the kernel share one of "
        f"{p['ports']} with sockets that have SO_REUSEADDR too"),
}
