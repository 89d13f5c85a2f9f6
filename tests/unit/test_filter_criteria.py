"""The ss-like filters (tracer/filters.py) and their options: each criterion
on made-up sockets, owners, events and groups; the values the command line
accepts, and the ones it refuses in one escaped sentence with status 2."""

from __future__ import annotations

import ipaddress
from types import SimpleNamespace as NS

import pytest

from tests.unit.test_cli import one_sentence, run
from tracer import arguments
from tracer.errors import ExitStatus, UsageError
from tracer.filters import Filter
from tracer.records import Owner


def sock(local="127.0.0.1", lport=80, remote="0.0.0.0", rport=0, state="LISTEN", uid=0,
         owners=(), netns=1, protocol="tcp", timer=None):
    return NS(diag=NS(netns=netns, local_addr=local, local_port=lport, remote_addr=remote,
                      remote_port=rport, state=state, uid=uid, timer=timer, protocol=protocol),
              owners=tuple(owners))


def net(text):
    return arguments.address_prefix(text)


NGINX = Owner(pid=812, comm="nginx", uid=33, unit="nginx.service")
SSHD = Owner(pid=90, comm="sshd", uid=0, unit="ssh.service")


# ---- the criteria -------------------------------------------------------------------


def test_no_criterion_matches_everything():
    assert Filter().matches_socket(sock()) and not Filter().active


def test_ports_addresses_and_prefixes():
    est = sock("10.1.2.3", 40000, "192.0.2.7", 5432, "ESTABLISHED")
    assert Filter(sports=frozenset({40000})).matches_socket(est)
    assert not Filter(sports=frozenset({80})).matches_socket(est)
    assert Filter(dports=frozenset({5432, 1})).matches_socket(est), "a repeated option ORs"
    assert Filter(srcs=(net("10.0.0.0/8"),)).matches_socket(est)
    assert not Filter(srcs=(net("11.0.0.0/8"),)).matches_socket(est)
    assert Filter(dsts=(net("192.0.2.0/24"),)).matches_socket(est)
    assert not Filter(dsts=(net("::/0"),)).matches_socket(est), "no IPv6 prefix holds an IPv4 address"
    assert not Filter(sports=frozenset({40000}), dports=frozenset({1})).matches_socket(est), \
        "different options AND"


def test_a_socket_without_a_remote_end_never_matches_dport_or_dst():
    listener = sock("0.0.0.0", 80)
    assert not Filter(dports=frozenset({80})).matches_socket(listener)
    assert not Filter(dsts=(net("0.0.0.0/0"),)).matches_socket(listener)


def test_wildcards_match_literally():
    listener = sock("0.0.0.0", 80)
    assert Filter(srcs=(net("0.0.0.0"),)).matches_socket(listener)
    assert not Filter(srcs=(net("127.0.0.1"),)).matches_socket(listener)


def test_ipv4_mapped_addresses_match_their_ipv4_form():
    mapped = sock("::ffff:127.0.0.1", 8080, "::ffff:10.0.0.9", 33000, "ESTABLISHED")
    assert Filter(srcs=(net("127.0.0.0/8"),)).matches_socket(mapped)
    assert Filter(dsts=(net("10.0.0.9"),)).matches_socket(mapped)
    plain = sock("127.0.0.1", 8080)
    assert Filter(srcs=(net("::ffff:127.0.0.1"),)).matches_socket(plain)
    assert net("::ffff:10.0.0.0/104") == ipaddress.ip_network("10.0.0.0/8")
    assert Filter(srcs=(net("[::1]"),)).matches_socket(sock("::1", 80))


def test_process_criteria_need_one_holder_matching_all_of_them():
    shared = sock(owners=(NGINX, SSHD))
    assert Filter(pids=frozenset({812})).matches_socket(shared)
    assert Filter(comms=frozenset({"sshd"})).matches_socket(shared)
    assert Filter(pids=frozenset({812}), comms=frozenset({"nginx"})).matches_socket(shared)
    assert not Filter(pids=frozenset({812}), comms=frozenset({"sshd"})).matches_socket(shared)
    assert Filter(units=frozenset({"nginx"})).matches_socket(shared), "nginx is nginx.service"
    assert Filter(units=frozenset({"ssh.service"})).matches_socket(shared)
    assert not Filter(units=frozenset({"ssh.socket"})).matches_socket(shared)
    assert not Filter(pids=frozenset({1})).matches_socket(sock()), "no owner, no pid"


