"""tracer/layout.py is generated from the committed object's BTF, not hand-written."""

from pathlib import Path

from tracer.engine import DEFAULT_OBJECT
from tracer.layoutgen import generate

LAYOUT = Path(__file__).resolve().parents[2] / "tracer" / "layout.py"


def test_committed_layout_equals_generation_from_committed_object():
    assert generate(str(DEFAULT_OBJECT)) == LAYOUT.read_text(), (
        "tracer/layout.py is stale: run scripts/build-probes"
    )


def test_header_structs_are_the_ones_generated():
    text = LAYOUT.read_text()
    header = (Path(__file__).resolve().parents[2] / "probes" / "portscope.h").read_text()
    for struct in ("ps_event", "ps_config"):
        assert f"struct {struct} {{" in header
        camel = "".join(p.capitalize() for p in struct.split("_"))
        assert f"class {camel}(ctypes.Structure)" in text
