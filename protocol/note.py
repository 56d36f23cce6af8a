"""Signed notes, checkpoints and tlog proofs: the text formats of the transparency log.

The relay signs its log's tree heads in the C2SP formats every transparency tool
reads, so an auditor can check them with Go's ``golang.org/x/mod/sumdb/note``, a C2SP
witness or ``pli audit verify`` alike:

- **signed note** (c2sp.org/signed-note): a UTF-8 text ending in a newline, a blank
  line, then one line per signature, ``"— " name " " base64(key id || signature)``.
  Ed25519 only (signature type 0x01); the key id is
  ``SHA-256(name || 0x0A || 0x01 || public key)[:4]`` and the verifier key is written
  ``name+<key id, 8 hex digits>+base64(0x01 || public key)``;
- **checkpoint** (c2sp.org/tlog-checkpoint): a note whose text is the origin (the
  log's name), the tree size in decimal and the base64 root hash, one per line,
  then optional extension lines;
- **tlog proof** (c2sp.org/tlog-proof): ``c2sp.org/tlog-proof@v1``, an optional
  ``extra`` line, ``index N``, the inclusion proof hashes one per line, a blank
  line, and the signed checkpoint verbatim: a receipt any verifier checks offline.

Verify first, parse second (STYLE rule 7): :func:`open_note` checks signatures over
the exact text bytes before anything reads that text, and the text is never
re-encoded. Parsing is strict: exact line structure, canonical base64, decimals
without leading zeros, every size bounded before work, UTF-8 without control
characters but the newline. Pure: no I/O, no clock.

Errors: :class:`~protocol.errors.DecodeError` (and its
:class:`~protocol.errors.LimitError`) for text that does not parse,
:class:`~protocol.errors.SignatureError` when no trusted key vouches for it (or a
trusted key's signature is bad), :class:`~protocol.merkle.ProofError` when the
inclusion proof fails.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import nacl.exceptions
import nacl.signing

from protocol.errors import DecodeError, LimitError, SignatureError
from protocol.merkle import EMPTY_ROOT, HASH_SIZE, MAX_PROOF_HASHES, MAX_SIZE, verify_inclusion

__all__ = [
    "ALG_ED25519",
    "MAX_EXTRA_SIZE",
    "MAX_NOTE_SIZE",
    "MAX_SIGNATURES",
    "MAX_TLOG_PROOF_SIZE",
    "TLOG_PROOF_HEADER",
    "Checkpoint",
    "NoteSignature",
    "Signer",
    "TlogProof",
    "Verifier",
    "key_id",
    "open_checkpoint",
    "open_note",
    "sign_checkpoint",
    "sign_note",
]

#: Signature type byte of Ed25519 in c2sp.org/signed-note.
ALG_ED25519: Final = 0x01
#: A whole signed note, in UTF-8 bytes. A checkpoint with a hundred cosignatures
#: is about 10 KiB.
MAX_NOTE_SIZE: Final = 16 * 1024
#: Signature lines in one note (the spec asks verifiers to accept at least 16; Go's
#: ``note.Open`` refuses more than 100).
MAX_SIGNATURES: Final = 100
#: The opaque ``extra`` data of a tlog proof, decoded.
MAX_EXTRA_SIZE: Final = 4096
#: A whole tlog proof: header, extra, index, 64 hashes and a maximal note fit.
MAX_TLOG_PROOF_SIZE: Final = 32 * 1024
#: First line of a c2sp.org/tlog-proof.
TLOG_PROOF_HEADER: Final = "c2sp.org/tlog-proof@v1"
#: A verifier key string: name, key id, base64 key. Longer ones are refused unread.
MAX_VKEY_SIZE: Final = 1024

_SIG_PREFIX: Final = "\u2014 "  # em dash, space
_KEY_ID_SIZE: Final = 4
_ED25519_SIG_SIZE: Final = 64
# Every ASCII control character except the newline (so CR and TAB too).
_CONTROL_RE: Final = re.compile(r"[\x00-\x09\x0b-\x1f]")
_DECIMAL_RE: Final = re.compile(r"0|[1-9][0-9]{0,18}")
_KEY_ID_HEX_RE: Final = re.compile(r"[0-9a-f]{8}")
_B64_RE: Final = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")


# --------------------------------------------------------------------------- helpers


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64decode(text: str, what: str) -> bytes:
    """Decode canonical, padded base64 (RFC 4648 §4): the one spelling of each value."""
    if _B64_RE.fullmatch(text) is None:
        raise DecodeError(f"{what}: not canonical base64")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise DecodeError(f"{what}: not canonical base64") from e
    if _b64encode(data) != text:  # non-zero padding bits
        raise DecodeError(f"{what}: not canonical base64")
    return data


def _decimal(text: str, what: str) -> int:
    """A non-negative decimal below 2^63 with no sign, space or leading zero."""
    if _DECIMAL_RE.fullmatch(text) is None:
        raise DecodeError(f"{what}: not a canonical decimal")
    value = int(text)
    if value >= MAX_SIZE:
        raise DecodeError(f"{what}: out of range")
    return value


def _check_chars(text: str, what: str) -> None:
    """Refuse control characters other than the newline (c2sp.org/signed-note)."""
    if _CONTROL_RE.search(text) is not None:
        raise DecodeError(f"{what}: control character (only the newline is allowed)")


def _to_text(data: str | bytes, limit: int, what: str) -> str:
    """``data`` as text, checking its UTF-8 size against ``limit`` before decoding."""
    if isinstance(data, str):
        if len(data) > limit:  # characters <= bytes: over the limit either way
            raise LimitError(f"{what} is larger than {limit} bytes")
        try:
            raw = data.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DecodeError(f"{what}: not valid Unicode") from e
    else:
        raw = bytes(data)
    if len(raw) > limit:
        raise LimitError(f"{what} is larger than {limit} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DecodeError(f"{what}: not UTF-8") from e
    _check_chars(text, what)
    return text


def _check_name(name: str) -> None:
    """Key names are non-empty, without spaces, plus signs or control characters."""
    if not isinstance(name, str) or not name:
        raise DecodeError("a key name is non-empty text")
    if "+" in name or any(c.isspace() or c < " " for c in name):
        raise DecodeError(f"key name {name!r} contains a space, a plus or a control character")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DecodeError("key name: not valid Unicode") from e


def key_id(name: str, public_key: bytes) -> bytes:
    """The 4-byte key id of an Ed25519 note key: SHA-256(name || 0x0A || 0x01 || key)[:4].

    Args:
        name: the key name.
        public_key: the 32-byte Ed25519 public key.

    Returns:
        The key id, big-endian as it appears in signatures.
    """
    return hashlib.sha256(name.encode("utf-8") + b"\n" + bytes([ALG_ED25519]) + public_key).digest()[:_KEY_ID_SIZE]


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class Verifier:
    """A trusted note key: a name and an Ed25519 public key.

    Published as :attr:`vkey` (``name+<key id hex>+base64(0x01 || key)``), the string
    Go's ``note.NewVerifier`` and C2SP tools take.
    """

    name: str
    public_key: bytes = field(repr=False)
    key_id: bytes = field(init=False)

    def __post_init__(self) -> None:
        _check_name(self.name)
        if not isinstance(self.public_key, bytes) or len(self.public_key) != 32:
            raise DecodeError("an Ed25519 public key is 32 bytes")
        object.__setattr__(self, "key_id", key_id(self.name, self.public_key))

    @property
    def vkey(self) -> str:
        """The verifier key string."""
        return f"{self.name}+{self.key_id.hex()}+{_b64encode(bytes([ALG_ED25519]) + self.public_key)}"

    @classmethod
    def from_vkey(cls, vkey: str) -> Verifier:
        """Parse a verifier key string ``name+<8 hex digits>+base64(0x01 || key)``.

        Args:
            vkey: the string, as published by the log.

        Raises:
            DecodeError: wrong shape, not Ed25519, or a key id that does not match.

        Returns:
            The verifier.
        """
        if len(vkey) > MAX_VKEY_SIZE:
            raise LimitError("verifier key too long")
        parts = vkey.split("+", 2)  # the base64 key may itself contain "+" (Go cuts twice too)
        if len(parts) != 3:
            raise DecodeError("a verifier key is name+keyid+key")
        name, hex_id, b64 = parts
        _check_name(name)
        if _KEY_ID_HEX_RE.fullmatch(hex_id) is None:
            raise DecodeError("verifier key id: not 8 lowercase hex digits")
        raw = _b64decode(b64, "verifier key")
        if len(raw) != 33 or raw[0] != ALG_ED25519:
            raise DecodeError("verifier key: not an Ed25519 key (0x01 || 32 bytes)")
        v = cls(name, raw[1:])
        if v.key_id.hex() != hex_id:
            raise DecodeError("verifier key id does not match its name and key")
        return v

    def verify(self, message: bytes, signature: bytes) -> None:
        """Check an Ed25519 signature over ``message`` (the note text bytes).

        Raises:
            SignatureError: not this key's signature of ``message``.
        """
        if len(signature) != _ED25519_SIG_SIZE:
            raise SignatureError(f"signature by {self.name} is not 64 bytes")
        try:
            nacl.signing.VerifyKey(self.public_key).verify(message, signature)
        except nacl.exceptions.BadSignatureError as e:
            raise SignatureError(f"bad signature by {self.name}+{self.key_id.hex()}") from e


@dataclass(frozen=True)
class Signer:
    """A note signing key: a name and an Ed25519 private key (the relay's log key)."""

    name: str
    signing_key: nacl.signing.SigningKey = field(repr=False)

    def __post_init__(self) -> None:
        _check_name(self.name)

    @property
    def verifier(self) -> Verifier:
        return Verifier(self.name, bytes(self.signing_key.verify_key))

    @property
    def key_id(self) -> bytes:
        return self.verifier.key_id

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``message`` (pure RFC 8032, no context)."""
        return self.signing_key.sign(message).signature


# --------------------------------------------------------------------------- notes


@dataclass(frozen=True)
class NoteSignature:
    """One signature line of a note: ``— name base64(key id || signature)``."""

    name: str
    key_id: bytes
    signature: bytes = field(repr=False)

    @property
    def line(self) -> str:
        """The signature line, without its newline."""
        return f"{_SIG_PREFIX}{self.name} {_b64encode(self.key_id + self.signature)}"


def sign_note(text: str, signer: Signer, *more: Signer) -> str:
    """Sign ``text`` as a c2sp.org/signed-note.

    Args:
        text: the note text: ends in a newline, no control character but newlines.
        signer: the key to sign with.
        *more: further keys (e.g. a witness), in the order their lines appear.

    Raises:
        DecodeError: ``text`` is not a valid note text, or two signers share a name
            and key id.
        LimitError: the signed note would exceed :data:`MAX_NOTE_SIZE`.

    Returns:
        ``text + "\\n" + signature lines``.
    """
    signers = (signer, *more)
    if not text.endswith("\n"):
        raise DecodeError("a note text ends with a newline")
    _check_chars(text, "note text")
    try:
        message = text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DecodeError("note text: not valid Unicode") from e
    seen: set[tuple[str, bytes]] = set()
    lines: list[str] = []
    for s in signers:
        ident = (s.name, s.key_id)
        if ident in seen:
            raise DecodeError(f"two signatures by {s.name}+{s.key_id.hex()}")
        seen.add(ident)
        lines.append(NoteSignature(s.name, s.key_id, s.sign(message)).line + "\n")
    note = text + "\n" + "".join(lines)
    if len(note.encode("utf-8")) > MAX_NOTE_SIZE:
        raise LimitError(f"a note is at most {MAX_NOTE_SIZE} bytes")
    return note


def _parse_signature_line(line: str) -> NoteSignature:
    if not line.startswith(_SIG_PREFIX):
        raise DecodeError("a signature line starts with an em dash and a space")
    name, sep, b64 = line[len(_SIG_PREFIX) :].partition(" ")
    if not sep:
        raise DecodeError("a signature line is: em dash, name, signature")
    _check_name(name)
    raw = _b64decode(b64, "signature")
    if len(raw) <= _KEY_ID_SIZE:
        raise DecodeError("a signature is a key id and at least one byte")
    return NoteSignature(name, raw[:_KEY_ID_SIZE], raw[_KEY_ID_SIZE:])


def _split_note(text: str) -> tuple[str, list[NoteSignature]]:
    """Split a note at its last blank line and parse the signature lines."""
    split = text.rfind("\n\n")
    if split < 0:
        raise DecodeError("a note is text, a blank line and signature lines")
    body, block = text[: split + 1], text[split + 2 :]
    if not block.endswith("\n"):
        raise DecodeError("a note ends with a signature line and a newline")
    if block.count("\n") > MAX_SIGNATURES:
        raise LimitError(f"a note has at most {MAX_SIGNATURES} signatures")
    sigs = [_parse_signature_line(line) for line in block[:-1].split("\n")]
    seen: set[tuple[str, bytes]] = set()
    for s in sigs:
        if (s.name, s.key_id) in seen:
            raise DecodeError(f"two signatures by {s.name}+{s.key_id.hex()}")
        seen.add((s.name, s.key_id))
    return body, sigs


def open_note(note: str | bytes, verifiers: Sequence[Verifier]) -> tuple[str, list[NoteSignature]]:
    """Verify a signed note, then hand back its text.

    c2sp.org/signed-note: signatures by unknown keys (name and key id not both those of
    a verifier) are ignored; a signature by a known key must verify; at least one must.

    Args:
        note: the note as received (UTF-8 bytes, or text).
        verifiers: the trusted keys; at least one. Two verifiers may not share a name
            and key id.

    Raises:
        ValueError: ``verifiers`` is empty or ambiguous (a caller bug).
        LimitError: the note exceeds :data:`MAX_NOTE_SIZE` or :data:`MAX_SIGNATURES`.
        DecodeError: not a well-formed note, or the same key signs twice.
        SignatureError: a known key's signature is bad, or no known key signed.

    Returns:
        The note text (with its final newline) and the verified signatures, in order.
    """
    known: dict[tuple[str, bytes], Verifier] = {}
    for v in verifiers:
        if known.setdefault((v.name, v.key_id), v) != v:
            raise ValueError(f"two verifiers named {v.name}+{v.key_id.hex()}")
    if not known:
        raise ValueError("at least one verifier is needed to open a note")
    body, sigs = _split_note(_to_text(note, MAX_NOTE_SIZE, "note"))
    message = body.encode("utf-8")
    verified: list[NoteSignature] = []
    for s in sigs:
        trusted = known.get((s.name, s.key_id))
        if trusted is not None:
            trusted.verify(message, s.signature)
            verified.append(s)
    if not verified:
        raise SignatureError("the note has no signature by a known key")
    return body, verified


# --------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class Checkpoint:
    """A log's tree head: origin, size and root (c2sp.org/tlog-checkpoint).

    ``extensions`` are the optional lines after the root hash: Pli writes none, but
    keeps them when reading a checkpoint, as the spec says. A checkpoint of size 0
    must carry the empty tree's root, SHA-256(): any other is not a tree head.
    """

    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "extensions", tuple(self.extensions))
        for what, line in (("origin", self.origin), *(("extension line", e) for e in self.extensions)):
            if not isinstance(line, str) or not line:
                raise DecodeError(f"checkpoint {what} is non-empty text")
            if "\n" in line:
                raise DecodeError(f"checkpoint {what} is one line")
            _check_chars(line, f"checkpoint {what}")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or not 0 <= self.size < MAX_SIZE:
            raise DecodeError("checkpoint size out of range")
        if not isinstance(self.root_hash, bytes) or len(self.root_hash) != HASH_SIZE:
            raise DecodeError("checkpoint root hash is 32 bytes")
        if self.size == 0 and self.root_hash != EMPTY_ROOT:
            raise DecodeError("the root of an empty tree is SHA-256 of nothing")

    def to_text(self) -> str:
        """The note text: origin, size, base64 root, extension lines, each ending in a newline."""
        lines = [self.origin, str(self.size), _b64encode(self.root_hash), *self.extensions]
        return "".join(line + "\n" for line in lines)

    @classmethod
    def from_text(cls, text: str) -> Checkpoint:
        """Parse a checkpoint note text (already verified by :func:`open_note`).

        Args:
            text: the note text, ending in a newline.

        Raises:
            DecodeError: fewer than three lines, an empty line, a non-canonical size
                or root hash.

        Returns:
            The checkpoint, extension lines included.
        """
        text = _to_text(text, MAX_NOTE_SIZE, "checkpoint")
        if not text.endswith("\n"):
            raise DecodeError("a checkpoint text ends with a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3 or not all(lines):
            raise DecodeError("a checkpoint is at least three non-empty lines")
        origin, size, root, *extensions = lines
        return cls(origin, _decimal(size, "tree size"), _b64decode(root, "root hash"), tuple(extensions))


def sign_checkpoint(checkpoint: Checkpoint, signer: Signer, *more: Signer) -> str:
    """Sign a checkpoint as a note (the log's key; witnesses may add theirs later).

    Raises:
        LimitError: the note would exceed :data:`MAX_NOTE_SIZE`.

    Returns:
        The signed checkpoint note.
    """
    return sign_note(checkpoint.to_text(), signer, *more)


def open_checkpoint(note: str | bytes, verifier: Verifier, *, origin: str) -> Checkpoint:
    """Verify a signed checkpoint of the log ``origin`` and parse it.

    Args:
        note: the signed checkpoint note.
        verifier: the log's key.
        origin: the log's origin line, as configured by the verifier (not as read
            from the note: a checkpoint of another log signed with the same key is
            refused).

    Raises:
        LimitError, DecodeError: not a well-formed note or checkpoint.
        SignatureError: not signed by ``verifier``, or for another origin.

    Returns:
        The verified checkpoint.
    """
    text, _ = open_note(note, [verifier])
    checkpoint = Checkpoint.from_text(text)
    if checkpoint.origin != origin:
        raise SignatureError(f"checkpoint of {checkpoint.origin!r}, expected {origin!r}")
    return checkpoint


# --------------------------------------------------------------------------- tlog proofs


@dataclass(frozen=True)
class TlogProof:
    """An offline proof that a leaf is in the log (c2sp.org/tlog-proof)::

        c2sp.org/tlog-proof@v1
        extra <base64>              (only when extra is not None)
        index <decimal>
        <base64 hash>               (zero or more: the inclusion proof, leaf side first)

        <signed checkpoint note, verbatim>

    ``extra`` is opaque and *not* authenticated. ``checkpoint`` is the signed note
    exactly as the log produced it (cosignatures included).
    """

    index: int
    proof: tuple[bytes, ...]
    checkpoint: str
    extra: bytes | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "proof", tuple(self.proof))
        if isinstance(self.index, bool) or not isinstance(self.index, int) or not 0 <= self.index < MAX_SIZE:
            raise DecodeError("tlog proof index out of range")
        if len(self.proof) > MAX_PROOF_HASHES:
            raise LimitError(f"a proof holds at most {MAX_PROOF_HASHES} hashes")
        if any(not isinstance(h, bytes) or len(h) != HASH_SIZE for h in self.proof):
            raise DecodeError("proof hashes are 32 bytes")
        if self.extra is not None and len(self.extra) > MAX_EXTRA_SIZE:
            raise LimitError(f"extra data is at most {MAX_EXTRA_SIZE} bytes")
        if not self.checkpoint.endswith("\n"):
            raise DecodeError("the checkpoint note ends with a newline")
        _to_text(self.checkpoint, MAX_NOTE_SIZE, "checkpoint note")

    def to_text(self) -> str:
        """The proof in its text form (store it as ``*.tlog-proof``)."""
        out = [TLOG_PROOF_HEADER + "\n"]
        if self.extra is not None:
            out.append(f"extra {_b64encode(self.extra)}\n")
        out.append(f"index {self.index}\n")
        out.extend(_b64encode(h) + "\n" for h in self.proof)
        out.append("\n")
        out.append(self.checkpoint)
        return "".join(out)

    @classmethod
    def from_text(cls, data: str | bytes) -> TlogProof:
        """Parse a tlog proof. Nothing is verified yet: call :meth:`verify`.

        Raises:
            LimitError: over :data:`MAX_TLOG_PROOF_SIZE`, too many hashes, too much extra.
            DecodeError: any other deviation from the format.

        Returns:
            The parsed proof.
        """
        text = _to_text(data, MAX_TLOG_PROOF_SIZE, "tlog proof")
        lines = _Lines(text)
        if lines.next() != TLOG_PROOF_HEADER:
            raise DecodeError(f"a tlog proof starts with {TLOG_PROOF_HEADER}")
        line = lines.next()
        extra = None
        if line.startswith("extra "):
            extra = _b64decode(line[len("extra ") :], "extra data")
            line = lines.next()
        if not line.startswith("index "):
            raise DecodeError("a tlog proof has an index line")
        index = _decimal(line[len("index ") :], "index")
        proof: list[bytes] = []
        while line := lines.next():
            if len(proof) == MAX_PROOF_HASHES:
                raise LimitError(f"a proof holds at most {MAX_PROOF_HASHES} hashes")
            h = _b64decode(line, "proof hash")
            if len(h) != HASH_SIZE:
                raise DecodeError("proof hashes are 32 bytes")
            proof.append(h)
        checkpoint = lines.rest()
        if not checkpoint:
            raise DecodeError("a tlog proof ends with a checkpoint")
        return cls(index, tuple(proof), checkpoint, extra)

    def verify(self, leaf_hash: bytes, verifier: Verifier, *, origin: str) -> Checkpoint:
        """Check the checkpoint's signature, then that ``leaf_hash`` is at :attr:`index`.

        Args:
            leaf_hash: the leaf *hash* (``merkle.leaf_hash`` of the leaf's bytes), which
                the verifier computes itself from what it expects was logged.
            verifier: the log's key.
            origin: the log's origin line.

        Raises:
            LimitError, DecodeError: the checkpoint is not well-formed.
            SignatureError: the checkpoint is not the log's.
            ProofError: the leaf is not at that index in the checkpointed tree.

        Returns:
            The verified checkpoint the leaf is included in.
        """
        checkpoint = open_checkpoint(self.checkpoint, verifier, origin=origin)
        verify_inclusion(leaf_hash, self.index, checkpoint.size, self.proof, checkpoint.root_hash)
        return checkpoint


class _Lines:
    """Newline-terminated lines of a text, one at a time."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._pos = 0

    def next(self) -> str:
        end = self._text.find("\n", self._pos)
        if end < 0:
            raise DecodeError("truncated tlog proof")
        line = self._text[self._pos : end]
        self._pos = end + 1
        return line

    def rest(self) -> str:
        return self._text[self._pos :]
