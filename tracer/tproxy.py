"""TPROXY rules and the policy routing they need, read from one network namespace.

A TPROXY rule (nftables ``tproxy to ...``, iptables ``-j TPROXY``) runs in
prerouting, before the kernel's own socket lookup. For a packet it matches,
the kernel (net/netfilter/nft_tproxy.c, xt_TPROXY.c, nf_tproxy_ipv{4,6}.c)
first looks for an established socket of the packet's 4-tuple, then for a
listener (TCP) or bound socket (UDP) on the rule's address (or, when the rule
gives none or 0.0.0.0, the primary address of the incoming interface) and port
(or the packet's own destination port). It assigns that socket to the packet
only if the socket has IP_TRANSPARENT; otherwise the rule does nothing for
the packet (NFT_BREAK / XT_CONTINUE) and the normal lookup runs.

The packet is delivered locally only if routing says so: for a destination the
host does not own, a fwmark rule (``ip rule add fwmark 1 lookup 100``) must send
the marked packet to a table with ``local 0.0.0.0/0 dev lo``; without it the
packet is forwarded (or dropped). :func:`policy_routing` reads those rules.

Rules are read with the tools an administrator uses: ``nft -j list ruleset``
(plus ``nft -a list ruleset`` for the text of each rule), ``iptables-save`` and
``ip6tables-save``, whichever exist, run inside the namespace. With the
iptables-nft backend an iptables rule also shows in the nft ruleset as an
``xt target TPROXY`` whose port nft cannot print; it is then taken from
iptables-save only. Nothing here raises for a missing tool, a refusal or
damaged output: each becomes one (what, why) entry of ``problems``.

Only the matches below are evaluated; a rule with any other match (ct state,
marks, sets by name, negations, source addresses...) has ``understood=False``
and :func:`matches` answers None for it. Whether the chain holding a rule is
reached from the prerouting hook (jumps, earlier verdicts) is not evaluated.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any, Callable

TIMEOUT_S = 60.0  # generous: under software emulation a tool runs ~50x slower
NFT_FAMILIES = {"ip": "ipv4", "ip6": "ipv6", "inet": None}
PROTOCOL_NUMBERS = {"6": "tcp", "17": "udp", "tcp": "tcp", "udp": "udp"}


@dataclass(frozen=True, slots=True)
class TproxyRule:
    netns: int                 # namespace inode the rule lives in
    source: str                # "nft" | "iptables" | "ip6tables"
    table: str                 # e.g. "inet filter" / "mangle"
    chain: str
    text: str                  # the rule as the tool prints it (print through tracer.text.printable)
    family: str | None         # "ipv4" | "ipv6" | None (both, inet table)
    protocol: str | None       # "tcp" | "udp" | None (any)
    dports: tuple[tuple[int, int], ...] | None   # ranges matched; None: any port
    daddrs: tuple[str, ...] | None               # prefixes matched ("10.0.0.0/8"); None: any
    iifs: tuple[str, ...] | None                 # input interfaces matched (trailing * or +: prefix); None: any
    to_addr: str | None        # tproxy target address; None: the incoming interface's primary address
    to_port: int | None        # tproxy target port; None: the packet's own port
    mark: str | None           # mark set, if any ("0x1", or "0x1/0x1" with a mask)
    understood: bool           # False: the rule has matches portscope does not evaluate

    def to_json(self) -> dict[str, object]:
        return {
            "netns": self.netns, "source": self.source, "table": self.table,
            "chain": self.chain, "text": self.text, "family": self.family,
            "protocol": self.protocol,
            "dports": [list(r) for r in self.dports] if self.dports is not None else None,
            "daddrs": list(self.daddrs) if self.daddrs is not None else None,
            "iifs": list(self.iifs) if self.iifs is not None else None,
            "to_addr": self.to_addr, "to_port": self.to_port, "mark": self.mark,
            "understood": self.understood,
        }


@dataclass
class TproxyScan:
    rules: list[TproxyRule] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (what, why)
    tools: tuple[str, ...] = ()  # which tools were asked


# ---- running the tools inside a namespace ------------------------------------


Runner = Callable[[list[str]], "tuple[int, str, str]"]


def _run(argv: list[str]) -> tuple[int, str, str]:
    try:
        done = subprocess.run(argv, capture_output=True, timeout=TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return -1, "", f"no answer within {TIMEOUT_S:.0f}s"
    except OSError as exc:
        return -1, "", exc.strerror or str(exc)
    return (done.returncode, done.stdout.decode("utf-8", "replace"),
            done.stderr.decode("utf-8", "replace"))


def _in_namespace(netns: str | int | None) -> tuple[int, Callable[[Callable[[], Any]], Any]]:
    """(inode, a function running its argument inside the namespace)."""
    if netns is None:
        return os.stat("/proc/self/ns/net").st_ino, lambda fn: fn()
    from .inventory import select_namespaces
    from .netns import open_netns
    from .nsenter import in_netns

    refs, _ = select_namespaces(str(netns))
    ref = refs[0]

    def enter(fn: Callable[[], Any]) -> Any:
        fd = open_netns(ref)
        if fd is None:
            raise OSError(f"network namespace {ref.inode} is gone")
        try:
            # A child forked from the thread that entered the namespace starts in it.
            return in_netns(fd, fn)
        finally:
            os.close(fd)

    return ref.inode, enter


def tproxy_rules(netns: str | int | None = None) -> TproxyScan:
    """Every TPROXY rule of one network namespace (None: portscope's own; else
    what tracer.inventory.select_namespaces accepts: a name, a path, an inode,
    pid:PID). A namespace that matches nothing raises UsageError (from
    select_namespaces); everything else goes to ``problems``."""
    inode, enter = _in_namespace(netns)
    scan = TproxyScan()
    tools: list[str] = []
    outputs: dict[str, tuple[int, str, str]] = {}
    commands = {
        "nft -j": ["nft", "-j", "list", "ruleset"],
        "nft -a": ["nft", "-a", "list", "ruleset"],
        "iptables-save": ["iptables-save"],
        "ip6tables-save": ["ip6tables-save"],
    }
    wanted = {key: argv for key, argv in commands.items() if shutil.which(argv[0])}
    for name in ("nft", "iptables-save", "ip6tables-save"):
        if shutil.which(name):
            tools.append(name)
        else:
            scan.problems.append((name, "not installed: its rules are not read"))

    def run_all() -> None:
        for key, argv in wanted.items():
            outputs[key] = _run(argv)

    try:
        enter(run_all)
    except OSError as exc:
        scan.problems.append((f"netns {inode}", f"cannot enter: {exc}"))
    scan.tools = tuple(tools)
    return collect(inode, outputs, scan)


def collect(inode: int, outputs: dict[str, tuple[int, str, str]],
            scan: TproxyScan | None = None) -> TproxyScan:
    """The scan from the tools' (status, stdout, stderr) by key ("nft -j",
    "nft -a", "iptables-save", "ip6tables-save"); missing keys were not run."""
    scan = scan if scan is not None else TproxyScan(tools=tuple(k for k in outputs))
    saved_ok = False
    for key, source in (("iptables-save", "iptables"), ("ip6tables-save", "ip6tables")):
        if key not in outputs:
            continue
        status, out, err = outputs[key]
        if status != 0:
            scan.problems.append((key, _why(status, err)))
            continue
        saved_ok = True
        rules, problems = parse_iptables_save(out, source, inode)
        scan.rules.extend(rules)
        scan.problems.extend(problems)
    if "nft -j" in outputs:
        status, out, err = outputs["nft -j"]
        if status != 0:
            scan.problems.append(("nft", _why(status, err)))
        else:
            texts: dict[tuple[str, str, str, int], str] = {}
            if "nft -a" in outputs and outputs["nft -a"][0] == 0:
                texts = nft_rule_texts(outputs["nft -a"][1])
            rules, problems = parse_nft_json(out, inode, texts, skip_xt=saved_ok)
            scan.rules.extend(rules)
            scan.problems.extend(problems)
    return scan


def _why(status: int, err: str) -> str:
    text = " ".join(err.split())[:300]
    return f"exit status {status}: {text}" if text else f"exit status {status}"


# ---- nft -j ------------------------------------------------------------------


class _NotUnderstood(Exception):
    pass


def parse_nft_json(text: str, inode: int, texts: dict[tuple[str, str, str, int], str] | None = None,
                   skip_xt: bool = False) -> tuple[list[TproxyRule], list[tuple[str, str]]]:
    """TPROXY rules of ``nft -j list ruleset`` output. ``texts``: each rule's
    text by (family, table, chain, handle), from :func:`nft_rule_texts`.
    ``skip_xt``: leave out iptables-nft rules (``xt target TPROXY``), read
    from iptables-save instead."""
    problems: list[tuple[str, str]] = []
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return [], [("nft", f"unparsable JSON output: {exc}")]
    items = document.get("nftables") if isinstance(document, dict) else None
    if not isinstance(items, list):
        return [], [("nft", "unparsable JSON output: no 'nftables' list")]
    rules: list[TproxyRule] = []
    broken = 0
    for item in items:
        rule = item.get("rule") if isinstance(item, dict) else None
        if not isinstance(rule, dict):
            continue
        try:
            found = _nft_rule(rule, inode, texts or {}, skip_xt)
        except (_NotUnderstood, TypeError, ValueError, KeyError, AttributeError, RecursionError):
            broken += 1
            continue
        if found is not None:
            rules.append(found)
    if broken:
        problems.append(("nft", f"{broken} rule(s) of unexpected shape in the JSON output"))
    return rules, problems


def _nft_rule(rule: dict[str, Any], inode: int, texts: dict[tuple[str, str, str, int], str],
              skip_xt: bool) -> TproxyRule | None:
    exprs = rule.get("expr")
    if not isinstance(exprs, list):
        return None
    at = next((i for i, e in enumerate(exprs) if isinstance(e, dict) and "tproxy" in e), None)
    xt_at = next((i for i, e in enumerate(exprs) if isinstance(e, dict)
                  and isinstance(e.get("xt"), dict) and e["xt"].get("name") == "TPROXY"), None)
    if at is None and xt_at is None:
        return None
    if at is None and skip_xt:
        return None  # an iptables-nft rule: iptables-save gives its target's options
    family_name = str(rule.get("family", ""))
    table, chain = str(rule.get("table", "")), str(rule.get("chain", ""))
    handle = rule.get("handle")
    key = (family_name, table, chain, handle if isinstance(handle, int) else -1)
    state = _Matches(NFT_FAMILIES.get(family_name) if family_name in NFT_FAMILIES else None)
    if family_name not in NFT_FAMILIES:
        state.understood = False  # bridge, netdev...: not a place TPROXY delivers from
    to_addr: str | None = None
    to_port: int | None = None
    end = at if at is not None else xt_at
    assert end is not None
    for expr in exprs[:end]:
        state.nft_expr(expr)
    if at is not None:
        target = exprs[at]["tproxy"]
        if not isinstance(target, dict):
            raise _NotUnderstood("tproxy")
        tfamily = target.get("family")
        if tfamily is not None:
            fam = {"ip": "ipv4", "ip6": "ipv6"}.get(str(tfamily))
            if fam is None:
                state.understood = False
            else:
                state.set_family(fam)
        addr = target.get("addr")
        if addr is not None:
            if isinstance(addr, str) and _is_address(addr):
                to_addr = None if ipaddress.ip_address(addr).is_unspecified else addr
            else:
                state.understood = False
                to_addr = _short(addr)
        port = target.get("port")
        if port is not None:
            if isinstance(port, int) and not isinstance(port, bool) and 0 <= port <= 65535:
                to_port = port or None
            else:
                state.understood = False
    else:
        state.understood = False  # xt target: nft cannot show its address and port
    for expr in exprs[end + 1:]:
        state.nft_after(expr)
    rule_text = texts.get(key) or _render(exprs)
    return state.rule(inode, "nft", f"{family_name} {table}", chain, rule_text, to_addr, to_port)


class _Matches:
    """What a rule matches, accumulated expression by expression."""

    def __init__(self, family: str | None) -> None:
        self.family = family
        self.protocol: str | None = None
        self.dports: tuple[tuple[int, int], ...] | None = None
        self.daddrs: tuple[str, ...] | None = None
        self.iifs: tuple[str, ...] | None = None
        self.mark: str | None = None
        self.understood = True

    def set_family(self, family: str) -> None:
        if self.family is not None and self.family != family:
            self.understood = False  # matches nothing; not worth modelling
        self.family = family

    def set_protocol(self, protocol: str) -> None:
        if self.protocol is not None and self.protocol != protocol:
            self.understood = False
        self.protocol = protocol

    def nft_expr(self, expr: Any) -> None:
        if not isinstance(expr, dict) or len(expr) != 1:
            self.understood = False
            return
        (kind, body), = expr.items()
        if kind == "counter":
            return
        if kind == "mangle":
            self.nft_after(expr)
            return
        if kind != "match" or not isinstance(body, dict):
            self.understood = False
            return
        op, left, right = body.get("op", "=="), body.get("left"), body.get("right")
        if not isinstance(left, dict):
            self.understood = False
            return
        if op not in ("==", "in"):  # a negation: only what it implies is kept
            payload = left.get("payload")
            if isinstance(payload, dict) and payload.get("protocol") in ("tcp", "udp"):
                self.set_protocol(payload["protocol"])
            elif isinstance(payload, dict) and payload.get("protocol") in ("ip", "ip6"):
                self.set_family("ipv4" if payload["protocol"] == "ip" else "ipv6")
            self.understood = False
            return
        try:
            self._nft_match(left, right)
        except _NotUnderstood:
            self.understood = False

    def _nft_match(self, left: dict[str, Any], right: Any) -> None:
        if "payload" in left and isinstance(left["payload"], dict):
            proto, fld = left["payload"].get("protocol"), left["payload"].get("field")
            if fld == "dport" and proto in ("tcp", "udp", "th"):
                if proto != "th":
                    self.set_protocol(proto)
                if self.dports is not None:
                    raise _NotUnderstood("two port matches")
                self.dports = _nft_ports(right)
                return
            if fld == "daddr" and proto in ("ip", "ip6"):
                self.set_family("ipv4" if proto == "ip" else "ipv6")
                if self.daddrs is not None:
                    raise _NotUnderstood("two address matches")
                self.daddrs = _nft_prefixes(right)
                return
            raise _NotUnderstood(f"{proto} {fld}")
        if "meta" in left and isinstance(left["meta"], dict):
            key = left["meta"].get("key")
            if key in ("iifname", "iif"):
                if self.iifs is not None:
                    raise _NotUnderstood("two interface matches")
                names = _nft_values(right)
                if not all(isinstance(n, str) for n in names):
                    raise _NotUnderstood("interface index")
                self.iifs = tuple(names)
                return
            if key == "l4proto":
                protos = {PROTOCOL_NUMBERS.get(str(p)) for p in _nft_values(right)}
                if None in protos:
                    raise _NotUnderstood("l4proto")
                if len(protos) == 1:
                    self.set_protocol(protos.pop())  # type: ignore[arg-type]
                return  # tcp and udp: any protocol TPROXY handles
            if key == "nfproto":
                fams = {str(v) for v in _nft_values(right)}
                if fams == {"ipv4"} or fams == {"ipv6"}:
                    self.set_family(fams.pop())
                    return
            raise _NotUnderstood(f"meta {key}")
        raise _NotUnderstood("match")

    def nft_after(self, expr: Any) -> None:
        """A statement at or after the target: only a mark set matters."""
        if not isinstance(expr, dict):
            return
        mangle = expr.get("mangle")
        if isinstance(mangle, dict):
            key = mangle.get("key")
            if isinstance(key, dict) and isinstance(key.get("meta"), dict) \
                    and key["meta"].get("key") == "mark":
                value = mangle.get("value")
                self.mark = hex(value) if isinstance(value, int) and not isinstance(value, bool) \
                    else _short(value)

    def rule(self, inode: int, source: str, table: str, chain: str, text: str,
             to_addr: str | None, to_port: int | None) -> TproxyRule:
        return TproxyRule(inode, source, table, chain, text, self.family, self.protocol,
                          self.dports, self.daddrs, self.iifs, to_addr, to_port, self.mark,
                          self.understood)


def _nft_values(right: Any) -> list[Any]:
    if isinstance(right, dict) and "set" in right:
        values = right["set"]
        if not isinstance(values, list):
            raise _NotUnderstood("set")
        return values
    if isinstance(right, list):  # some nft versions print an anonymous set as a list
        return right
    if isinstance(right, (dict, str, int)) and not isinstance(right, bool):
        if isinstance(right, str) and right.startswith("@"):
            raise _NotUnderstood("named set")
        return [right]
    raise _NotUnderstood("value")


def _nft_ports(right: Any) -> tuple[tuple[int, int], ...]:
    ranges = []
    for value in _nft_values(right):
        if isinstance(value, dict) and isinstance(value.get("range"), list) and len(value["range"]) == 2:
            low, high = value["range"]
        else:
            low = high = value
        if not all(isinstance(p, int) and not isinstance(p, bool) and 0 <= p <= 65535
                   for p in (low, high)) or low > high:
            raise _NotUnderstood("port")
        ranges.append((low, high))
    return tuple(sorted(ranges))


def _nft_prefixes(right: Any) -> tuple[str, ...]:
    prefixes = []
    for value in _nft_values(right):
        if isinstance(value, dict) and isinstance(value.get("prefix"), dict):
            addr, length = value["prefix"].get("addr"), value["prefix"].get("len")
            text = f"{addr}/{length}"
        elif isinstance(value, str):
            text = value
        else:
            raise _NotUnderstood("address")
        try:
            prefixes.append(str(ipaddress.ip_network(text, strict=False)))
        except ValueError:
            raise _NotUnderstood("address") from None
    return tuple(prefixes)


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _short(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)[:200]


def _render(exprs: list[Any]) -> str:
    """A rule's expressions as compact JSON, when nft's text is missing."""
    return " ".join(_short(e) for e in exprs)


_HANDLE = re.compile(r"^(?P<rule>.*?)\s+# handle (?P<handle>\d+)\s*$")


def nft_rule_texts(text: str) -> dict[tuple[str, str, str, int], str]:
    """Each rule's text of ``nft -a list ruleset`` by (family, table, chain, handle)."""
    texts: dict[tuple[str, str, str, int], str] = {}
    family = table = chain = ""
    for raw in text.splitlines():
        line = raw.strip()
        found = _HANDLE.match(line)
        head = found["rule"] if found else line
        words = head.split()
        if len(words) >= 3 and words[0] == "table" and head.endswith("{"):
            family, table, chain = words[1], _unquote(words[2]), ""
            continue
        if len(words) >= 2 and words[0] == "chain" and head.endswith("{"):
            chain = _unquote(words[1])
            continue
        if found and chain and not head.endswith("{"):
            texts[(family, table, chain, int(found["handle"]))] = found["rule"]
    return texts


