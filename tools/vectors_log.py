"""Generate protocol/vectors/logentry.json: the relay's log leaves, byte for byte.

Run from the repository root: ``python -m tools.vectors_log``. Every key, id, hash and
time is fixed here (the devices are those of keys.json, from tools/vectors_pli.py, and
Ed25519 is deterministic), so the output is reproducible. tests/test_logentry.py builds
each leaf from its fields and compares the bytes, parses each committed leaf back to
its fields, checks each device signature, and regenerates the file with :func:`render`
to compare it with the committed one.

Bytes are lowercase hex everywhere. A leaf is ``version (1) || type (1) || u64be(time)
|| body`` (protocol/logentry.py, SPEC.md §11); its RFC 9162 leaf hash is
``SHA-256(0x00 || leaf)``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from protocol import keys, logentry
from protocol.envelope import EnvelopeHeader, SignedHeader, seal_header
from protocol.logentry import EntryType, LogEntry
from tools.vectors_pli import ALICE, BOB, CAROL, Device

OUTPUT = Path(__file__).resolve().parent.parent / "protocol" / "vectors" / "logentry.json"

DEVICES = (ALICE, BOB, CAROL)
T0 = 1767261600  # 2026-01-01T10:00:00Z: the relay's clock when it sequences the first leaf

# The request alice sends bob, and bob's answer: fixed headers, so fixed hashes and signatures.
REQUEST = EnvelopeHeader(
    id=bytes.fromhex("0a0b0c0d0e0f10111213141516171819"),
    sender=ALICE.keys.device_id,
    to=(BOB.keys.device_id,),
    created=T0,
    expires=T0 + 30 * 86400,
    size=4096,
    sha256=hashlib.sha256(b"pli vectors: request ciphertext").digest(),
)
ANSWER = EnvelopeHeader(
    id=bytes.fromhex("a0a1a2a3a4a5a6a7a8a9aaabacadaeaf"),
    sender=BOB.keys.device_id,
    to=(ALICE.keys.device_id,),
    created=T0 + 3600,
    expires=T0 + 3600 + 30 * 86400,
    size=1024,
    sha256=hashlib.sha256(b"pli vectors: answer ciphertext").digest(),
)
READ_AT = T0 + 1800
ANSWERED_AT = T0 + 3600


def sealed(header: EnvelopeHeader) -> SignedHeader:
    signer = {d.keys.device_id: d for d in DEVICES}[header.sender]
    return seal_header(header, signer.keys.signing_key)


def record_hash(dev: Device) -> bytes:
    """SHA-256 of the device record as the relay receives it at enrolment (keys.json)."""
    return hashlib.sha256(dev.keys.public().to_bytes()).digest()


@dataclass(frozen=True)
class Case:
    name: str
    comment: str
    entry: LogEntry
    signer: Device | None  # whose device signature the entry carries, if any


def cases() -> tuple[Case, ...]:
    req, ans = sealed(REQUEST), sealed(ANSWER)
    alice, bob = ALICE.keys, BOB.keys
    return (
        Case("device-enrolled", "the relay attests that alice's device record was enrolled for her RPPS",
             LogEntry(type=EntryType.DEVICE_ENROLLED, time=T0 - 86400, device_id=alice.device_id,
                      rpps=ALICE.rpps, record_hash=record_hash(ALICE)), None),
        Case("device-revoked", "carol's device revoked by the operator",
             LogEntry(type=EntryType.DEVICE_REVOKED, time=T0 + 7200, device_id=CAROL.keys.device_id,
                      rpps=CAROL.rpps), None),
        Case("submitted", "alice's envelope stored; the signature is the envelope header's own "
             "(context pli/envelope/v1 over SHA-256(header))",
             LogEntry(type=EntryType.SUBMITTED, time=T0, envelope_id=REQUEST.id, envelope_hash=req.envelope_hash,
                      device_id=alice.device_id, signature=req.signature), ALICE),
        Case("delivered", "bob's device acknowledged alice's envelope",
             LogEntry(type=EntryType.DELIVERED, time=T0 + 60, envelope_id=REQUEST.id,
                      envelope_hash=req.envelope_hash, device_id=bob.device_id), None),
        Case("read", "bob's device says it opened alice's envelope at read_at (context pli/read/v1)",
             LogEntry(type=EntryType.READ, time=T0 + 1801, envelope_id=REQUEST.id, envelope_hash=req.envelope_hash,
                      device_id=bob.device_id, act_time=READ_AT,
                      signature=logentry.sign_read(bob.signing_key, req.envelope_hash, READ_AT)), BOB),
        Case("answered", "bob's device says its envelope (answer_hash) answers alice's (context pli/answered/v1)",
             LogEntry(type=EntryType.ANSWERED, time=T0 + 3601, envelope_id=REQUEST.id,
                      envelope_hash=req.envelope_hash, answer_hash=ans.envelope_hash, device_id=bob.device_id,
                      act_time=ANSWERED_AT,
                      signature=logentry.sign_answered(bob.signing_key, req.envelope_hash, ans.envelope_hash,
                                                       ANSWERED_AT)), BOB),
    )


def signed_message(entry: LogEntry) -> bytes | None:
    """The exact bytes the device's Ed25519 signature covers: context || 0x00 || statement."""
    if entry.type == EntryType.SUBMITTED:
        return keys.CTX_ENVELOPE + b"\x00" + entry.envelope_hash
    if entry.type == EntryType.READ:
        return logentry.CTX_READ + b"\x00" + logentry.read_statement(entry.envelope_hash, entry.device_id,
                                                                     entry.act_time)
    if entry.type == EntryType.ANSWERED:
        return logentry.CTX_ANSWERED + b"\x00" + logentry.answered_statement(
            entry.envelope_hash, entry.answer_hash, entry.device_id, entry.act_time)
    return None


