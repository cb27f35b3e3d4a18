"""Fuzzing the three parsers in the default suite: whatever the input, each refuses it with a LazysnapError or
accepts only entries Linux can represent (scripts/fuzz_parsers.py runs 10,000 examples of each)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings

from tests.hostile.fuzz_inputs import (
    outcome,
    run_load_index,
    run_tar,
    run_toc,
    stored_index_inputs,
    tar_inputs,
    toc_inputs,
)
from tests.support.estargz_writer import EstargzBlob

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(tar_inputs())
def test_the_tar_parser_raises_only_lazysnap_errors(tar: bytes) -> None:
    """Any tar of hostile headers is refused with a LazysnapError or gives entries within Linux's limits."""
    outcome(run_tar, tar)


@FUZZ
@given(toc_inputs())
def test_the_toc_parser_raises_only_lazysnap_errors(blob: EstargzBlob) -> None:
    """Any TOC with fields of any type or size is refused with a LazysnapError or gives entries within the limits."""
    outcome(run_toc, blob)


@FUZZ
@given(stored_index_inputs())
def test_the_index_loader_raises_only_lazysnap_errors(data: bytes) -> None:
    """Any checksummed stored index is refused with a LazysnapError or gives entries within Linux's limits."""
    outcome(run_load_index, data)