def _unquote(word: str) -> str:
    return word[1:-1] if len(word) >= 2 and word[0] == word[-1] == '"' else word


# ---- iptables-save -----------------------------------------------------------

# Match options evaluated, with their number of arguments.
_IPT_MATCH_ARGS = {"-p": 1, "--protocol": 1, "-d": 1, "--destination": 1, "-i": 1,
                   "--in-interface": 1, "--dport": 1, "--destination-port": 1,
                   "--dports": 1, "--destination-ports": 1, "-m": 1, "--match": 1}
_IPT_MODULES = {"tcp", "udp", "multiport", "comment"}


def parse_iptables_save(text: str, source: str, inode: int) -> tuple[list[TproxyRule], list[tuple[str, str]]]:
    """TPROXY rules of ``iptables-save`` (source "iptables") or
    ``ip6tables-save`` ("ip6tables") output."""
    family = "ipv6" if source == "ip6tables" else "ipv4"
    rules: list[TproxyRule] = []
    broken = 0
    table = ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("*"):
            table = line[1:].strip()
            continue
        if not line.startswith("-A ") or "TPROXY" not in line:
            continue
        try:
            rule = _ipt_rule(line, table, family, source, inode)
        except (ValueError, IndexError, _NotUnderstood):
            broken += 1
            continue
        if rule is not None:
            rules.append(rule)
    problems = [(f"{source}-save", f"{broken} TPROXY line(s) could not be parsed")] if broken else []
    return rules, problems


