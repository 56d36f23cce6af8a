"""The age v1 file format (c2sp.org/age), X25519 recipients only, sans I/O.

Pli encrypts every case with age so that any stock age implementation can open it
with the recipient's key: interoperability is the point, so nothing here departs from
the specification, and parsing is as strict as the reference implementation (the C2SP
CCTV test kit passes). Passphrase (scrypt), post-quantum hybrid, SSH and plugin
recipients and ASCII armor are not implemented: Pli never produces them, and stanzas
of other types are parsed and then ignored, as the specification requires.

Streaming is first-class because cases carry imaging files: ``EncryptWriter`` and
``DecryptReader`` hold one 64 KiB chunk (plus one read-ahead chunk when decrypting),
whatever the file size, and never release plaintext that has not been authenticated.
``encrypt_stream`` and ``decrypt_stream`` additionally run the ChaCha20-Poly1305 calls
on one worker thread (OpenSSL, through ``cryptography``, releases the GIL) so that they
overlap with the caller's reads and writes; the caller's file objects are only used
from the calling thread, and the output is byte-identical to the one-chunk-at-a-time
path. For callers with their own I/O pipeline, ``start_encryption`` and
``start_decryption`` give the header and a ``PayloadSealer`` or ``PayloadOpener`` that
works a block of chunks at a time, in the caller's buffers; the bytes are the same.

ChaCha20-Poly1305 is OpenSSL's (``cryptography``), about three times faster here than
libsodium's portable code on large inputs; X25519 is libsodium's (PyNaCl).

Randomness is drawn only by the public constructors and convenience functions; each
has a ``_from_parts`` path that takes the file key, ephemeral secrets and payload nonce
so the test vectors in ``protocol/vectors/age.json`` are reproducible.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import io
import re
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Self

import nacl.exceptions
import nacl.utils
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nacl.bindings import crypto_scalarmult, crypto_scalarmult_base

from protocol import _bech32
from protocol.errors import (
    DecodeError,
    HeaderMacError,
    LimitError,
    NoIdentityError,
    PayloadError,
    VersionError,
)

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import TracebackType

__all__ = [
    "CHUNK_SIZE",
    "MAX_HEADER_SIZE",
    "DecryptReader",
    "EncryptWriter",
    "Header",
    "PayloadOpener",
    "PayloadSealer",
    "Stanza",
    "SupportsRead",
    "SupportsWrite",
    "X25519Identity",
    "X25519Recipient",
    "ciphertext_size",
    "decrypt",
    "decrypt_stream",
    "encrypt",
    "encrypt_stream",
    "header_size",
    "sealed_size",
    "start_decryption",
    "start_encryption",
]

CHUNK_SIZE = 64 * 1024
"""Plaintext bytes per STREAM chunk (spec "Payload")."""

MAX_HEADER_SIZE = 64 * 1024
"""Largest header we read or write, MAC line included.

