"""Build OCI/Docker images in Python and push them with RegistryClient: for tests, the demo and benchmarks.

Layers come from lists of ``TarEntry`` (every tar entry type a container layer may hold: files,
dirs, symlinks, hardlinks, whiteouts, fifos, devices, xattrs via PAX, any mode/uid/gid/mtime) or
from a directory tree, compressed as plain tar, gzip, or zstd (one frame, or one frame per
``frame_size`` bytes of tar). ``push_image`` and ``push_index`` upload blobs, config and manifest.
``tests/support/image_builder.py`` re-exports this module for the tests.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import posixpath
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import zstandard

from snapshotter.remote import media_types as mt
from snapshotter.remote.client import Descriptor, Platform, RegistryClient, digest_of
from snapshotter.remote.media_types import Compression
from snapshotter.remote.reference import Reference

EntryKind = Literal["file", "dir", "symlink", "hardlink", "fifo", "char", "block"]
DEFAULT_MTIME = 1_700_000_000  # a fixed time keeps layers byte-for-byte reproducible
_TYPEFLAG = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
}
_DEFAULT_MODE = {"file": 0o644, "dir": 0o755, "symlink": 0o777, "hardlink": 0o644, "fifo": 0o644}
WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"


@dataclass(frozen=True)
class TarEntry:
    """One tar entry to write; ``mode`` holds permission bits incl. setuid/setgid/sticky (None: per type)."""

    path: str
    kind: EntryKind = "file"
    content: bytes = b""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    mtime: float = DEFAULT_MTIME
    link: str = ""  # target of a symlink or hardlink
    devmajor: int = 0
    devminor: int = 0
    xattrs: Mapping[str, str | bytes] = field(default_factory=dict)
    pax: Mapping[str, str] = field(default_factory=dict)  # extra PAX records, verbatim


def file(path: str, content: bytes | str = b"", *, mode: int = 0o644, **kw: Any) -> TarEntry:
    """A regular file."""
    data = content.encode() if isinstance(content, str) else content
    return TarEntry(path, "file", data, mode, **kw)


def directory(path: str, *, mode: int = 0o755, **kw: Any) -> TarEntry:
    """A directory."""
    return TarEntry(path, "dir", mode=mode, **kw)


def symlink(path: str, target: str, **kw: Any) -> TarEntry:
    """A symbolic link to ``target``."""
    return TarEntry(path, "symlink", link=target, **kw)


def hardlink(path: str, target: str, **kw: Any) -> TarEntry:
    """A hard link to the earlier entry ``target`` (a path inside the layer)."""
    return TarEntry(path, "hardlink", link=target, **kw)


def fifo(path: str, **kw: Any) -> TarEntry:
    """A named pipe."""
    return TarEntry(path, "fifo", **kw)


def char_device(path: str, major: int, minor: int, *, mode: int = 0o666, **kw: Any) -> TarEntry:
    """A character device."""
    return TarEntry(path, "char", mode=mode, devmajor=major, devminor=minor, **kw)


def block_device(path: str, major: int, minor: int, *, mode: int = 0o660, **kw: Any) -> TarEntry:
    """A block device."""
    return TarEntry(path, "block", mode=mode, devmajor=major, devminor=minor, **kw)


def whiteout(path: str) -> TarEntry:
    """The whiteout that hides ``path`` of lower layers (an empty file ``.wh.NAME`` beside it)."""
    parent, name = posixpath.split(path.strip("/"))
    return file(posixpath.join(parent, WHITEOUT_PREFIX + name), mode=0o000)


def opaque_whiteout(directory_path: str) -> TarEntry:
    """The marker that hides everything lower layers put in ``directory_path``."""
    return file(posixpath.join(directory_path.strip("/"), OPAQUE_WHITEOUT), mode=0o000)


def _tarinfo(entry: TarEntry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(entry.path.lstrip("/"))
    info.type = _TYPEFLAG[entry.kind]
    info.mode = entry.mode if entry.mode is not None else _DEFAULT_MODE.get(entry.kind, 0o644)
    info.uid, info.gid, info.uname, info.gname = entry.uid, entry.gid, entry.uname, entry.gname
    info.mtime = entry.mtime
    info.linkname = entry.link
    info.devmajor, info.devminor = entry.devmajor, entry.devminor
    info.size = len(entry.content) if entry.kind == "file" else 0
    pax = dict(entry.pax)
    for name, value in entry.xattrs.items():
        # Binary values survive as surrogate escapes; tarfile then writes them raw (hdrcharset=BINARY).
        pax[f"SCHILY.xattr.{name}"] = (
            value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value
        )
    info.pax_headers = pax
    return info


def build_tar(entries: Sequence[TarEntry]) -> bytes:
    """Return an uncompressed PAX tar of ``entries`` in the given order."""
    out = io.BytesIO()
    with tarfile.open(
        fileobj=out, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as tar:
        for entry in entries:
            info = _tarinfo(entry)
            tar.addfile(info, io.BytesIO(entry.content) if entry.kind == "file" else None)
    return out.getvalue()


def tar_from_directory(root: str | os.PathLike[str]) -> bytes:
    """Return a PAX tar of the tree under ``root`` (sorted; hardlinks, devices and xattrs kept)."""
    root = os.fspath(root)
    out = io.BytesIO()
    with tarfile.open(
        fileobj=out, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as tar:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in dirnames + sorted(filenames):
                _add_path(tar, root, os.path.join(dirpath, name))
    return out.getvalue()


def _add_path(tar: tarfile.TarFile, root: str, path: str) -> None:
    info = tar.gettarinfo(path, arcname=os.path.relpath(path, root))
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        names = []
    pax = dict(info.pax_headers)
    for name in sorted(names):
        value = os.getxattr(path, name, follow_symlinks=False)
        pax[f"SCHILY.xattr.{name}"] = value.decode("utf-8", "surrogateescape")
    info.pax_headers = pax
    if info.isreg():
        with open(path, "rb") as handle:
            tar.addfile(info, handle)
    else:
        tar.addfile(info)


def compress(
    data: bytes, compression: Compression, *, frame_size: int | None = None, level: int | None = None
) -> bytes:
    """Compress a tar as ``tar`` (as is), ``gzip``, or ``zstd`` (one frame per ``frame_size`` bytes if given)."""
    if compression == "tar":
        return data
    if compression == "gzip":
        return gzip.compress(data, compresslevel=6 if level is None else level, mtime=0)
    compressor = zstandard.ZstdCompressor(level=3 if level is None else level, write_content_size=True)
    if frame_size is None or not data:
        return bytes(compressor.compress(data))
    return b"".join(
        bytes(compressor.compress(data[i : i + frame_size])) for i in range(0, len(data), frame_size)
    )


@dataclass(frozen=True)
class Layer:
    """A built layer: its tar, its blob as pushed, and how it is described in a manifest."""

    tar: bytes
    blob: bytes
    compression: Compression
    media_type: str | None = None  # None: the standard OCI or Docker type for the compression
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def diff_id(self) -> str:
        """The digest of the uncompressed tar."""
        return digest_of(self.tar)

    @property
    def digest(self) -> str:
        """The digest of the blob."""
        return digest_of(self.blob)

    def descriptor(self, *, docker: bool = False) -> Descriptor:
        """The manifest descriptor of this layer."""
        media_type = self.media_type or mt.layer_media_type(self.compression, docker=docker)
        return Descriptor(media_type, self.digest, len(self.blob), dict(self.annotations))


def make_layer(
    content: Sequence[TarEntry] | bytes,
    compression: Compression = "gzip",
    *,
    frame_size: int | None = None,
    level: int | None = None,
    media_type: str | None = None,
    annotations: Mapping[str, str] | None = None,
) -> Layer:
    """Build a layer from tar entries or ready tar bytes, compressed as asked."""
    tar = content if isinstance(content, bytes) else build_tar(content)
    blob = compress(tar, compression, frame_size=frame_size, level=level)
    return Layer(tar, blob, compression, media_type, dict(annotations or {}))


def layer_from_directory(root: str | os.PathLike[str], compression: Compression = "gzip", **kw: Any) -> Layer:
    """Build a layer from a directory tree."""
    return make_layer(tar_from_directory(root), compression, **kw)


def _canonical(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def image_config(
    diff_ids: Sequence[str], platform: Platform | None = None, *, config: Mapping[str, Any] | None = None
) -> bytes:
    """Return an image config (JSON) with ``rootfs.diff_ids`` and an optional runtime ``config`` section."""
    platform = platform or Platform()
    document: dict[str, Any] = {
        "architecture": platform.architecture,
        "os": platform.os,
        "created": "2023-11-14T22:13:20Z",
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "config": dict(config or {"Cmd": ["/bin/sh"]}),
        "history": [{"created_by": "lazysnap image_builder"} for _ in diff_ids],
    }
    if platform.variant:
        document["variant"] = platform.variant
    return _canonical(document)


def build_manifest(
    config: Descriptor,
    layers: Sequence[Descriptor],
    *,
    docker: bool = False,
    annotations: Mapping[str, str] | None = None,
) -> bytes:
    """Return an image manifest (OCI, or Docker schema2 with ``docker=True``)."""
    document: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": mt.DOCKER_MANIFEST if docker else mt.OCI_MANIFEST,
        "config": config.to_json(),
        "layers": [layer.to_json() for layer in layers],
    }
    if annotations:
        document["annotations"] = dict(annotations)
    return _canonical(document)


def build_index(manifests: Sequence[tuple[Descriptor, Platform]], *, docker: bool = False) -> bytes:
    """Return an image index (OCI, or a Docker manifest list) listing each manifest with its platform."""
    entries = [{**descriptor.to_json(), "platform": platform.to_json()} for descriptor, platform in manifests]
    media_type = mt.DOCKER_MANIFEST_LIST if docker else mt.OCI_INDEX
    return _canonical({"schemaVersion": 2, "mediaType": media_type, "manifests": entries})


@dataclass(frozen=True)
class PushedImage:
    """What push_image uploaded: ``reference`` is pinned to the manifest digest."""

    reference: Reference
    manifest_digest: str
    manifest_media_type: str
    manifest: bytes
    config: Descriptor
    config_bytes: bytes
    layers: list[Descriptor]
    diff_ids: list[str]
    blobs: list[bytes]  # the raw layer blobs, as pushed
    tars: list[bytes]  # the uncompressed layer tars
    platform: Platform


@dataclass(frozen=True)
class PushedIndex:
    """What push_index uploaded: the index and each platform's image."""

    reference: Reference
    index_digest: str
    index_media_type: str
    images: list[PushedImage]