def _ipt_rule(line: str, table: str, family: str, source: str, inode: int) -> TproxyRule | None:
    words = shlex.split(line)
    chain = words[1]
    rest = words[2:]
    try:
        j = next(i for i in range(len(rest) - 1) if rest[i] in ("-j", "--jump") and rest[i + 1] == "TPROXY")
    except StopIteration:
        return None
    matches, target = rest[:j], rest[j + 2:]
    state = _Matches(family)
    i = 0
    while i < len(matches):
        word = matches[i]
        if word == "!":  # a negated option: neither it nor its value is a positive match
            state.understood = False
            i += 2 + _IPT_MATCH_ARGS.get(matches[i + 1] if i + 1 < len(matches) else "", 0)
            continue
        if word not in _IPT_MATCH_ARGS or i + 1 >= len(matches):
            state.understood = False
            i += 1
            continue
        value = matches[i + 1]
        i += 2
        if word in ("-m", "--match"):
            if value not in _IPT_MODULES:
                state.understood = False
            elif value == "comment":
                j2 = i
                if j2 + 1 < len(matches) and matches[j2] == "--comment":
                    i += 2
            continue
        if word in ("-p", "--protocol"):
            proto = PROTOCOL_NUMBERS.get(value.lower())
            if value.lower() == "all":
                continue
            if proto is None:
                state.understood = False
            else:
                state.set_protocol(proto)
        elif word in ("-d", "--destination"):
            try:
                state.daddrs = tuple(str(ipaddress.ip_network(v, strict=False)) for v in value.split(","))
            except ValueError:
                state.understood = False
        elif word in ("-i", "--in-interface"):
            state.iifs = (value,)
        else:  # --dport(s)
            ranges = []
            for part in value.split(","):
                low, colon, high = part.partition(":")
                a = int(low) if low else 0
                b = (int(high) if high else 65535) if colon else a
                if not (0 <= a <= b <= 65535):
                    raise ValueError("port")
                ranges.append((a, b))
            state.dports = tuple(sorted(ranges))
    opts: dict[str, str] = {}
    for k in range(0, len(target) - 1):
        if target[k] in ("--on-port", "--on-ip", "--tproxy-mark"):
            opts[target[k]] = target[k + 1]
    if "--on-port" not in opts:
        raise _NotUnderstood("no --on-port")
    port = int(opts["--on-port"], 0)
    if not 0 <= port <= 65535:
        raise ValueError("port")
    to_addr = opts.get("--on-ip")
    if to_addr is not None:
        if ipaddress.ip_address(to_addr).is_unspecified:
            to_addr = None
    mark = opts.get("--tproxy-mark")
    if mark is not None:
        value, _, mask = mark.partition("/")
        v, m = int(value, 0), int(mask, 0) if mask else 0xFFFFFFFF
        state.mark = None if m == 0 else hex(v) if m == 0xFFFFFFFF else f"{hex(v)}/{hex(m)}"
    return state.rule(inode, source, table, chain, line, to_addr, port or None)


