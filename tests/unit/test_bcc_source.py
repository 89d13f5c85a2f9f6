"""How the bcc engine prepares the one probe source (no kernel needed; the
engine at work is tested in tests/kernel/test_bcc_engine.py)."""

from __future__ import annotations

import os
import re

import pytest

from tracer import bcc_engine
from tracer.engine import EngineConfig
from tracer.errors import ObjectInvalid
from tracer.layout import PsPlan
from tracer.plans import GROUP_PROGRAMS, PLAN_PROGRAMS, Plan

OPS = re.compile(r"\bPS_(LOOKUP|UPDATE|INSERT|DELETE|RESERVE|SUBMIT)\(")


def test_every_map_operation_is_spelt_for_bcc() -> None:
    original = bcc_engine.SOURCE.read_text()
    count = len(OPS.findall(original))
    assert count > 10  # the source really uses them
    spelt = bcc_engine.bcc_source(original)
    assert not OPS.search(spelt)
    methods = re.findall(r"\b\w+\.(lookup|update|insert|delete|ringbuf_reserve|ringbuf_submit)\(",
                         spelt)
    assert len(methods) == count


def test_an_operation_it_cannot_spell_is_an_error() -> None:
    with pytest.raises(ObjectInvalid, match="cannot spell out"):
        bcc_engine.bcc_source("x = PS_LOOKUP(&map, key);")


def test_hooks_come_from_the_object() -> None:
    """bcc attaches what the CO-RE object's sections name; BTF-based hooks
    (fentry, tp_btf, iterators) are refused, so bcc never pretends."""
    sections = bcc_engine._sections(EngineConfig().object_path)
    for name in PLAN_PROGRAMS[Plan.KPROBE] + GROUP_PROGRAMS[Plan.KPROBE]:
        assert bcc_engine._hook(sections[name]) is not None, name
    assert bcc_engine._hook(sections["ps_enter_bind"]) == ("tracepoint", "syscalls:sys_enter_bind")
    assert bcc_engine._hook(sections["ps_kretprobe_get_port"]) == ("kretprobe", "inet_csk_get_port")
    for name in ("ps_fexit_get_port", "ps_group_data_ready", "ps_iter_tcp"):
        assert bcc_engine._hook(sections[name]) is None, name


def test_configuration_is_compiled_in() -> None:
    config = EngineConfig(pid=4242, port=8080, errors_only=False, ring_bytes=1 << 20,
                          closer_entries=99)
    flags = bcc_engine.cflags(config, Plan.KPROBE)
    assert "-DPS_CFG_target_tgid=4242" in flags
    assert "-DPS_CFG_target_port=8080" in flags
    assert f"-DPS_CFG_plan={int(PsPlan.KPROBE)}" in flags
    assert "-DPS_CLOSER_ENTRIES=99" in flags
    assert "-DPS_BCC" in flags
    pages = next(f for f in flags if f.startswith("-DPS_RING_PAGES="))
    assert int(pages.split("=")[1]) * os.sysconf("SC_PAGE_SIZE") == 1 << 20
