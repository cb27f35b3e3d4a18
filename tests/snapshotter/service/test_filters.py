"""containerd's filter syntax, as Walk uses it."""

from __future__ import annotations

import pytest

from snapshotter.errors import InvalidArgument
from snapshotter.service import filters


def fields(name: str = "n", parent: str = "", kind: str = "active", **labels: str) -> filters.FieldLookup:
    return filters.snapshot_fields(name, parent, kind, labels)


class TestMatching:
    def test_empty_filter_list_matches_everything(self) -> None:
        """No filters, or an empty one among others, matches every snapshot."""
        assert filters.parse_all([]).match(fields())
        assert filters.parse_all(["name==x", ""]).match(fields())

    def test_equality_on_kind_name_parent(self) -> None:
        """kind, name and parent compare as strings."""
        f = filters.parse("kind==committed,name==a,parent==p")
        assert f.match(fields("a", "p", "committed"))
        assert not f.match(fields("a", "p", "active"))
        assert not f.match(fields("b", "p", "committed"))

    def test_parent_not_empty(self) -> None:
        """parent!="" selects snapshots that have a parent."""
        f = filters.parse('parent!=""')
        assert f.match(fields(parent="p"))
        assert not f.match(fields(parent=""))

    def test_quoted_label_key_with_dots(self) -> None:
        """labels."a.b"==x looks up the label named a.b; unquoted dotted paths join too."""
        f = filters.parse('labels."containerd.io/gc.root"==check-walk')
        assert f.match(fields(**{"containerd.io/gc.root": "check-walk"}))
        assert not f.match(fields(**{"containerd.io/gc.root": "other"}))
        assert filters.parse("labels.a.b==x").match(fields(**{"a.b": "x"}))

    def test_presence(self) -> None:
        """A bare field path tests presence; no labels at all means absent."""
        f = filters.parse("labels.l")
        assert f.match(fields(l="2"))
        assert f.match(fields(l=""))
        assert not f.match(fields())

    def test_comma_is_and_list_is_or(self) -> None:
        """Selectors joined by commas must all hold; separate filters are alternatives."""
        f = filters.parse_all(["name==a,labels.l==1", "name==b"])
        assert f.match(fields("a", l="1"))
        assert not f.match(fields("a", l="2"))
        assert f.match(fields("b"))

    def test_regex(self) -> None:
        """~= is an unanchored regex match; values may be quoted with /.../."""
        assert filters.parse("name~=^sha256:").match(fields("sha256:abc"))
        assert filters.parse(r"name~=/a\d+/").match(fields("xa12"))
        assert not filters.parse("name~=^b").match(fields("abc"))

    def test_quoted_values_and_escapes(self) -> None:
        """Double-quoted values may hold commas, spaces and Go escapes."""
        assert filters.parse('labels.l=="a, b\\tc"').match(fields(l="a, b\tc"))
        assert filters.parse('labels.l=="\\u00e9"').match(fields(l="é"))

    def test_spaces_between_tokens(self) -> None:
        """Whitespace around fields and operators is ignored."""
        assert filters.parse(" name == a , kind==active ").match(fields("a"))

    def test_unknown_field_is_absent(self) -> None:
        """A field snapshots don't have never matches == but matches !=, as in containerd."""
        assert not filters.parse("size==1").match(fields())
        assert filters.parse("size!=1").match(fields())


@pytest.mark.parametrize(
    "text",
    [
        "name==",
        "==a",
        "name===a",
        "name=a",
        'labels."unterminated==a',
        "name==a,",
        "name==a b",
        "name~=(",
        "name==/a/",
        "labels.'x'==a",
        "name==a,,kind==view",
        "na-me==a",
    ],
)
def test_invalid_filters_raise_invalid_argument(text: str) -> None:
    """Malformed filters raise InvalidArgument naming the filter."""
    with pytest.raises(InvalidArgument, match="invalid filter"):
        filters.parse_all([text])
