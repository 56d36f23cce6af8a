"""Tests of protocol/envelope.py: the signed routing header and its prefix (SPEC.md §5)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import codec, envelope, keys
from protocol.envelope import EnvelopeHeader, SignedHeader, seal_header, split_prefix
from protocol.errors import DecodeError, LimitError, PliError, SignatureError, VersionError
from tools import vectors_pli

VECTORS = Path(__file__).resolve().parents[1] / "protocol" / "vectors" / "envelope.json"
DATA = json.loads(VECTORS.read_text(encoding="utf-8"))
ERRORS = {
    "malformed": DecodeError,
    "too_large": LimitError,
    "bad_signature": SignatureError,
    "unsupported_version": VersionError,
}

ALICE = vectors_pli.ALICE.keys
BOB = vectors_pli.BOB.keys
CAROL = vectors_pli.CAROL.keys


def _header(**change: Any) -> EnvelopeHeader:
    fields: dict[str, Any] = {
        "id": bytes(range(16)),
        "sender": ALICE.device_id,
        "to": (BOB.device_id, CAROL.device_id),
        "created": 1_767_261_600,
        "expires": 1_767_261_600 + 86400,
        "size": 1234,
        "sha256": hashlib.sha256(b"ciphertext").digest(),
    }
    fields.update(change)
    return EnvelopeHeader(**fields)


def _signed_raw(obj: dict[str, Any], key: Any = None) -> SignedHeader:
    raw = codec.encode(obj)
    digest = hashlib.sha256(raw).digest()
    return SignedHeader(raw=raw, signature=keys.sign((key or ALICE).signing_key, keys.CTX_ENVELOPE, digest))


def _read(data: bytes, key: keys.DeviceKeys) -> EnvelopeHeader:
    """What a reader does: split (the prefix must be complete), verify, decode."""
    result = split_prefix(data)
    if result is None:
        pytest.fail("the prefix should be complete")
    return result[0].verify(key.signing_key.verify_key)


def _header_obj(**change: Any) -> dict[str, Any]:
    return {**codec.decode(_header().to_bytes()), **change}


# --- vectors --------------------------------------------------------------------------


def test_vectors_file_is_up_to_date() -> None:
    assert VECTORS.read_text(encoding="utf-8") == vectors_pli.render(vectors_pli.envelope_vectors())


@pytest.mark.parametrize("case", DATA["valid"], ids=[c["name"] for c in DATA["valid"]])
def test_vector_both_ways(case: dict[str, Any]) -> None:
    sender = vectors_pli.device(case["sender"]).keys
    header = EnvelopeHeader(
        id=bytes.fromhex(case["id_hex"]),
        sender=bytes.fromhex(case["from_hex"]),
        to=tuple(bytes.fromhex(t) for t in case["to_hex"]),
        created=case["created"],
        expires=case["expires"],
        size=case["size"],
        sha256=bytes.fromhex(case["sha256_hex"]),
    )
    # we reproduce the bytes
    signed = seal_header(header, sender.signing_key)
    assert signed.raw.hex() == case["header_hex"]
    assert signed.signature.hex() == case["signature_hex"]
    assert signed.prefix.hex() == case["prefix_hex"]
    assert signed.envelope_hash.hex() == case["envelope_hash_hex"]
    # we accept the bytes: split, verify, decode
    prefix = bytes.fromhex(case["prefix_hex"])
    result = split_prefix(prefix + b"ciphertext follows")
    assert result is not None
    split, used = result
    assert used == len(prefix)
    assert split.raw.hex() == case["header_hex"]
    assert split.verify(sender.signing_key.verify_key) == header
    # the layout of SPEC.md §5, checked independently of the code
    raw = bytes.fromhex(case["header_hex"])
    assert prefix == b"pli-envelope/v1\n" + struct.pack(">H", len(raw)) + raw + bytes.fromhex(case["signature_hex"])
    sender.signing_key.verify_key.verify(
        b"pli/envelope/v1\x00" + hashlib.sha256(raw).digest(), bytes.fromhex(case["signature_hex"])
    )
    assert hashlib.sha256(raw).hexdigest() == case["envelope_hash_hex"]
    assert codec.decode(raw) == {
        "v": 1,
        "id": header.id,
        "from": header.sender,
        "to": list(header.to),
        "created": header.created,
        "expires": header.expires,
        "size": header.size,
        "sha256": header.sha256,
    }
    assert case["from_hex"] == sender.device_id.hex()


@pytest.mark.parametrize("case", DATA["invalid"], ids=[c["name"] for c in DATA["invalid"]])
def test_invalid_vector_is_refused(case: dict[str, Any]) -> None:
    signer = vectors_pli.device(case["expected_signer"]).keys
    error = ERRORS[case["error"]]
    with pytest.raises(error) as info:
        _read(bytes.fromhex(case["prefix_hex"]), signer)
    assert info.value.code == case["error"]


# --- split_prefix ---------------------------------------------------------------------


def test_split_prefix_byte_by_byte() -> None:
    signed = seal_header(_header(), ALICE.signing_key)
    data = signed.prefix + b"CIPHERTEXT"
    for n in range(len(signed.prefix)):
        assert split_prefix(data[:n]) is None, n
    for n in range(len(signed.prefix), len(data) + 1):
        result = split_prefix(data[:n])
        assert result is not None
        assert result == (signed, len(signed.prefix))


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_split_prefix_accepts_buffers(kind: type) -> None:
    signed = seal_header(_header(), ALICE.signing_key)
    result = split_prefix(kind(signed.prefix))
    assert result is not None
    assert result[0] == signed


@pytest.mark.parametrize("pos", range(16))
def test_bad_magic_refused_at_first_wrong_byte(pos: int) -> None:
    bad = bytearray(envelope.MAGIC)
    bad[pos] ^= 0x20
    # refused as soon as the wrong byte arrives, without waiting for the rest
    with pytest.raises(DecodeError, match="bad magic"):
        split_prefix(bytes(bad[: pos + 1]))
    assert split_prefix(envelope.MAGIC[:pos]) is None


def test_other_formats_are_not_envelopes() -> None:
    for data in (b"age-encryption.org/v1\n", b"\x00" * 20, b"PLI-ENVELOPE/V1\n\x00\x01"):
        with pytest.raises(DecodeError):
            split_prefix(data)


def test_header_length_zero() -> None:
    with pytest.raises(DecodeError, match="empty envelope header") as info:
        split_prefix(envelope.MAGIC + b"\x00\x00")
    assert not isinstance(info.value, LimitError)


@pytest.mark.parametrize("n", [4097, 0x8000, 0xFFFF])
def test_header_length_over_limit_refused_from_the_length_bytes(n: int) -> None:
    with pytest.raises(LimitError, match="over the 4096-byte limit"):
        split_prefix(envelope.MAGIC + struct.pack(">H", n))


def test_header_length_at_limit_waits_for_more() -> None:
    assert split_prefix(envelope.MAGIC + struct.pack(">H", 4096) + bytes(4000)) is None
    result = split_prefix(envelope.MAGIC + struct.pack(">H", 4096) + bytes(4096 + 64))
    assert result is not None
    assert len(result[0].raw) == 4096
    assert result[1] == envelope.MAX_PREFIX


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_split_and_verify(data: bytes) -> None:
    try:
        result = split_prefix(envelope.MAGIC + data)
        if result is not None:
            result[0].verify(ALICE.signing_key.verify_key)
    except PliError:
        return


# --- tampering ------------------------------------------------------------------------

_PREFIX = seal_header(_header(), ALICE.signing_key).prefix
# What follows the prefix on the wire: enough that a larger (flipped) length still splits.
_TRAILER = bytes(range(256)) * 17


@settings(max_examples=400, deadline=None)
@given(pos=st.integers(0, len(_PREFIX) - 1), bit=st.integers(0, 7))
def test_flipping_any_prefix_bit_is_refused(pos: int, bit: int) -> None:
    data = bytearray(_PREFIX + _TRAILER)
    data[pos] ^= 1 << bit
    with pytest.raises((SignatureError, DecodeError)):  # LimitError is a DecodeError
        _read(bytes(data), ALICE)


def test_flipping_every_prefix_byte_is_refused() -> None:
    """The exhaustive version of the property above, one bit per byte."""
    for pos in range(len(_PREFIX)):
        data = bytearray(_PREFIX + _TRAILER)
        data[pos] ^= 0x04
        with pytest.raises((SignatureError, DecodeError)):
            _read(bytes(data), ALICE)


def test_verify_with_another_devices_key() -> None:
    signed = seal_header(_header(), ALICE.signing_key)
    with pytest.raises(SignatureError):
        signed.verify(BOB.signing_key.verify_key)


def test_header_naming_another_sender_than_its_signer() -> None:
    # Alice signs a header that claims to come from Bob's device.
    signed = seal_header(_header(sender=BOB.device_id), ALICE.signing_key)
    with pytest.raises(SignatureError, match="names a sender other than its signer"):
        signed.verify(ALICE.signing_key.verify_key)
    with pytest.raises(SignatureError):
        signed.verify(BOB.signing_key.verify_key)


def test_header_signed_under_bundle_context_is_refused() -> None:
    raw = _header().to_bytes()
    signed = SignedHeader(raw=raw, signature=keys.sign(ALICE.signing_key, keys.CTX_BUNDLE, raw))
    with pytest.raises(SignatureError):
        signed.verify(ALICE.signing_key.verify_key)


def test_unknown_version_correctly_signed() -> None:
    signed = _signed_raw(_header_obj(v=2))
    with pytest.raises(VersionError, match="version 2 is not supported"):
        signed.verify(ALICE.signing_key.verify_key)


def test_signature_is_checked_before_decoding() -> None:
    # Garbage header bytes with a wrong signature: the signature error comes first.
    signed = SignedHeader(raw=b"\xc1garbage", signature=bytes(64))
    with pytest.raises(SignatureError):
        signed.verify(ALICE.signing_key.verify_key)
    signed = _signed_raw({"not": "a header"})
    with pytest.raises(DecodeError):
        signed.verify(ALICE.signing_key.verify_key)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"extra": 1}, DecodeError),
        ({"id": bytes(15)}, DecodeError),
        ({"from": bytes(17)}, DecodeError),
        ({"to": []}, DecodeError),
        ({"to": ["x" * 16]}, DecodeError),
        ({"to": [bytes(16)] * 65}, DecodeError),
        ({"created": 10, "expires": 10}, DecodeError),
        ({"size": -1}, DecodeError),
        ({"sha256": bytes(31)}, DecodeError),
        ({"v": "1"}, DecodeError),
        ({"sha256": None}, DecodeError),
    ],
)
def test_signed_but_invalid_header_fields(change: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        _signed_raw(_header_obj(**change)).verify(ALICE.signing_key.verify_key)


def test_non_canonical_signed_header_is_refused() -> None:
    # The same fields in another key order, correctly signed: still refused (one encoding).
    obj = _header_obj()
    raw = msgpack.packb(dict(reversed(list(obj.items()))), use_bin_type=True)
    digest = hashlib.sha256(raw).digest()
    signed = SignedHeader(raw=raw, signature=keys.sign(ALICE.signing_key, keys.CTX_ENVELOPE, digest))
    with pytest.raises(DecodeError, match="canonical"):
        signed.verify(ALICE.signing_key.verify_key)


def test_from_bytes_refuses_header_over_limit() -> None:
    with pytest.raises(LimitError):
        EnvelopeHeader.from_bytes(bytes(4097))


# --- EnvelopeHeader invariants --------------------------------------------------------


def test_header_round_trip() -> None:
    h = _header()
    assert EnvelopeHeader.from_bytes(h.to_bytes()) == h
    signed = seal_header(h, ALICE.signing_key)
    assert signed.verify(ALICE.signing_key.verify_key) == h
    assert signed.envelope_hash == hashlib.sha256(h.to_bytes()).digest()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"to": (bytes(16), bytes(16))}, "listed twice"),
        ({"to": ()}, "1 to 64"),
        ({"to": tuple(bytes([i]) * 16 for i in range(65))}, "1 to 64"),
        ({"to": (bytes(15),)}, "16 bytes"),
        ({"created": 100, "expires": 100}, "expire after"),
        ({"created": 100, "expires": 99}, "expire after"),
        ({"created": -1, "expires": 99}, "expire after"),
        ({"id": bytes(15)}, "envelope id"),
        ({"id": bytes(17)}, "envelope id"),
        ({"sender": bytes(32)}, "sender device id"),
        ({"size": -1}, "negative size"),
        ({"sha256": bytes(16)}, "sha256"),
    ],
)
def test_header_invariants(change: dict[str, Any], match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        _header(**change)


def test_header_with_64_recipients_fits_the_limit() -> None:
    h = _header(to=tuple(bytes([i]) * 16 for i in range(64)), size=(1 << 63) - 1)
    assert len(h.to_bytes()) <= envelope.MAX_HEADER
    signed = seal_header(h, ALICE.signing_key)
    assert signed.verify(ALICE.signing_key.verify_key) == h


@settings(max_examples=100, deadline=None)
@given(
    n_to=st.integers(1, 64),
    created=st.integers(0, 1 << 40),
    life=st.integers(1, 1 << 30),
    size=st.integers(0, (1 << 63) - 1),
    id_=st.binary(min_size=16, max_size=16),
)
def test_header_property_round_trip(n_to: int, created: int, life: int, size: int, id_: bytes) -> None:
    h = _header(
        id=id_, to=tuple(bytes([i]) * 16 for i in range(n_to)), created=created, expires=created + life, size=size
    )
    result = split_prefix(seal_header(h, ALICE.signing_key).prefix)
    assert result is not None
    assert result[0].verify(ALICE.signing_key.verify_key) == h
