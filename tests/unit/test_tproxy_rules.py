"""The parsers of tracer/tproxy.py on recorded output (tests/data/tproxy/,
captured from real namespaces with nft 1.0.6 and iptables 1.8.9 (nf_tables)
on Debian bookworm) and on damaged variants of it, and matches() and the
policy-routing answer on rules built by hand.

mixed.*: one namespace holding nft rules of an inet table, iptables and
ip6tables TPROXY rules (which iptables-nft also shows to nft as an xt target)
and fwmark rules. extra.*: rules with matches that are not evaluated (named
set, negation, source address) or that are (interface wildcards, sets of
addresses, a jump target chain, an ip6 target in an inet table). empty.*: a
namespace without rules. damaged*: hand-damaged copies of the above."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tracer import tproxy
from tracer.tproxy import (TproxyRule, collect, matches, nft_rule_texts, parse_iptables_save,
                           parse_nft_json, parse_policy_routing, tproxy_rules)

DATA = Path(__file__).resolve().parents[1] / "data" / "tproxy"
NS = 4026532174


def data(name: str) -> str:
    return (DATA / name).read_text()


def outputs(prefix: str) -> dict[str, tuple[int, str, str]]:
    found = {"nft -j": f"{prefix}.nft.json", "nft -a": f"{prefix}.nft-a.txt",
             "iptables-save": f"{prefix}.iptables-save.txt",
             "ip6tables-save": f"{prefix}.ip6tables-save.txt"}
    return {key: (0, data(name), "") for key, name in found.items() if (DATA / name).exists()}


def fields(rule: TproxyRule) -> tuple[object, ...]:
    return (rule.source, rule.table, rule.chain, rule.family, rule.protocol, rule.dports,
            rule.daddrs, rule.iifs, rule.to_addr, rule.to_port, rule.mark, rule.understood)


# ---- recorded output -------------------------------------------------------------


def test_mixed_namespace_every_rule_once() -> None:
    scan = collect(NS, outputs("mixed"))
    assert scan.problems == []
    assert [fields(r) for r in scan.rules] == [
        ("iptables", "mangle", "PREROUTING", "ipv4", "tcp", ((8080, 8080),), None, None,
         None, 9090, "0x1", True),
        ("iptables", "mangle", "PREROUTING", "ipv4", "udp", ((5000, 5010),), ("10.77.0.2/32",),
         ("tpv0",), "127.0.0.1", 9091, "0x1/0x1", True),
        ("iptables", "mangle", "PREROUTING", "ipv4", "tcp", ((80, 80), (443, 443)), None, None,
         None, 9092, None, True),
        ("ip6tables", "mangle", "PREROUTING", "ipv6", "tcp", ((443, 443),), None, None,
         "::1", 9094, "0x2", True),
        ("nft", "inet filter", "prerouting", "ipv4", "tcp", ((8080, 8080),), None, ("tpv0",),
         None, 9090, "0x1", True),
        ("nft", "inet filter", "prerouting", "ipv4", "tcp", ((8081, 8081), (8100, 8110)),
         ("10.77.0.0/24",), None, "127.0.0.1", 9091, "0x1", True),
        ("nft", "inet filter", "prerouting", None, "udp", ((5353, 5353),), None, None,
         None, 9092, None, True),
        ("nft", "inet filter", "prerouting", "ipv4", "tcp", None, None, None,
         None, 9093, None, False),  # ct state: not evaluated
        ("nft", "inet filter", "prerouting", "ipv6", "tcp", ((443, 443),), ("fd00::/64",), None,
         "fd00::1", 9094, None, True),
        ("nft", "inet filter", "prerouting", None, None, ((53, 53),), None, None,
         None, 9095, None, True),  # meta l4proto { tcp, udp } th dport 53
    ]
    assert all(r.netns == NS for r in scan.rules)
    texts = [r.text for r in scan.rules]
    assert texts[0].startswith("-A PREROUTING -p tcp -m tcp --dport 8080 -j TPROXY --on-port 9090")
    assert texts[4] == 'iifname "tpv0" tcp dport 8080 meta mark set 0x00000001 tproxy ip to :9090'
    assert texts[8] == "ip6 daddr fd00::/64 tcp dport 443 tproxy ip6 to [fd00::1]:9094"
    for rule in scan.rules:
        assert json.loads(json.dumps(rule.to_json()))["to_port"] == rule.to_port


def test_xt_rules_come_from_nft_when_iptables_save_is_missing() -> None:
    only_nft = {k: v for k, v in outputs("mixed").items() if k.startswith("nft")}
    scan = collect(NS, only_nft)
    xt = [r for r in scan.rules if r.table.endswith(" mangle")]
    assert len(xt) == 4  # three iptables rules and one ip6tables rule
    assert "xt target TPROXY" in xt[0].text
    assert all(r.source == "nft" and not r.understood and r.to_port is None for r in xt)
    assert {r.table for r in xt} == {"ip mangle", "ip6 mangle"}
    # iptables-save failing is a problem, and nft still lists its rules.
    failing = dict(only_nft, **{"iptables-save": (1, "", "iptables-save: permission denied\n")})
    scan = collect(NS, failing)
    assert scan.problems == [("iptables-save", "exit status 1: iptables-save: permission denied")]
    assert len([r for r in scan.rules if r.table.endswith(" mangle")]) == 4


def test_extra_rules_understood_or_not() -> None:
    texts = nft_rule_texts(data("extra.nft-a.txt"))
    rules, problems = parse_nft_json(data("extra.nft.json"), NS, texts)
    assert problems == []
    by_port = {r.to_port or r.to_addr: r for r in rules if r.table == "ip proxy"}
    assert not by_port[3128].understood and by_port[3128].to_addr == "10.0.0.1"  # @ports
    assert not by_port[3129].understood  # tcp dport != 22
    assert by_port[3129].protocol == "tcp"  # what the negation implies is kept
    assert not by_port[3131].understood  # ip saddr
    wild = by_port["127.0.0.1"]
    assert (wild.iifs, wild.protocol, wild.to_port, wild.understood) == (("veth*",), "udp", None, True)
    many = by_port[3130]
    assert (many.iifs, many.daddrs, many.dports, many.mark) == \
        (("eth0", "eth1"), ("192.0.2.0/24", "198.51.100.7/32"), ((1, 1024),), "0x10")
    sub = by_port[3132]
    assert (sub.table, sub.chain, sub.understood) == ("ip proxy", "sub", True)
    v6 = [r for r in rules if r.table == "inet proxy6"][0]
    assert (v6.family, v6.to_addr, v6.to_port) == ("ipv6", "::1", 3128)
    assert v6.text == "meta nfproto ipv6 tcp dport 80 tproxy ip6 to [::1]:3128"


def test_empty_namespace() -> None:
    scan = collect(NS, {"nft -j": (0, data("empty.nft.json"), ""),
                        "iptables-save": (0, data("empty.iptables-save.txt"), "")})
    assert scan.rules == [] and scan.problems == []


# ---- damaged output ----------------------------------------------------------------


def test_damaged_recordings() -> None:
    rules, problems = parse_nft_json(data("damaged-truncated.nft.json"), NS)
    assert rules == [] and problems[0][0] == "nft" and "unparsable" in problems[0][1]
    rules, problems = parse_nft_json(data("damaged-shapes.nft.json"), NS)
    assert problems == [("nft", "1 rule(s) of unexpected shape in the JSON output")]
    damaged = [r for r in rules if not r.understood]
    assert len(damaged) == len(rules) >= 8  # each damaged rule is listed, not evaluated
    assert all(matches(r, "tcp", "ipv4", "10.77.0.2", 8080, "tpv0") in (None, False) for r in rules)
    rules, problems = parse_iptables_save(data("damaged.iptables-save.txt"), "iptables", NS)
    assert problems == [("iptables-save", "7 TPROXY line(s) could not be parsed")]
    assert [(r.to_port, r.understood) for r in rules] == [(9090, True), (2, False), (5353, True)]
    assert rules[2].iifs == ("eth+",)


def _mutations(value: object, rng: random.Random) -> object:
    """``value`` with random parts replaced by other JSON values."""
    weird = [None, True, -1, 70000, 1.5, "", "@set", "x" * 300, [], {}, [1, 2], {"set": None},
             {"range": [1]}, {"prefix": {}}]
    if rng.random() < 0.08:
        return rng.choice(weird)
    if isinstance(value, dict):
        return {k: _mutations(v, rng) for k, v in value.items() if rng.random() > 0.03}
    if isinstance(value, list):
        return [_mutations(v, rng) for v in value if rng.random() > 0.03]
    return value


@pytest.mark.parametrize("name", ["mixed.nft.json", "extra.nft.json"])
def test_nft_json_never_raises(name: str) -> None:
    text = data(name)
    document = json.loads(text)
    rng = random.Random(7)
    for _ in range(400):
        rules, problems = parse_nft_json(json.dumps(_mutations(document, rng)), NS, skip_xt=rng.random() < .5)
        for rule in rules:
            matches(rule, "tcp", "ipv4", "10.77.0.2", 8080, "tpv0")
            json.dumps(rule.to_json())
    for end in range(0, len(text), 53):
        parse_nft_json(text[:end], NS)
    for garbage in ("", "null", "[]", '{"nftables": 3}', '{"nftables": [null, 1, "x"]}', "[" * 5000):
        rules, problems = parse_nft_json(garbage, NS)
        assert rules == [] and len(problems) <= 1


@pytest.mark.parametrize("name", ["mixed.iptables-save.txt", "mixed.ip6tables-save.txt",
                                  "damaged.iptables-save.txt"])
def test_iptables_save_never_raises(name: str) -> None:
    text = data(name)
    rng = random.Random(11)
    for end in range(0, len(text), 7):
        parse_iptables_save(text[:end], "iptables", NS)
    words = text.split(" ")
    for _ in range(400):
        damaged = " ".join(w if rng.random() > 0.1 else rng.choice(["!", "-j", "TPROXY", "--on-port",
                                                                        "'", "-m", "0x", ":", ""])
                           for w in words)
        for rule in parse_iptables_save(damaged, "ip6tables", NS)[0]:
            matches(rule, "udp", "ipv6", "::1", 53, None)


def test_nft_texts_of_damaged_listing() -> None:
    assert nft_rule_texts("") == {}
    assert nft_rule_texts("tcp dport 1 tproxy to :2 # handle 3") == {}  # no table or chain
    text = data("mixed.nft-a.txt")
    for end in range(0, len(text), 11):
        nft_rule_texts(text[:end])


# ---- matches() ---------------------------------------------------------------------


def rule(**kw: object) -> TproxyRule:
    base: dict[str, object] = dict(netns=1, source="nft", table="inet t", chain="c", text="",
                                   family=None, protocol=None, dports=None, daddrs=None, iifs=None,
                                   to_addr=None, to_port=9090, mark=None, understood=True)
    base.update(kw)
    return TproxyRule(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("the_rule, packet, expected", [
    (rule(), ("tcp", "ipv4", "10.0.0.1", 80, None), True),
    (rule(), ("icmp", "ipv4", "10.0.0.1", 0, None), False),
    (rule(family="ipv6"), ("tcp", "ipv4", "10.0.0.1", 80, None), False),
    (rule(protocol="udp"), ("tcp", "ipv4", "10.0.0.1", 80, None), False),
    (rule(dports=((80, 80), (100, 200))), ("tcp", "ipv4", "10.0.0.1", 150, None), True),
    (rule(dports=((80, 80), (100, 200))), ("tcp", "ipv4", "10.0.0.1", 201, None), False),
    (rule(daddrs=("10.0.0.0/8",)), ("tcp", "ipv4", "10.9.9.9", 80, None), True),
    (rule(daddrs=("10.0.0.0/8",)), ("tcp", "ipv4", "11.0.0.1", 80, None), False),
    (rule(daddrs=("10.0.0.0/8",)), ("tcp", "ipv6", "::ffff:10.0.0.1", 80, None), False),
    (rule(daddrs=("fd00::/64",)), ("udp", "ipv6", "fd00::5", 53, None), True),
    (rule(iifs=("eth0",)), ("tcp", "ipv4", "10.0.0.1", 80, "eth0"), True),
    (rule(iifs=("eth0",)), ("tcp", "ipv4", "10.0.0.1", 80, "eth01"), False),
    (rule(iifs=("eth0",)), ("tcp", "ipv4", "10.0.0.1", 80, None), None),
    (rule(iifs=("veth*",)), ("tcp", "ipv4", "10.0.0.1", 80, "veth9"), True),
    (rule(iifs=("eth+",)), ("tcp", "ipv4", "10.0.0.1", 80, "eth3"), True),
    (rule(iifs=("eth0",), dports=((1, 2),)), ("tcp", "ipv4", "10.0.0.1", 80, None), False),
    (rule(understood=False), ("tcp", "ipv4", "10.0.0.1", 80, "eth0"), None),
    (rule(understood=False, dports=((1, 2),)), ("tcp", "ipv4", "10.0.0.1", 80, "eth0"), False),
    (rule(daddrs=("10.0.0.0/8",)), ("tcp", "ipv4", "not-an-address", 80, None), None),
])
def test_matches(the_rule: TproxyRule, packet: tuple, expected: bool | None) -> None:
    assert matches(the_rule, *packet) is expected


# ---- policy routing ----------------------------------------------------------------


def test_policy_routing_recorded() -> None:
    routing = parse_policy_routing({
        "rule ipv4": (0, data("mixed.rule4.json"), ""), "rule ipv6": (0, data("mixed.rule6.json"), ""),
        "local ipv4": (0, data("mixed.local4.json"), ""), "local ipv6": (0, data("mixed.local6.json"), "")})
    assert routing.problems == [] and routing.read == ("ipv4", "ipv6")
    assert routing.delivers("0x1", "ipv4") is True  # fwmark 1 lookup 100: local default
    assert routing.delivers("0x2", "ipv4") is False  # fwmark 0x2/0x3 lookup 101: no local route
    assert routing.delivers("0x6", "ipv4") is False  # selected by 0x2/0x3 first
    assert routing.delivers(None, "ipv4") is False
    assert routing.delivers("0x2", "ipv6") is True
    assert routing.delivers("0x1", "ipv6") is False
    assert routing.delivers("0xzz", "ipv4") is None
    assert routing.routes[0].to_json()["table"] == "101"


def test_policy_routing_damaged() -> None:
    routing = parse_policy_routing({
        "rule ipv4": (0, '[{"priority": "x", "fwmark": "0x1", "table": "100"}, 3, {"fwmark": null}]', ""),
        "local ipv4": (0, "{", ""),
        "rule ipv6": (2, "", "RTNETLINK answers: Operation not permitted"),
        "local ipv6": (0, "[]", "")})
    assert routing.read == () and routing.routes == []
    assert routing.delivers("0x1", "ipv4") is None
    whats = [what for what, _ in routing.problems]
    assert "ip route (ipv4)" in whats and "ip rule (ipv6)" in whats
    routing = parse_policy_routing({"rule ipv4": (0, '[{"priority": "x", "fwmark": "0x1"}]', ""),
                                    "local ipv4": (0, "", "")})
    assert routing.read == ("ipv4",) and routing.problems[0][0] == "ip rule (ipv4)"


# ---- no tools ----------------------------------------------------------------------


def test_no_tools_is_a_problem_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tproxy.shutil, "which", lambda name: None)
    scan = tproxy_rules()
    assert scan.rules == [] and scan.tools == ()
    assert [what for what, _ in scan.problems] == ["nft", "iptables-save", "ip6tables-save"]
    assert tproxy.policy_routing().problems[0][0] == "ip"


def test_a_tool_that_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tproxy.shutil, "which", lambda name: "/nonexistent/" + name)
    monkeypatch.setattr(tproxy, "_run", lambda argv: (-1, "", "No such file or directory"))
    scan = tproxy_rules()
    assert scan.rules == [] and scan.tools == ("nft", "iptables-save", "ip6tables-save")
    assert ("nft", "exit status -1: No such file or directory") in scan.problems
