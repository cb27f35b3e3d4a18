"""What an entry's fields may hold, as Linux and the layer formats allow: one rule set for every parser.

Entries reach lazysnap three ways: tar headers (``index.tar_entries``), eStargz TOCs
(``index.estargz``) and stored or published indexes (``index.serialize``). All three pass each
entry through ``entry_problem`` (and each eStargz or stored chunk through ``chunk_problem``)
before it is used, so a value that the kernel, pyfuse3 or the eager unpack cannot represent is
refused when the layer is read, naming the field, instead of raising ``OverflowError`` inside a
FUSE handler later. Each parser adds the layer and the entry to the message and raises its own
``LayerFormatError`` subclass.

The limits, and why:

- uid and gid are 32 bits (``uid_t``): chown and pyfuse3 refuse anything else;
- sizes and offsets fit in a signed 64-bit ``off_t`` (pyfuse3's ``st_size`` is a C long);
- device numbers fit the kernel's ``dev_t``: major below 2^12, minor below 2^20 (mknod refuses more);
- the mode holds permission bits only (``0o7777``); the type lives in ``Entry.type`` (the tar and
  TOC parsers keep ``mode & 0o7777``, as the eager unpack's chmod does; a stored index must);
- mtimes fit in 64-bit nanoseconds (``st_mtime_ns``: years 1677 to 2262);
- a path component is at most ``NAME_MAX`` (255) bytes, a path and a symlink target are shorter
  than ``PATH_MAX`` (4096, which counts the terminating NUL); none holds a NUL byte;
- an xattr name is 1..255 bytes without NUL, a value at most ``XATTR_SIZE_MAX`` (64 KiB), and the
  list of an entry's names (each with its NUL) at most ``XATTR_LIST_MAX`` (64 KiB): setxattr and
  listxattr refuse more, so the eager unpack fails on such a layer and so do we.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from index.model import Chunk, Entry, EntryType

MAX_ID = 0xFFFF_FFFF
MAX_SIZE = (1 << 63) - 1
MAX_DEV_MAJOR = (1 << 12) - 1
MAX_DEV_MINOR = (1 << 20) - 1
MAX_MODE = 0o7777
MTIME_NS_START = -(1 << 63)
MTIME_NS_END = 1 << 63
NAME_MAX = 255
PATH_MAX = 4096
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 1 << 16
XATTR_LIST_MAX = 1 << 16
# A str of this many characters encodes to at most NAME_MAX bytes (4 bytes a character at most):
# the usual short path needs no encoding to know its components are short enough.
_SURELY_SHORT = NAME_MAX // 4
_SHOWN = 300  # characters of a name quoted in a message
# The integer fields of an entry, their ranges, and whether a layer has few distinct values of
# them (then a set of the column is built in one pass, faster than a min and a max).
_COLUMN_RANGES = (
    ("uid", 0, MAX_ID, True),
    ("gid", 0, MAX_ID, True),
    ("size", 0, MAX_SIZE, False),
    ("mode", 0, MAX_MODE, True),
    ("mtime_ns", MTIME_NS_START, MTIME_NS_END - 1, True),
    ("devmajor", 0, MAX_DEV_MAJOR, True),
    ("devminor", 0, MAX_DEV_MINOR, True),
    ("data_offset", -1, MAX_SIZE, False),
)
# An empty, "." or ".." component inside names joined by "/".
_UNNORMAL = re.compile(r"/\.{0,2}/")


def shown(name: str) -> str:
    """``repr(name)``, cut short for a message when the name is a hostile 64 KiB."""
    if len(name) <= _SHOWN:
        return repr(name)
    return f"{name[:_SHOWN]!r}... ({len(name)} characters)"


def name_problem(what: str, path: str, *, components: bool = True) -> str | None:
    """Return why ``path`` is not a name Linux can hold, or None; never raises.

    ``components``: also hold each ``/``-separated component to NAME_MAX (paths, not symlink
    targets, which symlink(2) stores whatever their components). The answer reads after the
    entry's name: ``has a path ...``, ``has a symlink target ...``.
    """
    if "\x00" in path:
        return f"has a {what} containing a NUL byte"
    if len(path) <= _SURELY_SHORT:
        return None
    raw = os.fsencode(path)
    if len(raw) >= PATH_MAX:
        return f"has a {what} of {len(raw)} bytes, beyond PATH_MAX ({PATH_MAX} including its NUL)"
    if components and len(raw) > NAME_MAX:
        longest = max(raw.split(b"/"), key=len)
        if len(longest) > NAME_MAX:
            return f"has a {what} component of {len(longest)} bytes, beyond NAME_MAX ({NAME_MAX})"
    return None


def entry_problem(entry: Entry) -> str | None:
    """Return what is wrong with ``entry``'s fields, naming the field, or None when Linux can represent it; never raises.

    The answer reads after the entry's name (``'etc/x' has owner -1:0, not a Linux uid:gid ...``).
    """
    # One chained test for the common entry: every numeric field in range.
    if not (
        0 <= entry.uid <= MAX_ID
        and 0 <= entry.gid <= MAX_ID
        and 0 <= entry.size <= MAX_SIZE
        and 0 <= entry.mode <= MAX_MODE
        and MTIME_NS_START <= entry.mtime_ns < MTIME_NS_END
        and 0 <= entry.devmajor <= MAX_DEV_MAJOR
        and 0 <= entry.devminor <= MAX_DEV_MINOR
        and -1 <= entry.data_offset <= MAX_SIZE
    ):
        return _number_problem(entry)
    problem = name_problem("path", entry.path)
    if problem is None and entry.link_target:
        problem = name_problem(f"{entry.type.value} target", entry.link_target, components=False)
    if problem is None and entry.type is EntryType.SYMLINK and not entry.link_target:
        problem = "has an empty symlink target, which symlink(2) refuses"
    if problem is None and entry.xattrs:
        problem = _xattr_problem(entry.xattrs)
    return problem


def _number_problem(entry: Entry) -> str:
    """The message for the first numeric field of ``entry`` out of its range."""
    if not (0 <= entry.uid <= MAX_ID and 0 <= entry.gid <= MAX_ID):
        return f"has owner {entry.uid}:{entry.gid}, not a Linux uid:gid (0 to {MAX_ID})"
    checks = (
        ("size", entry.size, 0, MAX_SIZE, ", not a 64-bit file size"),
        ("mode", entry.mode, 0, MAX_MODE, ", not permission bits (0 to 0o7777)"),
        ("mtime", entry.mtime_ns, MTIME_NS_START, MTIME_NS_END - 1, " ns, beyond 64-bit nanoseconds"),
        ("device major", entry.devmajor, 0, MAX_DEV_MAJOR, f", beyond Linux's (0 to {MAX_DEV_MAJOR})"),
        ("device minor", entry.devminor, 0, MAX_DEV_MINOR, f", beyond Linux's (0 to {MAX_DEV_MINOR})"),
        ("data offset", entry.data_offset, -1, MAX_SIZE, ", not a 64-bit offset"),
    )
    for field, value, low, high, meaning in checks:
        if not low <= value <= high:
            return f"has {field} {value}{meaning}"
    return "has a numeric field out of range"  # not reached: the caller found one


def _xattr_problem(xattrs: dict[str, bytes]) -> str | None:
    """Why ``xattrs`` cannot be set on a Linux file (setxattr's and listxattr's limits), or None."""
    listed = 0
    for name, value in xattrs.items():
        raw = os.fsencode(name)
        if not 0 < len(raw) <= XATTR_NAME_MAX or b"\x00" in raw:
            return f"has xattr name {name[:64]!r} ({len(raw)} bytes), not 1 to {XATTR_NAME_MAX} bytes without NUL"
        if len(value) > XATTR_SIZE_MAX:
            return f"has xattr {name!r} value of {len(value)} bytes, beyond XATTR_SIZE_MAX ({XATTR_SIZE_MAX})"
        listed += len(raw) + 1
    if listed > XATTR_LIST_MAX:
        return f"has xattr names of {listed} bytes in all, beyond XATTR_LIST_MAX ({XATTR_LIST_MAX})"
    return None


def columns_plainly_fine(columns: Mapping[str, Sequence[Any]]) -> bool:
    """Whether entry columns (field name to values, as a stored index holds them) are plainly within the limits.

    A C-speed screen for a whole index: True means ``entry_problem`` finds nothing in any entry
    on these fields, and every path and hardlink target is normalized (as ``normalize_path``
    leaves it); False means some value needs a closer look. Numbers are compared, not
    type-checked: the caller refuses floats when it parses (``bool`` passes, as the int it is).
    """
    try:
        for field, low, high, few in _COLUMN_RANGES:
            values = columns.get(field, ())
            distinct = set(values) if few else values  # one pass over a column of a few distinct values
            if values and not (low <= min(distinct) and max(distinct) <= high):
                return False
        paths, targets, types = (
            columns.get("path", ()),
            columns.get("link_target", ()),
            columns.get("type", ()),
        )
        # The root is the one empty path. Joined by "/", a path that is not normalized shows as
        # "//", "/./" or "/../", or at either end; and so does a NUL anywhere.
        joined = "/".join(filter(None, paths))
        hardlinked = (
            "/".join(itertools.compress(targets, map("hardlink".__eq__, types)))
            if "hardlink" in types
            else ""
        )
        linked = "".join(targets)  # TypeError unless all are str
    except TypeError:  # a column of another type than its field's
        return False
    for names in (joined, hardlinked):
        if names.startswith(("/", "./", "../")) or names.endswith(("/", "/.", "/..")) or names in (".", ".."):
            return False
        if _UNNORMAL.search(names):
            return False
    if "\x00" in joined or "\x00" in linked:
        return False
    if not (_all_within(paths, PATH_MAX - 1) and _all_within(targets, PATH_MAX - 1)):
        return False
    # A path within NAME_MAX bytes has no longer component; only the components of longer ones are looked at.
    if not _all_within(paths, NAME_MAX):
        long_paths = itertools.compress(paths, map(_SURELY_SHORT.__lt__, map(len, paths)))
        if not _all_within("/".join(long_paths).split("/"), NAME_MAX):
            return False
    # An empty symlink target is the one thing entry_problem refuses that no range shows.
    return "" not in itertools.compress(targets, map("symlink".__eq__, types))


def _all_within(names: Sequence[str], limit: int) -> bool:
    """Whether every name encodes to at most ``limit`` bytes; at C speed when the names are ASCII, as nearly all are."""
    longest = max(map(len, names), default=0)
    if longest * 4 <= limit:  # at most 4 bytes a character
        return True
    if longest > limit:  # at least a byte a character
        return False
    if "".join(names).isascii():  # a byte a character
        return True
    return all(len(os.fsencode(name)) <= limit for name in names if len(name) * 4 > limit)


def chunk_problem(chunk: Chunk) -> str | None:
    """Return what is wrong with ``chunk``'s offsets and sizes, naming the field, or None; never raises.

    The answer reads after the entry's name, like ``entry_problem``'s.
    """
    for field, value in (
        ("file offset", chunk.file_offset),
        ("size", chunk.size),
        ("blob offset", chunk.blob_offset),
        ("blob end", chunk.blob_end),
        ("inner offset", chunk.inner_offset),
    ):
        if not 0 <= value <= MAX_SIZE:
            return f"has a chunk {field} of {value}, not a 64-bit offset"
    if chunk.blob_end <= chunk.blob_offset:
        return f"has a chunk whose blob range {chunk.blob_offset}..{chunk.blob_end} is empty"
    return None


def chunks_problem(chunks: Iterable[Chunk]) -> str | None:
    """Return the first ``chunk_problem`` of ``chunks``, or None; never raises."""
    return next(filter(None, map(chunk_problem, chunks)), None)