def test_uid_is_the_sockets_or_its_holders_but_never_a_time_waits_zero():
    assert Filter(uids=frozenset({1000})).matches_socket(sock(uid=1000))
    assert Filter(uids=frozenset({33})).matches_socket(sock(uid=0, owners=(NGINX,)))
    tw = sock(state="TIME_WAIT", uid=0, rport=5, remote="127.0.0.1")
    assert not Filter(uids=frozenset({0})).matches_socket(tw)
    fin = sock(state="FIN_WAIT2", timer="timewait", uid=0, rport=5, remote="127.0.0.1")
    assert not Filter(uids=frozenset({0})).matches_socket(fin)


def test_a_socket_no_process_holds_matches_the_process_that_closed_it():
    tw = sock(state="TIME_WAIT", rport=5, remote="127.0.0.1")
    closer = NS(pid=7, comm="curl", uid=1000, unit=None)
    assert Filter(comms=frozenset({"curl"})).matches_socket(tw, closer)
    assert Filter(uids=frozenset({1000})).matches_socket(tw, closer)
    assert not Filter(comms=frozenset({"curl"})).matches_socket(tw)


def test_netns_by_inode_once_resolved():
    f = Filter(netns=("x",), inodes=frozenset({5}))
    assert f.matches_socket(sock(netns=5)) and not f.matches_socket(sock(netns=6))
    assert Filter(netns=("x", "y")).namespace() is None and Filter(netns=("x",)).namespace() == "x"


def test_local_ports_of_positional_ports_and_sport():
    assert Filter().local_ports([]) is None
    assert Filter(sports=frozenset({2, 1})).local_ports([]) == [1, 2]
    assert Filter(sports=frozenset({1, 2})).local_ports([2, 3]) == [2]
    with pytest.raises(UsageError, match="can never both match"):
        Filter(sports=frozenset({1})).local_ports([2])


def event(call="bind", addr="0.0.0.0", port=80, bound_addr="0.0.0.0", bound_port=0, **kw):
    base = dict(call=call, addr=addr, port=port, bound_addr=bound_addr, bound_port=bound_port,
                netns=1, pid=10, comm="srv", uid=0, sock_uid=0, cgroup_id=0)
    return NS(**(base | kw))


def test_events_local_and_remote_ends():
    bind = event("bind", "10.0.0.5", 8080)
    connect = event("connect", "192.0.2.1", 443, "10.0.0.5", 41000)
    assert Filter(sports=frozenset({8080})).matches_event(bind)
    assert Filter(sports=frozenset({41000})).matches_event(connect)
    assert not Filter(sports=frozenset({443})).matches_event(connect)
    assert Filter(dports=frozenset({443})).matches_event(connect)
    assert not Filter(dports=frozenset({8080})).matches_event(bind), "a bind has no remote end"
    assert Filter(srcs=(net("10.0.0.0/8"),)).matches_event(bind)
    assert Filter(dsts=(net("192.0.2.0/24"),)).matches_event(connect)
    assert not Filter(dsts=(net("10.0.0.0/8"),)).matches_event(connect)
    assert Filter(comms=frozenset({"srv"}), pids=frozenset({10})).matches_event(bind)
    assert not Filter(netns=("n",), inodes=frozenset({2})).matches_event(bind)
    assert Filter(units=frozenset({"a.service"})).matches_event(bind, lambda e: "a.service")
    assert not Filter(units=frozenset({"a.service"})).matches_event(bind, lambda e: None)


def test_groups_match_by_address_and_any_members_holder():
    member = NS(owners=(NGINX,))
    group = NS(netns=1, addr="0.0.0.0", port=80, members=[member, NS(owners=())])
    assert Filter(comms=frozenset({"nginx"})).matches_group(group)
    assert not Filter(comms=frozenset({"sshd"})).matches_group(group)
    assert Filter(sports=frozenset({80})).matches_group(group)
    assert not Filter(sports=frozenset({81})).matches_group(group)


# ---- the values of the options ------------------------------------------------------


