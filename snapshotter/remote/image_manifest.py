"""What registries serve about an image: descriptors, platforms, indexes, manifests and configs, as data.

Pure parsing, no I/O: ``RegistryClient`` fetches the bytes, this module judges them. Errors name
the image reference they came from.
"""

from __future__ import annotations

import hashlib
import json
import platform as _platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from snapshotter.errors import NoMatchingPlatform, RegistryError, UnsupportedMediaType
from snapshotter.remote import media_types as mt
from snapshotter.remote.reference import Reference, validate_digest

# containerd refuses manifests over 4 MiB; so do we, so a hostile registry cannot make us buffer gigabytes.
MAX_MANIFEST_SIZE = 4 << 20
# A descriptor's size is a Go int64 in containerd and the registry; a larger one is a lie.
MAX_DESCRIPTOR_SIZE = (1 << 63) - 1
_GOARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "i386": "386",
    "i686": "386",
    "armv7l": "arm",
    "armv6l": "arm",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


def _running_arch() -> str:
    machine = _platform.machine().lower()
    return _GOARCH.get(machine, machine)


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: what a manifest says about a blob or another manifest."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    urls: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """Return the descriptor as an OCI JSON object."""
        body: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            body["annotations"] = dict(self.annotations)
        if self.urls:
            body["urls"] = list(self.urls)
        return body


@dataclass(frozen=True)
class Platform:
    """The platform an image runs on, in Go's GOOS/GOARCH terms (what image indexes use)."""

    os: str = "linux"
    architecture: str = field(default_factory=_running_arch)
    variant: str | None = None

    def to_json(self) -> dict[str, str]:
        """Return the platform as an image index ``platform`` object."""
        body = {"os": self.os, "architecture": self.architecture}
        if self.variant:
            body["variant"] = self.variant
        return body

    def matches(self, other: Mapping[str, Any]) -> bool:
        """True if an index's ``platform`` object fits this platform (any variant if ours is None)."""
        if other.get("os") != self.os or other.get("architecture") != self.architecture:
            return False
        if self.variant is None:
            return True
        # arm64 without a variant means v8 (containerd normalizes the same way).
        default = "v8" if self.architecture == "arm64" else None
        return (other.get("variant") or default) == (self.variant or default)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class ResolvedImage:
    """An image resolved down to one platform's manifest, its config and its layers."""

    reference: Reference
    manifest_digest: str
    manifest_media_type: str
    config: Descriptor
    layers: list[Descriptor]
    diff_ids: list[str]


def parse_descriptor(obj: Any, context: str) -> Descriptor:
    """Build a Descriptor from manifest JSON; raises RegistryError if a field is missing or mistyped.

    The size must be a JSON integer (not a boolean) in Go's int64 range, as containerd reads it;
    the digest must be ``sha256:``, the only algorithm lazysnap verifies blobs with; annotations
    must map strings to strings and urls must be a list of strings, as the OCI spec says.
    """
    if not isinstance(obj, dict):
        raise RegistryError(f"{context}: descriptor is not a JSON object")
    media_type, digest, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
    if (
        not isinstance(media_type, str)
        or not isinstance(digest, str)
        or not isinstance(size, int)
        or isinstance(size, bool)
        or not 0 <= size <= MAX_DESCRIPTOR_SIZE
    ):
        raise RegistryError(
            f"{context}: descriptor lacks mediaType, digest or a valid size: {json.dumps(obj)[:200]}"
        )
    validate_digest(digest, context)
    if not digest.startswith("sha256:"):
        raise RegistryError(
            f"{context}: digest {digest[:80]!r} uses an algorithm lazysnap cannot verify (only sha256)"
        )
    annotations = obj.get("annotations") or {}
    if not isinstance(annotations, dict) or not all(isinstance(v, str) for v in annotations.values()):
        raise RegistryError(f"{context}: descriptor annotations are not a map of strings to strings")
    urls = obj.get("urls") or []
    if not isinstance(urls, list) or not all(isinstance(url, str) for url in urls):
        raise RegistryError(f"{context}: descriptor urls are not a list of strings")
    return Descriptor(media_type, digest, size, dict(annotations), tuple(urls))


def digest_of(data: bytes) -> str:
    """Return the ``sha256:`` digest of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def select_platform(ref: Reference, index: dict[str, Any], platform: Platform) -> Descriptor:
    """Pick the manifest for ``platform`` from an image index; raises NoMatchingPlatform."""
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise RegistryError(f"image {ref}: image index has no manifests list")
    offered: list[str] = []
    for i, entry in enumerate(entries):
        wanted = entry.get("platform") if isinstance(entry, dict) else None
        if not isinstance(wanted, dict):
            continue
        offered.append(
            "/".join(str(wanted.get(k)) for k in ("os", "architecture", "variant") if wanted.get(k))
        )
        if platform.matches(wanted):
            descriptor = parse_descriptor(entry, f"image {ref}: index entry {i}")
            if descriptor.media_type in mt.MANIFEST_TYPES:
                return descriptor
    raise NoMatchingPlatform(
        f"image {ref}: no manifest for platform {platform} (the index offers: {', '.join(offered) or 'none'}); "
        "pick one of those platforms or another image"
    )


def manifest_media_type(ref: Reference, response: httpx.Response, body: bytes) -> str:
    """Return a manifest's media type from Content-Type, else its body; raises UnsupportedMediaType."""
    content_type = response.headers.get("content-type", "").split(";")[0].strip()
    if content_type in mt.INDEX_TYPES | mt.MANIFEST_TYPES | mt.SCHEMA1_TYPES:
        return str(content_type)
    # Some registries answer application/json; fall back to the body's own mediaType, then its shape.
    document = parse_json_object(ref, body, "manifest")
    declared = document.get("mediaType")
    if isinstance(declared, str) and declared:
        return str(declared)
    if "manifests" in document:
        return mt.OCI_INDEX
    if "layers" in document:
        return mt.OCI_MANIFEST
    raise UnsupportedMediaType(f"image {ref}: manifest of unknown media type {content_type!r}")


def parse_json_object(ref: Reference, body: bytes, what: str) -> dict[str, Any]:
    """Parse ``body`` as a JSON object; raises RegistryError naming the image otherwise."""
    try:
        document = json.loads(body)
    except ValueError as error:
        raise RegistryError(f"image {ref}: {what} is not valid JSON: {error}") from error
    if not isinstance(document, dict):
        raise RegistryError(f"image {ref}: {what} is not a JSON object")
    return document


def diff_ids_from_config(ref: Reference, config: dict[str, Any], layer_count: int) -> list[str]:
    """Return an image config's ``rootfs.diff_ids``, one per layer; raises RegistryError otherwise."""
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
        raise RegistryError(f"image {ref}: image config has no rootfs.diff_ids list")
    if len(diff_ids) != layer_count:
        raise RegistryError(
            f"image {ref}: config lists {len(diff_ids)} diff_ids for {layer_count} layers; the image is malformed"
        )
    return [validate_digest(d, f"image {ref}: diff_id") for d in diff_ids]
