"""The manual page and the bash and zsh completions, written from the parser.

``portscope --help`` is built from the argparse parser (tracer/cli.py and
one module per command in tracer/commands/); so are these three files, so
that a new command, option or choice reaches the completion and the man
page without anyone listing it again. :func:`walk` reads the parser once
into plain data (:class:`Command`, :class:`Option`, :class:`Positional`);
:func:`bash_completion`, :func:`zsh_completion` and :func:`man_page` only
format that data. The completion scripts hold everything they complete:
pressing Tab never runs portscope (it must answer at once, and portscope
may not even be allowed to run as that user).

What a value completes to is read from the option itself: its ``choices``,
or the words its type accepts (``--state``'s names, ``--errno``'s);
a network namespace name (from /run/netns, read at completion time) for an
option whose type is :func:`tracer.arguments.netns_spec`; a file name for
``metavar="FILE"`` or an ``argparse.FileType``; nothing otherwise (a port or
a pid is typed, not guessed). Options hidden from ``--help``
(``argparse.SUPPRESS``) stay hidden here too.

What the parser does not hold is written here once, next to what uses it:
the meaning of each exit status (its number comes from
:class:`tracer.errors.ExitStatus`) and the environment variables
(tests/unit/test_manual.py checks that the list matches the code's).
"""

from __future__ import annotations

import argparse
import re
import textwrap
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from .arguments import netns_spec
from .errors import ExitStatus

# What a value completes to (Option.values, Positional.values).
CHOICES, NETNS, FILES, TYPED = "choices", "netns", "files", "typed"

NETNS_DIR = "/run/netns"  # where `ip netns add` names namespaces


@dataclass(frozen=True)
class Option:
    """One option of one command, as the completion and the manual need it."""

    flags: tuple[str, ...]  # "-o", "--output"
    help: str
    metavar: str | None  # None: a flag, it takes no value
    values: str = TYPED  # CHOICES, NETNS, FILES or TYPED
    choices: tuple[str, ...] = ()
    repeatable: bool = False  # action="append"/"count": may be given again
    excludes: tuple[str, ...] = ()  # the flags of its mutually exclusive partners
    group: str = ""  # its argument group's title ("filters", "probes"), if not the default


@dataclass(frozen=True)
class Positional:
    """One positional argument (PORT, FILE, the shell of `completion`)."""

    metavar: str
    help: str
    nargs: str | int | None
    values: str = TYPED
    choices: tuple[str, ...] = ()

    @property
    def many(self) -> bool:
        return self.nargs in ("*", "+", argparse.REMAINDER)

    @property
    def optional(self) -> bool:
        return self.nargs in ("?", "*")


@dataclass(frozen=True)
class Command:
    """A parser: portscope itself, or one of its commands."""

    name: str  # "portscope", "trace"
    prog: str  # "portscope", "portscope trace"
    summary: str  # the line in the parent's command list
    description: str
    usage: str  # one line, without "usage: "
    epilog: str
    options: tuple[Option, ...]
    positionals: tuple[Positional, ...]
    commands: tuple[Command, ...] = field(default=())

    def flags(self) -> list[str]:
        return [flag for option in self.options for flag in option.flags]


# ---- reading the parser --------------------------------------------------------------------


def walk(parser: argparse.ArgumentParser, name: str | None = None, summary: str = "") -> Command:
    """The parser as data: its options, positionals and commands (recursively)."""
    formatter = parser._get_formatter()
    options: list[Option] = []
    positionals: list[Positional] = []
    commands: list[Command] = []
    titles = {id(a): g.title or "" for g in parser._action_groups for a in g._group_actions}
    default_titles = {"options", "optional arguments", "positional arguments"}
    for action in parser._actions:
        if action.help == argparse.SUPPRESS:
            continue
        if isinstance(action, argparse._SubParsersAction):
            commands.extend(_commands(action))
            continue
        text = _help(formatter, action)
        if action.option_strings:
            title = titles.get(id(action), "")
            options.append(Option(
                flags=tuple(action.option_strings), help=text,
                metavar=None if action.nargs == 0 else _metavar(action),
                values=_values(action), choices=_choices(action),
                repeatable=isinstance(action, (argparse._AppendAction, argparse._CountAction)),
                excludes=_partners(parser, action),
                group="" if title in default_titles else title))
        else:
            positionals.append(Positional(metavar=_metavar(action), help=text, nargs=action.nargs,
                                          values=_values(action), choices=_choices(action)))
    return Command(
        name=name or parser.prog, prog=parser.prog, summary=summary,
        description=parser.description or "", usage=_usage(parser), epilog=parser.epilog or "",
        options=tuple(options), positionals=tuple(positionals), commands=tuple(commands))


