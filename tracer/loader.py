"""Opening the probes: which engine loads them, and with which plan.

Two engines fill the same :class:`~tracer.engine.Engine`: libbpf with the
CO-RE object (tracer/engine.py, the default) and bcc, which compiles the
same source against the running kernel's headers (tracer/bcc_engine.py,
for hosts whose kernel has no BTF but has headers). Every command that
traces opens its engine here, so neither engine module needs the other.
"""

from __future__ import annotations

from .bcc_engine import open_bcc_engine
from .elfmaps import NotAnObject, maps_used
from .engine import Engine, EngineConfig, default_engine, open_libbpf_engine
from .plans import KernelFacts, kernel_facts


def open_engine(config: EngineConfig, facts: KernelFacts | None = None) -> Engine:
    """Load and attach the requested plan, or the best plan the kernel allows,
    with the engine the configuration (or $PORTSCOPE_ENGINE) names."""
    facts = facts or kernel_facts(config.btf_path, mount_tracefs=True)
    if (config.engine or default_engine()) == "bcc":
        engine = open_bcc_engine(config, facts)
    else:
        engine = open_libbpf_engine(config, facts)
    # Only an engine whose programs record closes has closers to share (the
    # bcc engine may run without the object: then it shares, as it always did).
    try:
        records_closes = "ps_closers" in maps_used(config.object_path, config.programs[engine.plan])
    except NotAnObject:
        records_closes = True
    if records_closes:
        engine.publish_closers()
    return engine
