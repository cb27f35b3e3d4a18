"""Media types of OCI and Docker schema2 images: indexes, manifests, configs, layers.

``layer_compression`` maps any layer type lazysnap handles to ``"tar"``, ``"gzip"`` or ``"zstd"``.
"""

from __future__ import annotations

from typing import Literal

from index.model import LayerFormat
from snapshotter.errors import UnsupportedMediaType

Compression = Literal["tar", "gzip", "zstd"]

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
# "Non-distributable" layers were deprecated by image-spec 1.1 but still appear in the wild.
OCI_LAYER_NONDIST = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_NONDIST_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_NONDIST_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"

DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"  # uncompressed, rare but valid
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_ZSTD = "application/vnd.docker.image.rootfs.diff.tar.zstd"
DOCKER_FOREIGN_LAYER_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
DOCKER_MANIFEST_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
DOCKER_MANIFEST_V1 = "application/vnd.docker.distribution.manifest.v1+json"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
SCHEMA1_TYPES = frozenset({DOCKER_MANIFEST_V1, DOCKER_MANIFEST_V1_SIGNED})

_LAYER_COMPRESSION: dict[str, Compression] = {
    OCI_LAYER: "tar",
    OCI_LAYER_GZIP: "gzip",
    OCI_LAYER_ZSTD: "zstd",
    OCI_LAYER_NONDIST: "tar",
    OCI_LAYER_NONDIST_GZIP: "gzip",
    OCI_LAYER_NONDIST_ZSTD: "zstd",
    DOCKER_LAYER: "tar",
    DOCKER_LAYER_GZIP: "gzip",
    DOCKER_LAYER_ZSTD: "zstd",
    DOCKER_FOREIGN_LAYER_GZIP: "gzip",
}
LAYER_TYPES = frozenset(_LAYER_COMPRESSION)
FOREIGN_LAYER_TYPES = frozenset(
    {OCI_LAYER_NONDIST, OCI_LAYER_NONDIST_GZIP, OCI_LAYER_NONDIST_ZSTD, DOCKER_FOREIGN_LAYER_GZIP}
)

# What we send in Accept when fetching a manifest by tag: any index or manifest type we understand.
MANIFEST_ACCEPT = ", ".join([OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST])


def layer_compression(media_type: str, context: str = "layer") -> Compression:
    """Return how a layer of ``media_type`` is compressed; raises UnsupportedMediaType for other types."""
    try:
        return _LAYER_COMPRESSION[media_type]
    except KeyError:
        raise UnsupportedMediaType(
            f"{context}: unsupported layer media type {media_type!r}; lazysnap reads tar, tar+gzip and tar+zstd "
            "layers (OCI or Docker schema2): convert the image, e.g. with skopeo copy --format oci"
        ) from None


def layer_media_type(compression: Compression, *, docker: bool = False) -> str:
    """Return the standard layer media type for ``compression`` (OCI, or Docker schema2 with ``docker=True``)."""
    if docker:
        return {"tar": DOCKER_LAYER, "gzip": DOCKER_LAYER_GZIP, "zstd": DOCKER_LAYER_ZSTD}[compression]
    return {"tar": OCI_LAYER, "gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD}[compression]


def layer_format(media_type: str, context: str = "layer") -> LayerFormat:
    """Return the index format of a layer of ``media_type``; raises UnsupportedMediaType for other types."""
    return _LAYER_FORMAT[layer_compression(media_type, context)]


_LAYER_FORMAT = {"tar": LayerFormat.TAR, "gzip": LayerFormat.GZIP, "zstd": LayerFormat.ZSTD}
