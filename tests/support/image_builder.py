"""Build layers and images in Python and push them: the test-facing name of ``snapshotter.devtools.image_builder``.

One implementation serves tests, the demo and benchmarks; see that module for the details::

    layer = make_layer([directory("etc"), file("etc/hostname", "box\n"), whiteout("tmp/old")], "gzip")
    pushed = await push_image(client, registry.ref("app"), [layer])
"""

from __future__ import annotations

from snapshotter.devtools.image_builder import (
    DEFAULT_MTIME,
    OPAQUE_WHITEOUT,
    WHITEOUT_PREFIX,
    EntryKind,
    Layer,
    PushedImage,
    PushedIndex,
    TarEntry,
    block_device,
    build_index,
    build_manifest,
    build_tar,
    char_device,
    compress,
    directory,
    fifo,
    file,
    hardlink,
    image_config,
    layer_from_directory,
    make_layer,
    opaque_whiteout,
    push_image,
    push_index,
    symlink,
    tar_from_directory,
    whiteout,
)

__all__ = [
    "DEFAULT_MTIME",
    "OPAQUE_WHITEOUT",
    "WHITEOUT_PREFIX",
    "EntryKind",
    "Layer",
    "PushedImage",
    "PushedIndex",
    "TarEntry",
    "block_device",
    "build_index",
    "build_manifest",
    "build_tar",
    "char_device",
    "compress",
    "directory",
    "fifo",
    "file",
    "hardlink",
    "image_config",
    "layer_from_directory",
    "make_layer",
    "opaque_whiteout",
    "push_image",
    "push_index",
    "symlink",
    "tar_from_directory",
    "whiteout",
]
