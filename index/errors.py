"""The root of lazysnap's exception tree and the errors of layer content.

Every error lazysnap raises on purpose derives from ``LazysnapError``::

    LazysnapError
     +-- IntegrityError              bytes do not match the digest that pins them
     |    +-- DigestMismatch
     |    +-- MappingMismatch        an index maps a file to bytes whose tar header names another
     |    +-- IndexMismatch          a completed layer's index differs from its verified tar
     +-- LayerFormatError            a layer blob or index is not what it claims to be
     |    +-- UnsafePath             an entry would escape the layer root
     |    +-- TruncatedLayer         the compressed stream or tar ends too early
     |    +-- IndexVersionError      a stored index of another format version
     |    +-- EstargzError           (index.estargz) a malformed eStargz footer or TOC
     +-- (snapshotter.errors)        RegistryError, FetchError, ConfigError, UsageError, ...

The whole tree, with the gRPC status of each class, is drawn in ``snapshotter/errors.py``.

Messages name the object (layer digest, entry path, image reference) and say what to do.
"""

from __future__ import annotations


class LazysnapError(Exception):
    """Base class of every error lazysnap raises on purpose."""


class IntegrityError(LazysnapError):
    """Bytes did not match the digest that pins them; they were not used."""


class DigestMismatch(IntegrityError):
    """A blob, span, chunk or TOC hashed to another digest than expected."""

    def __init__(self, what: str, expected: str, actual: str) -> None:
        super().__init__(
            f"{what}: digest mismatch: expected {expected}, got {actual}; the data was discarded"
        )
        self.what = what
        self.expected = expected
        self.actual = actual


class MappingMismatch(IntegrityError):
    """The tar header before the bytes an index maps a file to does not describe that file; nothing was served."""

    def __init__(self, layer: str, path: str, field: str, index_value: object, tar_value: object) -> None:
        super().__init__(
            f"layer {layer}: {path!r}: {field}: index {index_value!r}, tar header {tar_value!r}; the index maps "
            "the file to bytes that are not its own: serve nothing of it and stop serving the layer lazily"
        )
        self.layer = layer
        self.path = path
        self.field = field
        self.index_value = index_value
        self.tar_value = tar_value


class IndexMismatch(IntegrityError):
    """A layer's index (or TOC) differs from the verified tar it claims to describe."""

    def __init__(self, layer: str, differences: list[str]) -> None:
        shown = "; ".join(differences[:5]) + (
            f"; and {len(differences) - 5} more" if len(differences) > 5 else ""
        )
        super().__init__(
            f"layer {layer}: the index differs from the verified tar in {len(differences)} place(s): {shown}; "
            "stop serving the layer lazily"
        )
        self.layer = layer
        self.differences = differences


class LayerFormatError(LazysnapError):
    """A layer blob, its TOC or a stored index is malformed."""


class UnsafePath(LayerFormatError):
    """A tar entry's name or link would escape the layer root."""


class TruncatedLayer(LayerFormatError):
    """The compressed stream or the tar archive ends in the middle of something."""


class IndexVersionError(LayerFormatError):
    """A stored index was written by another, incompatible version."""
