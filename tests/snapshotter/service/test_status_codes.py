"""One table maps every class of lazysnap's exception tree to a gRPC status code."""

from __future__ import annotations

import re
from typing import Any, NoReturn

import grpc
import pytest
import trio

import index.errors
import index.estargz
import snapshotter.errors
from index.errors import DigestMismatch, LayerFormatError, LazysnapError
from index.estargz import EstargzError
from snapshotter.errors import (
    AlreadyExists,
    AuthError,
    ConfigError,
    FailedPrecondition,
    FetchError,
    FetchTimeout,
    InvalidArgument,
    InvalidReference,
    MountNotFound,
    NotFound,
    NotServedLazily,
    SnapshotError,
    SnapshotNotFound,
    UsageError,
)
from snapshotter.proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.service.grpc_server import STATUS_CODES, SnapshotsServicer, status_code

TREE_MODULES = (index.errors, index.estargz, snapshotter.errors)


def tree_classes() -> set[type[LazysnapError]]:
    """Every LazysnapError subclass defined in the tree's modules."""
    found: set[type[LazysnapError]] = set()
    pending: list[type[LazysnapError]] = [LazysnapError]
    while pending:
        cls = pending.pop()
        if cls.__module__ in {m.__name__ for m in TREE_MODULES}:
            found.add(cls)
        pending.extend(cls.__subclasses__())
    return found


def test_every_class_of_the_tree_has_its_own_entry() -> None:
    """A class added to the tree must be given a status code, not silently inherit one."""
    assert tree_classes() - set(STATUS_CODES) == set()


def test_every_class_is_drawn_in_the_tree() -> None:
    """The drawing in snapshotter.errors names every class of the tree."""
    drawing = snapshotter.errors.__doc__ or ""
    drawn = set(re.findall(r"\+-- (\w+)|^    (LazysnapError)", drawing, re.MULTILINE))
    names = {a or b for a, b in drawn}
    assert {cls.__name__ for cls in tree_classes()} <= names


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (SnapshotNotFound("k"), grpc.StatusCode.NOT_FOUND),
        (AlreadyExists("k"), grpc.StatusCode.ALREADY_EXISTS),
        (FailedPrecondition("k"), grpc.StatusCode.FAILED_PRECONDITION),
        (InvalidArgument("k"), grpc.StatusCode.INVALID_ARGUMENT),
        (UsageError("k"), grpc.StatusCode.INVALID_ARGUMENT),
        (InvalidReference("k"), grpc.StatusCode.INVALID_ARGUMENT),
        (NotFound("k"), grpc.StatusCode.NOT_FOUND),
        (MountNotFound("k"), grpc.StatusCode.NOT_FOUND),
        (AuthError("k"), grpc.StatusCode.PERMISSION_DENIED),
        (FetchError("k"), grpc.StatusCode.UNAVAILABLE),
        (FetchTimeout("k"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (DigestMismatch("blob", "sha256:a", "sha256:b"), grpc.StatusCode.DATA_LOSS),
        (LayerFormatError("k"), grpc.StatusCode.FAILED_PRECONDITION),
        (EstargzError("k"), grpc.StatusCode.FAILED_PRECONDITION),
        (NotServedLazily("k"), grpc.StatusCode.FAILED_PRECONDITION),
        (ConfigError("k"), grpc.StatusCode.FAILED_PRECONDITION),
        (SnapshotError("k"), grpc.StatusCode.INTERNAL),
        (LazysnapError("k"), grpc.StatusCode.INTERNAL),
        (OSError(5, "Input/output error"), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_codes(error: BaseException, code: grpc.StatusCode) -> None:
    """Each error maps to the status containerd expects for it; anything outside the tree is INTERNAL."""
    assert status_code(error) is code


def test_a_subclass_outside_the_table_takes_its_nearest_ancestor() -> None:
    """A class defined elsewhere (a test's, a plugin's) gets its nearest ancestor's code."""

    class Slow(FetchTimeout):
        pass

    assert status_code(Slow("k")) is grpc.StatusCode.DEADLINE_EXCEEDED


class Aborted(Exception):
    """What the fake context raises, as grpc's does."""


class AbortingContext:
    """A ServicerContext whose abort raises, carrying the code and details."""

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise Aborted(code, details)


class RaisingService:
    """A SnapshotService whose stat raises the given error."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    async def stat(self, key: str) -> Any:
        raise self.error


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (SnapshotNotFound("snapshot k: not found"), grpc.StatusCode.NOT_FOUND),
        (FetchTimeout("layer x: timed out"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (DigestMismatch("layer x", "sha256:a", "sha256:b"), grpc.StatusCode.DATA_LOSS),
        (OSError(28, "No space left on device"), grpc.StatusCode.INTERNAL),
    ],
)
async def test_handlers_abort_with_the_mapped_code(error: BaseException, code: grpc.StatusCode) -> None:
    """A handler whose call raises aborts with the table's code and the error's message."""
    servicer = SnapshotsServicer(RaisingService(error), trio.lowlevel.current_trio_token())  # type: ignore[arg-type]
    with pytest.raises(Aborted) as caught:
        await trio.to_thread.run_sync(servicer.Stat, pb.StatSnapshotRequest(key="k"), AbortingContext())
    assert caught.value.args[0] is code
    assert str(error) in caught.value.args[1]
