"""Chain IDs follow the OCI image spec (values cross-checked with image-spec's own Go ``identity`` package)."""

from __future__ import annotations

import hashlib

import pytest

from snapshotter.errors import InvalidReference
from snapshotter.service.chain_ids import chain_id, chain_ids

# image-spec identity/chainid_test.go uses these placeholders; the expected values were computed
# with image-spec's identity.ChainIDs (Go, Debian's golang-github-opencontainers-image-spec-dev).
SPEC_AB = "sha256:970a948bffa8de94d6e22d747ba8c95030e6e546909f98f54e99a13005e173a8"
SPEC_ABC = "sha256:dee159b33409cefa3f6eda71539f006014283e9d9130c18a1dea7bd8a33c9b1b"
# The diff_ids of the example config in image-spec config.md, and their chain IDs by the same Go code.
CONFIG_MD_DIFF_IDS = [
    "sha256:c6f988f4874bb0add23a778f753c65efe992244e148a1d2ec2a8b664fb66bbd1",
    "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef",
]
CONFIG_MD_CHAIN = "sha256:c3191d32a37d7159b2e30830937d2e30268ad6c375a773a8994911a3aba9b93f"


class TestSpecVectors:
    def test_spec_test_vector(self) -> None:
        """[A, B, C] gives [A, ChainID(A|B), ChainID(A|B|C)] with the spec's own values."""
        assert chain_ids(["sha256:a", "sha256:b", "sha256:c"]) == ["sha256:a", SPEC_AB, SPEC_ABC]

    def test_config_md_example(self) -> None:
        """The config.md example's two diff_ids chain to the value image-spec's Go code computes."""
        assert chain_ids(CONFIG_MD_DIFF_IDS) == [CONFIG_MD_DIFF_IDS[0], CONFIG_MD_CHAIN]

    def test_formula(self) -> None:
        """Each link hashes the text 'parent SPACE diff_id', prefixes included."""
        assert "sha256:" + hashlib.sha256(b"sha256:a sha256:b").hexdigest() == SPEC_AB
        assert chain_id(SPEC_AB, "sha256:c") == SPEC_ABC
        assert chain_id(None, "sha256:a") == "sha256:a"


class TestEdges:
    def test_empty(self) -> None:
        """No layers, no chain IDs."""
        assert chain_ids([]) == []

    def test_order_matters(self) -> None:
        """ChainID(A|B) differs from ChainID(B|A)."""
        assert chain_ids(["sha256:a", "sha256:b"])[-1] != chain_ids(["sha256:b", "sha256:a"])[-1]

    @pytest.mark.parametrize("bad", ["", "abc", "sha256:", ":abc", "sha256:a b"])
    def test_rejects_non_digests(self, bad: str) -> None:
        """A diff_id that is not 'algorithm:value' raises InvalidReference."""
        with pytest.raises(InvalidReference):
            chain_ids(["sha256:a", bad])
