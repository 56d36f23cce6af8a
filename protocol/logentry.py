"""Log entries: the fixed-layout binary records that are the relay's Merkle log leaves.

Every fact that matters medico-legally is a leaf: a device enrolled or revoked, an
envelope submitted, delivered to a device, read, answered (SPEC.md §11). A leaf holds
ids, hashes and times only — never medical content. Where a leaf records an act of a
practitioner (submitting, reading, answering), it carries that device's Ed25519
signature, so the relay cannot forge it; the relay's own attestations (enrolment,
delivery) are proved by its signed checkpoints over the log.

Layout: ``version (1 byte) || type (1 byte) || time (8 bytes, big-endian Unix seconds,
the relay's clock when it sequenced the entry) || body``, where each type's body has
a fixed size. A reader refuses any other length.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from enum import IntEnum

import nacl.signing

from protocol.errors import DecodeError, SignatureError, VersionError
from protocol.keys import device_id_of, sign, verify

__all__ = [
    "CTX_ANSWERED",
    "CTX_READ",
    "EntryType",
    "LogEntry",
    "answered_statement",
    "read_statement",
]

VERSION = 1
CTX_READ = b"pli/read/v1"
CTX_ANSWERED = b"pli/answered/v1"
_HEAD = struct.Struct(">BBQ")
_RPPS_LEN = 11


class EntryType(IntEnum):
    DEVICE_ENROLLED = 1  #: device_id 16 || rpps 11 || SHA-256(device record) 32
    DEVICE_REVOKED = 2  #: device_id 16 || rpps 11
    SUBMITTED = 3  #: envelope_id 16 || envelope_hash 32 || sender device 16 || sender sig 64
    DELIVERED = 4  #: envelope_id 16 || envelope_hash 32 || recipient device 16
    READ = 5  #: envelope_id 16 || envelope_hash 32 || reader device 16 || read_at 8 || sig 64
    ANSWERED = 6  #: envelope_id 16 || envelope_hash 32 || answer hash 32 || device 16 || answered_at 8 || sig 64


_BODY_SIZE = {
    EntryType.DEVICE_ENROLLED: 16 + _RPPS_LEN + 32,
    EntryType.DEVICE_REVOKED: 16 + _RPPS_LEN,
    EntryType.SUBMITTED: 16 + 32 + 16 + 64,
    EntryType.DELIVERED: 16 + 32 + 16,
    EntryType.READ: 16 + 32 + 16 + 8 + 64,
    EntryType.ANSWERED: 16 + 32 + 32 + 16 + 8 + 64,
}
MAX_ENTRY = _HEAD.size + max(_BODY_SIZE.values())


def read_statement(envelope_hash: bytes, device_id: bytes, read_at: int) -> bytes:
    """What a recipient device signs (context ``pli/read/v1``) when it has opened an envelope."""
    return envelope_hash + device_id + struct.pack(">Q", read_at)


def answered_statement(envelope_hash: bytes, answer_hash: bytes, device_id: bytes, answered_at: int) -> bytes:
    """What a device signs (context ``pli/answered/v1``) when envelope ``answer_hash`` answers another."""
    return envelope_hash + answer_hash + device_id + struct.pack(">Q", answered_at)


@dataclass(frozen=True, kw_only=True)
class LogEntry:
    """One leaf. Fields that a type does not use are empty bytes / zero."""

    type: EntryType
    time: int
    device_id: bytes = b""
    rpps: str = ""
    record_hash: bytes = b""
    envelope_id: bytes = b""
    envelope_hash: bytes = b""
    answer_hash: bytes = b""
    act_time: int = 0
    signature: bytes = b""

    # -- encoding ------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        t = self.type
        for name, value in (("time", self.time), ("act_time", self.act_time)):
            if not 0 <= value < 1 << 64:
                raise DecodeError(f"log entry: {name} out of range")
        head = _HEAD.pack(VERSION, t, self.time)
        if t == EntryType.DEVICE_ENROLLED:
            body = self.device_id + _rpps(self.rpps) + self.record_hash
        elif t == EntryType.DEVICE_REVOKED:
            body = self.device_id + _rpps(self.rpps)
        elif t == EntryType.SUBMITTED:
            body = self.envelope_id + self.envelope_hash + self.device_id + self.signature
        elif t == EntryType.DELIVERED:
            body = self.envelope_id + self.envelope_hash + self.device_id
        elif t == EntryType.READ:
            body = (self.envelope_id + self.envelope_hash + self.device_id
                    + struct.pack(">Q", self.act_time) + self.signature)
        else:
            body = (self.envelope_id + self.envelope_hash + self.answer_hash + self.device_id
                    + struct.pack(">Q", self.act_time) + self.signature)
        if len(body) != _BODY_SIZE[t]:
            raise DecodeError(f"log entry {t.name}: a field has the wrong length")
        return head + body

    @property
    def leaf(self) -> bytes:
        """The leaf bytes (what the log stores and hashes)."""
        return self.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> LogEntry:
        """Parse one leaf.

        Raises:
            VersionError: an entry version other than 1.
            DecodeError: an unknown type or a length that is not the type's.
        """
        if len(data) < _HEAD.size or len(data) > MAX_ENTRY:
            raise DecodeError("log entry: wrong length")
        version, raw_type, time = _HEAD.unpack_from(data)
        if version != VERSION:
            raise VersionError(f"log entry version {version} is not supported")
        try:
            t = EntryType(raw_type)
        except ValueError as e:
            raise DecodeError(f"log entry type {raw_type} is unknown") from e
        b = data[_HEAD.size :]
        if len(b) != _BODY_SIZE[t]:
            raise DecodeError(f"log entry {t.name}: body of {len(b)} bytes, expected {_BODY_SIZE[t]}")
        if t == EntryType.DEVICE_ENROLLED:
            return cls(type=t, time=time, device_id=b[:16], rpps=_unrpps(b[16:27]), record_hash=b[27:59])
        if t == EntryType.DEVICE_REVOKED:
            return cls(type=t, time=time, device_id=b[:16], rpps=_unrpps(b[16:27]))
        if t == EntryType.SUBMITTED:
            return cls(type=t, time=time, envelope_id=b[:16], envelope_hash=b[16:48],
                       device_id=b[48:64], signature=b[64:128])
        if t == EntryType.DELIVERED:
            return cls(type=t, time=time, envelope_id=b[:16], envelope_hash=b[16:48], device_id=b[48:64])
        if t == EntryType.READ:
            (act,) = struct.unpack_from(">Q", b, 64)
            return cls(type=t, time=time, envelope_id=b[:16], envelope_hash=b[16:48],
                       device_id=b[48:64], act_time=act, signature=b[72:136])
        (act,) = struct.unpack_from(">Q", b, 96)
        return cls(type=t, time=time, envelope_id=b[:16], envelope_hash=b[16:48], answer_hash=b[48:80],
                   device_id=b[80:96], act_time=act, signature=b[104:168])

    @property
    def leaf_hash(self) -> bytes:
        """RFC 9162 leaf hash: SHA-256(0x00 || leaf)."""
        return hashlib.sha256(b"\x00" + self.to_bytes()).digest()

    # -- the practitioner's signature ------------------------------------------------------

    def verify_act(self, key: nacl.signing.VerifyKey) -> None:
        """Check the device signature a SUBMITTED, READ or ANSWERED entry carries.

        Raises:
            SignatureError: the key is not the entry's device, or the signature is not its.
        """
        if device_id_of(bytes(key)) != self.device_id:
            raise SignatureError("this key is not the device the entry names")
        if self.type == EntryType.SUBMITTED:
            from protocol.keys import CTX_ENVELOPE  # noqa: PLC0415 - keep the context list in keys

            verify(key, CTX_ENVELOPE, self.envelope_hash, self.signature)
        elif self.type == EntryType.READ:
            verify(key, CTX_READ, read_statement(self.envelope_hash, self.device_id, self.act_time), self.signature)
        elif self.type == EntryType.ANSWERED:
            verify(key, CTX_ANSWERED, answered_statement(
                self.envelope_hash, self.answer_hash, self.device_id, self.act_time), self.signature)
        else:
            raise SignatureError(f"a {self.type.name} entry carries no device signature")


def sign_read(key: nacl.signing.SigningKey, envelope_hash: bytes, read_at: int) -> bytes:
    return sign(key, CTX_READ, read_statement(envelope_hash, device_id_of(bytes(key.verify_key)), read_at))


def sign_answered(key: nacl.signing.SigningKey, envelope_hash: bytes, answer_hash: bytes, answered_at: int) -> bytes:
    device = device_id_of(bytes(key.verify_key))
    return sign(key, CTX_ANSWERED, answered_statement(envelope_hash, answer_hash, device, answered_at))


def _rpps(rpps: str) -> bytes:
    raw = rpps.encode("ascii", "strict") if rpps.isascii() else b""
    if len(raw) != _RPPS_LEN or not raw.isdigit():
        raise DecodeError("log entry: an RPPS number is 11 ASCII digits")
    return raw


def _unrpps(raw: bytes) -> str:
    if not raw.isdigit():
        raise DecodeError("log entry: an RPPS number is 11 ASCII digits")
    return raw.decode("ascii")
