"""Tests of protocol/logentry.py: the fixed-layout leaves of the relay's log (SPEC.md §11).

Vectors both ways (fields → exact bytes, committed bytes → fields), the generator
reproduces the committed file, every type round-trips, every malformed length, type,
version and RPPS is refused with a PliError, and the device signature a SUBMITTED,
READ or ANSWERED leaf carries verifies with its device's key only, over exactly the
fields it signs.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import replace
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import keys, merkle
from protocol.envelope import EnvelopeHeader, seal_header
from protocol.errors import DecodeError, LimitError, PliError, SignatureError, VersionError
from protocol.logentry import (
    CTX_ANSWERED,
    CTX_READ,
    MAX_ENTRY,
    EntryType,
    LogEntry,
    answered_statement,
    read_statement,
    sign_answered,
    sign_read,
)
from tools import vectors_log, vectors_pli

VECTORS = Path(__file__).resolve().parents[1] / "protocol" / "vectors" / "logentry.json"
DATA = json.loads(VECTORS.read_text(encoding="utf-8"))
ERRORS: dict[str, type[PliError]] = {
    "malformed": DecodeError,
    "too_large": LimitError,
    "bad_signature": SignatureError,
    "unsupported_version": VersionError,
}

ALICE = vectors_pli.ALICE.keys
BOB = vectors_pli.BOB.keys
CAROL = vectors_pli.CAROL.keys
HEAD = 10
#: the body size of each type, as SPEC.md §11 and the EntryType comments give it
BODY = {
    EntryType.DEVICE_ENROLLED: 59,
    EntryType.DEVICE_REVOKED: 27,
    EntryType.SUBMITTED: 128,
    EntryType.DELIVERED: 64,
    EntryType.READ: 136,
    EntryType.ANSWERED: 168,
}
#: (start, end) of each field in the body, per type
LAYOUT: dict[EntryType, dict[str, tuple[int, int]]] = {
    EntryType.DEVICE_ENROLLED: {"device_id": (0, 16), "rpps": (16, 27), "record_hash": (27, 59)},
    EntryType.DEVICE_REVOKED: {"device_id": (0, 16), "rpps": (16, 27)},
    EntryType.SUBMITTED: {"envelope_id": (0, 16), "envelope_hash": (16, 48), "device_id": (48, 64),
                          "signature": (64, 128)},
    EntryType.DELIVERED: {"envelope_id": (0, 16), "envelope_hash": (16, 48), "device_id": (48, 64)},
    EntryType.READ: {"envelope_id": (0, 16), "envelope_hash": (16, 48), "device_id": (48, 64),
                     "act_time": (64, 72), "signature": (72, 136)},
    EntryType.ANSWERED: {"envelope_id": (0, 16), "envelope_hash": (16, 48), "answer_hash": (48, 80),
                         "device_id": (80, 96), "act_time": (96, 104), "signature": (104, 168)},
}
#: the fields a device signature covers (the relay's time and the envelope id are not:
#: the envelope hash commits to the header, id included)
SIGNED = {
    EntryType.SUBMITTED: ("envelope_hash", "device_id", "signature"),
    EntryType.READ: ("envelope_hash", "device_id", "act_time", "signature"),
    EntryType.ANSWERED: ("envelope_hash", "answer_hash", "device_id", "act_time", "signature"),
}


def _case(name: str) -> dict[str, Any]:
    return next(c for c in DATA["valid"] if c["name"] == name)


def _vector_entry(name: str) -> LogEntry:
    return LogEntry.from_bytes(bytes.fromhex(_case(name)["leaf_hex"]))


def _flip(data: bytes, offset: int, bit: int = 0) -> bytes:
    return data[:offset] + bytes([data[offset] ^ (1 << bit)]) + data[offset + 1 :]


# -- vectors ---------------------------------------------------------------------------------


def test_vectors_file_is_up_to_date() -> None:
    assert VECTORS.read_text(encoding="utf-8") == vectors_log.render()


def test_vectors_cover_every_type_once() -> None:
    assert sorted(c["type_code"] for c in DATA["valid"]) == sorted(int(t) for t in EntryType)
    assert {c["type"] for c in DATA["valid"]} == {t.name for t in EntryType}
    codes = {c["error"] for c in DATA["invalid"]}
    assert codes == {"malformed", "unsupported_version"}


@pytest.mark.parametrize("case", DATA["valid"], ids=lambda c: c["name"])
def test_vector_fields_build_the_exact_bytes(case: dict[str, Any]) -> None:
    entry = vectors_log.entry_from_json(case["type"], case["fields"])
    leaf = entry.to_bytes()
    assert leaf.hex() == case["leaf_hex"]
    assert entry.leaf == leaf
    assert len(leaf) == case["leaf_size"] == HEAD + BODY[entry.type]
    # The layout by hand: version, type, u64be time, then the body.
    assert leaf[:HEAD] == bytes([1, case["type_code"]]) + struct.pack(">Q", case["fields"]["time"])
    assert entry.leaf_hash.hex() == case["leaf_hash_hex"]
    assert entry.leaf_hash == merkle.leaf_hash(leaf) == hashlib.sha256(b"\x00" + leaf).digest()


@pytest.mark.parametrize("case", DATA["valid"], ids=lambda c: c["name"])
def test_vector_bytes_parse_to_the_fields(case: dict[str, Any]) -> None:
    leaf = bytes.fromhex(case["leaf_hex"])
    entry = LogEntry.from_bytes(leaf)
    assert entry.type == EntryType[case["type"]] == case["type_code"]
    assert vectors_log.fields_json(entry) == case["fields"]
    # Each field sits where the layout says, and fields of other types stay empty.
    body = leaf[HEAD:]
    layout = LAYOUT[entry.type]
    for name, (start, end) in layout.items():
        value = getattr(entry, name)
        if name == "rpps":
            value = value.encode("ascii")
        elif name == "act_time":
            value = struct.pack(">Q", value)
        assert body[start:end] == value, name
    for name in ("device_id", "rpps", "record_hash", "envelope_id", "envelope_hash", "answer_hash", "signature"):
        if name not in layout:
            assert not getattr(entry, name), name
    if "act_time" not in layout:
        assert entry.act_time == 0


@pytest.mark.parametrize("case", DATA["valid"], ids=lambda c: c["name"])
def test_vector_device_signatures(case: dict[str, Any]) -> None:
    entry = LogEntry.from_bytes(bytes.fromhex(case["leaf_hex"]))
    devices = {d["name"]: d for d in DATA["devices"]}
    if case["signer"] is None:
        assert case["signed_message_hex"] is None
        for d in devices.values():
            with pytest.raises(SignatureError):
                entry.verify_act(nacl.signing.VerifyKey(bytes.fromhex(d["sign_key_hex"])))
        return
    signer = devices[case["signer"]]
    key = nacl.signing.VerifyKey(bytes.fromhex(signer["sign_key_hex"]))
    assert entry.device_id.hex() == signer["device_id_hex"]
    entry.verify_act(key)
    # Independently of verify_act: the signature is plain Ed25519 over the stated bytes.
    key.verify(bytes.fromhex(case["signed_message_hex"]), entry.signature)


def test_vector_devices_and_envelopes_are_consistent() -> None:
    for d in DATA["devices"]:
        dev = vectors_pli.device(d["name"])
        assert bytes.fromhex(d["sign_key_hex"]) == bytes(dev.keys.signing_key.verify_key)
        assert bytes.fromhex(d["device_id_hex"]) == keys.device_id_of(bytes.fromhex(d["sign_key_hex"]))
        assert d["record_sha256_hex"] == hashlib.sha256(dev.keys.public().to_bytes()).hexdigest()
    enrolled = _vector_entry("device-enrolled")
    assert enrolled.record_hash.hex() == DATA["devices"][0]["record_sha256_hex"]
    envs = {e["name"]: e for e in DATA["envelopes"]}
    for e in envs.values():
        header = EnvelopeHeader.from_bytes(bytes.fromhex(e["header_hex"]))
        assert header.id.hex() == e["id_hex"]
        assert hashlib.sha256(bytes.fromhex(e["header_hex"])).hexdigest() == e["envelope_hash_hex"]
    submitted = _vector_entry("submitted")
    assert submitted.envelope_hash.hex() == envs["request"]["envelope_hash_hex"]
    assert submitted.signature.hex() == envs["request"]["signature_hex"]
    assert _vector_entry("answered").answer_hash.hex() == envs["answer"]["envelope_hash_hex"]


@pytest.mark.parametrize("case", DATA["invalid"], ids=lambda c: c["name"])
def test_vector_invalid_leaves_are_refused(case: dict[str, Any]) -> None:
    with pytest.raises(PliError) as info:
        LogEntry.from_bytes(bytes.fromhex(case["leaf_hex"]))
    assert info.value.code == case["error"]
    assert isinstance(info.value, ERRORS[case["error"]])


@pytest.mark.parametrize("case", DATA["bad_signatures"], ids=lambda c: c["name"])
def test_vector_bad_signatures_are_refused(case: dict[str, Any]) -> None:
    entry = LogEntry.from_bytes(bytes.fromhex(case["leaf_hex"]))  # parses: only the signature is wrong
    key = nacl.signing.VerifyKey(bytes.fromhex(
        next(d for d in DATA["devices"] if d["name"] == case["key_of"])["sign_key_hex"]))
    with pytest.raises(SignatureError) as info:
        entry.verify_act(key)
    assert info.value.code == case["error"]


# -- round trips and refusals of the encoder ---------------------------------------------------

_H16 = st.binary(min_size=16, max_size=16)
_H32 = st.binary(min_size=32, max_size=32)
_SIG = st.binary(min_size=64, max_size=64)
_U64 = st.integers(0, 2**64 - 1)
_RPPS = st.text(alphabet="0123456789", min_size=11, max_size=11)


@st.composite
def entries(draw: st.DrawFn, kind: EntryType | None = None) -> LogEntry:
    t = draw(st.sampled_from(list(EntryType))) if kind is None else kind
    values: dict[str, Any] = {"type": t, "time": draw(_U64)}
    for name in LAYOUT[t]:
        values[name] = draw({"device_id": _H16, "envelope_id": _H16, "rpps": _RPPS, "record_hash": _H32,
                             "envelope_hash": _H32, "answer_hash": _H32, "act_time": _U64,
                             "signature": _SIG}[name])
    return LogEntry(**values)


@pytest.mark.parametrize("kind", list(EntryType), ids=lambda t: t.name)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_every_type_round_trips(kind: EntryType, data: st.DataObject) -> None:
    entry = data.draw(entries(kind))
    leaf = entry.to_bytes()
    assert len(leaf) == HEAD + BODY[kind]
    assert leaf[0] == 1
    assert leaf[1] == int(kind)
    assert LogEntry.from_bytes(leaf) == entry
    assert LogEntry.from_bytes(leaf).to_bytes() == leaf


def test_max_entry_is_the_longest_type() -> None:
    assert MAX_ENTRY == HEAD + max(BODY.values()) == 178


def _sample(kind: EntryType) -> LogEntry:
    return LogEntry(type=kind, time=1, device_id=bytes(16), rpps="10000005479", record_hash=bytes(32),
                    envelope_id=bytes(16), envelope_hash=bytes(32),
                    answer_hash=bytes(32) if kind == EntryType.ANSWERED else b"", act_time=5,
                    signature=bytes(64) if kind in SIGNED else b"")


@pytest.mark.parametrize(
    ("kind", "name"), [(t, n) for t in EntryType for n in LAYOUT[t] if n not in {"rpps", "act_time"}],
    ids=lambda v: v.name if isinstance(v, EntryType) else v,
)
def test_to_bytes_refuses_a_field_of_the_wrong_length(kind: EntryType, name: str) -> None:
    entry = _sample(kind)
    entry.to_bytes()
    size = LAYOUT[kind][name][1] - LAYOUT[kind][name][0]
    for wrong in (b"", bytes(size - 1), bytes(size + 1)):
        with pytest.raises(DecodeError):
            replace(entry, **{name: wrong}).to_bytes()


#: Arabic-Indic and full-width digits: str.isdigit() says yes, the layout says ASCII only
_ARABIC = "".join(chr(0x0660 + int(c)) for c in "10000005479")
_FULLWIDTH = "".join(chr(0xFF10 + int(c)) for c in "10000005479")


@pytest.mark.parametrize("rpps", ["", "1000000547", "100000054790", "1000000547a", " 1000000547", "10000-05479",
                                  _ARABIC, _FULLWIDTH, "1000000547\u00b2", "1000000547\u00e9"])
@pytest.mark.parametrize("kind", [EntryType.DEVICE_ENROLLED, EntryType.DEVICE_REVOKED])
def test_to_bytes_refuses_an_rpps_that_is_not_11_ascii_digits(kind: EntryType, rpps: str) -> None:
    with pytest.raises(DecodeError):
        replace(_sample(kind), rpps=rpps).to_bytes()


# -- refusals of the reader --------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(EntryType), ids=lambda t: t.name)
def test_every_other_length_is_refused(kind: EntryType) -> None:
    leaf = _sample(kind).to_bytes()
    for n in range(MAX_ENTRY + 40):
        data = (leaf + bytes(MAX_ENTRY + 40))[:n]
        if n == len(leaf):
            assert LogEntry.from_bytes(data).type == kind
            continue
        with pytest.raises(DecodeError):
            LogEntry.from_bytes(data)


@pytest.mark.parametrize("raw_type", [0, 7, 8, 0x81, 255])
def test_unknown_type_is_refused(raw_type: int) -> None:
    for kind in EntryType:  # whatever body size follows
        leaf = _sample(kind).to_bytes()
        with pytest.raises(DecodeError, match="unknown") as info:
            LogEntry.from_bytes(leaf[:1] + bytes([raw_type]) + leaf[2:])
        assert not isinstance(info.value, VersionError)


@pytest.mark.parametrize("version", [0, 2, 3, 255])
def test_other_versions_are_refused(version: int) -> None:
    for kind in EntryType:
        leaf = _sample(kind).to_bytes()
        with pytest.raises(VersionError) as info:
            LogEntry.from_bytes(bytes([version]) + leaf[1:])
        assert info.value.code == "unsupported_version"


@pytest.mark.parametrize("kind", [EntryType.DEVICE_ENROLLED, EntryType.DEVICE_REVOKED])
@pytest.mark.parametrize("byte", [b" ", b"a", b"/", b":", b"\x00", b"\x7f", b"\xb2", b"\xff"])
@pytest.mark.parametrize("position", [0, 5, 10])
def test_non_digit_rpps_is_refused(kind: EntryType, byte: bytes, position: int) -> None:
    leaf = _sample(kind).to_bytes()
    at = HEAD + 16 + position
    with pytest.raises(DecodeError, match="RPPS"):
        LogEntry.from_bytes(leaf[:at] + byte + leaf[at + 1 :])


@settings(max_examples=600, deadline=None)
@given(st.binary(max_size=MAX_ENTRY + 8))
def test_any_bytes_parse_or_raise_a_pli_error(data: bytes) -> None:
    try:
        entry = LogEntry.from_bytes(data)
    except PliError:
        return
    # What parses is canonical: it encodes back to the same bytes.
    assert entry.to_bytes() == data


@settings(max_examples=400, deadline=None)
@given(kind=st.sampled_from(list(EntryType)), head=st.binary(min_size=2, max_size=2), data=st.data())
def test_any_body_of_the_right_size_parses_or_raises_a_pli_error(
    kind: EntryType, head: bytes, data: st.DataObject
) -> None:
    # Right-sized bodies reach the field parsers (random bytes rarely do).
    body = data.draw(st.binary(min_size=BODY[kind], max_size=BODY[kind]))
    leaf = bytes([head[0] % 3, int(kind)]) + struct.pack(">Q", head[1]) + body
    try:
        entry = LogEntry.from_bytes(leaf)
    except PliError:
        return
    assert entry.type == kind
    assert entry.to_bytes() == leaf


# -- device signatures --------------------------------------------------------------------------

REQ = EnvelopeHeader(id=bytes(range(16)), sender=ALICE.device_id, to=(BOB.device_id, CAROL.device_id),
                     created=1_767_261_600, expires=1_767_261_600 + 86400, size=1234,
                     sha256=hashlib.sha256(b"ciphertext").digest())
ANS = replace(REQ, id=bytes(range(16, 32)), sender=BOB.device_id, to=(ALICE.device_id,))


def _submitted() -> LogEntry:
    signed = seal_header(REQ, ALICE.signing_key)
    return LogEntry(type=EntryType.SUBMITTED, time=7, envelope_id=REQ.id, envelope_hash=signed.envelope_hash,
                    device_id=ALICE.device_id, signature=signed.signature)


def _read(key: keys.DeviceKeys = BOB, at: int = 1_767_262_000) -> LogEntry:
    h = seal_header(REQ, ALICE.signing_key).envelope_hash
    return LogEntry(type=EntryType.READ, time=8, envelope_id=REQ.id, envelope_hash=h,
                    device_id=key.device_id, act_time=at, signature=sign_read(key.signing_key, h, at))


def _answered(at: int = 1_767_263_000) -> LogEntry:
    h = seal_header(REQ, ALICE.signing_key).envelope_hash
    a = seal_header(ANS, BOB.signing_key).envelope_hash
    return LogEntry(type=EntryType.ANSWERED, time=9, envelope_id=REQ.id, envelope_hash=h, answer_hash=a,
                    device_id=BOB.device_id, act_time=at, signature=sign_answered(BOB.signing_key, h, a, at))


ACTS = {EntryType.SUBMITTED: (_submitted, ALICE), EntryType.READ: (_read, BOB), EntryType.ANSWERED: (_answered, BOB)}


def test_submitted_carries_the_envelope_header_signature() -> None:
    entry = _submitted()
    signed = seal_header(REQ, ALICE.signing_key)
    # SHA-256(header) under pli/envelope/v1: the very signature the envelope prefix carries.
    assert entry.envelope_hash == hashlib.sha256(signed.raw).digest()
    ALICE.signing_key.verify_key.verify(keys.CTX_ENVELOPE + b"\x00" + entry.envelope_hash, entry.signature)
    entry.verify_act(ALICE.signing_key.verify_key)
    signed.verify(ALICE.signing_key.verify_key)
    # A leaf rebuilt from its bytes verifies the same way.
    LogEntry.from_bytes(entry.to_bytes()).verify_act(ALICE.signing_key.verify_key)


@pytest.mark.parametrize("kind", list(ACTS), ids=lambda t: t.name)
def test_act_verifies_with_its_device_key_only(kind: EntryType) -> None:
    make, signer = ACTS[kind]
    entry = make()
    entry.verify_act(signer.signing_key.verify_key)
    for other in (ALICE, BOB, CAROL):
        if other is signer:
            continue
        with pytest.raises(SignatureError):
            entry.verify_act(other.signing_key.verify_key)
    # The right device id, but another device's signature.
    forged = {EntryType.SUBMITTED: lambda: seal_header(REQ, CAROL.signing_key).signature,
              EntryType.READ: lambda: sign_read(CAROL.signing_key, entry.envelope_hash, entry.act_time),
              EntryType.ANSWERED: lambda: sign_answered(CAROL.signing_key, entry.envelope_hash, entry.answer_hash,
                                                        entry.act_time)}[kind]()
    with pytest.raises(SignatureError):
        replace(entry, signature=forged).verify_act(signer.signing_key.verify_key)


@pytest.mark.parametrize("kind", list(ACTS), ids=lambda t: t.name)
def test_a_flipped_bit_in_any_signed_field_is_refused(kind: EntryType) -> None:
    make, signer = ACTS[kind]
    leaf = make().to_bytes()
    key = signer.signing_key.verify_key
    LogEntry.from_bytes(leaf).verify_act(key)
    flipped = 0
    for name in SIGNED[kind]:
        start, end = LAYOUT[kind][name]
        for offset in range(HEAD + start, HEAD + end):
            changed = LogEntry.from_bytes(_flip(leaf, offset, offset % 8))
            with pytest.raises(SignatureError):
                changed.verify_act(key)
            flipped += 1
    assert flipped == sum(LAYOUT[kind][n][1] - LAYOUT[kind][n][0] for n in SIGNED[kind])


@pytest.mark.parametrize("kind", list(ACTS), ids=lambda t: t.name)
def test_relay_time_and_envelope_id_are_outside_the_signature(kind: EntryType) -> None:
    # Documented behaviour: the relay's sequencing time is its own attestation, and the
    # envelope id is committed to through the envelope hash (SHA-256 of the header, id
    # included) — an auditor checks the id against the header, not against the signature.
    make, signer = ACTS[kind]
    entry = make()
    replace(entry, time=entry.time + 1).verify_act(signer.signing_key.verify_key)
    replace(entry, envelope_id=bytes(16)).verify_act(signer.signing_key.verify_key)


def test_wrong_context_is_refused() -> None:
    read, answered, submitted = _read(), _answered(), _submitted()
    bob = BOB.signing_key
    stmt_read = read_statement(read.envelope_hash, read.device_id, read.act_time)
    stmt_answered = answered_statement(answered.envelope_hash, answered.answer_hash, answered.device_id,
                                       answered.act_time)
    for ctx in (CTX_ANSWERED, keys.CTX_ENVELOPE, keys.CTX_BUNDLE, b"pli/read/v2", b""):
        with pytest.raises(SignatureError):
            replace(read, signature=keys.sign(bob, ctx, stmt_read)).verify_act(bob.verify_key)
    for ctx in (CTX_READ, keys.CTX_ENVELOPE, b"pli/answered/v2"):
        with pytest.raises(SignatureError):
            replace(answered, signature=keys.sign(bob, ctx, stmt_answered)).verify_act(bob.verify_key)
    for ctx in (CTX_READ, CTX_ANSWERED, keys.CTX_DEVICE_CERT):
        sig = keys.sign(ALICE.signing_key, ctx, submitted.envelope_hash)
        with pytest.raises(SignatureError):
            replace(submitted, signature=sig).verify_act(ALICE.signing_key.verify_key)
    # Without any context (raw Ed25519 over the statement) is refused too.
    with pytest.raises(SignatureError):
        replace(read, signature=bob.sign(stmt_read).signature).verify_act(bob.verify_key)
    # The right contexts do verify.
    replace(read, signature=keys.sign(bob, CTX_READ, stmt_read)).verify_act(bob.verify_key)
    replace(answered, signature=keys.sign(bob, CTX_ANSWERED, stmt_answered)).verify_act(bob.verify_key)


def test_a_read_signature_is_not_an_answered_one() -> None:
    # Same device, same envelope: a READ signature moved into an ANSWERED leaf is refused.
    read, answered = _read(), _answered(at=_read().act_time)
    with pytest.raises(SignatureError):
        replace(answered, signature=read.signature).verify_act(BOB.signing_key.verify_key)
    with pytest.raises(SignatureError):
        replace(read, signature=answered.signature).verify_act(BOB.signing_key.verify_key)


@pytest.mark.parametrize("kind", [EntryType.DEVICE_ENROLLED, EntryType.DEVICE_REVOKED, EntryType.DELIVERED])
def test_relay_attestations_carry_no_device_signature(kind: EntryType) -> None:
    entry = replace(_sample(kind), device_id=BOB.device_id)
    with pytest.raises(SignatureError, match="no device signature"):
        entry.verify_act(BOB.signing_key.verify_key)