@pytest.mark.parametrize("name,states", [
    ("estab", ("ESTABLISHED",)), ("ESTABLISHED", ("ESTABLISHED",)), ("Time-Wait", ("TIME_WAIT",)),
    ("time_wait", ("TIME_WAIT",)), ("listening", ("LISTEN",)), ("unconn", ("CLOSE",)),
    ("close", ("CLOSE",)), ("syn-sent", ("SYN_SENT",)), ("fin-wait-1", ("FIN_WAIT1",)),
    ("bucket", ("SYN_RECV", "TIME_WAIT"))])
def test_state_names_as_the_kernel_and_ss_write_them(name, states):
    assert arguments.state_names(name) == states


def test_ss_state_groups_as_ss_defines_them():
    every = set(arguments.KERNEL_STATES)
    connected = set(arguments.state_names("connected"))
    assert connected == every - {"LISTEN", "CLOSE"}
    assert set(arguments.state_names("synchronized")) == connected - {"SYN_SENT"}
    assert set(arguments.state_names("big")) == every - {"SYN_RECV", "TIME_WAIT"}
    assert set(arguments.state_names("all")) == every


def test_uids_by_number_or_name():
    assert arguments.uid_value("0") == 0 == arguments.uid_value("root")
    assert arguments.uid_value("4294967294") == 4294967294


@pytest.mark.parametrize("argv,words", [
    (("ports", "--src", "10.0.0.0/33"), "invalid address '10.0.0.0/33'"),
    (("ports", "--dst", "10.0.0.0/8/8"), "invalid address"),
    (("ports", "--src", " ::1"), "invalid address"),
    (("ports", "--uid", "4294967295"), "invalid uid '4294967295'"),
    (("ports", "--uid", "-1"), "invalid uid '-1'"),
    (("ports", "--uid", "no-such-user-xyz"), "invalid uid"),
    (("timewait", "--sport", "0"), "invalid port '0'"),
    (("groups", "--pid", "0"), "invalid pid '0'"),
    (("why", "80", "--comm", "x" * 16), "invalid command name"),
    (("trace", "--unit", "a/b.service"), "invalid unit"),
    (("ports", "--state", "estabished"), "unknown state 'estabished'"),
])
def test_bad_filter_values_are_one_sentence(capsys, argv, words):
    code, _, err = run(capsys, *argv)
    assert code == ExitStatus.USAGE
    assert words in one_sentence(err)
    assert f"(see 'portscope {argv[0]} --help')" in err


@pytest.mark.parametrize("option", ["--src", "--dst", "--uid", "--unit", "--state", "--netns"])
@pytest.mark.parametrize("text", ["\x1b]2;PWND\x07", "a\x00b", "x\u202eevil", "\x9b31m"])
def test_hostile_filter_text_is_escaped(capsys, option, text):
    code, _, err = run(capsys, "ports", option, text)
    assert code == ExitStatus.USAGE
    line = one_sentence(err)
    assert not any(c in line for c in "\x1b\x00\x07\u202e\x9b"), line


@pytest.mark.parametrize("argv,words", [
    (("ports", "--state", "listen", "--dport", "80"), "a listener has no remote end"),
    (("groups", "--dst", "::1"), "can never match a reuseport group"),
    (("ports", "80", "--sport", "81"), "can never both match"),
    (("why", "80", "--sport", "81"), "every blocker of a bind to port 80 holds port 80"),
    (("why", "80", "--netns", "1", "--netns", "2"), "one network namespace"),
])
def test_combinations_that_can_never_match_are_refused(capsys, argv, words):
    code, _, err = run(capsys, *argv)
    assert code == ExitStatus.USAGE and words in one_sentence(err)


@pytest.mark.parametrize("command", ["ports", "why", "timewait", "groups", "trace"])
def test_every_listing_command_has_every_filter_and_an_example(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    for option in ("--sport", "--dport", "--src", "--dst", "--pid", "--comm", "--uid",
                   "--unit", "--netns"):
        assert option in out, option
    examples = out[out.index("examples:"):]
    assert any(o in examples for o in ("--sport", "--dport", "--src", "--dst", "--comm",
                                       "--unit", "--netns", "--uid", "--pid")), examples


def test_ports_help_lists_ss_state_names_and_unconn(capsys):
    _, out, _ = run(capsys, "ports", "--help")
    flat = " ".join(out.split())
    for name in ("estab", "time-wait", "listening", "unconn", "connected", "synchronized",
                 "bucket", "big"):
        assert name in flat
    assert "UNCONN" in flat and "CLOSE" in flat
