"""What an ELF executable or library needs loaded before it runs: its interpreter and DT_NEEDED libraries.

Reads only the few places of the file that say so (ELF header, program headers, the dynamic
segment and its string table) through an async ``read(offset, length)``, and resolves each
library the way the dynamic loader searches (RPATH/RUNPATH with ``$ORIGIN``, then the
multiarch and standard directories). ``/etc/ld.so.cache`` is not consulted: the standard
directories find what Debian- and Alpine-style images install, and a miss only costs a
prefetch, never correctness.

Everything read is bounded, and a malformed file gives an empty answer rather than an error:
the result is a hint for prefetching.
"""

from __future__ import annotations

import posixpath
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

ReadAt = Callable[[int, int], Awaitable[bytes]]

ELF_MAGIC = b"\x7fELF"
_PT_DYNAMIC, _PT_INTERP, _PT_LOAD = 2, 3, 1
_DT_NULL, _DT_NEEDED, _DT_STRTAB, _DT_STRSZ, _DT_RPATH, _DT_RUNPATH = 0, 1, 5, 10, 15, 29
# Bounds on what a hostile or broken file can make us read.
_MAX_PHNUM = 128
_MAX_DYNAMIC = 64 << 10
_MAX_STRTAB = 1 << 20
_MAX_NEEDED = 64
# Debian's multiarch directory per e_machine.
_MULTIARCH = {
    3: "i386-linux-gnu",
    40: "arm-linux-gnueabihf",
    62: "x86_64-linux-gnu",
    183: "aarch64-linux-gnu",
    21: "powerpc64le-linux-gnu",
    22: "s390x-linux-gnu",
    243: "riscv64-linux-gnu",
}
_STANDARD_DIRS = ("lib64", "usr/lib64", "lib", "usr/lib", "usr/local/lib")


def multiarch_triplet(machine: int) -> str | None:
    """Debian's multiarch directory name (``x86_64-linux-gnu``) for an ELF ``e_machine``, if known."""
    return _MULTIARCH.get(machine)


def elf_machine(head: bytes) -> int | None:
    """The ``e_machine`` of an ELF file from its first 20 bytes, or None if they are not an ELF header."""
    if len(head) < 20 or head[:4] != ELF_MAGIC or head[5] not in (1, 2):
        return None
    return int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")


@dataclass
class ElfDeps:
    """The loader-relevant facts of one ELF file (paths as written in the file)."""

    machine: int = 0
    interpreter: str = ""
    needed: list[str] = field(default_factory=list)
    search_paths: list[str] = field(default_factory=list)  # RUNPATH, else RPATH, ':'-split

    def library_dirs(self, origin: str) -> list[str]:
        """Directories to search for ``needed``, relative to the image root; ``origin`` is the file's directory."""
        dirs: list[str] = []
        for path in self.search_paths:
            path = path.replace("${ORIGIN}", "/" + origin).replace("$ORIGIN", "/" + origin)
            if path.startswith("/"):
                dirs.append(posixpath.normpath(path).lstrip("/"))
        triplet = _MULTIARCH.get(self.machine)
        if triplet:
            dirs += [f"lib/{triplet}", f"usr/lib/{triplet}"]
        dirs += _STANDARD_DIRS
        return dirs


async def read_elf_deps(
    read: ReadAt, size: int, on_interpreter: Callable[[ElfDeps], None] | None = None
) -> ElfDeps | None:
    """Return the interpreter and needed libraries of an ELF file, or None if it is not a dynamic ELF file.

    ``read(offset, length)`` returns the file's bytes (fewer at the end); its errors propagate.
    ``on_interpreter`` is called with the machine and interpreter as soon as the program headers
    are read: the dynamic segment is often at the far end of the file, a fetch of its own.
    """
    try:
        return await _read_elf_deps(read, size, on_interpreter)
    except _Short:
        return None