def _commands(action: argparse._SubParsersAction) -> Iterator[Command]:
    summaries = {a.dest: a.help or "" for a in action._choices_actions}
    seen: set[int] = set()
    for name, sub in action.choices.items():
        if id(sub) in seen:  # an alias: documented under its first name
            continue
        seen.add(id(sub))
        yield walk(sub, name, summaries.get(name, ""))


def _help(formatter: argparse.HelpFormatter, action: argparse.Action) -> str:
    """The help text with its %(default)s expanded, as --help shows it."""
    if not action.help:
        return ""
    return " ".join(formatter._expand_help(action).split())


def _metavar(action: argparse.Action) -> str:
    if isinstance(action.metavar, str):
        return action.metavar
    if action.choices is not None:  # as --help shows it: {libbpf,bcc}
        return "{" + ",".join(map(str, action.choices)) + "}"
    return action.dest.upper() if action.option_strings else action.dest


def _choices(action: argparse.Action) -> tuple[str, ...]:
    if action.choices is not None:
        return tuple(str(c) for c in action.choices)
    return _type_words(action.type)


def _type_words(kind: object) -> tuple[str, ...]:
    """The words a value type accepts, when it accepts a fixed set but not as
    argparse ``choices`` (which would refuse other cases and spellings): the
    type's own ``completions`` attribute, else its table in tracer/arguments.py."""
    words = getattr(kind, "completions", None)
    if words is None:
        words = _argument_words().get(kind)
    return tuple(words or ())


def _argument_words() -> dict[object, Iterable[str]]:
    import errno

    from . import arguments

    table: dict[object, Iterable[str]] = {arguments.errno_code: sorted(errno.errorcode.values())}
    if hasattr(arguments, "state_names"):  # --state: the kernel's names and ss's
        table[arguments.state_names] = getattr(arguments, "STATE_NAMES")
    return table


def _values(action: argparse.Action) -> str:
    """What the value of this option (or this positional) completes to."""
    if action.nargs == 0:
        return TYPED
    if _choices(action):
        return CHOICES
    if action.type is netns_spec:
        return NETNS
    if isinstance(action.type, argparse.FileType) or action.metavar == "FILE":
        return FILES
    return TYPED


def _partners(parser: argparse.ArgumentParser, action: argparse.Action) -> tuple[str, ...]:
    """The flags that cannot be given with this one (its mutually exclusive groups)."""
    partners: list[str] = []
    for group in parser._mutually_exclusive_groups:
        if action in group._group_actions:
            partners += [flag for other in group._group_actions if other is not action
                         and other.help != argparse.SUPPRESS for flag in other.option_strings]
    return tuple(partners)


def _usage(parser: argparse.ArgumentParser) -> str:
    """The usage line as --help writes it, on one line (whatever the terminal's width)."""
    formatter = argparse.HelpFormatter(parser.prog, width=100000)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups, prefix="")
    return " ".join(formatter.format_help().split())


def _ident(name: str) -> str:
    """A shell function name for a program or command name."""
    return "_" + re.sub(r"\W", "_", name)


# ---- bash ----------------------------------------------------------------------------------

_SAFE_WORD = re.compile(r"[A-Za-z0-9_.,:+/@%=-]+\Z")


def _words(words: Iterable[str]) -> str:
    """Words for ``compgen -W '...'`` (which expands what it is given): only
    words that need no quoting; anything else cannot be offered safely."""
    return " ".join(w for w in words if _SAFE_WORD.match(w))


