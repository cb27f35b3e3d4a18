"""lazysnap's one exception tree: every error raised on purpose, and where each class lives.

The root and the layer-content errors live in ``index.errors`` (and ``EstargzError`` in
``index.estargz``, not re-exported here: importing it costs the CLI's start-up ``tarfile``),
because ``index`` must not import ``snapshotter``; every other class is defined here and
re-exported where it used to live. The gRPC status each class maps to (in
``snapshotter.service.grpc_server.STATUS_CODES``) is on the right::

    LazysnapError                          index.errors            INTERNAL
     +-- IntegrityError                    index.errors            DATA_LOSS
     |    +-- DigestMismatch               index.errors            DATA_LOSS
     |    +-- MappingMismatch              index.errors            DATA_LOSS
     |    +-- IndexMismatch                index.errors            DATA_LOSS
     +-- LayerFormatError                  index.errors            FAILED_PRECONDITION
     |    +-- UnsafePath                   index.errors            FAILED_PRECONDITION
     |    +-- TruncatedLayer               index.errors            FAILED_PRECONDITION
     |    +-- IndexVersionError            index.errors            FAILED_PRECONDITION
     |    +-- EstargzError                 index.estargz           FAILED_PRECONDITION
     +-- RegistryError                     the registry said no, or something we can't use
     |    +-- InvalidReference             "host/name:tag" could not be parsed    INVALID_ARGUMENT
     |    +-- AuthError                    401/403 with the credentials we have   PERMISSION_DENIED
     |    +-- NotFound                     manifest or blob unknown               NOT_FOUND
     |    +-- UnsupportedMediaType         a type lazysnap can't handle           FAILED_PRECONDITION
     |    +-- NoMatchingPlatform           no manifest for this platform          NOT_FOUND
     |    +-- RangeNotSupported            the registry can't serve the range     FAILED_PRECONDITION
     |         +-- RangeIgnored            it answers a range with the whole blob FAILED_PRECONDITION
     +-- FetchError                        the registry could not be reached      UNAVAILABLE
     |    +-- FetchTimeout                 over its deadline after every retry    DEADLINE_EXCEEDED
     |    +-- TruncatedResponse            the body ended before its length       UNAVAILABLE
     +-- ConfigError                       a config file or value is wrong        FAILED_PRECONDITION
     +-- NotServedLazily                   no index without a whole download      FAILED_PRECONDITION
     +-- UsageError                        a command was given something unusable (exit code 2)
     |    |                                                                        INVALID_ARGUMENT
     |    +-- MountPointError              not an empty directory, or mounted     INVALID_ARGUMENT
     |    +-- MountNotFound                no daemon serves that directory        NOT_FOUND
     |    +-- LinkError                    bench: bad --rate/--rtt, netns failed  INVALID_ARGUMENT
     +-- BenchRunError                     bench: a step of a run failed          INTERNAL
     +-- SnapshotError                     containerd snapshot API errors         INTERNAL
          +-- SnapshotNotFound             no snapshot has that key               NOT_FOUND
          +-- AlreadyExists                the key is taken                       ALREADY_EXISTS
          +-- FailedPrecondition           the snapshot's state forbids the call  FAILED_PRECONDITION
          +-- InvalidArgument              malformed filter, field path, ...      INVALID_ARGUMENT

``LayerFormatError`` maps to FAILED_PRECONDITION, not INVALID_ARGUMENT: containerd's call was
well formed, the layer it names is what can't be served. ``AuthError`` maps to PERMISSION_DENIED,
not UNAUTHENTICATED: containerd itself is trusted (the socket is 0600); the registry refused us.
Anything not in the tree (OSError, a bug) is INTERNAL.

Messages name the object (layer digest, entry path, image reference, config key) and say what to do.

trio's nurseries wrap what their tasks (and their bodies) raise in an ``ExceptionGroup``;
``single_error`` and ``unwrap_groups`` turn a group of errors from this tree back into the one
error a command reports in one line.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from index.errors import (
    DigestMismatch,
    IndexMismatch,
    IndexVersionError,
    IntegrityError,
    LayerFormatError,
    LazysnapError,
    MappingMismatch,
    TruncatedLayer,
    UnsafePath,
)

__all__ = [
    "AlreadyExists",
    "AuthError",
    "BenchRunError",
    "ConfigError",
    "DigestMismatch",
    "FailedPrecondition",
    "FetchError",
    "FetchTimeout",
    "IndexMismatch",
    "IndexVersionError",
    "IntegrityError",
    "InvalidArgument",
    "InvalidReference",
    "LayerFormatError",
    "LazysnapError",
    "LinkError",
    "MappingMismatch",
    "MountNotFound",
    "MountPointError",
    "NoMatchingPlatform",
    "NotFound",
    "NotServedLazily",
    "RangeIgnored",
    "RangeNotSupported",
    "RegistryError",
    "SnapshotError",
    "SnapshotNotFound",
    "TruncatedLayer",
    "TruncatedResponse",
    "UnsafePath",
    "UnsupportedMediaType",
    "UsageError",
    "single_error",
    "unwrap_groups",
]

ErrorKinds = tuple[type[BaseException], ...]


def _leaves(error: BaseException) -> Iterator[BaseException]:
    """The exceptions a (possibly nested) exception group holds, in order; ``error`` itself if not a group."""
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _leaves(inner)
    else:
        yield error


def single_error(caught: BaseException, kinds: ErrorKinds) -> BaseException | None:
    """The one error to report for ``caught``: itself, or a group's first leaf; None when any leaf is not of ``kinds``.

    A group holding anything else (a bug, KeyboardInterrupt) must keep its traceback, so it is
    not reduced to one line.
    """
    leaves = list(_leaves(caught))
    if not leaves or not all(isinstance(leaf, kinds) for leaf in leaves):
        return None
    return leaves[0]


@contextmanager
def unwrap_groups(*kinds: type[BaseException]) -> Iterator[None]:
    """Re-raise an exception group whose leaves are all of ``kinds`` as its first leaf alone; others pass unchanged."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaf = single_error(group, kinds)
        if leaf is None:
            raise
    else:
        return
    raise leaf  # its traceback still shows where it was first raised


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


class RangeIgnored(RangeNotSupported):
    """The registry answers Range requests with the whole blob (200): the blob must be fetched whole."""


class FetchError(LazysnapError):
    """The registry could not be reached or its answer could not be read, after retries."""


class FetchTimeout(FetchError):
    """A request exceeded its deadline after every retry."""


class TruncatedResponse(FetchError):
    """A response body ended before the length it announced."""


class ConfigError(LazysnapError):
    """The config file can't be read, or a key is unknown, of the wrong type or out of range."""


class NotServedLazily(LazysnapError):
    """The layer has no index to be served from without downloading it whole first."""


class UsageError(LazysnapError):
    """A command was given something it can't use: a bad mount point, an unknown mount."""


class MountPointError(UsageError):
    """The mount point can't be used: not a directory, not empty, or already mounted."""


class MountNotFound(UsageError):
    """No lazysnap daemon serves that directory."""


class LinkError(UsageError):
    """The network profile can't be set up: a bad --rate/--rtt, or netns/veth/tc failed."""


class BenchRunError(LazysnapError):
    """A step of a benchmark run failed; the message names the step and carries its output."""


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