async def _read_elf_deps(
    read: ReadAt, size: int, on_interpreter: Callable[[ElfDeps], None] | None
) -> ElfDeps | None:
    head = await read(0, 64)
    if len(head) < 52 or head[:4] != ELF_MAGIC or head[4] not in (1, 2) or head[5] not in (1, 2):
        return None
    is64, order = head[4] == 2, "<" if head[5] == 1 else ">"
    if is64:
        machine, phoff, phentsize, phnum = _unpack(order + "2xH12xQ14xHH", head, 16)
        ph_format, ph_size = order + "II QQ 8x QQ 8x", 56
    else:
        machine, phoff, phentsize, phnum = _unpack(order + "2xH8xI10xHH", head, 16)
        ph_format, ph_size = order + "I I I 4x I 4x 4x 4x", 32
    if phentsize < ph_size or not 0 < phnum <= _MAX_PHNUM or phoff + phnum * phentsize > size:
        return None
    table = await read(phoff, phnum * phentsize)
    deps = ElfDeps(machine=machine)
    loads: list[tuple[int, int, int]] = []  # (vaddr, offset, filesz)
    dynamic: tuple[int, int] | None = None
    for i in range(phnum):
        if len(table) < (i + 1) * phentsize:
            return None
        if is64:
            p_type, _flags, p_offset, p_vaddr, p_filesz, _memsz = _unpack(ph_format, table, i * phentsize)
        else:
            p_type, p_offset, p_vaddr, p_filesz = _unpack(ph_format, table, i * phentsize)
        if p_type == _PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == _PT_INTERP and 0 < p_filesz <= 4096 and p_offset + p_filesz <= size:
            deps.interpreter = (await read(p_offset, p_filesz)).split(b"\0", 1)[0].decode("utf-8", "replace")
        elif p_type == _PT_DYNAMIC and 0 < p_filesz <= _MAX_DYNAMIC and p_offset + p_filesz <= size:
            dynamic = (p_offset, p_filesz)
    if on_interpreter is not None and deps.interpreter:
        on_interpreter(deps)
    if dynamic is None:
        return deps
    await _read_dynamic(read, size, deps, dynamic, loads, is64, order)
    return deps


async def _read_dynamic(
    read: ReadAt,
    size: int,
    deps: ElfDeps,
    dynamic: tuple[int, int],
    loads: list[tuple[int, int, int]],
    is64: bool,
    order: str,
) -> None:
    """Fill ``deps.needed`` and ``deps.search_paths`` from the dynamic segment."""
    data = await read(*dynamic)
    entry_format, entry_size = (order + "qQ", 16) if is64 else (order + "iI", 8)
    needed: list[int] = []
    paths: dict[int, int] = {}
    strtab = strsz = 0
    for pos in range(0, len(data) - entry_size + 1, entry_size):
        tag, value = struct.unpack_from(entry_format, data, pos)
        if tag == _DT_NULL:
            break
        if tag == _DT_NEEDED and len(needed) < _MAX_NEEDED:
            needed.append(value)
        elif tag == _DT_STRTAB:
            strtab = value
        elif tag == _DT_STRSZ:
            strsz = value
        elif tag in (_DT_RPATH, _DT_RUNPATH):
            paths[tag] = value
    offset = _file_offset(strtab, loads)
    if offset is None or not 0 < strsz <= _MAX_STRTAB or offset + strsz > size:
        return
    strings = await read(offset, strsz)

    def string_at(index: int) -> str:
        if not 0 <= index < len(strings):
            return ""
        return strings[index:].split(b"\0", 1)[0].decode("utf-8", "replace")

    deps.needed = [name for name in map(string_at, needed) if name and "/" not in name]
    search = paths.get(_DT_RUNPATH, paths.get(_DT_RPATH))
    if search is not None:
        deps.search_paths = [p for p in string_at(search).split(":") if p]


def _file_offset(vaddr: int, loads: list[tuple[int, int, int]]) -> int | None:
    """Translate a virtual address to a file offset through the PT_LOAD segments."""
    for seg_vaddr, seg_offset, seg_filesz in loads:
        if seg_vaddr <= vaddr < seg_vaddr + seg_filesz:
            return seg_offset + (vaddr - seg_vaddr)
    return None


def _unpack(fmt: str, data: bytes, offset: int) -> tuple[int, ...]:
    fmt = fmt.replace(" ", "")
    if len(data) < offset + struct.calcsize(fmt):
        raise _Short()
    return struct.unpack_from(fmt, data, offset)


class _Short(ValueError):
    """The file ended inside a header."""
