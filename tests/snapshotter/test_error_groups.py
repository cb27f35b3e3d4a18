"""Errors trio's nurseries wrap in exception groups reach the user as the one error they are."""

from __future__ import annotations

import pytest
import trio

from snapshotter.errors import LazysnapError, NotFound, single_error, unwrap_groups


async def _fail(error: BaseException) -> None:
    raise error


def test_a_group_of_lazysnap_errors_reduces_to_its_first_leaf() -> None:
    """A nested group whose leaves are all LazysnapErrors gives its first leaf."""
    first, second = NotFound("layer a"), LazysnapError("layer b")
    group = ExceptionGroup("outer", [ExceptionGroup("inner", [first]), second])
    assert single_error(group, (LazysnapError, OSError)) is first


def test_a_group_holding_a_bug_is_not_reduced() -> None:
    """A group holding anything else than the given kinds keeps its traceback (None)."""
    group = ExceptionGroup("outer", [NotFound("layer a"), TypeError("a bug")])
    assert single_error(group, (LazysnapError, OSError)) is None


async def test_an_error_of_a_nursery_task_is_raised_alone() -> None:
    """An error raised in a nursery's task leaves unwrap_groups as itself, not as a group."""
    error = NotFound("layer a")
    with pytest.raises(NotFound) as caught, unwrap_groups(LazysnapError, OSError):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_fail, error)
    assert caught.value is error