The specification sets no bound; ours keeps a hostile header from making a reader
buffer without limit. It fits 668 X25519 stanzas (see ``header_size``).
"""

_TAG_SIZE = 16
_ENC_CHUNK_SIZE = CHUNK_SIZE + _TAG_SIZE
_FILE_KEY_SIZE = 16
_NONCE_SIZE = 16
_KEY_SIZE = 32
_MAC_SIZE = 32
_COLUMNS = 64  # spec "Recipient stanza": body wrapped at 64 columns
_BYTES_PER_LINE = _COLUMNS // 4 * 3

_VERSION_LINE = b"age-encryption.org/v1\n"
_VERSION_PREFIX = b"age-encryption.org/"
_MAC_PREFIX = b"---"
_MAC_LINE_SIZE = len(b"--- ") + 43 + 1
_X25519_TYPE = "X25519"
_X25519_INFO = b"age-encryption.org/v1/X25519"
_ZERO_NONCE = bytes(12)
_IDENTITY_HRP = "AGE-SECRET-KEY-"
_RECIPIENT_HRP = "age"
_READ_BLOCK = 4096
_PIPELINE_WORKERS = 1
_PIPELINE_BATCH = 8
_PIPELINE_DEPTH = 2

# spec "ABNF definition of file header": arg-line = "-> " argument *(SP argument) LF,
# argument = 1*VCHAR.
_ARG_LINE = re.compile(rb"-> [\x21-\x7e]+(?: [\x21-\x7e]+)*\n")
_ARGUMENT = re.compile(r"[\x21-\x7e]+")
_B64_CHARS = re.compile(rb"[A-Za-z0-9+/]*")

# Fixed sizes of an X25519 stanza, so header_size() is exact (spec "X25519 recipient
# stanza"): "-> X25519 " + 43 base64 chars + LF, then a 43-char body line + LF.
_X25519_STANZA_SIZE = len(b"-> X25519 ") + 43 + 1 + 43 + 1
_FIXED_HEADER_SIZE = len(_VERSION_LINE) + _MAC_LINE_SIZE


_Buffer = bytes | bytearray | memoryview


class SupportsRead(Protocol):
    """Anything with ``read(n)`` returning at most ``n`` bytes, ``b""`` at end of file."""

    def read(self, n: int, /) -> bytes: ...


class SupportsWrite(Protocol):
    def write(self, data: bytes, /) -> object: ...


# --- primitives ---------------------------------------------------------------------


def _b64encode(data: bytes) -> bytes:
    # spec "Conventions": standard alphabet, no padding, canonical.
    return binascii.b2a_base64(data, newline=False).rstrip(b"=")


def _b64decode(s: bytes) -> bytes:
    """Strict unpadded base64: the only accepted spelling is the canonical one."""
    if len(s) % 4 == 1 or _B64_CHARS.fullmatch(s) is None:
        raise DecodeError("invalid base64")
    try:
        out = binascii.a2b_base64(s + b"=" * (-len(s) % 4), strict_mode=True)
    except binascii.Error as e:
        raise DecodeError("invalid base64") from e
    # Non-zero trailing bits decode fine but re-encode differently (RFC 4648 3.5).
    if _b64encode(out) != s:
        raise DecodeError("non-canonical base64")
    return out


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=_KEY_SIZE, salt=salt, info=info).derive(ikm)


def _stream_nonce(counter: int, *, last: bool) -> bytes:
    # spec "Payload": 11-byte big-endian chunk counter || 0x01 for the final chunk.
    # 2**88 chunks is out of reach, so the counter cannot overflow in practice;
    # to_bytes would raise OverflowError rather than wrap if it ever did.
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def _header_mac(file_key: bytes, header_without_mac: bytes) -> bytes:
    # spec "Header MAC": HMAC-SHA-256 keyed with HKDF(file key, "", "header") over the
    # header up to and including "---".
    key = _hkdf(file_key, b"", b"header")
    return hmac.new(key, header_without_mac, hashlib.sha256).digest()


def _write_all(dst: SupportsWrite, data: bytes) -> None:
    n = dst.write(data)
    # Raw (unbuffered) writers may accept less than asked; buffered ones never do.
    while isinstance(n, int) and 0 <= n < len(data):
        data = data[n:]
        n = dst.write(data)


_Opened = tuple[bytes, PayloadError | None]  # output, and an error to raise after it
_ChunkOp = Callable[[ChaCha20Poly1305, bytes, int, bool], _Opened]  # cipher, data, index, final flag


def _seal_chunk(aead: ChaCha20Poly1305, plaintext: bytes, index: int, last: bool) -> _Opened:
    return aead.encrypt(_stream_nonce(index, last=last), plaintext, None), None


def _open_chunk(aead: ChaCha20Poly1305, sealed: _Buffer, index: int, last: bool) -> _Opened:
    """Open chunk ``index``; ``last`` is whether the input ends right after it.

    A full-size chunk that only opens with the other final flag is authentic but
    misplaced: a final chunk followed by more data, or a non-final chunk at the end
    of the input (truncation). Its plaintext is still released and the error comes
    after it, as the reference implementation does and the C2SP test kit expects.
    """
    try:
        plaintext = aead.decrypt(_stream_nonce(index, last=last), sealed, None)
    except InvalidTag as e:
        failed = PayloadError(f"age payload chunk {index} failed to decrypt")
        if len(memoryview(sealed)) != _ENC_CHUNK_SIZE:
            raise failed from e
        try:
            plaintext = aead.decrypt(_stream_nonce(index, last=not last), sealed, None)
        except InvalidTag as e2:
            raise failed from e2
        if last:
            return plaintext, PayloadError("age payload truncated: no final chunk")
        return plaintext, PayloadError("age payload has data after its final chunk")
    if last and not plaintext and index:
        raise PayloadError("age final chunk is empty")  # spec "Payload"
    return plaintext, None


_Job = tuple[bytes, int, bool]  # data, chunk index, whether it is the final chunk


def _run_batch(
    op: _ChunkOp, aead: ChaCha20Poly1305, jobs: list[_Job]
) -> tuple[list[bytes], PayloadError | None]:
    out: list[bytes] = []
    for data, index, last in jobs:
        try:
            result, error = op(aead, data, index, last)
        except PayloadError as e:
            return out, e
        out.append(result)
        if error is not None:
            return out, error
    return out, None


class _Pipeline:
    """Runs the ChaCha20-Poly1305 calls on worker threads while the caller does I/O.

    The AEAD calls (OpenSSL, through cryptography) release the GIL, so sealing or
    opening chunks overlaps with the caller's reads and writes. Chunks go to workers in batches, because a thread
    hand-off costs about as much as sealing one 64 KiB chunk; results are written
    strictly in order, and at most ``_PIPELINE_DEPTH`` batches are in flight, so
    memory stays flat. Only the pure AEAD calls run on workers: the caller's
    ``src`` and ``dst`` are used from the calling thread alone. The first failing
    chunk stops the output after every earlier chunk has been written.
    """

    __slots__ = ("_aead", "_batch", "_dst", "_inflight", "_op", "_pool", "_stopped", "written")

    def __init__(
        self,
        dst: SupportsWrite,
        op: _ChunkOp,
        aead: ChaCha20Poly1305,
    ) -> None:
        self._dst = dst
        self._op = op
        self._aead = aead
        self._pool = ThreadPoolExecutor(max_workers=_PIPELINE_WORKERS)
        self._inflight: deque[Future[tuple[list[bytes], PayloadError | None]]] = deque()
        self._batch: list[_Job] = []
        self._stopped = False
        self.written = 0

    def push(self, data: bytes, index: int, *, last: bool) -> None:
        self._batch.append((data, index, last))
        if len(self._batch) == _PIPELINE_BATCH:
            self._submit()
            self._drain(keep=_PIPELINE_DEPTH)

    def _submit(self) -> None:
        if self._batch:
            self._inflight.append(self._pool.submit(_run_batch, self._op, self._aead, self._batch))
            self._batch = []

    def _drain(self, *, keep: int) -> None:
        while len(self._inflight) > keep:
            try:
                outputs, error = self._inflight.popleft().result()
                for out in outputs:
                    _write_all(self._dst, out)
                    self.written += len(out)
            except BaseException:
                self._stopped = True  # nothing after a failed write may reach dst
                raise
            if error is not None:
                self._stopped = True  # nothing after a failed chunk may reach dst
                raise error

    def finish(self) -> None:
        """Write every pushed chunk, or raise the first chunk's error."""
        if self._stopped:
            return
        self._submit()
        self._drain(keep=0)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self._inflight:
            f.cancel()
        self._pool.shutdown(wait=True)