# Which fields each type's body holds, in order (the rest of a LogEntry is empty / zero).
FIELDS: dict[EntryType, tuple[str, ...]] = {
    EntryType.DEVICE_ENROLLED: ("device_id", "rpps", "record_hash"),
    EntryType.DEVICE_REVOKED: ("device_id", "rpps"),
    EntryType.SUBMITTED: ("envelope_id", "envelope_hash", "device_id", "signature"),
    EntryType.DELIVERED: ("envelope_id", "envelope_hash", "device_id"),
    EntryType.READ: ("envelope_id", "envelope_hash", "device_id", "act_time", "signature"),
    EntryType.ANSWERED: ("envelope_id", "envelope_hash", "answer_hash", "device_id", "act_time", "signature"),
}


def fields_json(entry: LogEntry) -> dict[str, Any]:
    out: dict[str, Any] = {"time": entry.time}
    for name in FIELDS[entry.type]:
        value = getattr(entry, name)
        out[name + "_hex" if isinstance(value, bytes) else name] = value.hex() if isinstance(value, bytes) else value
    return out


def entry_from_json(type_name: str, fields: dict[str, Any]) -> LogEntry:
    """The inverse of :func:`fields_json` (for the tests, and other implementations' readers)."""
    values: dict[str, Any] = {}
    for k, v in fields.items():
        if k.endswith("_hex"):
            values[k[: -len("_hex")]] = bytes.fromhex(v)
        else:
            values[k] = v
    return LogEntry(type=EntryType[type_name], **values)


def _valid(case: Case) -> dict[str, Any]:
    e = case.entry
    leaf = e.to_bytes()
    msg = signed_message(e)
    return {
        "name": case.name,
        "comment": case.comment,
        "type": e.type.name,
        "type_code": int(e.type),
        "fields": fields_json(e),
        "signer": case.signer.name if case.signer else None,
        "signed_message_hex": msg.hex() if msg is not None else None,
        "leaf_hex": leaf.hex(),
        "leaf_size": len(leaf),
        "leaf_hash_hex": hashlib.sha256(b"\x00" + leaf).hexdigest(),
    }


def _leaf(name: str) -> bytes:
    return next(c.entry for c in cases() if c.name == name).to_bytes()


