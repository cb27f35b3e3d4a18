"""ELF dependency hints: interpreter, DT_NEEDED and RUNPATH of real binaries, agreeing with readelf."""

from __future__ import annotations

import re
import struct
import subprocess
from pathlib import Path

import pytest
import trio

from fusefs.prefetch.elf_deps import ElfDeps, read_elf_deps

HOST_BINARIES = ["/usr/bin/true", "/usr/bin/ls", "/usr/bin/python3.11", "/usr/lib/x86_64-linux-gnu/libc.so.6"]


def deps_of(data: bytes) -> ElfDeps | None:
    async def read(offset: int, length: int) -> bytes:
        return data[offset : offset + length]

    return trio.run(read_elf_deps, read, len(data))


def readelf_needed(path: str) -> list[str]:
    out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out)


def readelf_interpreter(path: str) -> str:
    out = subprocess.run(["readelf", "-l", path], capture_output=True, text=True, check=True).stdout
    found = re.search(r"Requesting program interpreter: (.+?)\]", out)
    return found.group(1) if found else ""


@pytest.mark.parametrize("path", [p for p in HOST_BINARIES if Path(p).exists()])
def test_host_binaries_match_readelf(path: str) -> None:
    """Interpreter and needed libraries are exactly what readelf reports, in order."""
    deps = deps_of(Path(path).read_bytes())
    assert deps is not None
    assert deps.needed == readelf_needed(path)
    assert deps.interpreter == readelf_interpreter(path)
    assert deps.machine == 62  # x86-64


def test_library_dirs_put_runpath_first_with_origin_expanded() -> None:
    """$ORIGIN is the file's own directory; the multiarch directories come before the generic ones."""
    deps = ElfDeps(machine=62, needed=["libx.so"], search_paths=["$ORIGIN/../lib", "/opt/app/lib"])
    dirs = deps.library_dirs("opt/app/bin")
    assert dirs[:4] == ["opt/app/lib", "opt/app/lib", "lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"]
    assert "usr/lib" in dirs


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x7fELF",
        b"#!/bin/sh\necho hi\n",
        b"\x7fELF\x02\x01\x01"
        + b"\0" * 9
        + struct.pack("<HHIQQQIHHH", 2, 62, 1, 0, 1 << 40, 0, 0, 64, 56, 3),
        b"\x7fELF\x02\x01\x01" + b"\0" * 9 + struct.pack("<HHIQQQIHHH", 2, 62, 1, 0, 64, 0, 0, 64, 56, 60000),
        b"\x7fELF\x09\x01" + b"\0" * 60,
    ],
    ids=["empty", "magic-only", "script", "phoff-beyond-end", "huge-phnum", "bad-class"],
)
def test_malformed_files_give_no_answer(data: bytes) -> None:
    """Anything that is not a well-formed ELF file yields None, never an exception."""
    assert deps_of(data) is None


def test_truncated_real_binary_gives_no_needed_libraries() -> None:
    """A binary cut short before its dynamic section is still answered without an error."""
    data = Path("/usr/bin/ls").read_bytes()[:4096]
    deps = deps_of(data)
    assert deps is None or deps.needed == []