# --- keys -----------------------------------------------------------------------------


class X25519Recipient:
    """An age X25519 public key (``age1...``)."""

    __slots__ = ("_public",)

    def __init__(self, public: bytes) -> None:
        if len(public) != _KEY_SIZE:
            raise DecodeError("X25519 recipient must be 32 bytes")
        # A low-order point would make every shared secret all-zero, which identities
        # must refuse (spec "X25519 recipient stanza"): refuse it here instead of
        # producing a file nobody can open.
        try:
            crypto_scalarmult(b"\x01" * 32, public)
        except nacl.exceptions.CryptoError as e:
            raise DecodeError("X25519 recipient is a low-order point") from e
        self._public = bytes(public)

    @classmethod
    def from_bytes(cls, public: bytes) -> Self:
        return cls(public)

    @classmethod
    def from_string(cls, s: str) -> Self:
        hrp, data = _bech32.decode(s)
        if hrp != _RECIPIENT_HRP:
            raise DecodeError(f"not an age X25519 recipient (prefix {hrp!r})")
        return cls(data)

    def to_string(self) -> str:
        return _bech32.encode(_RECIPIENT_HRP, self._public)

    def to_bytes(self) -> bytes:
        return self._public

    def _wrap(self, file_key: bytes, ephemeral_secret: bytes) -> Stanza:
        # spec "X25519 recipient stanza".
        share = crypto_scalarmult_base(ephemeral_secret)
        shared = crypto_scalarmult(ephemeral_secret, self._public)
        wrap_key = _hkdf(shared, share + self._public, _X25519_INFO)
        body = ChaCha20Poly1305(wrap_key).encrypt(_ZERO_NONCE, file_key, None)
        return Stanza(_X25519_TYPE, (_b64encode(share).decode("ascii"),), body)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, X25519Recipient) and other._public == self._public

    def __hash__(self) -> int:
        return hash(self._public)

    def __repr__(self) -> str:
        return f"X25519Recipient({self.to_string()!r})"


class X25519Identity:
    """An age X25519 secret key (``AGE-SECRET-KEY-1...``); its repr never shows it."""

    __slots__ = ("_public", "_secret")

    def __init__(self, secret: bytes) -> None:
        if len(secret) != _KEY_SIZE:
            raise DecodeError("X25519 identity must be 32 bytes")
        self._secret = bytes(secret)
        self._public = crypto_scalarmult_base(self._secret)

    @classmethod
    def generate(cls) -> Self:
        return cls(nacl.utils.random(_KEY_SIZE))

    @classmethod
    def from_bytes(cls, secret: bytes) -> Self:
        return cls(secret)

    @classmethod
    def from_string(cls, s: str) -> Self:
        hrp, data = _bech32.decode(s)
        # Uppercase only, as age writes and accepts it.
        if hrp != _IDENTITY_HRP:
            raise DecodeError("not an age X25519 identity")
        return cls(data)

    def to_string(self) -> str:
        return _bech32.encode(_IDENTITY_HRP, self._secret)

    def to_bytes(self) -> bytes:
        return self._secret

    @property
    def recipient(self) -> X25519Recipient:
        return X25519Recipient(self._public)

    def _unwrap(self, share: bytes, body: bytes) -> bytes | None:
        """File key from one well-formed X25519 stanza, or None if it is not for us."""
        try:
            shared = crypto_scalarmult(self._secret, share)
        except nacl.exceptions.CryptoError as e:  # libsodium refuses an all-zero result
            raise DecodeError("X25519 share is a low-order point") from e
        # spec "X25519 recipient stanza": abort on an all-zero shared secret.
        if hmac.compare_digest(shared, bytes(_KEY_SIZE)):
            raise DecodeError("X25519 share is a low-order point")
        wrap_key = _hkdf(shared, share + self._public, _X25519_INFO)
        try:
            return ChaCha20Poly1305(wrap_key).decrypt(_ZERO_NONCE, body, None)
        except InvalidTag:
            return None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, X25519Identity) and hmac.compare_digest(
            other._secret, self._secret
        )

    def __hash__(self) -> int:
        return hash(self._public)

    def __repr__(self) -> str:
        return f"X25519Identity(recipient={self.recipient.to_string()!r})"