def _set(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


def _flip(data: bytes, offset: int) -> bytes:
    return _set(data, offset, bytes([data[offset] ^ 0x01]))


HEAD = 10  # version, type, u64be time


def invalid_leaves() -> list[tuple[str, bytes, str]]:
    """Byte strings a reader must refuse, with the error code it must refuse them with."""
    enrolled, read = _leaf("device-enrolled"), _leaf("read")
    submitted, delivered = _leaf("submitted"), _leaf("delivered")
    rpps = HEAD + 16
    return [
        ("empty", b"", "malformed"),
        ("header only", enrolled[:HEAD], "malformed"),
        ("shorter than the header", enrolled[: HEAD - 1], "malformed"),
        ("enrolled, one byte short", enrolled[:-1], "malformed"),
        ("enrolled, one byte too many", enrolled + b"\x00", "malformed"),
        ("read, one byte short", read[:-1], "malformed"),
        ("longer than the longest type", _leaf("answered") + b"\x00", "malformed"),
        ("submitted body under the delivered type", _set(submitted, 1, bytes([EntryType.DELIVERED])), "malformed"),
        ("delivered body under the submitted type", _set(delivered, 1, bytes([EntryType.SUBMITTED])), "malformed"),
        ("type 0", _set(delivered, 1, b"\x00"), "malformed"),
        ("type 7", _set(delivered, 1, b"\x07"), "malformed"),
        ("type 255", _set(delivered, 1, b"\xff"), "malformed"),
        ("version 2", _set(enrolled, 0, b"\x02"), "unsupported_version"),
        ("version 0", _set(read, 0, b"\x00"), "unsupported_version"),
        ("RPPS with a letter", _set(enrolled, rpps + 10, b"A"), "malformed"),
        ("RPPS with a space", _set(enrolled, rpps, b" "), "malformed"),
        ("RPPS with a NUL byte", _set(_leaf("device-revoked"), rpps + 5, b"\x00"), "malformed"),
        ("RPPS with a non-ASCII byte", _set(enrolled, rpps + 3, b"\xd9"), "malformed"),
    ]


def bad_signatures() -> list[tuple[str, bytes, Device, str]]:
    """Leaves that parse, whose device signature must not verify with the given key."""
    submitted, read, answered = _leaf("submitted"), _leaf("read"), _leaf("answered")
    read_entry = LogEntry.from_bytes(read)
    other_context = replace(read_entry, signature=keys.sign(
        BOB.keys.signing_key, logentry.CTX_ANSWERED,
        logentry.read_statement(read_entry.envelope_hash, read_entry.device_id, read_entry.act_time))).to_bytes()
    carol_signs = replace(read_entry, signature=logentry.sign_read(
        CAROL.keys.signing_key, read_entry.envelope_hash, read_entry.act_time)).to_bytes()
    # offsets in the body (after the 10-byte head)
    return [
        ("submitted, checked with another device's key", submitted, BOB, "bad_signature"),
        ("submitted, envelope hash changed", _flip(submitted, HEAD + 16), ALICE, "bad_signature"),
        ("submitted, signature changed", _flip(submitted, HEAD + 64 + 63), ALICE, "bad_signature"),
        ("read, checked with another device's key", read, ALICE, "bad_signature"),
        ("read, read_at changed", _flip(read, HEAD + 64 + 7), BOB, "bad_signature"),
        ("read, envelope hash changed", _flip(read, HEAD + 16 + 31), BOB, "bad_signature"),
        ("read, signature changed", _flip(read, HEAD + 72), BOB, "bad_signature"),
        ("read, signed with the answered context", other_context, BOB, "bad_signature"),
        ("read, names bob's device but signed by carol's", carol_signs, BOB, "bad_signature"),
        ("answered, answer hash changed", _flip(answered, HEAD + 48), BOB, "bad_signature"),
        ("answered, answered_at changed", _flip(answered, HEAD + 96), BOB, "bad_signature"),
        ("answered, device id changed", _flip(answered, HEAD + 80), BOB, "bad_signature"),
        ("enrolled: no device signature", _leaf("device-enrolled"), ALICE, "bad_signature"),
        ("delivered: no device signature", _leaf("delivered"), BOB, "bad_signature"),
    ]


def build() -> dict[str, Any]:
    return {
        "description": (
            "Log leaves of the relay's transparency log (SPEC.md section 11): version 0x01 || "
            "type (1 byte) || u64be time (the relay's clock when it sequenced the entry) || a "
            "fixed-size body per type. 'devices' are those of keys.json. 'envelopes' are the "
            "signed headers the leaves name (envelope_hash = SHA-256(header)). 'valid': each "
            "type's fields, exact leaf bytes and RFC 9162 leaf hash SHA-256(0x00 || leaf); for "
            "submitted, read and answered, the signing device and the exact bytes its Ed25519 "
            "signature covers (context || 0x00 || statement). 'invalid': byte strings a reader "
            "must refuse with 'error'. 'bad_signatures': leaves that parse but whose device "
            "signature must not verify with the key of 'key_of'."
        ),
        "devices": [
            {
                "name": d.name,
                "sign_seed_hex": d.sign_seed.hex(),
                "sign_key_hex": bytes(d.keys.signing_key.verify_key).hex(),
                "device_id_hex": d.keys.device_id.hex(),
                "rpps": d.rpps,
                "record_sha256_hex": record_hash(d).hex(),
            }
            for d in DEVICES
        ],
        "envelopes": [
            {
                "name": name,
                "id_hex": h.id.hex(),
                "header_hex": s.raw.hex(),
                "signature_hex": s.signature.hex(),
                "envelope_hash_hex": s.envelope_hash.hex(),
            }
            for name, h in (("request", REQUEST), ("answer", ANSWER))
            for s in (sealed(h),)
        ],
        "valid": [_valid(c) for c in cases()],
        "invalid": [{"name": n, "leaf_hex": b.hex(), "error": err} for n, b, err in invalid_leaves()],
        "bad_signatures": [
            {"name": n, "leaf_hex": b.hex(), "key_of": dev.name, "error": err}
            for n, b, dev, err in bad_signatures()
        ],
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    OUTPUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()

