"""The command line's argument handling and error reporting, in-process."""

import pytest

from tests.needs import missing
from tracer import arguments, cli
from tracer.errors import ExitStatus


def run(capsys, *argv):
    """main() as the console script runs it: its status, stdout and stderr
    (--help still exits through argparse, with status 0)."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_sentence(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("portscope: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("port", ["0", "65536", "-1", "no-such-service", "80x", "٨٠", " 80", "8_0",
                                  ":0", "::80", ":", "x" * 65])
def test_bad_port_is_one_sentence_and_usage_status(capsys, port):
    code, _, err = run(capsys, "trace", "--port", port)
    assert code == ExitStatus.USAGE
    assert f"invalid port {port!r}" in one_sentence(err)
    assert "(see 'portscope trace --help')" in err


def test_unknown_errno_name(capsys):
    code, _, err = run(capsys, "trace", "--errno", "EWHATEVER")
    assert code == ExitStatus.USAGE and "unknown errno 'EWHATEVER'" in one_sentence(err)


@pytest.mark.parametrize("size,expected", [("8M", 8 << 20), ("512k", 512 << 10), ("4096", 4096)])
def test_byte_sizes(size, expected):
    assert arguments.byte_size(size) == expected


def test_errno_names_and_numbers():
    assert arguments.errno_code("EADDRINUSE") == 98 == arguments.errno_code("98")
    assert arguments.errno_code("eaddrnotavail") == 99


def test_help_teaches(capsys):
    code, out, _ = run(capsys, "trace", "--help")
    assert code == 0
    for option in ("--port", "--pid", "--comm", "--errno", "--all", "--json",
                   "--plan", "examples:"):
        assert option in out
    assert "--errors-only" not in out, "it changes nothing: not taught"


def test_no_command_prints_help_and_usage_status(capsys):
    assert cli.main([]) == ExitStatus.USAGE
    assert "trace" in capsys.readouterr().out


@pytest.mark.parametrize("port", ["h\x1b[31m", "http\x00", "ht tp"])
def test_a_hostile_service_name_is_refused_without_reaching_the_terminal(capsys, port):
    code, _, err = run(capsys, "ports", port)
    assert code == ExitStatus.USAGE
    assert "invalid port" in one_sentence(err)
    assert "\x1b" not in err and "\x00" not in err


def test_a_port_as_ss_writes_it_or_by_its_service_name():
    """``:8080`` as ss prints it, and a name of /etc/services, as ss and
    netstat accept them; the port is the one the system's own lookup gives."""
    import os
    import socket

    assert arguments.port_number(":8080") == arguments.port_number("8080") == 8080
    if not os.path.exists("/etc/services"):
        missing("no /etc/services (package netbase) on this machine")
    assert arguments.port_number("http") == socket.getservbyname("http", "tcp") == 80
    assert arguments.port_number(":https") == socket.getservbyname("https", "tcp")
    # A name only UDP has (syslog is 514/udp, and 514/tcp is "shell").
    assert arguments.port_number("syslog") == socket.getservbyname("syslog", "udp")


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0
    assert out.startswith("portscope ") and out.split()[1][0].isdigit()


def test_errors_only_is_the_default():
    parser = cli.build_parser()
    assert parser.parse_args(["trace"]).all is False
    assert parser.parse_args(["trace", "--all"]).all is True
    assert parser.parse_args(["trace", "--errors-only"]).all is False