def _bash_value_arm(key: str, option: Option) -> str:
    """The case arm completing the value of one option of one command
    (``key``: the command's name, empty for the program's own options)."""
    pattern = "|".join(f'"{key} {flag}"' for flag in option.flags)
    if option.values == CHOICES:
        body = f"COMPREPLY=($(compgen -W '{_words(option.choices)}' -- \"$cur\"))"
    elif option.values == NETNS:
        body = 'COMPREPLY=($(compgen -W "$(_portscope_netns)" -- "$cur"))'
    elif option.values == FILES:
        body = 'compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -f -- "$cur"))'
    else:
        body = "COMPREPLY=()"  # typed by hand: offer nothing rather than options
    return f"        {pattern}) {body}; return 0 ;;"


def _bash_scope_arm(command: Command, key: str) -> str:
    """The case arm giving one command's options, and what its other words complete to."""
    positional = "files" if any(p.values == FILES for p in command.positionals) else ""
    choices = [c for p in command.positionals if p.values == CHOICES for c in p.choices]
    words = _words([c.name for c in command.commands] + choices)
    return (f"        {key}) options='{_words(command.flags())}'; words='{words}'; "
            f"positional='{positional}' ;;")


def bash_completion(root: Command) -> str:
    """A bash completion script: ``complete -F _portscope portscope``. It
    needs nothing but bash (not the bash-completion package's helpers)."""
    name = root.name
    top_valued = [f for o in root.options if o.metavar for f in o.flags]
    skip = f"            {'|'.join(top_valued)}) ((i++)) ;;\n" if top_valued else ""
    scopes = [_bash_scope_arm(root, "''")] + [_bash_scope_arm(c, c.name) for c in root.commands]
    values = [_bash_value_arm(key, o) for key, c in [("", root), *((c.name, c) for c in root.commands)]
              for o in c.options if o.metavar]
    func = _ident(name)
    return f"""\
# bash completion for {name}, written by `{name} completion bash` from its
# argument parser: regenerate it rather than edit it.
{func}_netns() {{
    local f
    for f in {NETNS_DIR}/*; do [[ -e $f ]] && printf '%s\\n' "${{f##*/}}"; done
}}

{func}() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} prev='' command='' i options words positional
    ((COMP_CWORD > 0)) && prev=${{COMP_WORDS[COMP_CWORD-1]}}
    # --opt=value: bash splits it at the = (COMP_WORDBREAKS)
    if [[ $cur == = ]]; then
        cur=''
    elif [[ $prev == = ]] && ((COMP_CWORD > 1)); then
        prev=${{COMP_WORDS[COMP_CWORD-2]}}
    fi
    # The command: the first word that is neither an option nor an option's value.
    for ((i = 1; i < COMP_CWORD; i++)); do
        case ${{COMP_WORDS[i]}} in
{skip}            -*) ;;
            *) command=${{COMP_WORDS[i]}}; break ;;
        esac
    done
    case "$command $prev" in
{chr(10).join(values)}
    esac
    case $command in
{chr(10).join(scopes)}
        *) return 0 ;;
    esac
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$options" -- "$cur"))
    elif [[ -n $words ]]; then
        COMPREPLY=($(compgen -W "$words" -- "$cur"))
    elif [[ -n $positional ]]; then
        compopt -o filenames 2>/dev/null
        COMPREPLY=($(compgen -f -- "$cur"))
    elif [[ -z $cur ]]; then
        COMPREPLY=($(compgen -W "$options" -- "$cur"))
    fi
    return 0
}}
complete -F {func} {name}
"""


# ---- zsh -----------------------------------------------------------------------------------


def _zsh_quote(text: str) -> str:
    """Single-quoted for zsh."""
    return "'" + text.replace("'", "'\\''") + "'"


def _zsh_help(text: str) -> str:
    """An _arguments explanation (inside [...]): brackets and colons escaped."""
    text = " ".join(text.split())
    for char in "\\[]:$`":
        text = text.replace(char, "\\" + char)
    return text


def _zsh_value(text: str) -> str:
    """A word of an _arguments action list ``(a b c)``."""
    return re.sub(r"([\\\[\]:$`()\s'\"])", r"\\\1", text)


