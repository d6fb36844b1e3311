"""The Python constants that repeat bpf/events.h agree with it.

The header is the one source of truth for the kernel side; these tests read
it as text (no compiler, no root) so a changed value or slot fails here
instead of as miscounted events on a live host.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from egress_auditor.attribution import lineage, lineage_tracer
from egress_auditor.host import btf as task_fields
from egress_auditor.inputs import ebpf
from egress_auditor.inputs.ebpf import count_lines
from egress_auditor.model import Family

EVENTS_H = Path(__file__).resolve().parents[2] / "bpf" / "events.h"

_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_DEFINE = re.compile(r"^\s*#\s*define\s+(\w+)\s+(0[xX][0-9a-fA-F]+|\d+)[uUlL]*\s*$", re.M)
_STRUCT = re.compile(r"\bstruct\s+(\w+)\s*\{(.*?)\}\s*;", re.S)
_FIELD = re.compile(r"^\s*(?:struct\s+)?\w+\s+(\w+)\s*(?:\[\s*(\w+)\s*\])?\s*$")


def defines(text: str) -> dict[str, int]:
    """Every `#define NAME <integer>` of a C header (comments stripped)."""
    return {name: int(value, 0) for name, value in _DEFINE.findall(_COMMENT.sub("", text))}


def structs(text: str) -> dict[str, list[tuple[str, str | None]]]:
    """Each struct's fields in order, as (name, array length or None)."""
    found = {}
    for name, body in _STRUCT.findall(_COMMENT.sub("", text)):
        fields = []
        for declaration in filter(str.strip, body.split(";")):
            match = _FIELD.match(declaration)
            assert match, f"struct {name}: cannot read field {declaration.strip()!r}"
            fields.append((match.group(1), match.group(2)))
        found[name] = fields
    return found


@pytest.fixture(scope="module")
def header() -> str:
    return EVENTS_H.read_text()


def test_parser_reads_defines_and_structs() -> None:
    sample = """
    #define A 1 /* one */
    #define B 0x10U
    #  define C 7 // seven
    #define NOT_A_NUMBER (A + 1)
    #ifndef D
    #define D 32
    #endif
    struct s {
        u64 first; /* a; b */
        u8 data[D];
        struct other nested;
    };
    """
    assert defines(sample) == {"A": 1, "B": 16, "C": 7, "D": 32}
    assert structs(sample) == {"s": [("first", None), ("data", "D"), ("nested", None)]}


def test_parser_refuses_what_it_cannot_read() -> None:
    with pytest.raises(AssertionError, match="cannot read field"):
        structs("struct s { u32 a, b; };")


def test_connect_event_kinds_and_stat_slots(header: str) -> None:
    found = defines(header)
    assert (ebpf.EVENT_NEW_FLOW, ebpf.EVENT_MAP_FULL) == (found["EA_EVENT_NEW_FLOW"], found["EA_EVENT_MAP_FULL"])
    assert (ebpf.STAT_EVENTS_LOST, ebpf.STAT_MAP_FULL) == (found["EA_STAT_EVENTS_LOST"], found["EA_STAT_MAP_FULL"])
    assert max(ebpf.STAT_EVENTS_LOST, ebpf.STAT_MAP_FULL) < found["EA_STAT_SLOTS"]


def test_address_families(header: str) -> None:
    found = defines(header)
    assert (Family.IPV4, Family.IPV6) == (found["EA_AF_INET"], found["EA_AF_INET6"])


def test_process_event_kinds_flags_and_stat_slots(header: str) -> None:
    found = defines(header)
    kinds = (lineage.PROC_FORK, lineage.PROC_EXEC, lineage.PROC_EXIT)
    assert kinds == (found["EA_PROC_FORK"], found["EA_PROC_EXEC"], found["EA_PROC_EXIT"])
    assert (lineage.ARGS_CUT, lineage.ARGS_MISSING) == (found["EA_PROC_ARGS_CUT"], found["EA_PROC_ARGS_MISSING"])
    stats = (lineage_tracer.PSTAT_EVENTS, lineage_tracer.PSTAT_LOST)
    assert stats == (found["EA_PSTAT_EVENTS"], found["EA_PSTAT_LOST"])
    assert max(stats) < found["EA_PSTAT_SLOTS"]


def test_count_line_layout(header: str) -> None:
    found = defines(header)
    slot = structs(header)["ea_count_slot"]
    assert count_lines.LINE_SLOTS == found["EA_LINE_SLOTS"]
    assert count_lines.SLOT_WORDS == len(slot)
    words = {name: index for index, (name, _) in enumerate(slot)}
    positions = (count_lines.FP, count_lines.FP2, count_lines.COUNT, count_lines.LAST_NS)
    assert positions == (words["fp"], words["fp2"], words["count"], words["last_ns"])
    assert count_lines.LINE_BYTES == count_lines.LINE_SLOTS * count_lines.SLOT_WORDS * 8
    assert all(re.search(rf"\bu64\s+{name}\b", header) for name, _ in slot)


def test_task_name_length(header: str) -> None:
    flow_key = dict(structs(header)["ea_flow_key"])
    assert task_fields.TASK_COMM_LEN == int(flow_key["comm"] or 0)
