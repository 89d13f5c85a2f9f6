"""The commands' options, one module per command, each registering its own
subparser (``add_parser``). They import nothing but argparse and
tracer/arguments.py, so that ``portscope --help`` loads no library; what a
command does lives in the library module of the same name (tracer/trace.py,
tracer/why.py, ...), imported only when the command runs. The UI's command
runs here (commands/ui.py): it only wires the collector to the screen.
"""

from . import (
    completion,
    deliver,
    doctor,
    export,
    groups,
    man,
    ports,
    record,
    replay,
    report,
    timewait,
    trace,
    ui,
    why,
)

# In the order ``portscope --help`` lists them.
COMMANDS = (trace, ports, why, deliver, timewait, groups, export, ui, record, report, replay, doctor,
            completion, man)