async def push_image(
    client: RegistryClient,
    ref: Reference,
    layers: Sequence[Layer],
    *,
    platform: Platform | None = None,
    docker: bool = False,
    chunked: bool = False,
    tag: str | None = None,
    untagged: bool = False,
    config: Mapping[str, Any] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> PushedImage:
    """Upload layers, config and manifest; tag it ``tag`` (default ref.tag) unless ``untagged``; raises RegistryError."""
    platform = platform or Platform()
    descriptors = [layer.descriptor(docker=docker) for layer in layers]
    for layer, descriptor in zip(layers, descriptors, strict=True):
        await client.push_blob(ref, layer.blob, chunked=chunked, media_type=descriptor.media_type)
    diff_ids = [layer.diff_id for layer in layers]
    config_bytes = image_config(diff_ids, platform, config=config)
    config_type = mt.DOCKER_CONFIG if docker else mt.OCI_CONFIG
    config_descriptor = await client.push_blob(ref, config_bytes, media_type=config_type)
    manifest = build_manifest(config_descriptor, descriptors, docker=docker, annotations=annotations)
    manifest_type = mt.DOCKER_MANIFEST if docker else mt.OCI_MANIFEST
    digest = digest_of(manifest)
    push_tag = None if untagged else (tag or ref.tag)
    await client.push_manifest(ref, manifest, manifest_type, tag=push_tag or digest)
    pinned = replace(ref, tag=push_tag, digest=digest)
    return PushedImage(
        pinned,
        digest,
        manifest_type,
        manifest,
        config_descriptor,
        config_bytes,
        descriptors,
        diff_ids,
        [layer.blob for layer in layers],
        [layer.tar for layer in layers],
        platform,
    )


async def push_index(
    client: RegistryClient,
    ref: Reference,
    images: Sequence[tuple[Platform, Sequence[Layer]]],
    *,
    docker: bool = False,
    tag: str | None = None,
) -> PushedIndex:
    """Upload one image per platform (untagged) and an index over them tagged ``tag`` (default ref.tag)."""
    pushed = [
        await push_image(client, ref, layers, platform=platform, docker=docker, untagged=True)
        for platform, layers in images
    ]
    manifest_type = mt.DOCKER_MANIFEST if docker else mt.OCI_MANIFEST
    entries = [
        (Descriptor(manifest_type, image.manifest_digest, len(image.manifest), {}), image.platform)
        for image in pushed
    ]
    body = build_index(entries, docker=docker)
    index_type = mt.DOCKER_MANIFEST_LIST if docker else mt.OCI_INDEX
    digest = await client.push_manifest(ref, body, index_type, tag=tag or ref.tag or digest_of(body))
    return PushedIndex(replace(ref, tag=tag or ref.tag, digest=digest), digest, index_type, pushed)
