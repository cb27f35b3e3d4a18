"""fusefs.prefetch.python_imports: the top-level imports of a module, from its bytecode (CPython 3.8-3.13) or its source."""

from __future__ import annotations

import dis
import importlib.util
import marshal
import os
import random
import sys
from pathlib import Path

import pytest

from fusefs.prefetch.python_imports import (
    FROZEN_SINCE_311,
    ImportStatement,
    pyc_imports,
    pyc_layout,
    source_imports,
)

DATA = Path(__file__).parent / "data"
# tests/fusefs/data/pyc/imports_sample.cpython-3X.pyc were compiled from data/imports_sample.py
# by CPython 3.8 to 3.13 (py_compile), so that every supported layout is checked here.
SAMPLE_PYCS = sorted((DATA / "pyc").glob("imports_sample.cpython-*.pyc"))

EVERY_IMPORT = [
    ImportStatement("json"),
    ImportStatement("os.path", 0, ("path",)),
    ImportStatement("xml.etree.ElementTree"),
    ImportStatement("collections"),
    ImportStatement("", 1, ("sibling",)),
    ImportStatement("pkg.inner", 1, ("helper", "other")),
    ImportStatement("", 2, ("cousin",)),
    ImportStatement("email.mime", 0, ("text",)),
    ImportStatement("_json"),
    ImportStatement("codecs"),
]


def _version(pyc: Path) -> tuple[int, int]:
    tag = pyc.name.split(".")[1]  # cpython-311
    digits = tag.split("-")[1]
    return int(digits[0]), int(digits[1:])


def test_the_sample_pycs_of_six_cpython_versions_are_all_here() -> None:
    assert sorted(_version(p) for p in SAMPLE_PYCS) == [(3, 8), (3, 9), (3, 10), (3, 11), (3, 12), (3, 13)]


@pytest.mark.parametrize("pyc", SAMPLE_PYCS, ids=lambda p: p.name)
def test_top_level_imports_of_each_version_in_order_without_those_inside_functions(pyc: Path) -> None:
    expected = EVERY_IMPORT
    if _version(pyc) >= (3, 11):  # os.path and codecs are frozen into the interpreter from 3.11 on
        expected = [s for s in EVERY_IMPORT if s.module not in FROZEN_SINCE_311]
    found = pyc_imports(pyc.read_bytes())
    assert found == expected
    assert ImportStatement("tomllib") not in found  # imported inside a function: not on import


def test_source_imports_are_the_top_level_lines() -> None:
    found = source_imports((DATA / "imports_sample.py").read_bytes())
    # The try: and if: bodies are indented, so only unconditional top-level lines are seen.
    assert found == [
        ImportStatement("json"),
        ImportStatement("os.path"),
        ImportStatement("xml.etree.ElementTree"),
        ImportStatement("collections"),
        ImportStatement("", 1, ("sibling",)),
        ImportStatement("pkg.inner", 1, ("helper", "other")),
        ImportStatement("", 2, ("cousin",)),
        ImportStatement("email.mime", 0, ("text",)),
    ]


def test_source_imports_read_parenthesized_name_lists() -> None:
    text = b"from .a import (\n    b,\n    c as d,\n)\nimport e  # comment\n"
    assert source_imports(text) == [ImportStatement("a", 1, ("b", "c")), ImportStatement("e")]


def _reference(code: object) -> list[ImportStatement]:
    """What dis says the top-level code imports (the same rules: level from the LOAD_CONST before)."""
    found: list[ImportStatement] = []
    consts: list[object] = []
    current: tuple[str, int] | None = None
    names: list[str] = []
    for ins in dis.get_instructions(code):  # type: ignore[arg-type]
        if ins.opname == "LOAD_CONST":
            consts = [*consts[-1:], ins.argval]
        elif ins.opname == "IMPORT_NAME":
            if current is not None:
                found.append(ImportStatement(current[0], current[1], tuple(names)))
            level = consts[0] if len(consts) == 2 and type(consts[0]) is int else 0
            current, names = (ins.argval, level), []
        elif ins.opname == "IMPORT_FROM" and current is not None:
            names.append(ins.argval)
    if current is not None:
        found.append(ImportStatement(current[0], current[1], tuple(names)))
    return found


def test_agrees_with_dis_on_the_standard_library_of_this_interpreter() -> None:
    stdlib = Path(os.__file__).parent
    sources = sorted(stdlib.glob("*.py"))[:150] + sorted(stdlib.glob("*/*.py"))[:150]
    checked = 0
    for source in sources:
        try:
            code = compile(source.read_bytes(), str(source), "exec")
        except (SyntaxError, ValueError):
            continue
        data = importlib.util.MAGIC_NUMBER + b"\0" * 12 + marshal.dumps(code)
        layout = pyc_layout(data)
        assert layout is not None
        expected = [s for s in _reference(code) if s.level or s.module not in layout.frozen]
        assert pyc_imports(data) == expected, source
        checked += 1
    assert checked > 250


def test_truncated_pycs_give_nothing_and_never_raise() -> None:
    data = (DATA / "pyc" / f"imports_sample.{sys.implementation.cache_tag}.pyc").read_bytes()
    for end in range(len(data)):
        assert pyc_imports(data[:end]) == []


def test_corrupt_and_hostile_pycs_never_raise() -> None:
    data = bytearray((DATA / "pyc" / f"imports_sample.{sys.implementation.cache_tag}.pyc").read_bytes())
    rng = random.Random(3)
    for _ in range(2000):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            mutated[rng.randrange(16, len(mutated))] = rng.randrange(256)
        assert isinstance(pyc_imports(bytes(mutated)), list)
    header = bytes(data[:16])
    assert pyc_imports(header + b"(" + b"\xff\xff\xff\x7f") == []  # a tuple claiming 2 G items
    assert pyc_imports(header + b")\x01" * 100_000) == []  # nesting far deeper than allowed
    assert pyc_imports(header + b"r\x05\x00\x00\x00") == []  # a reference to nothing


def test_unknown_versions_and_non_pycs_give_nothing() -> None:
    data = (DATA / "pyc" / f"imports_sample.{sys.implementation.cache_tag}.pyc").read_bytes()
    assert pyc_imports(b"\x00\x00\r\n" + data[4:]) == []  # magic of no CPython we know
    assert pyc_imports(b"#!/bin/sh\necho hello\n") == []
    assert pyc_imports(b"") == []
