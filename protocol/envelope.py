"""Envelope v1: what the relay sees of a case (SPEC.md §5).

An envelope is a routing header signed by the sending device, followed by an age file.
The header holds only what the relay needs to route and keep the envelope: its id,
the sending device, the recipient devices, times, the ciphertext's size and SHA-256.
Everything medical is inside the age ciphertext.

Byte layout::

    "pli-envelope/v1\\n"     16 bytes, ASCII
    header length          2 bytes, big-endian, 1..MAX_HEADER
    header                 canonical msgpack map (below)
    signature              64 bytes: Ed25519 by the sender over
                           "pli/envelope/v1" || 0x00 || SHA-256(header)
    ciphertext             exactly header.size bytes: an age v1 file

The signature is checked over the exact header bytes before they are decoded
(sign bytes, not objects), with the key of the device the relay authenticated.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import nacl.signing

from protocol import codec
from protocol.errors import DecodeError, LimitError, SignatureError
from protocol.keys import CTX_ENVELOPE, DEVICE_ID_SIZE, device_id_of, sign, verify

__all__ = [
    "MAGIC",
    "MAX_HEADER",
    "EnvelopeHeader",
    "SignedHeader",
    "seal_header",
    "split_prefix",
]

MAGIC = b"pli-envelope/v1\n"
MAX_HEADER = 4096
MAX_RECIPIENTS = 64
ID_SIZE = 16
_LEN = struct.Struct(">H")
PREFIX_OVERHEAD = len(MAGIC) + _LEN.size + 64
MAX_PREFIX = PREFIX_OVERHEAD + MAX_HEADER


@dataclass(frozen=True, kw_only=True)
class EnvelopeHeader:
    """The routing header. Construction checks every invariant, so an invalid one cannot exist."""

    id: bytes
    sender: bytes
    to: tuple[bytes, ...]
    created: int
    expires: int
    size: int
    sha256: bytes

    def __post_init__(self) -> None:
        if len(self.id) != ID_SIZE:
            raise DecodeError("envelope id must be 16 bytes")
        if len(self.sender) != DEVICE_ID_SIZE:
            raise DecodeError("sender device id must be 16 bytes")
        if not 1 <= len(self.to) <= MAX_RECIPIENTS:
            raise DecodeError(f"an envelope has 1 to {MAX_RECIPIENTS} recipient devices")
        if any(len(t) != DEVICE_ID_SIZE for t in self.to):
            raise DecodeError("recipient device ids must be 16 bytes")
        if len(set(self.to)) != len(self.to):
            raise DecodeError("a recipient device is listed twice")
        if not 0 <= self.created < self.expires:
            raise DecodeError("an envelope must expire after it is created")
        if self.size < 0:
            raise DecodeError("negative size")
        if len(self.sha256) != 32:
            raise DecodeError("sha256 must be 32 bytes")

    def to_bytes(self) -> bytes:
        return codec.encode(
            {
                "v": 1,
                "id": self.id,
                "from": self.sender,
                "to": list(self.to),
                "created": self.created,
                "expires": self.expires,
                "size": self.size,
                "sha256": self.sha256,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> EnvelopeHeader:
        """Decode header bytes. Call only on bytes whose signature was verified.

        Raises:
            DecodeError, LimitError, VersionError: not a valid v1 header.
        """
        if len(data) > MAX_HEADER:
            raise LimitError(f"envelope header over {MAX_HEADER} bytes")
        r = codec.MapReader(codec.decode(data, limits=_HEADER_LIMITS), "envelope header")
        codec.expect_version(r, (1,))
        to = r.list_("to", max_items=MAX_RECIPIENTS)
        if not all(isinstance(t, bytes) for t in to):
            raise DecodeError("envelope header: recipients must be byte strings")
        h = cls(
            id=r.bytes_("id", size=ID_SIZE),
            sender=r.bytes_("from", size=DEVICE_ID_SIZE),
            to=tuple(to),
            created=r.int_("created"),
            expires=r.int_("expires"),
            size=r.int_("size"),
            sha256=r.bytes_("sha256", size=32),
        )
        r.done()
        return h


_HEADER_LIMITS = codec.Limits(
    max_size=MAX_HEADER, max_str=64, max_bin=64, max_array=MAX_RECIPIENTS, max_map=16
)


@dataclass(frozen=True)
class SignedHeader:
    """Header bytes and their signature, as split from an envelope, not yet verified."""

    raw: bytes
    signature: bytes

    @property
    def prefix(self) -> bytes:
        return MAGIC + _LEN.pack(len(self.raw)) + self.raw + self.signature

    @property
    def envelope_hash(self) -> bytes:
        """SHA-256 of the header bytes: names the envelope in receipts (it commits to the ciphertext)."""
        return hashlib.sha256(self.raw).digest()

    def verify(self, sender_key: nacl.signing.VerifyKey) -> EnvelopeHeader:
        """Verify with the sender's key, then decode; the decoded sender must be that key's device.

        Raises:
            SignatureError: not signed by ``sender_key``, or names another sender.
            DecodeError: the header does not decode.
        """
        verify(sender_key, CTX_ENVELOPE, self.envelope_hash, self.signature)
        header = EnvelopeHeader.from_bytes(self.raw)
        if header.sender != device_id_of(bytes(sender_key)):
            raise SignatureError("envelope header names a sender other than its signer")
        return header


def seal_header(header: EnvelopeHeader, key: nacl.signing.SigningKey) -> SignedHeader:
    """Sign a header; ``SignedHeader.prefix`` is what precedes the ciphertext on the wire."""
    raw = header.to_bytes()
    # The signature is over SHA-256(header), not the header itself, so that the log's
    # SUBMITTED leaf (SPEC.md §11) can carry it at a fixed size and still be verified.
    return SignedHeader(raw=raw, signature=sign(key, CTX_ENVELOPE, hashlib.sha256(raw).digest()))


def split_prefix(data: bytes | bytearray | memoryview) -> tuple[SignedHeader, int] | None:
    """Split the signed header off the start of an envelope.

    Sans-I/O: feed it what has arrived so far. Returns ``None`` while more bytes are
    needed, else the (unverified) signed header and how many bytes it took.

    Raises:
        DecodeError: the bytes are not an envelope.
        LimitError: the declared header length is over ``MAX_HEADER`` (checked before
            waiting for, or allocating, that many bytes).
    """
    head = bytes(data[: len(MAGIC) + _LEN.size])
    if head[: len(MAGIC)] != MAGIC[: len(head)]:
        raise DecodeError("not a Pli v1 envelope (bad magic)")
    if len(head) < len(MAGIC) + _LEN.size:
        return None
    (n,) = _LEN.unpack_from(head, len(MAGIC))
    if n == 0:
        raise DecodeError("empty envelope header")
    if n > MAX_HEADER:
        raise LimitError(f"envelope header of {n} bytes is over the {MAX_HEADER}-byte limit")
    end = len(MAGIC) + _LEN.size + n + 64
    if len(data) < end:
        return None
    start = len(MAGIC) + _LEN.size
    raw = bytes(data[start : start + n])
    sig = bytes(data[start + n : end])
    return SignedHeader(raw=raw, signature=sig), end
