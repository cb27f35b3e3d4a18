"""What is in a layer and where its bytes live: ``Entry``, ``Chunk``, ``SeekPoint``, ``LayerIndex``.

Offsets come in two spaces. *Compressed* offsets are positions in the blob as the registry
serves it. *Uncompressed* offsets are positions in the layer's tar stream (for a plain tar
layer the two are equal). A regular file of a tar/gzip/zstd layer has ``data_offset``: where
its bytes start in the tar stream; a seek point maps the tar stream back to the blob. A file
of an eStargz layer has ``chunks`` instead, each in its own gzip member.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class EntryType(enum.Enum):
    """The kind of a tar entry."""

    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"


class LayerFormat(enum.Enum):
    """How a layer blob is encoded, which decides how its bytes are reached."""

    TAR = "tar"
    GZIP = "gzip"
    ZSTD = "zstd"
    ESTARGZ = "estargz"


@dataclass(frozen=True, slots=True)
class Chunk:
    """One piece of a file stored as its own compressed member (eStargz).

    ``blob_offset``/``blob_end`` bound the gzip member in the blob; ``inner_offset`` is where
    this chunk's bytes start inside that member's output; ``digest`` (``sha256:...`` of the
    uncompressed chunk, empty when unknown) is checked before the bytes are used.
    """

    file_offset: int
    size: int
    blob_offset: int
    blob_end: int
    inner_offset: int = 0
    digest: str = ""


@dataclass(frozen=True, slots=True)
class Entry:
    """One tar entry: metadata and where its data lives.

    ``path`` is normalized: relative to the layer root, ``/``-separated, no ``.``/``..``
    components, no leading or trailing slash; the root itself is ``""``. For hardlinks
    ``link_target`` is the normalized path of the earlier entry; for symlinks it is the raw
    target. ``mode`` holds the permission bits including setuid/setgid/sticky (``0o7777``).
    Whiteouts (``.wh.NAME``, ``.wh..wh..opq``) are kept as ordinary entries.

    ``header_offset`` says where the tar headers that precede the entry's data begin, so that
    a read can check them (``index.header_check``). Tar, gzip and zstd layers: the uncompressed
    offset of the entry's first header block, PAX and GNU long-name records included (set for
    every entry). eStargz: for a file with data only, the offset, in the output of the gzip
    members from blob offset ``header_member`` on, where the previous file's data (and its
    padding) ends: the headers from there to the first chunk are this file's and those of the
    data-less entries before it. -1: unknown, which fails the read-time check.
    """

    path: str
    type: EntryType
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    size: int = 0
    mtime_ns: int = 0
    link_target: str = ""
    xattrs: dict[str, bytes] = field(default_factory=dict)
    devmajor: int = 0
    devminor: int = 0
    data_offset: int = -1
    chunks: tuple[Chunk, ...] = ()
    header_offset: int = -1
    header_member: int = -1

    @property
    def name(self) -> str:
        """The last component of the path ("" for the root)."""
        return self.path.rsplit("/", 1)[-1]


@dataclass(frozen=True, slots=True)
class SeekPoint:
    """A place where decompression can restart.

    ``compressed_offset`` is the first blob byte the decoder needs; for a gzip checkpoint that
    starts ``bits`` bits into that byte (``bits`` in 0..7), ``window`` holds the 32 KiB of
    output before ``uncompressed_offset``. zstd frame starts and plain tar need neither.
    """

    compressed_offset: int
    uncompressed_offset: int
    bits: int = 0
    window: bytes = b""


@dataclass(slots=True)
class LayerIndex:
    """Everything known about one layer blob.

    ``span_size``/``span_digests``: the blob is cut into aligned spans of ``span_size``
    compressed bytes (the last may be shorter); ``span_digests[i]`` is the ``sha256:...`` of
    span ``i``, recorded while the whole blob was streamed and verified, so each lazily
    fetched span can be checked on its own. Empty for eStargz, whose chunks carry digests.
    """

    media_type: str
    format: LayerFormat
    digest: str
    compressed_size: int
    diff_id: str
    uncompressed_size: int
    entries: list[Entry]
    seek_points: list[SeekPoint] = field(default_factory=list)
    span_size: int = 0
    span_digests: list[str] = field(default_factory=list)
    toc_digest: str = ""
