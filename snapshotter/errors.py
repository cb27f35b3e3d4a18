"""Errors of the registry client, the cache and the snapshot service.

They extend the tree rooted in ``index.errors.LazysnapError``::

    LazysnapError
     +-- IntegrityError, LayerFormatError, ...   (index.errors)
     +-- RegistryError                the registry said no, or said something we can't use
     |    +-- InvalidReference        "host/name:tag" could not be parsed
     |    +-- AuthError               401/403 after trying the credentials we have
     |    +-- NotFound                manifest or blob unknown to the registry
     |    +-- UnsupportedMediaType    a manifest/config/layer type lazysnap can't handle
     |    +-- NoMatchingPlatform      an image index without a manifest for this platform
     |    +-- RangeNotSupported       the registry can't serve the byte range asked for
     +-- FetchError                   the registry could not be reached or read
     |    +-- FetchTimeout            a request ran over its deadline after every retry
     |    +-- TruncatedResponse       the body ended before its announced length
     +-- UsageError                   a command was given something it can't use (exit code 2)
     +-- SnapshotError                containerd snapshot API errors (map to gRPC codes)
          +-- SnapshotNotFound        NOT_FOUND
          +-- AlreadyExists           ALREADY_EXISTS
          +-- FailedPrecondition      FAILED_PRECONDITION
          +-- InvalidArgument         INVALID_ARGUMENT
"""

from __future__ import annotations

from index.errors import LazysnapError


class RegistryError(LazysnapError):
    """The registry answered, but not with something usable."""


class InvalidReference(RegistryError):
    """An image reference could not be parsed."""


class AuthError(RegistryError):
    """The registry refused our credentials (or we had none)."""


class NotFound(RegistryError):
    """The registry does not know the manifest or blob."""


class UnsupportedMediaType(RegistryError):
    """A manifest, config or layer has a media type lazysnap does not handle."""


class NoMatchingPlatform(RegistryError):
    """An image index lists no manifest for the requested platform."""


class RangeNotSupported(RegistryError):
    """The registry answered a Range request with something that is not that range."""


class FetchError(LazysnapError):
    """The registry could not be reached or its answer could not be read, after retries."""


class FetchTimeout(FetchError):
    """A request exceeded its deadline after every retry."""


class TruncatedResponse(FetchError):
    """A response body ended before the length it announced."""


class UsageError(LazysnapError):
    """A command was given something it can't use: a bad mount point, an unknown mount."""


class SnapshotError(LazysnapError):
    """An error of containerd's snapshot API."""


class SnapshotNotFound(SnapshotError):
    """No snapshot has that key."""


class AlreadyExists(SnapshotError):
    """A snapshot with that key already exists."""


class FailedPrecondition(SnapshotError):
    """The snapshot is not in a state that allows the call (e.g. it has children)."""


class InvalidArgument(SnapshotError):
    """The call's arguments are malformed (bad filter, forbidden field path, ...)."""


class NotServedLazily(LazysnapError):
    """The layer has no index to be served from without downloading it whole first."""
