"""Image references: ``[host[:port]/]name[:tag][@digest]``, with Docker Hub's shorthand.

``busybox`` means ``registry-1.docker.io/library/busybox:latest``; a first path component is a
host when it contains ``.`` or ``:`` or is ``localhost`` (the rule docker and containerd use).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from snapshotter.errors import InvalidReference

DOCKER_HUB = "registry-1.docker.io"
# Names people write for Docker Hub; all of them are served by DOCKER_HUB.
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"})

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_HOST = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*|\[[0-9a-fA-F:.]+\])(?::[0-9]{1,5})?"
)
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"(?P<algorithm>[a-z0-9]+(?:[+._-][a-z0-9]+)*):(?P<hex>[a-zA-Z0-9=_-]{32,})")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_DIGEST_HEX_LENGTH = {"sha256": 64, "sha384": 96, "sha512": 128}
_MAX_NAME_LENGTH = 255


@dataclass(frozen=True)
class Reference:
    """A parsed image reference; ``tag`` and ``digest`` may both be set (the digest wins when fetching)."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    @property
    def name(self) -> str:
        """``host/repository`` without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def manifest_key(self) -> str:
        """What to put after ``/manifests/``: the digest if known, else the tag."""
        return self.digest or self.tag or "latest"

    def with_digest(self, digest: str) -> Reference:
        """Return this reference pinned to ``digest``; raises InvalidReference for a malformed digest."""
        validate_digest(digest, str(self))
        return replace(self, digest=digest)

    def with_tag(self, tag: str | None) -> Reference:
        """Return this reference with another tag (and no digest); raises InvalidReference for a bad tag."""
        if tag is not None and not _TAG.fullmatch(tag):
            raise InvalidReference(f"invalid tag {tag!r} for {self.name}: use letters, digits, '_', '.', '-'")
        return replace(self, tag=tag, digest=None)


def sha256_hex(digest: str) -> str:
    """Return the hex part of a ``sha256:<64 lowercase hex>`` digest, safe to use as a file name.

    Raises:
        ValueError: ``digest`` is anything else (so it can never name another path).
    """
    algorithm, _, hex_part = digest.partition(":")
    if algorithm != "sha256" or not _SHA256_HEX.fullmatch(hex_part):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return hex_part


def validate_digest(digest: str, context: str) -> str:
    """Return ``digest`` if it is ``algorithm:hex`` with a known hex length; raises InvalidReference."""
    match = _DIGEST.fullmatch(digest)
    if match is None:
        raise InvalidReference(f"{context}: invalid digest {digest!r}: expected 'sha256:' and 64 hex digits")
    expected = _DIGEST_HEX_LENGTH.get(match["algorithm"])
    hex_part = match["hex"]
    if expected is not None and (len(hex_part) != expected or not re.fullmatch(r"[a-f0-9]+", hex_part)):
        raise InvalidReference(
            f"{context}: invalid digest {digest!r}: {match['algorithm']} needs {expected} lowercase hex digits"
        )
    return digest


def _split_host(text: str) -> tuple[str, str]:
    first, sep, rest = text.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        if not _HOST.fullmatch(first):
            raise InvalidReference(f"invalid registry host {first!r} in image reference {text!r}")
        host = DOCKER_HUB if first.lower() in _HUB_ALIASES else first
        return host, rest
    return DOCKER_HUB, text


def parse_reference(text: str) -> Reference:
    """Parse ``[host[:port]/]name[:tag][@sha256:digest]`` (Docker Hub shorthand too); raises InvalidReference."""
    original = text
    if not text or text != text.strip():
        raise InvalidReference(f"invalid image reference {original!r}: empty or surrounded by whitespace")
    digest: str | None = None
    if "@" in text:
        text, _, digest = text.partition("@")
        validate_digest(digest, f"image reference {original!r}")
        algorithm = digest.partition(":")[0]
        if algorithm != "sha256":
            # Blobs, indexes and cache entries are all keyed by sha256 (as containerd's are).
            raise InvalidReference(
                f"image reference {original!r}: {algorithm} digests are not supported, only sha256; "
                "pull by tag or by the manifest's sha256 digest"
            )
    host, remainder = _split_host(text)
    tag: str | None = None
    last_slash = remainder.rfind("/")
    colon = remainder.rfind(":")
    if colon > last_slash:
        remainder, tag = remainder[:colon], remainder[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise InvalidReference(
                f"invalid tag {tag!r} in image reference {original!r}: use letters, digits, '_', '.', '-' (max 128)"
            )
    if host == DOCKER_HUB and "/" not in remainder:
        remainder = f"library/{remainder}"  # official images live under library/
    _check_repository(remainder, original)
    if len(host) + 1 + len(remainder) > _MAX_NAME_LENGTH:
        raise InvalidReference(
            f"image reference {original!r}: name longer than {_MAX_NAME_LENGTH} characters"
        )
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry=host, repository=remainder, tag=tag, digest=digest)


def _check_repository(repository: str, original: str) -> None:
    if not repository:
        raise InvalidReference(f"invalid image reference {original!r}: no repository name")
    for component in repository.split("/"):
        if _COMPONENT.fullmatch(component):
            continue
        if _COMPONENT.fullmatch(component.lower()):
            raise InvalidReference(
                f"invalid image reference {original!r}: repository names must be lowercase"
            )
        raise InvalidReference(
            f"invalid image reference {original!r}: bad path component {component!r} "
            "(lowercase letters, digits and single '.', '_', '__' or '-' separators)"
        )
