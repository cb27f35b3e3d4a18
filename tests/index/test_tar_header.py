"""One header block or PAX payload decoded: fast forms agree with the plain readings, bad values are refused."""

from __future__ import annotations

import zlib
from decimal import Decimal, InvalidOperation

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from index.errors import LayerFormatError
from index.tar_header import BLOCK, _sums_to, parse_pax, pax_int, pax_mtime_ns

_INT64_END = 1 << 63


def _plain_sum_check(block: bytes, total: int) -> bool:
    """The byte-sum check as first written: adler32's low half is 1 + the byte sum, mod 65521."""
    return 0 <= total <= 255 * BLOCK and ((zlib.adler32(block) & 0xFFFF) - 1 - total) % 65521 == 0


@pytest.mark.parametrize("block_sum", [0, 1, 65519, 65520, 65521, 65522, 130559, 130560])
def test_the_sum_check_accepts_what_the_plain_check_accepts(block_sum: int) -> None:
    """Around the modulus and the bounds, the cached form of the sum check agrees with the plain one."""
    block = (b"\xff" * (block_sum // 255) + bytes([block_sum % 255])).ljust(BLOCK, b"\0")[:BLOCK]
    for total in (block_sum + delta for delta in (-65521, -1, 0, 1, 65521)):
        assert _sums_to(block, total) == _plain_sum_check(block, total), total


def _mtime_outcome(raw: bytes) -> tuple[str, object]:
    """What ``pax_mtime_ns(raw)`` returns, or the message of the LayerFormatError it raises (nothing else)."""
    try:
        return "value", pax_mtime_ns(raw)
    except LayerFormatError as exc:
        return "error", str(exc)


def _decimal_mtime_outcome(raw: bytes) -> tuple[str, object]:
    """The plain reading of a PAX mtime, which ``pax_mtime_ns`` must agree with."""
    try:
        seconds = Decimal(raw.decode("ascii"))
    except (InvalidOperation, UnicodeDecodeError, ValueError):
        return "error", f"PAX record mtime={raw!r} is not a number"
    if seconds.is_nan() or seconds.is_infinite():
        return "error", f"PAX record mtime={raw!r} is not a number"
    if not -_INT64_END <= seconds < _INT64_END:
        return "error", f"PAX record mtime={raw!r} is out of range (seconds must fit in 64 bits)"
    return "value", int(seconds.scaleb(9))


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.from_regex(rb"\A[0-9]{1,30}(\.[0-9]{0,12})?\Z"),
        st.from_regex(rb"\A[-+ ]?[0-9_]{0,5}(\.[0-9]{0,3})?([eE][-+]?[0-9]{1,12})? ?\Z"),
        st.binary(max_size=10),
    )
)
@example(b"Infinity")
@example(b"-inf")
@example(b"NaN")
@example(b"sNaN")
@example(b"1e999999")
@example(b"1e99999999999")
@example(b"1e-99999999999")
@example(b"1.")
@example(b".5")
@example(b"000000000000000000001.000000001")
@example(b"9223372036854775807.999999999")
@example(b"9223372036854775808")
@example(b"-9223372036854775808")
@example(b"-9223372036854775808.000000001")
def test_pax_mtimes_read_as_decimal_reads_them(raw: bytes) -> None:
    """A PAX mtime is read to the nanosecond exactly as Decimal reads it, and refused as it is refused."""
    assert _mtime_outcome(raw) == _decimal_mtime_outcome(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"Infinity",
        b"-Infinity",
        b"NaN",
        b"sNaN",
        b"1e999999",
        b"1e99999999999",
        b"1e999999999999999999999",  # beyond what Decimal can hold at all
        b"-1e30",
        b"99999999999999999999999999",
        b"9223372036854775808",
        b"",
        b"12:00",
        b"\xff",
    ],
)
def test_a_pax_mtime_that_is_no_time_is_a_layer_format_error(raw: bytes) -> None:
    """Not a number, infinite, or seconds beyond 64 bits: a LayerFormatError naming the record, nothing else."""
    with pytest.raises(LayerFormatError, match=r"^PAX record mtime=") as caught:
        pax_mtime_ns(raw)
    assert repr(raw) in str(caught.value)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"1700000000.5", 1_700_000_000_500_000_000),
        (b"-1.5", -1_500_000_000),
        (b"1e3", 1_000_000_000_000),
        (b"9223372036854775807.999999999", (_INT64_END - 1) * 10**9 + 999_999_999),
        (b"-9223372036854775808", -_INT64_END * 10**9),
    ],
)
def test_pax_mtimes_to_the_edge_of_64_bit_seconds_are_read(raw: bytes, expected: int) -> None:
    """Fractional, negative, exponent and 64-bit-edge mtimes are read to the exact nanosecond."""
    assert pax_mtime_ns(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(b"0", 0), (b"3000000", 3_000_000), (b"-1", -1), (b"99999999999999999999999999", 10**26 - 1)],
)
def test_pax_integers_are_read_as_written(raw: bytes, expected: int) -> None:
    """An integer record is read whatever its sign or size: the parser judges the value (tests/index/test_tar_entries.py)."""
    assert pax_int({"size": raw}, "size", 7) == expected
    assert pax_int({}, "size", 7) == 7


@pytest.mark.parametrize("raw", [b"1e5", b"1.0", b"", b"0x10", b"\xff", b"9" * 5000])
def test_a_pax_integer_that_is_no_integer_is_a_layer_format_error(raw: bytes) -> None:
    """A record that is not a decimal integer (or too long to read as one) is a LayerFormatError naming it."""
    with pytest.raises(LayerFormatError, match=r"^PAX record uid=.* is not an integer$"):
        pax_int({"uid": raw}, "uid", 0)


def _reference_pax(data: bytes) -> dict[str, bytes] | str:
    """The plain reading of PAX records, which ``parse_pax`` must agree with; its error message if any."""
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            break
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space]) if space > pos else 0
        except ValueError:
            length = 0
        end = pos + length
        if length <= 0 or end > len(data) or data[end - 1 : end] != b"\n" or b"=" not in data[space:end]:
            return f"malformed PAX record at byte {pos} of an extended header"
        key, _, value = data[space + 1 : end - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value
        pos = end
    return records


def _record(key: bytes, value: bytes) -> bytes:
    """A well-formed PAX record: its length counts its own digits."""
    body = b" " + key + b"=" + value + b"\n"
    digits = next(d for d in range(1, 9) if len(str(len(body) + d)) == d)
    return str(len(body) + digits).encode() + body


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.lists(st.tuples(st.binary(max_size=12), st.binary(max_size=20)), max_size=4).map(
            lambda kvs: b"".join(_record(k, v) for k, v in kvs)
        ),
        st.binary(max_size=40),
        st.from_regex(rb"\A([ 0-9+_-]{1,3} [a-z=\n]{0,6}\n?){1,3}\0*\Z"),
    )
)
def test_pax_records_read_as_the_plain_reading(data: bytes) -> None:
    """PAX records, well formed or not, give the plain reading's records, or its error at the same byte."""
    expected = _reference_pax(data)
    if isinstance(expected, str):
        with pytest.raises(LayerFormatError) as caught:
            parse_pax(data)
        assert str(caught.value) == expected
    else:
        assert parse_pax(data) == expected
