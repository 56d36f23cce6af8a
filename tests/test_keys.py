"""Tests of protocol/keys.py: device certificates, ids, fingerprints, contexts, sealed keys (SPEC.md §3)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import nacl.pwhash
import nacl.secret
import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import codec, keys
from protocol.errors import DecodeError, DecryptError, PliError, SignatureError, VersionError
from tools import vectors_pli

VECTORS = Path(__file__).resolve().parents[1] / "protocol" / "vectors" / "keys.json"
DATA = json.loads(VECTORS.read_text(encoding="utf-8"))
FAST = {"opslimit": nacl.pwhash.argon2id.OPSLIMIT_MIN, "memlimit": nacl.pwhash.argon2id.MEMLIMIT_MIN}

ALICE = vectors_pli.ALICE.keys
BOB = vectors_pli.BOB.keys
CONTEXTS = (keys.CTX_DEVICE_CERT, keys.CTX_ENVELOPE, keys.CTX_BUNDLE)


def _device_vector(name: str) -> dict[str, Any]:
    return next(d for d in DATA["devices"] if d["name"] == name)


# --- vectors --------------------------------------------------------------------------


def test_vectors_file_is_up_to_date() -> None:
    assert VECTORS.read_text(encoding="utf-8") == vectors_pli.render(vectors_pli.keys_vectors())


@pytest.mark.parametrize("entry", DATA["devices"], ids=[d["name"] for d in DATA["devices"]])
def test_device_vector_both_ways(entry: dict[str, Any]) -> None:
    k = keys.DeviceKeys(
        sign_seed=bytes.fromhex(entry["sign_seed_hex"]),
        enc_secret=bytes.fromhex(entry["enc_secret_hex"]),
        created=entry["created"],
    )
    pub = k.public()
    # we reproduce the bytes
    assert pub.sign_key.hex() == entry["sign_key_hex"]
    assert pub.enc_key.hex() == entry["enc_key_hex"]
    assert pub.cert.hex() == entry["cert_hex"]
    assert pub.sig.hex() == entry["sig_hex"]
    assert pub.to_bytes().hex() == entry["record_hex"]
    assert k.device_id.hex() == pub.device_id.hex() == entry["device_id_hex"]
    assert pub.fingerprint == entry["fingerprint"]
    assert pub.recipient.to_string() == entry["age_recipient"]
    assert k.identity.recipient.to_string() == entry["age_recipient"]
    # we accept the bytes
    parsed = keys.DevicePublic.from_bytes(bytes.fromhex(entry["record_hex"]))
    assert parsed == pub
    assert parsed.created == entry["created"]
    # the certificate is the canonical map SPEC.md §3.2 lists, and nothing else
    assert codec.decode(parsed.cert) == {
        "v": 1,
        "sign_key": pub.sign_key,
        "enc_key": pub.enc_key,
        "created": entry["created"],
    }


def test_device_id_vector_matches_spec_formula() -> None:
    for entry in DATA["devices"]:
        sign_key = bytes.fromhex(entry["sign_key_hex"])
        expected = hashlib.sha256(b"pli/device-id/v1\x00" + sign_key).digest()[:16]
        assert entry["device_id_hex"] == expected.hex()
        assert keys.device_id_of(sign_key) == expected
        assert re.fullmatch(r"[0-9a-f]{32}", entry["device_id_hex"])


def _spec_fingerprint(sign_key: bytes, enc_key: bytes) -> str:
    """SPEC.md §3.3, written again from the text."""
    d = b"\x00\x00" + sign_key + enc_key + b"pli/fingerprint/v1"
    for _ in range(5200):
        d = hashlib.sha512(d + sign_key + enc_key).digest()
    return " ".join("%05d" % (int.from_bytes(d[i * 5 : i * 5 + 5], "big") % 100000) for i in range(6))  # noqa: UP031


def test_fingerprint_vector_and_format() -> None:
    seen = set()
    for entry in DATA["devices"]:
        fp = entry["fingerprint"]
        assert re.fullmatch(r"\d{5}( \d{5}){5}", fp), fp
        sign_key, enc_key = bytes.fromhex(entry["sign_key_hex"]), bytes.fromhex(entry["enc_key_hex"])
        assert _spec_fingerprint(sign_key, enc_key) == fp == keys.fingerprint(sign_key, enc_key)
        seen.add(fp)
    assert len(seen) == len(DATA["devices"])


def test_fingerprint_depends_on_both_keys() -> None:
    a, b = ALICE.public(), BOB.public()
    base = keys.fingerprint(a.sign_key, a.enc_key)
    assert keys.fingerprint(a.sign_key, b.enc_key) != base
    assert keys.fingerprint(b.sign_key, a.enc_key) != base
    assert keys.fingerprint(a.enc_key, a.sign_key) != base  # order matters


@pytest.mark.parametrize("entry", DATA["signatures"], ids=[s["context"] for s in DATA["signatures"]])
def test_signature_vectors(entry: dict[str, Any]) -> None:
    signer = vectors_pli.device(entry["signer"]).keys
    ctx = entry["context"].encode("ascii")
    message = bytes.fromhex(entry["message_hex"])
    sig = bytes.fromhex(entry["signature_hex"])
    assert keys.sign(signer.signing_key, ctx, message) == sig
    keys.verify(signer.signing_key.verify_key, ctx, message, sig)
    # SPEC.md §3.1: plain Ed25519 over context || 0x00 || message
    signer.signing_key.verify_key.verify(ctx + b"\x00" + message, sig)
    for other in CONTEXTS:
        if other != ctx:
            with pytest.raises(SignatureError):
                keys.verify(signer.signing_key.verify_key, other, message, sig)


def test_sealed_vector_unseals() -> None:
    s = DATA["sealed"]
    sealed = bytes.fromhex(s["sealed_hex"])
    k = keys.DeviceKeys.unseal(sealed, s["passphrase"].encode("utf-8"))
    dev = vectors_pli.device(s["device"])
    assert k == dev.keys
    assert k.sign_seed == dev.sign_seed
    assert k.enc_secret == dev.enc_secret
    # the file's layout is SPEC.md §3.4's
    outer = codec.decode(sealed)
    assert set(outer) == {"v", "kdf", "ops", "mem", "salt", "box"}
    assert outer["kdf"] == "argon2id13"
    assert (outer["ops"], outer["mem"], outer["salt"].hex()) == (s["ops"], s["mem"], s["salt_hex"])
    assert outer["box"][:24].hex() == s["nonce_hex"]
    assert len(outer["box"]) == 24 + len(bytes.fromhex(s["inner_hex"])) + 16
    with pytest.raises(DecryptError):
        keys.DeviceKeys.unseal(sealed, b"wrong passphrase")


# --- device certificates --------------------------------------------------------------


def test_cert_record_round_trip() -> None:
    pub = ALICE.public()
    assert keys.DevicePublic.from_bytes(pub.to_bytes()) == pub
    assert keys.DevicePublic.from_record(pub.to_record()) == pub
    assert pub.to_record() == {"sign_key": pub.sign_key, "cert": pub.cert, "sig": pub.sig}
    assert ALICE.public() == pub  # deterministic


def _tampered(record: dict[str, bytes], field: str, pos: int) -> dict[str, bytes]:
    value = bytearray(record[field])
    value[pos % len(value)] ^= 0x01
    return {**record, field: bytes(value)}


@settings(max_examples=60, deadline=None)
@given(field=st.sampled_from(["cert", "sig", "sign_key"]), pos=st.integers(0, 200))
def test_tampered_record_is_refused(field: str, pos: int) -> None:
    record = _tampered(ALICE.public().to_record(), field, pos)
    with pytest.raises((SignatureError, DecodeError)):
        keys.DevicePublic.from_record(record)


def test_tampered_cert_byte_is_signature_error() -> None:
    record = _tampered(ALICE.public().to_record(), "cert", 10)
    with pytest.raises(SignatureError, match="device-cert"):
        keys.DevicePublic.from_record(record)


def test_swapped_sign_key_is_signature_error() -> None:
    record = {**ALICE.public().to_record(), "sign_key": BOB.public().sign_key}
    with pytest.raises(SignatureError):
        keys.DevicePublic.from_record(record)


def test_cert_naming_another_key_is_signature_error() -> None:
    # Mallory signs, with her own key, a certificate that names Alice's signing key with
    # Mallory's encryption key: the signature verifies, the certificate is still refused.
    alice, mallory = ALICE.public(), BOB.public()
    cert = codec.encode({"v": 1, "sign_key": alice.sign_key, "enc_key": mallory.enc_key, "created": 1})
    sig = keys.sign(BOB.signing_key, keys.CTX_DEVICE_CERT, cert)
    record = {"sign_key": mallory.sign_key, "cert": cert, "sig": sig}
    with pytest.raises(SignatureError, match="names another signing key"):
        keys.DevicePublic.from_record(record)


def test_cert_signed_under_another_context_is_refused() -> None:
    pub = ALICE.public()
    sig = keys.sign(ALICE.signing_key, keys.CTX_ENVELOPE, pub.cert)
    with pytest.raises(SignatureError):
        keys.DevicePublic.from_record({**pub.to_record(), "sig": sig})


def _signed_record(cert_obj: Any) -> dict[str, bytes]:
    cert = codec.encode(cert_obj)
    return {
        "sign_key": ALICE.public().sign_key,
        "cert": cert,
        "sig": keys.sign(ALICE.signing_key, keys.CTX_DEVICE_CERT, cert),
    }


def test_cert_with_unknown_version_is_version_error() -> None:
    pub = ALICE.public()
    record = _signed_record({"v": 2, "sign_key": pub.sign_key, "enc_key": pub.enc_key, "created": 1})
    with pytest.raises(VersionError):
        keys.DevicePublic.from_record(record)


@pytest.mark.parametrize(
    "change",
    [
        {"extra": 1},  # unknown field
        {"enc_key": b"short"},
        {"created": -1},
        {"created": "1"},
    ],
)
def test_cert_with_bad_fields_is_decode_error(change: dict[str, Any]) -> None:
    pub = ALICE.public()
    cert = {"v": 1, "sign_key": pub.sign_key, "enc_key": pub.enc_key, "created": 1, **change}
    with pytest.raises(DecodeError):
        keys.DevicePublic.from_record(_signed_record(cert))


@pytest.mark.parametrize(
    "record",
    [
        {"sign_key": b"x" * 31, "cert": b"", "sig": bytes(64)},
        {"sign_key": bytes(32), "cert": b"", "sig": bytes(63)},
        {"sign_key": bytes(32), "cert": b"c" * 257, "sig": bytes(64)},
        {"sign_key": bytes(32), "cert": b""},
        {"sign_key": bytes(32), "cert": b"", "sig": bytes(64), "extra": b""},
        [],
    ],
)
def test_malformed_record_is_decode_error(record: Any) -> None:
    with pytest.raises(DecodeError):
        keys.DevicePublic.from_record(record)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_record_bytes(data: bytes) -> None:
    try:
        keys.DevicePublic.from_bytes(data)
    except PliError:
        return
    pytest.fail("random bytes accepted as a device record")


# --- signatures and contexts ----------------------------------------------------------


def test_sign_is_over_context_nul_message() -> None:
    sig = keys.sign(ALICE.signing_key, keys.CTX_BUNDLE, b"m")
    assert sig == ALICE.signing_key.sign(b"pli/bundle/v1\x00m").signature
    assert len(sig) == 64


def test_bundle_signature_is_not_valid_as_envelope_signature() -> None:
    sig = keys.sign(ALICE.signing_key, keys.CTX_BUNDLE, b"header bytes")
    keys.verify(ALICE.signing_key.verify_key, keys.CTX_BUNDLE, b"header bytes", sig)
    with pytest.raises(SignatureError, match="pli/envelope/v1"):
        keys.verify(ALICE.signing_key.verify_key, keys.CTX_ENVELOPE, b"header bytes", sig)


def test_context_boundary_is_unambiguous() -> None:
    # "pli/bundle/v1" + 0x00 + "x" must not equal another context + 0x00 + message
    sig = keys.sign(ALICE.signing_key, b"pli/bundle/v1", b"x")
    with pytest.raises(SignatureError):
        keys.verify(ALICE.signing_key.verify_key, b"pli/bundle/v1\x00x", b"", sig)
    with pytest.raises(SignatureError):
        keys.verify(ALICE.signing_key.verify_key, b"pli/bundle", b"/v1\x00x", sig)


@pytest.mark.parametrize("sig_len", [0, 63, 65])
def test_verify_refuses_wrong_signature_length(sig_len: int) -> None:
    with pytest.raises(SignatureError, match="64 bytes"):
        keys.verify(ALICE.signing_key.verify_key, keys.CTX_BUNDLE, b"m", bytes(sig_len))


def test_verify_with_another_key() -> None:
    sig = keys.sign(ALICE.signing_key, keys.CTX_BUNDLE, b"m")
    with pytest.raises(SignatureError):
        keys.verify(BOB.signing_key.verify_key, keys.CTX_BUNDLE, b"m", sig)


@settings(max_examples=50, deadline=None)
@given(message=st.binary(max_size=100), pos=st.integers(0, 63), bit=st.integers(0, 7))
def test_any_flipped_signature_bit_fails(message: bytes, pos: int, bit: int) -> None:
    sig = bytearray(keys.sign(ALICE.signing_key, keys.CTX_ENVELOPE, message))
    sig[pos] ^= 1 << bit
    with pytest.raises(SignatureError):
        keys.verify(ALICE.signing_key.verify_key, keys.CTX_ENVELOPE, message, bytes(sig))


# --- DeviceKeys -----------------------------------------------------------------------


@pytest.mark.parametrize(("seed", "secret"), [(bytes(31), bytes(32)), (bytes(32), bytes(33))])
def test_device_keys_refuse_wrong_sizes(seed: bytes, secret: bytes) -> None:
    with pytest.raises(DecodeError):
        keys.DeviceKeys(sign_seed=seed, enc_secret=secret, created=0)


def test_generate_is_random_and_consistent() -> None:
    a, b = keys.DeviceKeys.generate(now=5), keys.DeviceKeys.generate(now=5)
    assert a.sign_seed != b.sign_seed
    assert a.enc_secret != b.enc_secret
    assert a.public().created == 5
    assert keys.DevicePublic.from_bytes(a.public().to_bytes()) == a.public()


def test_private_keys_stay_out_of_repr() -> None:
    text = repr(ALICE)
    assert ALICE.sign_seed.hex() not in text
    assert repr(ALICE.sign_seed) not in text
    assert repr(ALICE.enc_secret) not in text


# --- sealed keys ----------------------------------------------------------------------


def test_seal_round_trip() -> None:
    sealed = ALICE.seal(b"passphrase \xc3\xa9", **FAST)
    assert keys.DeviceKeys.unseal(sealed, b"passphrase \xc3\xa9") == ALICE
    assert ALICE.seal(b"passphrase \xc3\xa9", **FAST) != sealed  # fresh salt and nonce
    outer = codec.decode(sealed)
    assert outer["ops"] == FAST["opslimit"]
    assert outer["mem"] == FAST["memlimit"]
    assert ALICE.sign_seed not in sealed
    assert ALICE.enc_secret not in sealed


def test_unseal_wrong_passphrase() -> None:
    sealed = ALICE.seal(b"right", **FAST)
    with pytest.raises(DecryptError, match="wrong passphrase"):
        keys.DeviceKeys.unseal(sealed, b"wrong")
    with pytest.raises(DecryptError):
        keys.DeviceKeys.unseal(sealed, b"")


def _reseal(sealed: bytes, **change: Any) -> bytes:
    return codec.encode({**codec.decode(sealed), **change})


@pytest.mark.parametrize("field", ["salt", "box"])
def test_unseal_corrupted_file_is_decrypt_error(field: str) -> None:
    sealed = ALICE.seal(b"pw", **FAST)
    outer = codec.decode(sealed)
    for pos in (0, len(outer[field]) // 2, len(outer[field]) - 1):
        value = bytearray(outer[field])
        value[pos] ^= 0x80
        with pytest.raises(DecryptError):
            keys.DeviceKeys.unseal(_reseal(sealed, **{field: bytes(value)}), b"pw")


def test_unseal_truncated_box_is_decrypt_error() -> None:
    sealed = ALICE.seal(b"pw", **FAST)
    box = codec.decode(sealed)["box"]
    for n in (0, 10, 24, 40, len(box) - 1):
        with pytest.raises(DecryptError):
            keys.DeviceKeys.unseal(_reseal(sealed, box=box[:n]), b"pw")


def test_unseal_changed_cost_is_decrypt_error() -> None:
    # another opslimit derives another key: the box does not open
    sealed = ALICE.seal(b"pw", **FAST)
    with pytest.raises(DecryptError):
        keys.DeviceKeys.unseal(_reseal(sealed, ops=FAST["opslimit"] + 1), b"pw")


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"v": 2}, VersionError),
        ({"kdf": "scrypt"}, DecodeError),
        ({"salt": bytes(15)}, DecodeError),
        ({"ops": 0}, DecodeError),
        ({"mem": 1024}, DecodeError),
        ({"extra": 1}, DecodeError),
        ({"box": b"x" * 1025}, DecodeError),
    ],
)
def test_unseal_malformed_file(change: dict[str, Any], error: type[Exception]) -> None:
    sealed = ALICE.seal(b"pw", **FAST)
    with pytest.raises(error):
        keys.DeviceKeys.unseal(_reseal(sealed, **change), b"pw")


@pytest.mark.parametrize("data", [b"", b"\x00", b"\x80", bytes(100)])
def test_unseal_garbage_is_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        keys.DeviceKeys.unseal(data, b"pw")


def test_unseal_refuses_bad_inner_contents() -> None:
    # A box that opens but holds something else than SPEC.md §3.4's inner map.
    s = DATA["sealed"]
    key = nacl.pwhash.argon2id.kdf(32, b"pw", bytes.fromhex(s["salt_hex"]), opslimit=s["ops"], memlimit=s["mem"])
    for inner, error in (
        (codec.encode({"v": 1, "sign_seed": bytes(32), "enc_secret": bytes(32), "created": 1, "x": 1}), DecodeError),
        (codec.encode({"v": 9, "sign_seed": bytes(32), "enc_secret": bytes(32), "created": 1}), VersionError),
        (codec.encode({"v": 1, "sign_seed": bytes(31), "enc_secret": bytes(32), "created": 1}), DecodeError),
        (b"\xc1", DecodeError),
    ):
        box = nacl.secret.SecretBox(key).encrypt(inner, bytes(24))
        sealed = codec.encode(
            {
                "v": 1,
                "kdf": "argon2id13",
                "ops": s["ops"],
                "mem": s["mem"],
                "salt": bytes.fromhex(s["salt_hex"]),
                "box": bytes(box),
            }
        )
        with pytest.raises(error):
            keys.DeviceKeys.unseal(sealed, b"pw")