# ---- evaluation ----------------------------------------------------------------


def matches(rule: TproxyRule, protocol: str, family: str, daddr: str, dport: int,
            iif: str | None) -> bool | None:
    """Whether the rule applies to a packet (None: cannot tell — rule not
    understood, or ``iif`` unknown while the rule matches on it). A definite
    mismatch on protocol, family, port or address answers False even then."""
    if rule.family is not None and rule.family != family:
        return False
    if rule.protocol is not None and rule.protocol != protocol:
        return False
    if protocol not in ("tcp", "udp"):
        return False  # TPROXY handles TCP and UDP only
    if rule.dports is not None and not any(lo <= dport <= hi for lo, hi in rule.dports):
        return False
    if rule.daddrs is not None:
        try:
            addr = ipaddress.ip_address(daddr)
            nets = [ipaddress.ip_network(p, strict=False) for p in rule.daddrs]
        except ValueError:
            return None
        if not any(addr.version == n.version and addr in n for n in nets):
            return False
    if not rule.understood:
        return None
    if rule.iifs is not None:
        if iif is None:
            return None
        return any(_iface_matches(pattern, iif) for pattern in rule.iifs)
    return True


def _iface_matches(pattern: str, name: str) -> bool:
    if pattern.endswith(("*", "+")) and not pattern.endswith("\\*"):
        return name.startswith(pattern[:-1])
    return name == pattern


