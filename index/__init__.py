"""What is in a layer and where its bytes are: pure Python over bytes, no network, no FUSE."""

from index.errors import (
    DigestMismatch,
    IndexVersionError,
    IntegrityError,
    LayerFormatError,
    LazysnapError,
    TruncatedLayer,
    UnsafePath,
)
from index.model import Chunk, Entry, EntryType, LayerFormat, LayerIndex, SeekPoint

__all__ = [
    "Chunk",
    "DigestMismatch",
    "Entry",
    "EntryType",
    "IndexVersionError",
    "IntegrityError",
    "LayerFormat",
    "LayerFormatError",
    "LayerIndex",
    "LazysnapError",
    "SeekPoint",
    "TruncatedLayer",
    "UnsafePath",
]
