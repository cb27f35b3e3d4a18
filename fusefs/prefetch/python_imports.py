"""What a Python module imports when it is loaded: read from its ``.pyc`` bytecode or its source.

Only the module's top-level code counts: that is what runs on import, while imports inside
functions run later, if ever. A ``.pyc`` is read with a small marshal reader of our own, not
``marshal.loads``: the bytes come from an image (untrusted: ``marshal`` is documented as unsafe
on such input) and may be written by another Python version than ours. CPython 3.8 to 3.13
are understood; other versions give no answer. Source files are scanned for ``import`` and
``from ... import`` lines that start at column 0.

Every answer is a hint for prefetching: malformed input gives an empty answer, never an error,
and everything read is bounded.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

# Modules that CPython 3.11+ serves from its frozen copies instead of reading them from disk.
FROZEN_SINCE_311 = frozenset(
    (
        "_collections_abc",
        "_sitebuiltins",
        "abc",
        "codecs",
        "genericpath",
        "importlib.machinery",
        "importlib.util",
        "io",
        "ntpath",
        "os",
        "os.path",
        "posixpath",
        "runpy",
        "site",
        "stat",
        "zipimport",
    )
)

_MAX_OBJECTS = 500_000  # marshal objects read from one file at most
_MAX_NESTING = 64  # nested containers and code objects
_HEADER_SIZE = 16  # magic, flags and source mtime/size (or hash): PEP 552


@dataclass(frozen=True, slots=True)
class ImportStatement:
    """One ``import module`` (``names`` empty) or ``from module import names`` with its relative ``level``."""

    module: str
    level: int = 0
    names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Layout:
    """How one range of CPython versions marshals code objects and numbers its import opcodes."""

    leading_ints: int  # 32-bit counters before co_code
    objects_after_names: int  # marshalled objects between co_names and co_firstlineno
    objects_after_lineno: int  # marshalled objects after co_firstlineno
    import_name: int
    import_from: int
    load_const: int
    extended_arg: int
    frozen: frozenset[str]


# By pyc magic number (the first two bytes, little-endian): 3.8-3.10, 3.11-3.12, 3.13.
_LAYOUTS = (
    (range(3400, 3450), _Layout(6, 5, 1, 108, 109, 100, 144, frozenset())),
    (range(3450, 3550), _Layout(5, 5, 2, 108, 109, 100, 144, FROZEN_SINCE_311)),
    (range(3550, 3600), _Layout(5, 5, 2, 75, 74, 83, 71, FROZEN_SINCE_311)),
)


def pyc_layout(data: bytes) -> _Layout | None:
    """The layout of a ``.pyc`` file's code objects, from its magic number; None when unknown."""
    if len(data) < _HEADER_SIZE or data[2:4] != b"\r\n":
        return None
    magic = int.from_bytes(data[:2], "little")
    for versions, layout in _LAYOUTS:
        if magic in versions:
            return layout
    return None


def pyc_imports(data: bytes) -> list[ImportStatement]:
    """The imports of a ``.pyc`` file's top-level code, in order; [] when unreadable. Raises nothing."""
    layout = pyc_layout(data)
    if layout is None:
        return []
    try:
        code = _MarshalReader(data, _HEADER_SIZE, layout).read()
    except (_Malformed, RecursionError):
        return []
    if not isinstance(code, _Code):
        return []
    return [s for s in _statements(code, layout) if s.level or s.module not in layout.frozen]


def _statements(code: _Code, layout: _Layout) -> list[ImportStatement]:
    """Walk the bytecode: ``LOAD_CONST level, LOAD_CONST fromlist, IMPORT_NAME`` then ``IMPORT_FROM``s."""
    found: list[ImportStatement] = []
    consts: list[object] = []  # the last two constants loaded: the level and the fromlist
    current: ImportStatement | None = None
    from_names: list[str] = []
    arg = 0
    raw = code.code
    for pos in range(0, len(raw) - 1, 2):
        op, arg = raw[pos], arg | raw[pos + 1]
        if op == layout.extended_arg:
            arg <<= 8
            continue
        if op == layout.load_const:
            consts = [*consts[-1:], code.consts[arg] if arg < len(code.consts) else None]
        elif op == layout.import_name and arg < len(code.names):
            if current is not None:
                found.append(_with_names(current, from_names))
            level = consts[0] if len(consts) == 2 and type(consts[0]) is int else 0
            current, from_names = ImportStatement(code.names[arg], level), []
        elif op == layout.import_from and current is not None and arg < len(code.names):
            from_names.append(code.names[arg])
        arg = 0
    if current is not None:
        found.append(_with_names(current, from_names))
    return found


def _with_names(statement: ImportStatement, names: list[str]) -> ImportStatement:
    return ImportStatement(statement.module, statement.level, tuple(names))


_NULL = object()  # marshal's NULL: ends a dict
_SHORT_ASCII = frozenset(b"zZ")  # type codes of short ASCII strings (plain and interned)
_REF = ord("r")  # a reference to an object read before


class _Malformed(Exception):
    """The marshal data ends early, nests too deep or holds an unknown type."""


@dataclass(frozen=True, slots=True)
class _Code:
    """What import discovery needs of a code object."""

    code: bytes
    consts: tuple[object, ...]
    names: tuple[str, ...]


