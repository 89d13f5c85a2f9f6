"""Opening the probes: which engine loads them, with which plans, and the
rule of one object per process.

Two engines fill the same :class:`~tracer.engine.Engine`: libbpf with the
CO-RE object (tracer/engine.py, the default) and bcc, which compiles the
same source against the running kernel's headers (tracer/bcc_engine.py,
for hosts whose kernel has no BTF but has headers). Every command that
traces opens its engine here, once, with every part it will read (events,
reuseport counting, socket iterators), so neither engine module needs the
other and no part is loaded twice: the iterators the engine carries become
the process's shared iterators (tracer/sockflags.SharedIterators), which
the inventory, the explainer and the group watcher then use.
"""

from __future__ import annotations

from dataclasses import replace

from .bcc_engine import open_bcc_engine
from .coreobject import LibbpfLoaded, open_libbpf_engine
from .engine import Engine, EngineConfig, default_engine
from .plans import KernelFacts, kernel_facts
from .sockflags import SharedIterators, SocketIterators


def open_engine(config: EngineConfig, facts: KernelFacts | None = None) -> Engine:
    """Load and attach the requested plan, or the best plan the kernel allows,
    for every part the configuration asks for, with the engine the
    configuration (or $PORTSCOPE_ENGINE) names."""
    facts = facts or kernel_facts(config.btf_path, mount_tracefs=True)
    if config.iterators and SharedIterators.loaded():
        config = replace(config, iterators=False)  # this process has them already
    if (config.engine or default_engine()) == "bcc":
        engine = open_bcc_engine(config, facts)
    else:
        engine = open_libbpf_engine(config, facts)
    try:
        if engine.carries_iterators and isinstance(engine.loaded, LibbpfLoaded):
            engine.iterators = SharedIterators.adopt(SocketIterators(loaded=engine.loaded))
        if engine.records_closes:
            engine.publish_closers()
    except BaseException:
        engine.close()
        raise
    return engine
