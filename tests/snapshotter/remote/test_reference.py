"""Image references parse like docker and containerd parse them, and malformed ones are refused clearly."""

from __future__ import annotations

import pytest

from snapshotter.errors import InvalidReference
from snapshotter.remote.reference import DOCKER_HUB, Reference, parse_reference

DIGEST = "sha256:" + "ab" * 32


class TestDockerHubShorthand:
    @pytest.mark.parametrize(
        ("text", "repository", "tag"),
        [
            ("busybox", "library/busybox", "latest"),
            ("busybox:1.36", "library/busybox", "1.36"),
            ("library/busybox", "library/busybox", "latest"),
            ("docker.io/busybox", "library/busybox", "latest"),
            ("index.docker.io/user/app:v1", "user/app", "v1"),
            ("user/app", "user/app", "latest"),
        ],
    )
    def test_hub_names(self, text: str, repository: str, tag: str) -> None:
        """Names without a host are Docker Hub's, official images live under library/."""
        ref = parse_reference(text)
        assert (ref.registry, ref.repository, ref.tag, ref.digest) == (DOCKER_HUB, repository, tag, None)

    def test_str_is_canonical(self) -> None:
        """str() spells out host, repository and tag."""
        assert str(parse_reference("busybox")) == "registry-1.docker.io/library/busybox:latest"


class TestHosts:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("127.0.0.1:5000/app", Reference("127.0.0.1:5000", "app", "latest", None)),
            ("localhost/app:1", Reference("localhost", "app", "1", None)),
            ("localhost:5000/a/b/c:t", Reference("localhost:5000", "a/b/c", "t", None)),
            ("ghcr.io/org/app", Reference("ghcr.io", "org/app", "latest", None)),
            ("[::1]:5000/app", Reference("[::1]:5000", "app", "latest", None)),
            (f"reg.example.com/app@{DIGEST}", Reference("reg.example.com", "app", None, DIGEST)),
            (f"reg.example.com/app:v2@{DIGEST}", Reference("reg.example.com", "app", "v2", DIGEST)),
        ],
    )
    def test_parse(self, text: str, expected: Reference) -> None:
        """A first component with '.', ':' or 'localhost' is a host; tag and digest are optional."""
        assert parse_reference(text) == expected

    def test_round_trip(self) -> None:
        """Parsing str(ref) gives ref back."""
        ref = parse_reference(f"127.0.0.1:5000/a/b:tag@{DIGEST}")
        assert str(ref) == f"127.0.0.1:5000/a/b:tag@{DIGEST}"
        assert parse_reference(str(ref)) == ref

    def test_manifest_key_prefers_digest(self) -> None:
        """Fetching uses the digest when there is one, else the tag."""
        assert parse_reference(f"h.io/a:t@{DIGEST}").manifest_key == DIGEST
        assert parse_reference("h.io/a:t").manifest_key == "t"


class TestMalformed:
    @pytest.mark.parametrize(
        "text",
        [
            "",
            " busybox",
            "Busybox",
            "h.io/App",
            "h.io/app:",
            "h.io/app:-bad",
            "h.io/app@sha256:123",
            "h.io/app@sha256:" + "AB" * 32,
            "h.io/app@md5",
            "h.io//app",
            "h.io/app/",
            "h.io/a..b",
            "bad_host:5000:x/app",
            "h.io/" + "a" * 300,
        ],
    )
    def test_rejected(self, text: str) -> None:
        """A malformed reference raises InvalidReference naming the input."""
        with pytest.raises(InvalidReference) as info:
            parse_reference(text)
        assert repr(text)[:30].strip("'") in str(info.value) or text == ""

    def test_uppercase_message(self) -> None:
        """Uppercase names get a message that says names must be lowercase."""
        with pytest.raises(InvalidReference, match="lowercase"):
            parse_reference("example.com/MyApp")