# ---- policy routing ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MarkRoute:
    """One ``ip rule`` selecting packets by fwmark, and whether its table
    delivers every destination locally (``local 0.0.0.0/0 dev lo``)."""

    family: str        # "ipv4" | "ipv6"
    priority: int
    fwmark: int
    fwmask: int
    table: str
    local_default: bool

    def selects(self, mark: int) -> bool:
        return (mark & self.fwmask) == self.fwmark

    def to_json(self) -> dict[str, object]:
        return {"family": self.family, "priority": self.priority, "fwmark": hex(self.fwmark),
                "fwmask": hex(self.fwmask), "table": self.table, "local_default": self.local_default}


@dataclass
class PolicyRouting:
    """The fwmark rules of one namespace (from ``ip -j rule`` and ``ip -j route``)."""

    routes: list[MarkRoute] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    read: tuple[str, ...] = ()  # families whose rules were read

    def delivers(self, mark: str | None, family: str) -> bool | None:
        """Whether a packet carrying ``mark`` (a rule's mark, "0x1" or
        "0x1/0x1") is routed to a local table by a fwmark rule: what TPROXY
        needs for a destination address the host does not own (for an
        address it owns, the main routing already delivers locally). None:
        the rules of that family could not be read or the mark is unreadable.
        The first fwmark rule selecting the mark decides (rules without
        fwmark that come first, like ``from all lookup local``, are not
        weighed)."""
        if family not in self.read:
            return None
        if mark is None:
            value = 0
        else:
            try:
                value = int(mark.partition("/")[0], 0)
            except ValueError:
                return None
        for route in sorted((r for r in self.routes if r.family == family), key=lambda r: r.priority):
            if route.selects(value):
                return route.local_default
        return False


