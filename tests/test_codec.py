"""Tests of protocol/codec.py: canonical msgpack (SPEC.md §2), vectors both ways, strictness, limits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import codec
from protocol.errors import DecodeError, LimitError, PliError, VersionError
from tools import vectors_pli

VECTORS = Path(__file__).resolve().parents[1] / "protocol" / "vectors" / "codec.json"
DATA = json.loads(VECTORS.read_text(encoding="utf-8"))
ERROR_CLASSES = {"malformed": DecodeError, "too_large": LimitError}


# --- vectors --------------------------------------------------------------------------


def test_vectors_file_is_up_to_date() -> None:
    assert json.loads(VECTORS.read_text(encoding="utf-8")) == vectors_pli.codec_vectors()
    assert VECTORS.read_text(encoding="utf-8") == vectors_pli.render(vectors_pli.codec_vectors())


@pytest.mark.parametrize("case", DATA["valid"], ids=[c["name"] for c in DATA["valid"]])
def test_valid_vector_both_ways(case: dict[str, Any]) -> None:
    value = vectors_pli.from_json(case["value"])
    data = bytes.fromhex(case["hex"])
    assert codec.encode(value) == data
    decoded = codec.decode(data)
    assert decoded == value
    assert type(decoded) is type(value)  # bytes stay bytes, text stays text, bool stays bool


@pytest.mark.parametrize("case", DATA["invalid"], ids=[c["name"] for c in DATA["invalid"]])
def test_invalid_vector_is_refused(case: dict[str, Any]) -> None:
    with pytest.raises(DecodeError) as info:
        codec.decode(bytes.fromhex(case["hex"]))
    assert info.value.code in case["errors"]


def test_vectors_cover_every_msgpack_width() -> None:
    """The vectors exercise each integer, str, bin, array and map width at least once."""
    first_bytes = {bytes.fromhex(c["hex"])[0] for c in DATA["valid"]}
    for marker in (0xCC, 0xCD, 0xCE, 0xCF, 0xD0, 0xD1, 0xD2, 0xD3, 0xD9, 0xDA, 0xC4, 0xC5, 0xDC, 0xDE, 0xC0):
        assert marker in first_bytes, hex(marker)


# --- canonical form -------------------------------------------------------------------


def test_keys_sorted_by_utf8_bytes() -> None:
    # U+FF61 sorts before U+1F600 by UTF-8 bytes (and code points), after it by UTF-16 units;
    # "aa" sorts before "b" bytewise, after it in length-first (CBOR-style) order.
    data = codec.encode({"\U0001f600": 1, "\uff61": 2, "b": 3, "aa": 4})
    assert data == (b"\x84" + b"\xa2aa\x04" + b"\xa1b\x03" + b"\xa3\xef\xbd\xa1\x02" + b"\xa4\xf0\x9f\x98\x80\x01")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, "00"),
        (127, "7f"),
        (128, "cc80"),
        (255, "ccff"),
        (256, "cd0100"),
        (65536, "ce00010000"),
        (1 << 32, "cf0000000100000000"),
        (-1, "ff"),
        (-32, "e0"),
        (-33, "d0df"),
        (-129, "d1ff7f"),
        (-32769, "d2ffff7fff"),
        (-(1 << 31) - 1, "d3ffffffff7fffffff"),
    ],
)
def test_shortest_integer_form(value: int, expected: str) -> None:
    assert codec.encode(value).hex() == expected
    assert codec.decode(bytes.fromhex(expected)) == value


def test_bin_and_str_are_distinct() -> None:
    assert codec.encode(b"a") == b"\xc4\x01a"
    assert codec.encode("a") == b"\xa1a"
    assert codec.decode(b"\xc4\x01a") == b"a"
    assert codec.decode(b"\xa1a") == "a"
    assert codec.encode([True, False]) == b"\x92\xc3\xc2"


def test_tuples_encode_as_arrays() -> None:
    assert codec.encode((1, 2)) == codec.encode([1, 2]) == b"\x92\x01\x02"


def test_nil_is_carried_by_the_codec_and_refused_by_typed_fields() -> None:
    # The codec leaves nil to the formats (module docstring: "no nil except where a format
    # says so"); every MapReader getter that expects a type refuses it.
    assert codec.encode(None) == b"\xc0"
    assert codec.decode(b"\xc0") is None
    assert codec.decode(b"\x81\xa1a\xc0") == {"a": None}
    r = codec.MapReader(codec.decode(b"\x81\xa1a\xc0"), "thing")
    with pytest.raises(DecodeError, match="'a' must be bytes"):
        r.bytes_("a")
    with pytest.raises(DecodeError, match="'a' must be an integer"):
        r.int_("a")
    with pytest.raises(DecodeError, match="'a' must be an array"):
        r.list_("a", max_items=1)
    with pytest.raises(DecodeError, match=r"thing\.a: expected a map"):
        r.map_("a")


@pytest.mark.parametrize(
    "value", [1.5, 0.0, {1.0}, {"a": [1, 2.0]}, object(), {1: 2}, {b"k": 1}, 1 << 64, -(1 << 63) - 1]
)
def test_encode_refuses_foreign_values(value: Any) -> None:
    with pytest.raises(DecodeError):
        codec.encode(value)


def test_encode_refuses_nesting_too_deep() -> None:
    value: Any = 1
    for _ in range(17):
        value = [value]
    with pytest.raises(DecodeError, match="nesting too deep"):
        codec.encode(value)


# --- strict decoding ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x82\xa1b\x01\xa1a\x02", "canonical"),  # unsorted keys
        (b"\x82\xa1a\x01\xa1a\x02", "canonical"),  # duplicate keys
        (b"\xcc\x01", "canonical"),  # uint8 for a fixint
        (b"\xd9\x01a", "canonical"),  # str8 for a fixstr
        (b"\xca\x00\x00\x00\x00", "floating-point"),
        (b"\xcb" + bytes(8), "floating-point"),
        (b"\x91\xcb" + bytes(8), "floating-point"),
        (b"\xd4\x01\x00", "extension"),  # fixext1
        (b"\xc7\x00\x05", "extension"),  # ext8, empty
        (b"\xc7\x01\x05\x00", "extension"),  # ext8, one byte
        (b"\x01\x02", "extra data"),  # trailing byte
        (b"\x81\x01\x02", "map key"),  # int key
        (b"\x81\xc4\x01a\x02", "map keys must be text"),  # bin key
        (b"\x91" * 17 + b"\x01", "nesting too deep"),
    ],
)
def test_refusals(data: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=match) as info:
        codec.decode(data)
    assert type(info.value) is DecodeError  # not a LimitError: these are malformed, not too large
    assert info.value.code == "malformed"


def test_nesting_at_the_limit_is_accepted() -> None:
    assert codec.decode(b"\x91" * 16 + b"\x01") is not None


def test_very_deep_nesting_is_refused() -> None:
    with pytest.raises(DecodeError):
        codec.decode(b"\x91" * 100_000 + b"\x01")


# --- limits ---------------------------------------------------------------------------
# Each of these would allocate gigabytes if a declared length were trusted: they return at
# once by construction, so completing at all shows the length was checked first.


@pytest.mark.parametrize(
    "data",
    [
        b"\xc6\xff\xff\xff\xff" + bytes(10),  # bin32 of 4 GiB
        b"\xdb\xff\xff\xff\xff" + bytes(10),  # str32 of 4 GiB
        b"\xdd\xff\xff\xff\xff" + bytes(10),  # array32 of 2^32-1 items
        b"\xdf\xff\xff\xff\xff" + bytes(10),  # map32 of 2^32-1 pairs
        b"\xc5\xff\xff" + bytes(10),  # bin16 of 64 KiB
        b"\x91\xdd\xff\xff\xff\xff",  # nested lying array
    ],
)
def test_lying_length_is_refused(data: bytes) -> None:
    with pytest.raises(DecodeError):
        codec.decode(data)


@pytest.mark.parametrize(
    ("data", "limits"),
    [
        (b"\xdd\x00\x01\x00\x00" + bytes(65536), codec.Limits(max_array=4096)),
        (b"\xde\x01\x01" + b"".join(codec.encode(f"k{i:03d}")[0:] + b"\x00" for i in range(257)), codec.Limits()),
        (codec.encode("x" * 100), codec.Limits(max_str=99)),
        (codec.encode(b"x" * 100), codec.Limits(max_bin=99)),
        (codec.encode(list(range(10))), codec.Limits(max_array=9)),
        (codec.encode({str(i): i for i in range(10)}), codec.Limits(max_map=9)),
    ],
)
def test_over_limit_is_limit_error(data: bytes, limits: codec.Limits) -> None:
    with pytest.raises(LimitError) as info:
        codec.decode(data, limits=limits)
    assert info.value.code == "too_large"
    assert info.value.status == 413


def test_at_limit_is_accepted() -> None:
    assert codec.decode(codec.encode("x" * 99), limits=codec.Limits(max_str=99)) == "x" * 99
    assert codec.decode(codec.encode(list(range(9))), limits=codec.Limits(max_array=9)) == list(range(9))


def test_object_over_max_size_is_limit_error() -> None:
    data = codec.encode(b"x" * 200)
    with pytest.raises(LimitError, match="over the 100-byte limit"):
        codec.decode(data, limits=codec.Limits(max_size=100))
    with pytest.raises(LimitError):
        codec.decode(bytes((1 << 20) + 1))  # the default: 1 MiB
    assert codec.decode(data, limits=codec.Limits(max_size=len(data))) == b"x" * 200


# --- properties -----------------------------------------------------------------------

_scalars = (
    st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.text(max_size=40)
    | st.binary(max_size=40)
    | st.booleans()
)
_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=6),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(_values)
def test_round_trip(value: Any) -> None:
    data = codec.encode(value)
    assert codec.decode(data) == value
    assert codec.encode(codec.decode(data)) == data


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=8), st.integers(-(1 << 63), (1 << 64) - 1), min_size=2, max_size=8))
def test_map_order_does_not_matter_and_keys_come_out_sorted(value: dict[str, int]) -> None:
    reordered = dict(reversed(list(value.items())))
    assert codec.encode(value) == codec.encode(reordered)
    keys = list(msgpack.unpackb(codec.encode(value), raw=True))
    assert keys == sorted(keys)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=8), st.integers(-(1 << 63), (1 << 64) - 1), min_size=2, max_size=8))
def test_non_canonical_map_order_is_refused(value: dict[str, int]) -> None:
    items = sorted(value.items(), key=lambda kv: kv[0].encode(), reverse=True)
    data = msgpack.packb(dict(items), use_bin_type=True)
    with pytest.raises(DecodeError, match="canonical"):
        codec.decode(data)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=64))
def test_fuzz_decode_returns_or_raises_pli_error(data: bytes) -> None:
    try:
        value = codec.decode(data)
    except PliError:
        return
    assert codec.encode(value) == data  # accepted only when canonical


@settings(max_examples=300, deadline=None)
@given(_values, st.data())
def test_fuzz_mutated_canonical_bytes(value: Any, data: st.DataObject) -> None:
    encoded = bytearray(codec.encode(value))
    pos = data.draw(st.integers(0, len(encoded) - 1))
    encoded[pos] = data.draw(st.integers(0, 255))
    try:
        decoded = codec.decode(bytes(encoded))
    except PliError:
        return
    assert codec.encode(decoded) == bytes(encoded)


# --- MapReader and versions -----------------------------------------------------------


def _reader(obj: dict[str, Any]) -> codec.MapReader:
    return codec.MapReader(codec.decode(codec.encode(obj)), "thing")


def test_map_reader_reads_every_type() -> None:
    r = _reader({"v": 1, "b": b"xy", "i": 7, "s": "t", "l": [1], "m": {"k": 2}})
    assert codec.expect_version(r, (1,)) == 1
    assert r.bytes_("b", size=2) == b"xy"
    assert r.int_("i", max_value=7) == 7
    assert r.str_("s") == "t"
    assert r.list_("l", max_items=1) == [1]
    m = r.map_("m")
    assert m.int_("k") == 2
    m.done()
    r.done()


def test_map_reader_missing_field() -> None:
    with pytest.raises(DecodeError, match="thing: field 'x' is missing"):
        _reader({"a": 1}).int_("x")


@pytest.mark.parametrize(
    ("obj", "getter", "match"),
    [
        ({"x": "1"}, lambda r: r.int_("x"), "must be an integer"),
        ({"x": True}, lambda r: r.int_("x"), "must be an integer"),
        ({"x": 1}, lambda r: r.bytes_("x"), "must be bytes"),
        ({"x": "ab"}, lambda r: r.bytes_("x"), "must be bytes"),
        ({"x": b"ab"}, lambda r: r.str_("x"), "must be text"),
        ({"x": {}}, lambda r: r.list_("x", max_items=1), "must be an array"),
        ({"x": b"abc"}, lambda r: r.bytes_("x", size=2), "must be 2 bytes, not 3"),
        ({"x": -1}, lambda r: r.int_("x"), "out of range"),
        ({"x": 11}, lambda r: r.int_("x", max_value=10), "out of range"),
    ],
)
def test_map_reader_wrong_type(obj: dict[str, Any], getter: Any, match: str) -> None:
    with pytest.raises(DecodeError, match=match) as info:
        getter(_reader(obj))
    assert type(info.value) is DecodeError


@pytest.mark.parametrize(
    ("obj", "getter"),
    [
        ({"x": b"abc"}, lambda r: r.bytes_("x", max_size=2)),
        ({"x": "abc"}, lambda r: r.str_("x", max_len=2)),
        ({"x": "éa"}, lambda r: r.str_("x", max_len=2)),  # 3 UTF-8 bytes, 2 characters
        ({"x": [1, 2, 3]}, lambda r: r.list_("x", max_items=2)),
    ],
)
def test_map_reader_over_limit(obj: dict[str, Any], getter: Any) -> None:
    with pytest.raises(LimitError, match="'x'"):
        getter(_reader(obj))


def test_map_reader_unknown_field() -> None:
    r = _reader({"v": 1, "a": 1, "zz": 2, "extra": 3})
    codec.expect_version(r, (1,))
    r.int_("a")
    with pytest.raises(DecodeError, match=r"thing: unknown field\(s\) \['extra', 'zz'\]"):
        r.done()


def test_map_reader_requires_a_map() -> None:
    with pytest.raises(DecodeError, match="expected a map"):
        codec.MapReader([1], "thing")


@pytest.mark.parametrize("v", [0, 2, 255])
def test_expect_version_unknown(v: int) -> None:
    with pytest.raises(VersionError, match=f"version {v} is not supported") as info:
        codec.expect_version(_reader({"v": v}), (1,))
    assert info.value.code == "unsupported_version"


@pytest.mark.parametrize("v", ["1", b"\x01", 256, -1])
def test_expect_version_malformed(v: Any) -> None:
    with pytest.raises(DecodeError) as info:
        codec.expect_version(_reader({"v": v}), (1,))
    assert not isinstance(info.value, VersionError)


def test_expect_version_missing() -> None:
    with pytest.raises(DecodeError, match="'v' is missing"):
        codec.expect_version(_reader({}), (1,))