# --- header ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stanza:
    """One recipient stanza: ``type`` is the first argument, ``args`` the rest."""

    type: str
    args: tuple[str, ...]
    body: bytes

    def encode(self) -> bytes:
        words = (self.type, *self.args)
        if any(_ARGUMENT.fullmatch(w) is None for w in words):
            raise ValueError("stanza arguments must be non-empty runs of VCHAR")
        line = " ".join(words).encode("ascii")
        b64 = _b64encode(self.body)
        # spec "Recipient stanza": 64-column lines, then a final line shorter than 64
        # columns, which is empty when the body fills its last line exactly.
        lines = [b64[i : i + _COLUMNS] for i in range(0, len(b64), _COLUMNS)]
        if not lines or len(lines[-1]) == _COLUMNS:
            lines.append(b"")
        return b"-> " + line + b"\n" + b"".join(ln + b"\n" for ln in lines)


@dataclass(frozen=True, slots=True)
class Header:
    """A parsed header. ``encode()`` reproduces the parsed bytes exactly."""

    stanzas: tuple[Stanza, ...]
    mac: bytes

    def encode_without_mac(self) -> bytes:
        """The bytes the MAC covers: everything up to and including ``---``."""
        return _VERSION_LINE + b"".join(s.encode() for s in self.stanzas) + _MAC_PREFIX

    def encode(self) -> bytes:
        return self.encode_without_mac() + b" " + _b64encode(self.mac) + b"\n"

    @classmethod
    def decode_prefix(cls, data: bytes) -> tuple[Header, int]:
        """Parse the header at the start of ``data``; return it and its length."""
        header, raw = _read_header(_Source(io.BytesIO(data)))
        return header, len(raw)


class _Source:
    """Buffered view of a caller's reader: header lines, then exact-size payload reads.

    The header is read in small blocks; whatever was read past it is served first to
    the payload reads, after which they go straight to the caller's reader so that
    a 64 KiB chunk costs one ``read`` and no copy.
    """

    __slots__ = ("_buf", "_eof", "_src")

    def __init__(self, src: SupportsRead) -> None:
        self._src = src
        self._buf = bytearray()
        self._eof = False

    def _more(self, n: int) -> bool:
        data = self._src.read(n)
        if not data:
            self._eof = True
            return False
        self._buf += data
        return True

    def readline(self, limit: int) -> bytes:
        """One LF-terminated line of at most ``limit`` bytes."""
        start = 0
        while True:
            i = self._buf.find(b"\n", start)
            if i >= 0:
                if i + 1 > limit:
                    break
                line = bytes(self._buf[: i + 1])
                del self._buf[: i + 1]
                return line
            if len(self._buf) >= limit:
                break
            start = len(self._buf)
            if self._eof or not self._more(_READ_BLOCK):
                raise DecodeError("header truncated")
        raise LimitError(f"age header longer than {MAX_HEADER_SIZE} bytes")

    def read_full(self, n: int) -> bytes:
        """Exactly ``n`` bytes, or fewer only at end of input."""
        if not self._buf:
            if self._eof:
                return b""
            data = self._src.read(n)
            if len(data) == n:
                return data if type(data) is bytes else bytes(data)
            if not data:
                self._eof = True
                return b""
            self._buf += data
        while len(self._buf) < n and not self._eof:
            self._more(n - len(self._buf))
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out


def _read_header(source: _Source) -> tuple[Header, bytes]:
    """Parse a header (spec "ABNF definition of file header"); return it and its bytes."""
    raw = bytearray()

    def line() -> bytes:
        ln = source.readline(MAX_HEADER_SIZE - len(raw))
        raw.extend(ln)
        return ln

    first = line()
    if first != _VERSION_LINE:
        if first.startswith(_VERSION_PREFIX):
            raise VersionError("unsupported age version")
        raise DecodeError("not an age file")
    stanzas: list[Stanza] = []
    while True:
        ln = line()
        if ln.startswith(_MAC_PREFIX):
            # end = "--- " 43base64char LF
            if len(ln) != _MAC_LINE_SIZE or ln[3:4] != b" ":
                raise DecodeError("malformed header MAC line")
            mac = _b64decode(ln[4:-1])
            if len(mac) != _MAC_SIZE:  # unreachable for 43 canonical chars; kept explicit
                raise DecodeError("malformed header MAC line")
            break
        stanzas.append(_read_stanza(ln, line))
    if not stanzas:
        raise DecodeError("age header without recipient stanzas")
    return Header(tuple(stanzas), mac), bytes(raw)


def _read_stanza(arg_line: bytes, next_line: Callable[[], bytes]) -> Stanza:
    if _ARG_LINE.fullmatch(arg_line) is None:
        raise DecodeError("malformed stanza argument line")
    kind, *args = arg_line[3:-1].decode("ascii").split(" ")
    body = bytearray()
    while True:
        # A line starting with "---" or "->" here is not base64, so a stanza that
        # does not end with a short line is refused.
        chunk = _b64decode(next_line()[:-1])
        if len(chunk) > _BYTES_PER_LINE:
            raise DecodeError("stanza body line longer than 64 columns")
        body += chunk
        if len(chunk) < _BYTES_PER_LINE:
            return Stanza(kind, tuple(args), bytes(body))