def _zsh_action(values: str, choices: tuple[str, ...], metavar: str, func: str) -> str:
    """What the value completes to: its choices, the namespace names, files,
    or only its name (a message: typed by hand)."""
    label = _zsh_help(metavar)
    if values == CHOICES:
        return f"{label}:({' '.join(_zsh_value(c) for c in choices)})"
    if values == NETNS:
        return f"{label}:{func}_netns"
    if values == FILES:
        return f"{label}:_files"
    return f"{label}: "


def _zsh_option(option: Option, func: str) -> str:
    """One _arguments spec (a word of the generated script) for one option."""
    excludes = () if option.repeatable else option.flags
    excludes = (*excludes, *option.excludes)
    prefix = "*" if option.repeatable else ""
    if option.metavar is None:
        forms = list(option.flags)
        tail = f"[{_zsh_help(option.help)}]"
    else:
        # "-o+": the value may follow in the same word; "--x=": after an = or as the next word.
        forms = [f + ("=" if f.startswith("--") else "+") for f in option.flags]
        tail = f"[{_zsh_help(option.help)}]:" + _zsh_action(option.values, option.choices,
                                                             option.metavar, func)
    exclusion = f"({' '.join(excludes)})" if excludes else ""
    spec = prefix + "{" + ",".join(forms) + "}" if len(forms) > 1 else prefix + forms[0]
    if len(forms) > 1:  # brace expansion: one spec per form
        return (_zsh_quote(exclusion) if exclusion else "") + spec + _zsh_quote(tail)
    return _zsh_quote(exclusion + spec + tail)


def _zsh_positional(positional: Positional, func: str) -> str:
    count = "*" if positional.many else ""
    colon = "::" if positional.optional and not positional.many else ":"
    return _zsh_quote(count + colon + _zsh_action(positional.values, positional.choices,
                                                  positional.metavar, func))


def _zsh_arguments(command: Command, tail: list[str], func: str) -> str:
    specs = [_zsh_option(o, func) for o in command.options] + tail
    return "  _arguments -s -S \\\n    " + " \\\n    ".join(specs)


def zsh_completion(root: Command) -> str:
    """A zsh completion function (``#compdef``): found on $fpath by compinit,
    or sourced after compinit."""
    name = root.name
    func = _ident(name)
    described = "\n".join("    " + _zsh_quote(c.name.replace(":", "\\:") + ":" + " ".join(c.summary.split()))
                          for c in root.commands)
    dispatch = "\n".join(f"        {c.name}) {func}{_ident(c.name)} && ret=0 ;;"
                         for c in root.commands)
    commands = "\n\n".join(
        f"{func}{_ident(c.name)}() {{\n"
        + _zsh_arguments(c, [_zsh_positional(p, func) for p in c.positionals], func) + "\n}"
        for c in root.commands)
    top = _zsh_arguments(root, [_zsh_quote(f"1: :{func}_commands"), _zsh_quote("*:: :->command")],
                         func)
    return f"""\
#compdef {name}
# zsh completion for {name}, written by `{name} completion zsh` from its
# argument parser: regenerate it rather than edit it.

{func}_netns() {{
  local -a names
  names=({NETNS_DIR}/*(N:t))
  _describe -t netns 'network namespace' names
}}

{func}_commands() {{
  local -a commands
  commands=(
{described}
  )
  _describe -t commands '{name} command' commands
}}

{commands}

{func}() {{
  local curcontext=$curcontext state state_descr line ret=1
  typeset -A opt_args
{top.replace("_arguments -s -S", "_arguments -C -s -S", 1)} && ret=0
  if [[ $state == command ]]; then
    curcontext=${{curcontext%:*:*}}:{name}-$words[1]:
    case $words[1] in
{dispatch}
    esac
  fi
  return ret
}}

if [[ $funcstack[1] == {func} ]]; then
  {func} "$@"
else
  compdef {func} {name}
fi
"""


# ---- the manual page -----------------------------------------------------------------------