def policy_routing(netns: str | int | None = None) -> PolicyRouting:
    """The fwmark rules of a namespace (same ``netns`` forms as tproxy_rules)."""
    _, enter = _in_namespace(netns)
    outputs: dict[str, tuple[int, str, str]] = {}
    if not shutil.which("ip"):
        return PolicyRouting(problems=[("ip", "not installed: policy routing not read")])

    def run_all() -> None:
        for fam, flag in (("ipv4", "-4"), ("ipv6", "-6")):
            outputs[f"rule {fam}"] = _run(["ip", "-j", flag, "rule", "show"])
            outputs[f"local {fam}"] = _run(["ip", "-j", flag, "route", "show", "table", "all",
                                            "type", "local"])

    try:
        enter(run_all)
    except OSError as exc:
        return PolicyRouting(problems=[("netns", f"cannot enter: {exc}")])
    return parse_policy_routing(outputs)


def parse_policy_routing(outputs: dict[str, tuple[int, str, str]]) -> PolicyRouting:
    """From ``ip -j -4|-6 rule show`` ("rule ipv4"/"rule ipv6") and ``ip -j
    -4|-6 route show table all type local`` ("local ipv4"/"local ipv6")."""
    result = PolicyRouting()
    read = []
    for family in ("ipv4", "ipv6"):
        rules = _ip_json(outputs.get(f"rule {family}"), f"ip rule ({family})", result.problems)
        local = _ip_json(outputs.get(f"local {family}"), f"ip route ({family})", result.problems)
        if rules is None or local is None:
            continue
        read.append(family)
        local_tables = set()
        for route in local:
            if isinstance(route, dict) and route.get("dst") in ("default", "0.0.0.0/0", "::/0") \
                    and route.get("type", "local") == "local":
                local_tables.add(str(route.get("table", "main")))
        for rule in rules:
            if not isinstance(rule, dict) or "fwmark" not in rule:
                continue
            try:
                mark = int(str(rule["fwmark"]), 0)
                mask = int(str(rule.get("fwmask", "0xffffffff")), 0)
                priority = int(rule.get("priority", 0))
            except (TypeError, ValueError):
                result.problems.append((f"ip rule ({family})", "a fwmark rule of unexpected shape"))
                continue
            table = str(rule.get("table", ""))
            if rule.get("action", "to_tbl") not in ("to_tbl", "lookup") and "table" not in rule:
                continue
            result.routes.append(MarkRoute(family, priority, mark, mask, table, table in local_tables))
    result.read = tuple(read)
    return result


def _ip_json(output: tuple[int, str, str] | None, what: str,
             problems: list[tuple[str, str]]) -> list[Any] | None:
    if output is None:
        problems.append((what, "not read"))
        return None
    status, out, err = output
    if status != 0:
        problems.append((what, _why(status, err)))
        return None
    try:
        value = json.loads(out) if out.strip() else []
    except ValueError as exc:
        problems.append((what, f"unparsable JSON output: {exc}"))
        return None
    if not isinstance(value, list):
        problems.append((what, "unparsable JSON output: not a list"))
        return None
    return value