def _unwrap_file_key(stanzas: Sequence[Stanza], identities: Sequence[X25519Identity]) -> bytes:
    # spec "X25519 recipient stanza": ignore other types; refuse a malformed X25519
    # stanza (exactly one argument, canonical 32-byte share, 32-byte body checked
    # before decrypting). We check every X25519 stanza up front: stricter than
    # stopping at the first match, and it keeps the outcome independent of order.
    candidates: list[tuple[bytes, bytes]] = []
    for s in stanzas:
        if s.type != _X25519_TYPE:
            continue
        if len(s.args) != 1:
            raise DecodeError("X25519 stanza must have exactly one argument")
        share = _b64decode(s.args[0].encode("ascii"))
        if len(share) != _KEY_SIZE:
            raise DecodeError("X25519 share must be 32 bytes")
        if len(s.body) != _FILE_KEY_SIZE + _TAG_SIZE:
            raise DecodeError("X25519 stanza body must be 32 bytes")
        candidates.append((share, s.body))
    for identity in identities:
        for share, body in candidates:
            file_key = identity._unwrap(share, body)  # noqa: SLF001 (same module)
            if file_key is not None:
                return file_key
    raise NoIdentityError("no identity matches any recipient stanza")


# --- payload in blocks ----------------------------------------------------------------
#
# For callers that run their own I/O pipeline (the bundle path of client/core.py): the
# header is bytes, and the payload is sealed or opened a block of whole chunks at a time,
# into the caller's buffers, so that a gigabyte costs a thousand Python-level calls and
# no intermediate copies. The bytes are exactly those of EncryptWriter and DecryptReader.


def _start_encryption(
    recipients: Sequence[X25519Recipient],
    *,
    file_key: bytes,
    ephemeral_secrets: Sequence[bytes],
    payload_nonce: bytes,
) -> tuple[bytes, PayloadSealer]:
    if not recipients:
        raise ValueError("at least one recipient is required")
    if len(ephemeral_secrets) != len(recipients):
        raise ValueError("one ephemeral secret per recipient is required")
    if len(file_key) != _FILE_KEY_SIZE or len(payload_nonce) != _NONCE_SIZE:
        raise ValueError("file key and payload nonce must be 16 bytes")
    if any(len(e) != _KEY_SIZE for e in ephemeral_secrets):
        raise ValueError("ephemeral secrets must be 32 bytes")
    if header_size(len(recipients)) > MAX_HEADER_SIZE:
        raise LimitError(f"too many recipients for a {MAX_HEADER_SIZE}-byte header")
    stanzas = tuple(
        r._wrap(file_key, e)  # noqa: SLF001 (same module)
        for r, e in zip(recipients, ephemeral_secrets, strict=True)
    )
    without_mac = Header(stanzas, b"").encode_without_mac()
    mac = _header_mac(file_key, without_mac)
    # spec "Payload": payload key = HKDF(ikm = file key, salt = nonce, "payload").
    sealer = PayloadSealer(ChaCha20Poly1305(_hkdf(file_key, payload_nonce, b"payload")))
    return without_mac + b" " + _b64encode(mac) + b"\n" + payload_nonce, sealer


def start_encryption(recipients: Sequence[X25519Recipient]) -> tuple[bytes, PayloadSealer]:
    """A fresh file key for ``recipients``: the age header (payload nonce included) and
    the sealer of the payload that must follow it.

    Raises:
        ValueError: no recipients.
        LimitError: too many recipients for ``MAX_HEADER_SIZE``.
    """
    return _start_encryption(
        recipients,
        file_key=nacl.utils.random(_FILE_KEY_SIZE),
        ephemeral_secrets=[nacl.utils.random(_KEY_SIZE) for _ in recipients],
        payload_nonce=nacl.utils.random(_NONCE_SIZE),
    )


def _read_payload_key(source: _Source, identities: Sequence[X25519Identity]) -> tuple[bytes, ChaCha20Poly1305]:
    """Parse the header, unwrap the file key, check the MAC, read the nonce; the raw
    header (MAC line included) and the payload cipher."""
    parsed, raw = _read_header(source)
    file_key = _unwrap_file_key(parsed.stanzas, identities)
    expected = _header_mac(file_key, raw[:-_MAC_LINE_SIZE] + _MAC_PREFIX)
    if not hmac.compare_digest(expected, parsed.mac):
        raise HeaderMacError("age header MAC does not match")
    nonce = source.read_full(_NONCE_SIZE)
    if len(nonce) != _NONCE_SIZE:
        # The C2SP test kit classes a short nonce as a header failure.
        raise DecodeError("age payload nonce truncated")
    return raw, ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))


def start_decryption(prefix: bytes, identities: Sequence[X25519Identity]) -> tuple[PayloadOpener, int]:
    """Open the header at the start of ``prefix``; return the payload's opener and offset.

    ``prefix`` is the file's first bytes: ``MAX_HEADER_SIZE + 16`` of them (or the whole
    file, if shorter) always hold the header and the payload nonce. The payload's sealed
    chunks start at the returned offset.

    Raises:
        ValueError: no identities.
        DecodeError, LimitError, VersionError: not a well-formed age header (or no nonce).
        NoIdentityError: no identity opens any recipient stanza.
        HeaderMacError: the header was altered.
    """
    if not identities:
        raise ValueError("at least one identity is required")
    raw, aead = _read_payload_key(_Source(io.BytesIO(prefix)), identities)
    return PayloadOpener(aead), len(raw) + _NONCE_SIZE