# What each exit status means; the numbers are ExitStatus's own.
EXIT_MEANINGS: dict[ExitStatus, str] = {
    ExitStatus.OK: "success; a long-running command stopped by SIGINT, SIGTERM or SIGHUP",
    ExitStatus.ERROR: "runtime failure: a probe failed to load or attach, an output could not "
                      "be written",
    ExitStatus.USAGE: "bad arguments or bad input: a bad port, pid, size, interval or time, a "
                      "--netns that names no network namespace, a missing or malformed probe "
                      "object, a damaged journal or recording",
    ExitStatus.NO_PERMISSION: "not permitted: not root, kernel lockdown, BPF refused by policy",
    ExitStatus.UNSUPPORTED: "the kernel lacks what is needed (no BTF, no usable probe plan)",
    ExitStatus.CONFLICT: "portscope why: the bind would fail",
    ExitStatus.INTERRUPTED: "a one-shot command interrupted by a signal before it finished",
}

# The environment variables portscope reads (tests/unit/test_manual.py
# checks this list against the os.environ reads in tracer/ and tui/).
ENVIRONMENT: dict[str, str] = {
    "PORTSCOPE_PLAN": "a probe plan (fentry, kprobe or tracepoint) that replaces the automatic "
                      "choice wherever no --plan is given; an unknown value is an error (exit "
                      "status 2)",
    "PORTSCOPE_ENGINE": "libbpf (the default) or bcc: the engine used wherever no --engine is "
                        "given",
    "PORTSCOPE_OBJECT": "the compiled probe object to load instead of the one shipped with "
                        "portscope",
    "PORTSCOPE_LIBBPF": "the libbpf shared library to load instead of the system's libbpf.so.1",
    "PORTSCOPE_PIN_DIR": "where collectors pin their BPF maps (default /sys/fs/bpf/portscope); "
                         "another directory keeps two deployments apart",
    "NO_COLOR": "set to anything but the empty string: no colour in text output, even on a "
                "terminal (https://no-color.org); --color always still colours",
    "FORCE_COLOR": "set to anything but the empty string: colour in text output even into a "
                   "pipe or a file, as --color always (unless NO_COLOR is set or --color never "
                   "is given); --json and -o FILE are never coloured",
    "TERM": "dumb: no colour in text output (unless --color always or FORCE_COLOR)",
}

SEE_ALSO = ("ss(8)", "ip-netns(8)", "bpftool(8)", "bind(2)", "listen(2)", "connect(2)",
            "socket(7)", "tcp(7)")

_LEADING_DASHES = re.compile(r"(?<![\w\\-])-[\w-]*")


def roff_escape(text: str) -> str:
    """Text as roff prints it literally: a backslash is ``\\e``, a word
    starting with a dash (an option) gets ``\\-`` minus signs (which neither
    break a line nor turn into a typographic hyphen, so that it can be copied),
    anything outside ASCII is a named glyph, and a line
    that would start with a control character (``.`` or ``'``) starts with
    ``\\&``, so that it is printed instead of run as a request."""
    text = text.replace("\\", "\\e")
    text = _LEADING_DASHES.sub(lambda m: m.group(0).replace("-", "\\-"), text)
    text = "".join(c if ord(c) < 128 else f"\\[u{ord(c):04X}]" for c in text)
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line
                     for line in text.split("\n"))


def _prose(text: str) -> str:
    """A paragraph: one line of filled text, escaped."""
    return roff_escape(" ".join(text.split()))


def _bold(text: str) -> str:
    return f"\\fB{roff_escape(text)}\\fR"


def _italic(text: str) -> str:
    return f"\\fI{roff_escape(text)}\\fR"


def _preformatted(text: str) -> list[str]:
    """Lines shown as they are (examples, usage), indented."""
    return [".PP", ".RS 4", ".nf", *(roff_escape(line) for line in text.split("\n")), ".fi", ".RE"]


def _option_item(option: Option) -> list[str]:
    head = ", ".join(_bold(f) for f in option.flags)
    if option.metavar:
        head += " " + _italic(option.metavar)
    return [".TP", head, _prose(option.help) or "\\&"]


def _options(command: Command) -> list[str]:
    lines: list[str] = []
    group = ""
    for positional in command.positionals:
        lines += [".TP", _italic(positional.metavar), _prose(positional.help) or "\\&"]
    for option in command.options:
        if option.group != group:
            group = option.group
            lines += [".PP", _italic(group + ":")]
        lines += _option_item(option)
    return lines