class _MarshalReader:
    """Reads marshal data into plain values; code objects keep only their bytecode, constants and names."""

    def __init__(self, data: bytes, pos: int, layout: _Layout) -> None:
        self._data = data
        self._pos = pos
        self._layout = layout
        self._refs: list[object] = []
        self._budget = _MAX_OBJECTS

    def read(self, depth: int = 0) -> object:
        """Read the next object; raises _Malformed."""
        self._budget -= 1
        if self._budget < 0 or depth > _MAX_NESTING:
            raise _Malformed
        data, pos = self._data, self._pos
        if pos + 2 > len(data):
            raise _Malformed
        code = data[pos]
        # Fast paths for what most of a .pyc is made of: short names and references to them.
        if code & 0x7F in _SHORT_ASCII:
            end = pos + 2 + data[pos + 1]
            if end > len(data):
                raise _Malformed
            text = data[pos + 2 : end].decode("latin-1")  # one byte per character, as CPython reads it
            self._pos = end
            if code & 0x80:
                self._refs.append(text)
            return text
        if code == _REF:
            end = pos + 5
            index = int.from_bytes(data[pos + 1 : end], "little", signed=True)
            if end > len(data) or not 0 <= index < len(self._refs):
                raise _Malformed
            self._pos = end
            return self._refs[index]
        self._pos = pos + 1
        kind, ref = chr(code & 0x7F), code & 0x80
        slot = -1
        if ref:  # FLAG_REF: later 'r' records name this object by its number, counted before its children
            slot = len(self._refs)
            self._refs.append(None)
        value = self._value(kind, depth)
        if ref:
            self._refs[slot] = value
        return value

    def _value(self, kind: str, depth: int) -> object:
        if kind == "0":
            return _NULL
        if kind in "NFTS.":  # None, False, True, StopIteration, Ellipsis
            return {"F": False, "T": True}.get(kind)
        if kind == "i":
            return int.from_bytes(self._take(4), "little", signed=True)
        if kind == "l":  # a long: a digit count (its sign is the number's) and 15-bit digits
            self._take(2 * abs(self._int()))
            return None
        if kind == "g":
            return struct.unpack("<d", self._take(8))[0]
        if kind == "y":
            self._take(16)
            return None
        if kind in "fx":  # old text floats and complexes: one or two length-prefixed strings
            for _ in range(1 if kind == "f" else 2):
                self._take(self._take(1)[0])
            return None
        if kind == "s":
            return self._take(self._size())
        if kind in "tuaA":
            return self._text(self._size())
        if kind in "([<>":
            return tuple([self.read(depth + 1) for _ in range(self._size())])
        if kind == ")":
            return tuple([self.read(depth + 1) for _ in range(self._take(1)[0])])
        if kind == "{":  # key, value pairs up to a NULL key
            while self.read(depth + 1) is not _NULL:
                self.read(depth + 1)
            return None
        if kind == "r":
            index = self._int()
            if not 0 <= index < len(self._refs):
                raise _Malformed
            return self._refs[index]
        if kind == "c":
            return self._code(depth)
        raise _Malformed

    def _code(self, depth: int) -> _Code:
        layout = self._layout
        self._take(4 * layout.leading_ints)
        bytecode = self.read(depth + 1)
        consts = self.read(depth + 1)
        names = self.read(depth + 1)
        for _ in range(layout.objects_after_names):
            self.read(depth + 1)
        self._take(4)  # co_firstlineno
        for _ in range(layout.objects_after_lineno):
            self.read(depth + 1)
        if not isinstance(bytecode, bytes) or not isinstance(consts, tuple) or not isinstance(names, tuple):
            raise _Malformed
        return _Code(bytecode, consts, tuple(n if isinstance(n, str) else "" for n in names))

    def _take(self, size: int) -> bytes:
        end = self._pos + size
        if size < 0 or end > len(self._data):
            raise _Malformed
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def _int(self) -> int:
        return int.from_bytes(self._take(4), "little", signed=True)

    def _size(self) -> int:
        size = self._int()
        if size < 0 or size > len(self._data):
            raise _Malformed
        return size

    def _text(self, size: int) -> str:
        try:
            return self._take(size).decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise _Malformed from None


# `import a.b as c, d` and `from .x import (y, z)` at column 0 (top-level code).
_SOURCE_IMPORT = re.compile(rb"^import[ \t]+([^#;\r\n]+)", re.MULTILINE)
_SOURCE_FROM = re.compile(
    rb"^from[ \t]+(\.*)[ \t]*([\w.]*)[ \t]+import[ \t]+(\([^)]*\)|[^#;\r\n]+)", re.MULTILINE
)
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_MAX_SOURCE = 4 << 20


def source_imports(text: bytes) -> list[ImportStatement]:
    """The imports on top-level lines of Python source, in order; raises nothing."""
    text = text[:_MAX_SOURCE]
    found: list[tuple[int, ImportStatement]] = []
    for match in _SOURCE_IMPORT.finditer(text):
        for part in _decode(match.group(1)).split(","):
            module = part.split(" as ")[0].strip()
            if _DOTTED.match(module):
                found.append((match.start(), ImportStatement(module)))
    for match in _SOURCE_FROM.finditer(text):
        dots, module = len(match.group(1)), _decode(match.group(2))
        if module and not _DOTTED.match(module):
            continue
        listed = _decode(match.group(3)).strip("() \t\r\n").replace("\n", ",").replace("\\", ",")
        names = tuple(
            name for name in (p.split(" as ")[0].strip() for p in listed.split(",")) if name.isidentifier()
        )
        found.append((match.start(), ImportStatement(module, dots, names)))
    return [statement for _, statement in sorted(found, key=lambda item: item[0])]


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")
