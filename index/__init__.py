"""What is in a layer and where its bytes are: pure Python over bytes, no network, no FUSE.

The public names below are imported on first use (PEP 562). Every module of the package imports
``index.errors`` or ``index.model``, which runs this file first: importing the builder (libz
through ctypes) and the reader (trio, zstandard) here would put them on every path that needs
one small module, a mount's start-up included.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from index.builder import LayerIndexBuilder, build_index
    from index.completion_check import compare_with_blob, compare_with_tar, verify_index
    from index.errors import (
        DigestMismatch,
        IndexMismatch,
        IndexVersionError,
        IntegrityError,
        LayerFormatError,
        LazysnapError,
        MappingMismatch,
        TruncatedLayer,
        UnsafePath,
    )
    from index.estargz import read_estargz_index
    from index.model import Chunk, Entry, EntryType, LayerFormat, LayerIndex, SeekPoint
    from index.reader import ByteRange, LayerReader, is_randomly_accessible, plan_read
    from index.serialize import dump_index, load_index, load_index_file, save_index

_EXPORTS = {
    **dict.fromkeys(("LayerIndexBuilder", "build_index"), "index.builder"),
    **dict.fromkeys(("compare_with_blob", "compare_with_tar", "verify_index"), "index.completion_check"),
    **dict.fromkeys(
        (
            "DigestMismatch",
            "IndexMismatch",
            "IndexVersionError",
            "IntegrityError",
            "LayerFormatError",
            "LazysnapError",
            "MappingMismatch",
            "TruncatedLayer",
            "UnsafePath",
        ),
        "index.errors",
    ),
    "read_estargz_index": "index.estargz",
    **dict.fromkeys(("Chunk", "Entry", "EntryType", "LayerFormat", "LayerIndex", "SeekPoint"), "index.model"),
    **dict.fromkeys(("ByteRange", "LayerReader", "is_randomly_accessible", "plan_read"), "index.reader"),
    **dict.fromkeys(("dump_index", "load_index", "load_index_file", "save_index"), "index.serialize"),
}

__all__ = [
    "ByteRange",
    "Chunk",
    "DigestMismatch",
    "Entry",
    "EntryType",
    "IndexMismatch",
    "IndexVersionError",
    "IntegrityError",
    "LayerFormat",
    "LayerFormatError",
    "LayerIndex",
    "LayerIndexBuilder",
    "LayerReader",
    "LazysnapError",
    "MappingMismatch",
    "SeekPoint",
    "TruncatedLayer",
    "UnsafePath",
    "build_index",
    "compare_with_blob",
    "compare_with_tar",
    "dump_index",
    "is_randomly_accessible",
    "load_index",
    "load_index_file",
    "plan_read",
    "read_estargz_index",
    "save_index",
    "verify_index",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'index' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup finds it without calling here
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