def _epilog(epilog: str) -> list[str]:
    """The epilog's blocks (``examples:`` and the lines under it) as labelled
    preformatted text: the examples are shown as --help shows them."""
    lines: list[str] = []
    for block in re.split(r"\n\s*\n", epilog.strip("\n")):
        rows = block.split("\n")
        if rows and rows[0].strip().endswith(":") and not rows[0].startswith(" "):
            lines += [".PP", _italic(rows[0].strip()[:-1].capitalize() + ":")]
            rows = rows[1:]
        if rows:
            lines += _preformatted(textwrap.dedent("\n".join(rows)))
    return lines


def _command_section(command: Command) -> list[str]:
    return [".SS " + _quoted_arg(command.prog), *_usage_lines(command.usage),
            ".PP", _prose(command.description or command.summary), *_options(command),
            *_epilog(command.epilog)]


def _quoted_arg(text: str) -> str:
    """A macro argument: quoted, its own quotes doubled."""
    return '"' + roff_escape(text).replace('"', '""') + '"'


def _name_line(root: Command) -> str:
    """NAME's one line: the description's first sentence, as whatis shows it."""
    first = re.split(r"(?<=[.?!])\s", " ".join(root.description.split()), maxsplit=1)[0]
    first = first.rstrip(".?!")
    return f"{roff_escape(root.name)} \\- {roff_escape(first[:1].lower() + first[1:])}"


def _synopsis(root: Command) -> list[str]:
    lines = [".nf", roff_escape(root.usage)]
    for command in root.commands:
        lines.append(f"{_bold(command.prog)} [{_italic('options')}]"
                     + "".join(" " + _positional_synopsis(p) for p in command.positionals))
    return [*lines, ".fi"]


def _positional_synopsis(positional: Positional) -> str:
    text = _italic(positional.metavar) + ("..." if positional.many else "")
    return f"[{text}]" if positional.optional else text


def _usage_lines(usage: str) -> list[str]:
    """A usage line, filled and indented: it breaks only between its
    bracketed groups (``[--port PORT]`` stays whole), never inside one."""
    groups, depth, word = [], 0, ""
    for char in usage:
        if char == " " and depth == 0:
            groups.append(word)
            word = ""
            continue
        depth += (char in "[({") - (char in "])}")
        word += char
    groups.append(word)
    return [".PP", ".RS 4", " ".join(roff_escape(g).replace(" ", "\\ ") for g in groups if g), ".RE"]


def _examples(root: Command) -> list[str]:
    """EXAMPLES: the first example of each command, a tour; each command's
    own section has all of its examples."""
    rows = []
    for command in root.commands:
        lines = [line for line in command.epilog.split("\n") if line.startswith("  ")]
        if lines:
            rows.append(lines[0])
    return _preformatted(textwrap.dedent("\n".join(rows))) if rows else []


def man_page(root: Command, version: str, section: str = "1") -> str:
    """The manual page, in roff with the man(7) macros."""
    title = root.name.upper()
    lines = [
        f'.TH {title} {section} "" {_quoted_arg(root.name + " " + version)} "User Commands"',
        ".nh", ".ad l",  # no hyphenation (paths, options), no stretched spaces
        ".SH NAME", _name_line(root),
        ".SH SYNOPSIS", *_synopsis(root),
        ".SH DESCRIPTION", _prose(root.description),
        ".SH OPTIONS", *_options(root),
        ".SH COMMANDS",
    ]
    for command in root.commands:
        lines += [".TP", _bold(command.name), _prose(command.summary)]
    for command in root.commands:
        lines += _command_section(command)
    lines += [".SH EXIT STATUS"]
    for status in ExitStatus:
        lines += [".TP", _bold(str(int(status))), _prose(EXIT_MEANINGS[status])]
    lines += [".SH ENVIRONMENT"]
    for variable, meaning in ENVIRONMENT.items():
        lines += [".TP", _bold(variable), _prose(meaning)]
    lines += [".SH EXAMPLES", *_examples(root)]
    lines += [".SH SEE ALSO", ",\n".join(_bold(ref.split("(")[0]) + "(" + ref.split("(")[1]
                                         for ref in SEE_ALSO)]
    return "\n".join(lines) + "\n"
