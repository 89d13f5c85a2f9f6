"""The bash and zsh completions and the man page (tracer/manual.py): each is
run by the real program (bash, zsh, groff) and checked against what the
argument parser itself says, so that a command or option the parser gains is
a failure here until the generated files carry it."""

from __future__ import annotations

import argparse
import ast
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.needs import need_tool
from tracer import arguments, cli, manual
from tracer.errors import ExitStatus

ROOT = Path(__file__).resolve().parents[2]
PARSER = cli.build_parser()
TREE = manual.walk(PARSER)


# ---- what the parser says, read directly (not through tracer.manual) -----------------------


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def visible(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.help != argparse.SUPPRESS
            and not isinstance(a, argparse._SubParsersAction)]


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in visible(parser) for flag in action.option_strings}


def action_of(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return next(a for a in parser._actions if flag in a.option_strings)


def accepted_words(action: argparse.Action) -> set[str]:
    """The words an option's value may be: its choices, or, for a type that
    accepts a fixed set of names, that set as tracer/arguments.py defines it."""
    if action.choices is not None:
        return set(action.choices)
    if action.type is arguments.errno_code:
        import errno

        return set(errno.errorcode.values())
    return set(getattr(arguments, "STATE_NAMES"))  # --state


COMMANDS = subparsers(PARSER)


# ---- bash ----------------------------------------------------------------------------------


def bash_complete(script: str, line: str, tmp_path: Path, setup: str = "") -> list[str]:
    """COMPREPLY for the command line ``line`` (completing its last word;
    a line ending in a space completes an empty word), as bash computes it
    with the script sourced."""
    bash = need_tool("bash")
    words = line.split(" ")
    path = tmp_path / ".completion.bash"  # hidden: not among the files completed
    path.write_text(script)
    program = (f"source {shlex.quote(str(path))}\n{setup}\n"
               f"COMP_WORDS=({' '.join(shlex.quote(w) for w in words)})\n"
               f"COMP_CWORD={len(words) - 1}\nCOMP_LINE={shlex.quote(line)}\nCOMP_POINT={len(line)}\n"
               f"_{words[0]}\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n")
    result = subprocess.run([bash, "--norc", "--noprofile", "-c", program], cwd=tmp_path,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and not result.stderr, result.stderr
    return [w for w in result.stdout.split("\n") if w]


@pytest.fixture(scope="module")
def bash_script() -> str:
    return manual.bash_completion(TREE)


def test_bash_completes_a_command_from_its_first_letters(bash_script, tmp_path):
    assert bash_complete(bash_script, "portscope w", tmp_path) == ["why"]
    assert set(bash_complete(bash_script, "portscope ", tmp_path)) == set(COMMANDS)
    assert set(bash_complete(bash_script, "portscope r", tmp_path)) == {
        c for c in COMMANDS if c.startswith("r")} == {"record", "report", "replay"}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_bash_completes_every_option_of_every_command(bash_script, tmp_path, command):
    expected = {f for f in option_strings(COMMANDS[command]) if f.startswith("--")}
    assert set(bash_complete(bash_script, f"portscope {command} --", tmp_path)) == expected
    assert set(bash_complete(bash_script, f"portscope {command} -", tmp_path)) == \
        option_strings(COMMANDS[command])


def test_bash_spot_checks(bash_script, tmp_path):
    trace = set(bash_complete(bash_script, "portscope trace --", tmp_path))
    assert {"--port", "--errno", "--plan", "--ring-size", "--json"} <= trace
    assert "--errors-only" not in trace, "hidden from --help, hidden from completion"
    assert set(bash_complete(bash_script, "portscope --debug why --re", tmp_path)) == {
        "--reuseaddr", "--reuseport"}
    assert set(bash_complete(bash_script, "portscope -", tmp_path)) == option_strings(PARSER)


def test_bash_completes_choices_and_named_values(bash_script, tmp_path):
    state = action_of(COMMANDS["ports"], "--state")
    expected = {w for w in accepted_words(state) if w.startswith("l")}
    assert set(bash_complete(bash_script, "portscope ports --state l", tmp_path)) == expected
    assert "listen" in expected
    # --state=l: bash splits the word at the =
    assert set(bash_complete(bash_script, "portscope ports --state = l", tmp_path)) == expected
    assert set(bash_complete(bash_script, "portscope trace --plan ", tmp_path)) == \
        set(action_of(COMMANDS["trace"], "--plan").choices)
    assert set(bash_complete(bash_script, "portscope trace --errno EADDRIN", tmp_path)) == {
        "EADDRINUSE"}
    assert bash_complete(bash_script, "portscope completion ", tmp_path) == ["bash", "zsh"]
    # A value typed by hand (a port): nothing, rather than options or commands.
    assert bash_complete(bash_script, "portscope trace --port ", tmp_path) == []


def test_bash_completes_files_where_a_file_is_wanted(bash_script, tmp_path):
    (tmp_path / "journal.db").write_text("")
    assert "journal.db" in bash_complete(bash_script, "portscope report jou", tmp_path)
    assert "journal.db" in bash_complete(bash_script, "portscope trace -o jou", tmp_path)
    assert bash_complete(bash_script, "portscope ports jou", tmp_path) == []


def test_bash_completes_netns_names_from_run_netns(bash_script, tmp_path):
    names = sorted(os.listdir(manual.NETNS_DIR)) if os.path.isdir(manual.NETNS_DIR) else []
    assert sorted(bash_complete(bash_script, "portscope ports --netns ", tmp_path)) == names
    # What the function lists goes to every --netns that takes a name.
    fake = "_portscope_netns() { printf '%s\\n' blue red; }"
    assert bash_complete(bash_script, "portscope why --netns b", tmp_path, fake) == ["blue"]
    assert bash_complete(bash_script, "portscope report --netns ", tmp_path, fake) == [], \
        "report's --netns is an inode number, not a name"


# ---- zsh -----------------------------------------------------------------------------------

# Completes LINE in an interactive zsh under zpty, the script on $fpath: the
# compadd calls of the completion system are recorded (after matching) to OUT.
ZPTY_DRIVER = r"""
zmodload zsh/zpty
dir=$1 out=$2 line=$3
zpty z zsh -f -i
zpty -w z "PS1=''; fpath=($dir \$fpath); autoload -Uz compinit; compinit -u -D"
zpty -w z "zstyle ':completion:*' completer _complete"
zpty -w z 'compadd() { if [[ ${@[1,(i)(-|--)]} == *-(O|A|D)\ * ]]; then builtin compadd "$@"; return; fi; local -a __hits; builtin compadd -A __hits "$@"; (( $#__hits )) && print -rl -- $__hits >> '"$out"'; builtin compadd "$@"; }'
zpty -w z "comppostfuncs=(_zc_done); _zc_done() { print -r -- '<<done>>' >> $out }"
zpty -w -n z "$line"$'\t'
for i in {1..200}; do
  [[ -f $out ]] && grep -q '<<done>>' $out && break
  sleep 0.05
done
zpty -d z
"""


@pytest.fixture(scope="module")
def zsh_fpath(tmp_path_factory) -> Path:
    need_tool("zsh")
    directory = tmp_path_factory.mktemp("zfunc")
    (directory / "_portscope").write_text(manual.zsh_completion(TREE))
    return directory


def zsh(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([need_tool("zsh"), *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd)


def zsh_complete(fpath: Path, line: str, tmp_path: Path) -> set[str]:
    out = tmp_path / "hits"
    out.unlink(missing_ok=True)
    driver = tmp_path / "drive.zsh"
    driver.write_text(ZPTY_DRIVER)
    result = zsh("-f", str(driver), str(fpath), str(out), line, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    hits = out.read_text().split("\n") if out.exists() else []
    assert "<<done>>" in hits, f"zsh never finished completing {line!r}: {result.stderr}"
    return {h for h in hits if h and h != "<<done>>"}


def test_zsh_accepts_the_script(zsh_fpath):
    result = zsh("-n", str(zsh_fpath / "_portscope"))
    assert result.returncode == 0 and not result.stderr, result.stderr
    assert (zsh_fpath / "_portscope").read_text().startswith("#compdef portscope\n")


def test_compinit_finds_it_on_fpath(zsh_fpath):
    result = zsh("-f", "-c", f"fpath=({zsh_fpath} $fpath); autoload -Uz compinit; compinit -u -D; "
                             "print -r -- $_comps[portscope]; whence -w _portscope")
    assert result.stdout.split("\n")[:2] == ["_portscope", "_portscope: function"], result


def test_sourcing_it_after_compinit_registers_it(zsh_fpath):
    result = zsh("-f", "-c", f"autoload -Uz compinit; compinit -u -D; source {zsh_fpath}/_portscope; "
                             "print -r -- $_comps[portscope]; whence -w _portscope_trace")
    assert result.returncode == 0 and not result.stderr, result.stderr
    assert result.stdout.split("\n")[:2] == ["_portscope", "_portscope_trace: function"]


def test_zsh_completes_commands_options_and_values(zsh_fpath, tmp_path):
    assert zsh_complete(zsh_fpath, "portscope w", tmp_path) == {"why"}
    assert zsh_complete(zsh_fpath, "portscope ", tmp_path) == set(COMMANDS)
    for command in ("ports", "trace", "why"):
        assert zsh_complete(zsh_fpath, f"portscope {command} --", tmp_path) == {
            f for f in option_strings(COMMANDS[command]) if f.startswith("--")}, command
    state = action_of(COMMANDS["ports"], "--state")
    assert zsh_complete(zsh_fpath, "portscope ports --state l", tmp_path) == {
        w for w in accepted_words(state) if w.startswith("l")}
    assert zsh_complete(zsh_fpath, "portscope completion ", tmp_path) == {"bash", "zsh"}
    # --tcp and --udp exclude each other, as the parser's group says.
    assert "--udp" not in zsh_complete(zsh_fpath, "portscope ports --tcp --", tmp_path)


# ---- the manual page -----------------------------------------------------------------------


def render(roff: str, tmp_path: Path) -> str:
    """The page as plain text (groff's ASCII device, overstrikes removed,
    wide lines), after checking that groff warns about nothing."""
    groff = need_tool("groff")
    page = tmp_path / "page.1"
    page.write_text(roff)
    check = subprocess.run([groff, "-man", "-Tutf8", "-ww", "-z", str(page)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and not check.stderr, check.stderr
    text = subprocess.run([groff, "-man", "-Tascii", "-P-c", "-rLL=200n", str(page)],
                          capture_output=True, text=True, timeout=60, check=True).stdout
    return re.sub(r".\x08", "", text)


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> str:
    return render(manual.man_page(TREE, "1.2.3"), tmp_path_factory.mktemp("man"))


def has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def test_man_reads_it_without_warnings(tmp_path):
    man = need_tool("man")
    path = tmp_path / "portscope.1"
    path.write_text(manual.man_page(TREE, "1.2.3"))
    result = subprocess.run([man, "--warnings", "-l", str(path)], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "MANPAGER": "cat", "MANWIDTH": "80"})
    assert result.returncode == 0 and not result.stderr, result.stderr
    assert "PORTSCOPE(1)" in result.stdout


def test_every_command_and_option_is_in_the_manual(page):
    sections = re.findall(r"^([A-Z][A-Z ]+)$", page, re.M)
    assert sections == ["NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "COMMANDS", "EXIT STATUS",
                        "ENVIRONMENT", "EXAMPLES", "SEE ALSO"]
    for flag in option_strings(PARSER):
        assert has_word(page, flag), flag
    for name, parser in COMMANDS.items():
        section = page.split(f"\n   portscope {name}\n", 1)
        assert len(section) == 2, f"no subsection for {name}"
        body = section[1].split("\n   portscope ", 1)[0].split("\nEXIT STATUS", 1)[0]
        for flag in option_strings(parser):
            assert has_word(body, flag), (name, flag)
        for action in visible(parser):
            if not action.option_strings:
                assert has_word(body, action.metavar or action.dest), (name, action.dest)
        for line in (parser.epilog or "").split("\n")[1:]:
            assert " ".join(line.split()) in " ".join(body.split()), (name, line)


def test_exit_statuses_and_environment(page):
    statuses = page.split("\nEXIT STATUS\n")[1].split("\nENVIRONMENT\n")[0]
    assert re.findall(r"^ {7}(\d+) ", statuses, re.M) == [str(int(s)) for s in ExitStatus]
    environment = page.split("\nENVIRONMENT\n")[1].split("\nEXAMPLES\n")[0]
    for variable in environment_variables():
        assert has_word(environment, variable)


def environment_variables() -> set[str]:
    """The variables tracer/ and tui/ read from os.environ (os.environ.get,
    os.getenv, os.environ[...], ``in os.environ``), by name or through a
    module-level constant."""
    found: set[str] = set()
    for path in [*ROOT.joinpath("tracer").rglob("*.py"), *ROOT.joinpath("tui").rglob("*.py")]:
        tree = ast.parse(path.read_text())
        constants = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
                     for t in n.targets if isinstance(t, ast.Name)
                     and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)}
        for node in ast.walk(tree):
            key = _environ_key(node)
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                found.add(key.value)
            elif isinstance(key, ast.Name) and key.id in constants:
                found.add(constants[key.id])
    return found


def _environ_key(node: ast.AST) -> ast.AST | None:
    source = ast.unparse(node.func) if isinstance(node, ast.Call) else ""
    if source in ("os.environ.get", "os.getenv", "environ.get", "getenv") and node.args:
        return node.args[0]  # type: ignore[union-attr]
    if isinstance(node, ast.Subscript) and ast.unparse(node.value) in ("os.environ", "environ"):
        return node.slice
    if isinstance(node, ast.Compare) and any(ast.unparse(c) in ("os.environ", "environ")
                                             for c in node.comparators):
        return node.left
    return None


def test_the_environment_section_lists_what_the_code_reads():
    read = environment_variables()
    assert {"PORTSCOPE_PLAN", "PORTSCOPE_ENGINE"} <= read
    assert set(manual.ENVIRONMENT) == read, (
        "describe each variable the code reads (and only those) in tracer/manual.py ENVIRONMENT")


def test_every_exit_status_has_a_meaning():
    assert set(manual.EXIT_MEANINGS) == set(ExitStatus)


@pytest.mark.parametrize("text, escaped", [
    (".leading dot", "\\&.leading dot"),
    ("'leading quote", "\\&'leading quote"),
    ("first\n.second", "first\n\\&.second"),
    ("C:\\path\\to", "C:\\epath\\eto"),
    ("--ring-size and -o", "\\-\\-ring\\-size and \\-o"),
    ("IPv6-only, time_wait", "IPv6-only, time_wait"),
    ("caf\u00e9 \u2026", "caf\\[u00E9] \\[u2026]"),
    ("in the middle. a dot", "in the middle. a dot"),
])
def test_roff_escape(text, escaped):
    assert manual.roff_escape(text) == escaped


# ---- the generator is general: a small parser of its own ------------------------------------


def toy_parser(extra: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy", description="A toy. It has parts.")
    parser.add_argument("--config", metavar="FILE", help="read FILE first")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    paint = sub.add_parser("paint", help="paint something", description="Paint it.",
                           epilog="examples:\n  toy paint --color red   a red one\n")
    paint.add_argument("--color", choices=("red", "blue"), help=".leading dot and a \\ backslash")
    paint.add_argument("--where", metavar="PLACE", help="[brackets]: colons, 'quotes' and $HOME")
    paint.add_argument("thing", metavar="THING", help="what to paint")
    if extra:
        paint.add_argument("--zeta", choices=("zig", "zag"), help="a new option")
    sub.add_parser("wash", help="wash it")
    return parser


def test_a_new_option_reaches_all_three(tmp_path):
    before, after = manual.walk(toy_parser(False)), manual.walk(toy_parser(True))
    for write in (manual.bash_completion, manual.zsh_completion):
        assert "--zeta" not in write(before) and "--zeta" in write(after)
        assert "zig" in write(after)
    assert "\\-\\-zeta" in manual.man_page(after, "1") and "zeta" not in manual.man_page(before, "1")

    script = manual.bash_completion(after)
    assert bash_complete(script, "toy paint --z", tmp_path) == ["--zeta"]
    assert bash_complete(script, "toy paint --zeta z", tmp_path) == ["zig", "zag"]
    assert set(bash_complete(script, "toy ", tmp_path)) == {"paint", "wash"}
    # --config takes a value: its value is not mistaken for the command.
    (tmp_path / "conf").write_text("")
    assert bash_complete(script, "toy --config co", tmp_path) == ["conf"]
    assert set(bash_complete(script, "toy --config conf paint --c", tmp_path)) == {"--color"}

    text = render(manual.man_page(after, "1"), tmp_path)
    assert ".leading dot and a \\ backslash" in " ".join(text.split())
    assert "[brackets]: colons, 'quotes' and $HOME" in text
    assert has_word(text, "--zeta") and has_word(text, "toy paint")
    assert "toy - a toy" in text  # NAME, from the description's first sentence


def test_a_toy_zsh_script_completes(tmp_path):
    directory = tmp_path / "zfunc"
    directory.mkdir()
    (directory / "_toy").write_text(manual.zsh_completion(manual.walk(toy_parser(True))))
    assert zsh("-n", str(directory / "_toy")).returncode == 0
    assert zsh_complete(directory, "toy paint --", tmp_path) == {"--help", "--color", "--where",
                                                                  "--zeta"}
    assert zsh_complete(directory, "toy paint --zeta ", tmp_path) == {"zig", "zag"}


# ---- the commands --------------------------------------------------------------------------


def test_the_commands_print_what_the_parser_makes(capsys):
    assert cli.main(["completion", "bash"]) == ExitStatus.OK
    assert capsys.readouterr().out == manual.bash_completion(TREE)
    assert cli.main(["completion", "zsh"]) == ExitStatus.OK
    assert capsys.readouterr().out == manual.zsh_completion(TREE)
    assert cli.main(["man"]) == ExitStatus.OK
    assert capsys.readouterr().out == manual.man_page(TREE, cli._version())


def test_an_unknown_shell_is_one_sentence(capsys):
    assert cli.main(["completion", "fish"]) == ExitStatus.USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("portscope: ") and "fish" in err


def test_the_top_level_help_teaches_how_to_install_it(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert 'eval "$(portscope completion bash)"' in out
    assert "portscope man | man -l -" in out
