"""containerd's filter syntax, as used by the Snapshots ``List`` (Walk) call.

A filter is ``selector[,selector...]`` (comma = AND); a request carries a list of filters
that are ORed. A selector is a field path, optionally followed by an operator and a value::

    kind==active            name==p            parent!=""
    labels."a.b"==x         labels.l           name~=^sha256:

Field path parts are identifiers or double-quoted strings, joined by ``.``. Values are bare
words (up to the next comma or space) or quoted strings; ``~=`` (regex) values may also be quoted
with ``/.../`` or ``|...|``. A selector without an operator tests that the field is present.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from snapshotter.errors import InvalidArgument

#: Looks a field path up in the object being filtered: (value, present).
FieldLookup = Callable[[Sequence[str]], tuple[str, bool]]

_QUOTES = '"/|'
_OPERATOR_RUNES = "=!~"
_SEPARATORS = ",."
_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}


class _Tok(Enum):
    FIELD = "field"
    VALUE = "value"
    QUOTED = "quoted"
    SEPARATOR = "separator"
    OPERATOR = "operator"
    EOF = "end of input"


@dataclass(frozen=True)
class _Token:
    kind: _Tok
    text: str
    pos: int


class _FilterSyntaxError(Exception):
    """Internal: carries a position and a reason to ``parse``, which adds the input."""

    def __init__(self, pos: int, reason: str) -> None:
        super().__init__(reason)
        self.pos = pos
        self.reason = reason


def _is_field_rune(ch: str) -> bool:
    return ch == "_" or ch.isalnum()


def _tokenize(text: str) -> list[_Token]:
    """Split one filter into tokens; after an operator the next bare word is a value."""
    tokens: list[_Token] = []
    pos = 0
    expect_value = False
    while pos < len(text):
        ch = text[pos]
        if ch.isspace():
            pos += 1
            continue
        start = pos
        if ch in _QUOTES:
            pos = _scan_quoted(text, pos)
            tokens.append(_Token(_Tok.QUOTED, text[start:pos], start))
        elif ch in _SEPARATORS:
            pos += 1
            expect_value = False
            tokens.append(_Token(_Tok.SEPARATOR, ch, start))
        elif ch in _OPERATOR_RUNES:
            while pos < len(text) and text[pos] in _OPERATOR_RUNES:
                pos += 1
            expect_value = True
            tokens.append(_Token(_Tok.OPERATOR, text[start:pos], start))
        elif expect_value:
            while pos < len(text) and text[pos] != "," and not text[pos].isspace():
                pos += 1
            expect_value = False
            tokens.append(_Token(_Tok.VALUE, text[start:pos], start))
        elif _is_field_rune(ch):
            while pos < len(text) and _is_field_rune(text[pos]):
                pos += 1
            tokens.append(_Token(_Tok.FIELD, text[start:pos], start))
        else:
            raise _FilterSyntaxError(pos, f"unexpected character {ch!r}")
    tokens.append(_Token(_Tok.EOF, "", len(text)))
    return tokens


def _scan_quoted(text: str, pos: int) -> int:
    """Return the position just after the quoted literal starting at ``pos``."""
    quote = text[pos]
    i = pos + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == quote:
            return i + 1
        i += 1
    raise _FilterSyntaxError(pos, "quoted literal not terminated")


def _unquote(token: _Token, allow_alt_quotes: bool) -> str:
    """Strip the quotes of a literal and resolve its escapes (Go-style for ``"``)."""
    quote, body = token.text[0], token.text[1:-1]
    if quote != '"':
        if not allow_alt_quotes:
            raise _FilterSyntaxError(token.pos, f"quote {quote!r} only allowed for ~= values")
        # Regex literals keep their backslashes (\d, \.); only an escaped quote is unescaped.
        return body.replace("\\" + quote, quote)
    return _unescape_go(body, token.pos)


def _unescape_go(body: str, pos: int) -> str:
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        if i + 1 >= len(body):
            raise _FilterSyntaxError(pos, "invalid escape at end of quoted literal")
        esc = body[i + 1]
        if esc in _SIMPLE_ESCAPES or esc == '"':
            out.append(_SIMPLE_ESCAPES.get(esc, esc))
            i += 2
            continue
        digits, base = {"x": (2, 16), "u": (4, 16), "U": (8, 16)}.get(
            esc, (3, 8) if esc in "01234567" else (0, 0)
        )
        start = i + 1 if base == 8 else i + 2
        chunk = body[start : start + digits]
        if not digits or len(chunk) != digits:
            raise _FilterSyntaxError(pos, f"invalid escape \\{esc} in quoted literal")
        try:
            out.append(chr(int(chunk, base)))
        except (ValueError, OverflowError):
            raise _FilterSyntaxError(pos, f"invalid escape \\{esc}{chunk} in quoted literal") from None
        i = start + digits
    return "".join(out)


@dataclass(frozen=True)
class Selector:
    """One ``fieldpath [op value]`` term; ``operator`` is "" for a presence test."""

    fieldpath: tuple[str, ...]
    operator: str = ""
    value: str = ""
    regex: re.Pattern[str] | None = None

    def match(self, lookup: FieldLookup) -> bool:
        """Tell whether the object behind ``lookup`` satisfies this selector; raises nothing."""
        value, present = lookup(self.fieldpath)
        if self.operator == "":
            return present
        if self.operator == "==":
            return present and value == self.value
        if self.operator == "!=":
            # As containerd: an absent field has the value "", so `parent!=""` means "has a parent".
            return value != self.value
        assert self.regex is not None
        return self.regex.search(value) is not None


@dataclass(frozen=True)
class Filter:
    """An OR of ANDs of selectors; no alternatives at all means "match everything"."""

    alternatives: tuple[tuple[Selector, ...], ...] = ()

    def match(self, lookup: FieldLookup) -> bool:
        """Tell whether any alternative has all its selectors matching; raises nothing."""
        if not self.alternatives:
            return True
        return any(all(s.match(lookup) for s in conj) for conj in self.alternatives)


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.i = 0

    def peek(self) -> _Token:
        return self.tokens[self.i]

    def take(self) -> _Token:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def selectors(self) -> tuple[Selector, ...]:
        result = [self.selector()]
        while self.peek().kind is not _Tok.EOF:
            token = self.take()
            if token.kind is not _Tok.SEPARATOR or token.text != ",":
                raise _FilterSyntaxError(token.pos, f"expected ',' or end of input, got {token.text!r}")
            result.append(self.selector())
        return tuple(result)

    def selector(self) -> Selector:
        path = self.fieldpath()
        token = self.peek()
        if token.kind is _Tok.EOF or (token.kind is _Tok.SEPARATOR and token.text == ","):
            return Selector(path)
        if token.kind is not _Tok.OPERATOR:
            raise _FilterSyntaxError(token.pos, f"expected an operator, got {token.text!r}")
        self.take()
        if token.text not in ("==", "!=", "~="):
            raise _FilterSyntaxError(token.pos, f"unknown operator {token.text!r}")
        value = self.value(allow_alt_quotes=token.text == "~=")
        if token.text != "~=":
            return Selector(path, token.text, value)
        try:
            return Selector(path, token.text, value, re.compile(value))
        except re.error as error:
            raise _FilterSyntaxError(token.pos, f"invalid regular expression {value!r}: {error}") from None

    def fieldpath(self) -> tuple[str, ...]:
        parts = [self.field()]
        while self.peek().kind is _Tok.SEPARATOR and self.peek().text == ".":
            self.take()
            parts.append(self.field())
        return tuple(parts)

    def field(self) -> str:
        token = self.take()
        if token.kind is _Tok.FIELD:
            return token.text
        if token.kind is _Tok.QUOTED:
            return _unquote(token, allow_alt_quotes=False)
        raise _FilterSyntaxError(token.pos, f"expected a field name, got {token.kind.value} {token.text!r}")

    def value(self, allow_alt_quotes: bool) -> str:
        token = self.take()
        if token.kind in (_Tok.VALUE, _Tok.FIELD):
            return token.text
        if token.kind is _Tok.QUOTED:
            return _unquote(token, allow_alt_quotes)
        raise _FilterSyntaxError(token.pos, f"expected a value, got {token.kind.value} {token.text!r}")


def parse(text: str) -> Filter:
    """Parse one filter string (an empty one matches everything); raises InvalidArgument."""
    if text.strip() == "":
        return Filter()
    try:
        return Filter((_Parser(text).selectors(),))
    except _FilterSyntaxError as error:
        raise InvalidArgument(
            f"invalid filter {text!r} at position {error.pos}: {error.reason}: invalid argument"
        ) from None


def parse_all(texts: Sequence[str]) -> Filter:
    """Parse a request's filters, ORed together (none, or any empty one, matches all); raises InvalidArgument."""
    alternatives: list[tuple[Selector, ...]] = []
    for text in texts:
        parsed = parse(text)
        if not parsed.alternatives:
            return Filter()
        alternatives.extend(parsed.alternatives)
    return Filter(tuple(alternatives))


def snapshot_fields(name: str, parent: str, kind: str, labels: Mapping[str, str]) -> FieldLookup:
    """Build the field lookup containerd uses for snapshots: kind, name, parent, labels.<key>."""

    def lookup(path: Sequence[str]) -> tuple[str, bool]:
        if not path:
            return "", False
        head = path[0]
        if head == "kind":
            return kind, True
        if head == "name":
            return name, True
        if head == "parent":
            return parent, True
        if head == "labels":
            key = ".".join(path[1:])
            return (labels[key], True) if key in labels else ("", False)
        return "", False

    return lookup