def sealed_size(plaintext_size: int) -> int:
    """Bytes that ``plaintext_size`` bytes of payload take once sealed: 16 per chunk more."""
    return plaintext_size + max(1, -(-plaintext_size // CHUNK_SIZE)) * _TAG_SIZE


class PayloadSealer:
    """Seals the payload's STREAM chunks (spec "Payload") a block at a time, in order.

    Made by ``start_encryption`` with a fresh key, and good for one payload: chunk
    numbers (the nonces) only move forward. Every block but the final one is a whole
    number of ``CHUNK_SIZE`` chunks, so the caller must know where the payload ends: the
    final block holds its last chunk (and is empty only when the whole payload is).
    """

    __slots__ = ("_aead", "_counter", "_finished")

    def __init__(self, aead: ChaCha20Poly1305) -> None:
        self._aead = aead
        self._counter = 0
        self._finished = False

    def seal_into(self, plaintext: _Buffer, out: bytearray | memoryview, *, final: bool) -> int:
        """Seal ``plaintext`` into the start of ``out``; return the bytes written
        (``sealed_size(len(plaintext))`` for a final block, 16 per chunk more otherwise).

        Raises:
            ValueError: a block after the final one, a non-final block that is not whole
                chunks (or is empty), an empty final block after others, or ``out`` too small.
        """
        src = memoryview(plaintext).cast("B")
        dst = memoryview(out).cast("B")
        n = len(src)
        if self._finished:
            raise ValueError("the payload's final chunk is already sealed")
        if not final and (n == 0 or n % CHUNK_SIZE):
            raise ValueError("a non-final block must be whole chunks")
        if final and n == 0 and self._counter:
            raise ValueError("the final chunk is empty only when the whole payload is")
        if len(dst) < (sealed_size(n) if final else n + n // CHUNK_SIZE * _TAG_SIZE):
            raise ValueError("output buffer too small")
        aead, counter = self._aead, self._counter
        pos = written = 0
        while True:
            end = min(pos + CHUNK_SIZE, n)
            last = final and end == n
            size = end - pos + _TAG_SIZE
            aead.encrypt_into(_stream_nonce(counter, last=last), src[pos:end], None, dst[written : written + size])
            written += size
            counter += 1
            pos = end
            if pos == n:
                break
        self._counter = counter
        self._finished = final
        return written


class PayloadOpener:
    """Opens the payload's sealed chunks a block at a time, in order, refusing any
    reordering, truncation or trailing data (as ``DecryptReader`` does).

    Made by ``start_decryption``. Every block but the final one is a whole number of
    sealed chunks; the final block is the end of the input (its last chunk may be
    short), so the caller must know where the file ends. After a failure it only
    raises that failure again.
    """

    __slots__ = ("_aead", "_counter", "_error", "_finished")

    def __init__(self, aead: ChaCha20Poly1305) -> None:
        self._aead = aead
        self._counter = 0
        self._error: PayloadError | None = None
        self._finished = False

    def open(self, sealed: _Buffer, *, final: bool) -> list[bytes]:
        """The plaintext of each chunk of ``sealed``, all authenticated.

        Raises:
            PayloadError: a chunk fails to open, is misplaced (a final chunk followed by
                more, or no final chunk at the end), truncated, or an empty final chunk;
                or the payload has no chunks at all.
            ValueError: a block after the final one, or a non-final block that is not
                whole sealed chunks.
        """
        if self._error is not None:
            raise PayloadError(str(self._error))
        view = memoryview(sealed).cast("B")
        n = len(view)
        if self._finished:
            raise ValueError("the payload's final block was already opened")
        if not final and (n == 0 or n % _ENC_CHUNK_SIZE):
            raise ValueError("a non-final block must be whole sealed chunks")
        self._finished = final
        try:
            return self._open(view, final=final)
        except PayloadError as e:
            self._error = e
            raise

    def _open(self, view: memoryview, *, final: bool) -> list[bytes]:
        n = len(view)
        if n == 0:
            raise PayloadError("age payload has no chunks" if not self._counter else "age payload truncated")
        out: list[bytes] = []
        pos = 0
        while pos < n:
            chunk = view[pos : pos + _ENC_CHUNK_SIZE]
            pos += len(chunk)
            index = self._counter
            self._counter += 1
            if len(chunk) < _TAG_SIZE:
                raise PayloadError(f"age payload chunk {index} truncated")
            plaintext, error = _open_chunk(self._aead, chunk, index, final and pos == n)
            if error is not None:
                raise error
            out.append(plaintext)
        return out


# --- encryption -----------------------------------------------------------------------


class EncryptWriter:
    """Writes an age file to ``dst``: the header at once, then the payload in chunks.

    ``close()`` must be called (or the ``with`` block left normally): it seals the
    final chunk, without which the file does not decrypt. Leaving a ``with`` block by
    an exception deliberately does *not* seal it, so a half-written plaintext can
    never pass for a complete one.
    """

    __slots__ = ("_aead", "_closed", "_counter", "_dst", "_held", "_written")

    def __init__(self, dst: SupportsWrite, recipients: Sequence[X25519Recipient]) -> None:
        self._setup(
            dst,
            recipients,
            file_key=nacl.utils.random(_FILE_KEY_SIZE),
            ephemeral_secrets=[nacl.utils.random(_KEY_SIZE) for _ in recipients],
            payload_nonce=nacl.utils.random(_NONCE_SIZE),
        )

    @classmethod
    def _from_parts(
        cls,
        dst: SupportsWrite,
        recipients: Sequence[X25519Recipient],
        *,
        file_key: bytes,
        ephemeral_secrets: Sequence[bytes],
        payload_nonce: bytes,
    ) -> Self:
        self = cls.__new__(cls)
        self._setup(
            dst,
            recipients,
            file_key=file_key,
            ephemeral_secrets=ephemeral_secrets,
            payload_nonce=payload_nonce,
        )
        return self

    def _setup(
        self,
        dst: SupportsWrite,
        recipients: Sequence[X25519Recipient],
        *,
        file_key: bytes,
        ephemeral_secrets: Sequence[bytes],
        payload_nonce: bytes,
    ) -> None:
        head, sealer = _start_encryption(
            recipients, file_key=file_key, ephemeral_secrets=ephemeral_secrets, payload_nonce=payload_nonce
        )
        self._dst = dst
        self._written = 0
        self._counter = 0
        self._held: bytes | bytearray = b""
        self._closed = False
        self._emit(head)
        self._aead = sealer._aead  # noqa: SLF001 (same module)

    @property
    def bytes_written(self) -> int:
        """Ciphertext bytes written to ``dst`` so far, header included."""
        return self._written

    def _emit(self, data: bytes) -> None:
        _write_all(self._dst, data)
        self._written += len(data)

    def _seal(self, plaintext: bytes, *, last: bool) -> None:
        self._emit(self._aead.encrypt(_stream_nonce(self._counter, last=last), plaintext, None))
        self._counter += 1

    def _copy_from(self, source: _Source) -> None:
        """Encrypt all of ``source`` and close, sealing chunks on worker threads."""
        if self._closed or self._held or self._counter:
            raise ValueError("_copy_from needs a fresh EncryptWriter")
        self._closed = True
        with _Pipeline(self._dst, _seal_chunk, self._aead) as pipe:
            plaintext = source.read_full(CHUNK_SIZE)
            last = False
            while not last:
                following = source.read_full(CHUNK_SIZE) if len(plaintext) == CHUNK_SIZE else b""
                last = not following
                pipe.push(plaintext, self._counter, last=last)
                self._counter += 1
                plaintext = following
            pipe.finish()
        self._written += pipe.written

    def write(self, data: bytes | bytearray | memoryview) -> int:
        # Invariant: ``_held`` keeps 1..CHUNK_SIZE plaintext bytes back (none only
        # before the first write), because a chunk can only be sealed once we know
        # whether it is the last: a full final chunk is sealed as final, and the final
        # chunk is never empty unless the whole payload is (spec "Payload").
        if self._closed:
            raise ValueError("write to a closed EncryptWriter")
        mv = memoryview(data)
        if mv.itemsize != 1 or mv.ndim != 1:
            mv = mv.cast("B")
        n = mv.nbytes
        if not n:
            return 0
        pos = 0
        held = self._held
        if held:
            room = CHUNK_SIZE - len(held)
            if n <= room:
                if not isinstance(held, bytearray):
                    held = bytearray(held)
                held += mv
                self._held = held
                return n
            if room:
                if not isinstance(held, bytearray):
                    held = bytearray(held)
                held += mv[:room]
            self._seal(bytes(held), last=False)
            pos = room
        end = n - CHUNK_SIZE
        while pos < end:
            self._seal(bytes(mv[pos : pos + CHUNK_SIZE]), last=False)
            pos += CHUNK_SIZE
        # Holding the caller's bytes object itself costs no copy (it is immutable).
        self._held = data if pos == 0 and type(data) is bytes else bytes(mv[pos:])
        return n

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._seal(bytes(self._held), last=True)
        self._held = b""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._closed = True  # abandoned: no final chunk, the file will not decrypt


# --- decryption -----------------------------------------------------------------------


class DecryptReader:
    """Reads the plaintext of an age file from ``src``.

    Construction parses the header, unwraps the file key and checks the header MAC,
    so a reader that exists belongs to a file we can open. Each chunk is
    authenticated before any of its bytes are returned; truncation, a missing or
    misplaced final chunk and trailing data raise :class:`PayloadError`, after every
    byte verified before the failure has been returned.
    """

    __slots__ = (
        "_aead",
        "_counter",
        "_done",
        "_error",
        "_next",
        "_out",
        "_out_pos",
        "_source",
        "header",
    )

    header: bytes
    """The raw header, MAC line included (the payload nonce is not part of it)."""

    def __init__(self, src: SupportsRead, identities: Sequence[X25519Identity]) -> None:
        if not identities:
            raise ValueError("at least one identity is required")
        self._source = _Source(src)
        self.header, self._aead = _read_payload_key(self._source, identities)
        self._counter = 0
        self._done = False
        self._error: PayloadError | None = None
        self._out = b""
        self._out_pos = 0
        # Read-ahead: a chunk is the last one iff nothing follows it.
        self._next = self._source.read_full(_ENC_CHUNK_SIZE)

    def _next_chunk(self) -> bytes | None:
        """The next verified plaintext chunk, or None after the final one."""
        if self._error is not None:
            raise PayloadError(str(self._error))
        if self._done:
            return None
        try:
            sealed, index, last = self._take_sealed()
            plaintext, self._error = _open_chunk(self._aead, sealed, index, last)
        except PayloadError as e:
            self._error = e
            raise
        return plaintext

    def _take_sealed(self) -> tuple[bytes, int, bool]:
        """Next sealed chunk, its index, and whether the input ends after it."""
        sealed = self._next
        if len(sealed) == _ENC_CHUNK_SIZE:
            self._next = self._source.read_full(_ENC_CHUNK_SIZE)
            last = not self._next
        else:
            self._next = b""
            last = True  # a short chunk can only be the final one
        index = self._counter
        if not sealed:
            raise PayloadError("age payload has no chunks")
        if len(sealed) < _TAG_SIZE:
            raise PayloadError(f"age payload chunk {index} truncated")
        self._counter += 1
        self._done = last
        return sealed, index, last

    def _copy_to(self, dst: SupportsWrite) -> int:
        """Decrypt the rest of the payload into ``dst``, chunks opened on worker threads.

        Chunks are written strictly in order and only once opened, and the first
        failure stops the copy after every earlier chunk has been written, exactly as
        the one-chunk-at-a-time path would.
        """
        try:
            with _Pipeline(dst, _open_chunk, self._aead) as pipe:
                try:
                    while not self._done:
                        sealed, index, last = self._take_sealed()
                        pipe.push(sealed, index, last=last)
                finally:
                    # After a framing error, the chunks before it are still written
                    # (or the first of their own errors wins); after a decryption
                    # error the pipeline is stopped and this writes nothing more.
                    pipe.finish()
        except PayloadError as e:
            self._error = e
            raise
        return pipe.written

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all if negative); fewer only at end of file or before an error.

        Bytes verified before a :class:`PayloadError` are returned first; the error is
        raised by the next call, so a caller sees every authenticated byte.
        """
        parts: list[bytes] = []
        want = n if n >= 0 else -1
        try:
            while want:
                avail = len(self._out) - self._out_pos
                if not avail:
                    chunk = self._next_chunk()
                    if chunk is None:
                        break
                    self._out, self._out_pos = chunk, 0
                    continue
                take = avail if want < 0 else min(want, avail)
                if self._out_pos == 0 and take == avail:
                    parts.append(self._out)  # a whole chunk: no copy
                    self._out = b""
                else:
                    parts.append(self._out[self._out_pos : self._out_pos + take])
                    self._out_pos += take
                if want > 0:
                    want -= take
        except PayloadError:
            if not parts:
                raise
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def readinto(self, buffer: bytearray | memoryview) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


# --- convenience and sizes -------------------------------------------------------------


def encrypt(plaintext: bytes, recipients: Sequence[X25519Recipient]) -> bytes:
    """Encrypt a small in-memory plaintext; stream anything large instead."""
    out = io.BytesIO()
    with EncryptWriter(out, recipients) as w:
        w.write(plaintext)
    return out.getvalue()


def decrypt(ciphertext: bytes, identities: Sequence[X25519Identity]) -> bytes:
    """Decrypt a small in-memory age file; all of it is verified before returning."""
    reader = DecryptReader(io.BytesIO(ciphertext), identities)
    parts: list[bytes] = []
    while (chunk := reader._next_chunk()) is not None:  # noqa: SLF001 (same module)
        parts.append(chunk)
    return b"".join(parts)


def encrypt_stream(
    src: SupportsRead, dst: SupportsWrite, recipients: Sequence[X25519Recipient]
) -> int:
    """Encrypt ``src`` to ``dst``; return the ciphertext bytes written.

    Chunks are sealed on worker threads (see ``_Pipeline``); the output is identical
    to writing ``src`` through an :class:`EncryptWriter`.
    """
    w = EncryptWriter(dst, recipients)
    w._copy_from(_Source(src))  # noqa: SLF001 (same module)
    return w.bytes_written


def decrypt_stream(
    src: SupportsRead, dst: SupportsWrite, identities: Sequence[X25519Identity]
) -> int:
    """Decrypt ``src`` to ``dst``; return the plaintext bytes written.

    On :class:`PayloadError` ``dst`` already holds the verified chunks before the
    failure: the caller must discard it, since the plaintext is incomplete.
    """
    return DecryptReader(src, identities)._copy_to(dst)  # noqa: SLF001 (same module)


def header_size(n_recipients: int) -> int:
    """Exact header length, MAC line included, for ``n_recipients`` X25519 stanzas."""
    if n_recipients < 1:
        raise ValueError("at least one recipient is required")
    return _FIXED_HEADER_SIZE + n_recipients * _X25519_STANZA_SIZE


def ciphertext_size(plaintext_size: int, header_size: int) -> int:
    """Exact age file length: header, 16-byte nonce, and 16 bytes of tag per chunk."""
    if plaintext_size < 0 or header_size < 0:
        raise ValueError("sizes must be non-negative")
    chunks = max(1, -(-plaintext_size // CHUNK_SIZE))  # empty payload: one empty chunk
    return header_size + _NONCE_SIZE + plaintext_size + chunks * _TAG_SIZE
