"""What is in a layer and where its bytes are: pure Python over bytes, no network, no FUSE."""

from index.builder import LayerIndexBuilder, build_index
from index.errors import (
    DigestMismatch,
    IndexVersionError,
    IntegrityError,
    LayerFormatError,
    LazysnapError,
    TruncatedLayer,
    UnsafePath,
)
from index.estargz import read_estargz_index
from index.model import Chunk, Entry, EntryType, LayerFormat, LayerIndex, SeekPoint
from index.reader import ByteRange, LayerReader, is_randomly_accessible, plan_read
from index.serialize import dump_index, load_index, load_index_file, save_index

__all__ = [
    "ByteRange",
    "Chunk",
    "DigestMismatch",
    "Entry",
    "EntryType",
    "IndexVersionError",
    "IntegrityError",
    "LayerFormat",
    "LayerFormatError",
    "LayerIndex",
    "LayerIndexBuilder",
    "LayerReader",
    "LazysnapError",
    "SeekPoint",
    "TruncatedLayer",
    "UnsafePath",
    "build_index",
    "dump_index",
    "is_randomly_accessible",
    "load_index",
    "load_index_file",
    "plan_read",
    "read_estargz_index",
    "save_index",
]
