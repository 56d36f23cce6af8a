"""Bundle v1: what is inside an envelope's encryption (SPEC.md §6).

A bundle is a POSIX tar (pax format, deterministic) so that
``age -d -i key envelope.age | tar x`` recovers everything with standard tools,
twenty years from now, without Pli. Its members, in this order and no others:

1. ``pli/manifest``      canonical msgpack: ids, kind, sender, recipients, files, body
2. ``pli/manifest.sig``  64 bytes: Ed25519 by the sender over
                         "pli/bundle/v1" || 0x00 || manifest bytes
3. ``files/<name>``      each file listed in the manifest, in manifest order

then zero bytes up to the Padmé length, so the ciphertext size leaks little.

The signature sits inside the encryption and covers the sender's keys, every
recipient device id, the envelope and case ids and the time: a recipient cannot
re-encrypt a signed bundle to a third party and pass it off as sent to them.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import tarfile
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import nacl.signing

from protocol import case, codec
from protocol.age import SupportsRead, SupportsWrite
from protocol.envelope import ID_SIZE, MAX_RECIPIENTS, EnvelopeHeader
from protocol.errors import BundleError, DecodeError, LimitError, NotARecipientError
from protocol.keys import CTX_BUNDLE, DEVICE_ID_SIZE, DevicePublic, device_id_of, sign, verify

__all__ = [
    "KINDS",
    "MAX_FILES",
    "BundleReader",
    "FileEntry",
    "Manifest",
    "Sender",
    "padme",
    "sign_manifest",
    "write_bundle",
]

KINDS = tuple(sorted(case.KINDS))
VERSION = 2  # manifest version: 2 carries the téléexpertise case model (protocol/case.py)
MAX_FILES = 256
MAX_MANIFEST = 1 << 20
MAX_TEXT = 256 * 1024
MAX_NAME = 255
MIN_PADDED = 4096
_COPY = 1 << 16
_BIG_COPY = 1 << 20  # file data moves in 1 MiB reads and writes
_TAR_READ = 1 << 15  # tarfile's stream reads, instead of its 10 KiB records

MEMBER_MANIFEST = "pli/manifest"
MEMBER_SIGNATURE = "pli/manifest.sig"
FILES_DIR = "files/"

_MEDIA_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,63}")
# Also what Windows refuses or reads as a drive or a stream (":"): the files are opened
# on practitioners' machines, many of them Windows.
_BAD_NAME_CHARS = re.compile(r'[\x00-\x1f\x7f/\\:<>"|?*]')
_WINDOWS_RESERVED = re.compile(r"(?i)(con|prn|aux|nul|com[1-9]|lpt[1-9])(\..*)?")

_MANIFEST_LIMITS = codec.Limits(
    max_size=MAX_MANIFEST, max_str=MAX_TEXT, max_bin=64, max_array=MAX_FILES, max_map=MAX_FILES
)


def padme(length: int) -> int:
    """Padmé padding (Nikitin et al., PETS 2019): leaks O(log log L) bits of the size.

    Sizes under ``MIN_PADDED`` all pad to ``MIN_PADDED``.
    """
    length = max(length, MIN_PADDED)
    e = length.bit_length() - 1
    s = e.bit_length()
    mask = (1 << (e - s)) - 1
    return (length + mask) & ~mask


def check_file_name(name: str) -> None:
    """Refuse a name that could escape the destination folder or confuse a person.

    Raises:
        DecodeError: the name is empty, too long, ``.``/``..``, ends in a dot, is a
            Windows device name, or holds a slash, a backslash, one of ``:<>"|?*`` or a
            control character.
    """
    if not name or name in {".", ".."} or name != name.strip() or name.endswith("."):
        raise DecodeError(f"file name {name!r} is not allowed")
    if _WINDOWS_RESERVED.fullmatch(name):
        raise DecodeError(f"file name {name!r} is a Windows device name")
    if len(name.encode("utf-8")) > MAX_NAME:
        raise LimitError(f"file name over {MAX_NAME} bytes")
    if _BAD_NAME_CHARS.search(name):
        raise DecodeError(f"file name {name!r} holds a character not allowed in file names")


@dataclass(frozen=True)
class FileEntry:
    """One attached file as the manifest lists it."""

    name: str
    media_type: str
    size: int
    sha256: bytes

    def __post_init__(self) -> None:
        check_file_name(self.name)
        if not _MEDIA_TYPE.fullmatch(self.media_type):
            raise DecodeError(f"media type {self.media_type!r} is not valid")
        if self.size < 0 or len(self.sha256) != 32:
            raise DecodeError("file entry: bad size or hash")

    def to_obj(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.media_type, "size": self.size, "sha256": self.sha256}

    @classmethod
    def from_obj(cls, obj: object) -> FileEntry:
        r = codec.MapReader(obj, "manifest file")
        e = cls(
            name=r.str_("name", max_len=MAX_NAME),
            media_type=r.str_("type", max_len=128),
            size=r.int_("size"),
            sha256=r.bytes_("sha256", size=32),
        )
        r.done()
        return e


@dataclass(frozen=True)
class Sender:
    """The sending device's keys and the practitioner it speaks for (checked by the recipient
    against the relay's directory and its own pins, not trusted from here alone)."""

    sign_key: bytes
    enc_key: bytes
    rpps: str
    name: str

    @property
    def device_id(self) -> bytes:
        return device_id_of(self.sign_key)

    def to_obj(self) -> dict[str, Any]:
        return {"sign_key": self.sign_key, "enc_key": self.enc_key, "rpps": self.rpps, "name": self.name}

    @classmethod
    def from_obj(cls, obj: object) -> Sender:
        r = codec.MapReader(obj, "manifest sender")
        s = cls(
            sign_key=r.bytes_("sign_key", size=32),
            enc_key=r.bytes_("enc_key", size=32),
            rpps=r.str_("rpps", max_len=16),
            name=r.str_("name", max_len=256),
        )
        r.done()
        return s


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """The signed description of a bundle. Its invariants are checked at construction."""

    kind: str
    case_id: bytes
    envelope_id: bytes
    created: int
    sender: Sender
    recipients: tuple[bytes, ...]
    files: tuple[FileEntry, ...]
    body: dict[str, Any] = field(hash=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DecodeError(f"unknown bundle kind {self.kind!r}")
        if len(self.case_id) != ID_SIZE or len(self.envelope_id) != ID_SIZE:
            raise DecodeError("case and envelope ids are 16 bytes")
        if len(self.recipients) > MAX_RECIPIENTS:
            raise LimitError(f"over {MAX_RECIPIENTS} recipients")
        if not self.recipients or any(len(r) != DEVICE_ID_SIZE for r in self.recipients):
            raise DecodeError("manifest recipients must be 16-byte device ids")
        if len(set(self.recipients)) != len(self.recipients):
            raise DecodeError("a recipient is listed twice")
        if len(self.files) > MAX_FILES:
            raise LimitError(f"over {MAX_FILES} files")
        # NFC then case-folded: "É" typed on one system and "É" (E + accent) on another are
        # one name on most file systems.
        names = [unicodedata.normalize("NFC", f.name).casefold() for f in self.files]
        if len(set(names)) != len(names):
            raise DecodeError("two files have the same name")
        if not isinstance(self.body, dict):
            raise DecodeError("manifest body must be a map")
        case.check_body(
            self.kind, self.body, sender_rpps=self.sender.rpps,
            files={f.name: f.media_type for f in self.files},
        )

    def to_bytes(self) -> bytes:
        return codec.encode(
            {
                "v": VERSION,
                "kind": self.kind,
                "case": self.case_id,
                "envelope": self.envelope_id,
                "created": self.created,
                "sender": self.sender.to_obj(),
                "recipients": list(self.recipients),
                "files": [f.to_obj() for f in self.files],
                "body": self.body,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Decode manifest bytes; call only on bytes whose signature was verified.

        Raises:
            DecodeError, LimitError, VersionError: not a valid v2 manifest.
        """
        r = codec.MapReader(codec.decode(data, limits=_MANIFEST_LIMITS), "manifest")
        codec.expect_version(r, (VERSION,))
        recipients = r.list_("recipients", max_items=MAX_RECIPIENTS)
        if not all(isinstance(x, bytes) for x in recipients):
            raise DecodeError("manifest recipients must be byte strings")
        body = r.raw("body")
        if not isinstance(body, dict):
            raise DecodeError("manifest body must be a map")
        m = cls(
            kind=r.str_("kind", max_len=32),
            case_id=r.bytes_("case", size=ID_SIZE),
            envelope_id=r.bytes_("envelope", size=ID_SIZE),
            created=r.int_("created"),
            sender=Sender.from_obj(r.raw("sender")),
            recipients=tuple(recipients),
            files=tuple(FileEntry.from_obj(f) for f in r.list_("files", max_items=MAX_FILES)),
            body=body,
        )
        r.done()
        return m


def sign_manifest(manifest: Manifest, key: nacl.signing.SigningKey) -> tuple[bytes, bytes]:
    """Return the manifest bytes and the sender's signature over them."""
    if bytes(key.verify_key) != manifest.sender.sign_key:
        raise BundleError("the manifest names another sender than the signing key")
    raw = manifest.to_bytes()
    return raw, sign(key, CTX_BUNDLE, raw)


class _Counter:
    """Counts what tarfile writes, so padding can follow without knowing sizes ahead."""

    def __init__(self, dst: SupportsWrite) -> None:
        self.dst = dst
        self.count = 0

    def write(self, data: bytes) -> int:
        self.dst.write(data)
        self.count += len(data)
        return len(data)


class _HashingReader:
    """Reads exactly ``entry.size`` bytes and checks them against the manifest hash.

    On the sending side this catches a file that changed between hashing and sending;
    on the receiving side, a file that does not match what the sender signed.
    """

    def __init__(self, src: SupportsRead, entry: FileEntry, what: str) -> None:
        self._src = src
        self._entry = entry
        self._what = what
        self._h = hashlib.sha256()
        self._n = 0
        self._checked = False

    def read(self, n: int = -1) -> bytes:
        want = self._entry.size - self._n if n < 0 else min(n, self._entry.size - self._n)
        try:
            data = self._src.read(want) if want > 0 else b""
        except tarfile.TarError as e:  # the container ends inside this member
            raise BundleError(f"file {self._entry.name!r} is cut short: {e}") from e
        self._h.update(data)
        self._n += len(data)
        # A short read means the source ended early: refuse it here, before tarfile
        # reports it as a bare OSError ("unexpected end of data").
        if (not data or len(data) < want) and not self._checked:
            self._check()
        return data

    def _check(self) -> None:
        self._checked = True
        if self._n != self._entry.size or not hmac.compare_digest(
            self._h.digest(), self._entry.sha256
        ):
            raise BundleError(f"file {self._entry.name!r} {self._what}")

    def drain(self) -> None:
        while self.read(_COPY):
            pass
        if not self._checked:
            self._check()


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def write_bundle(
    dst: SupportsWrite,
    manifest_bytes: bytes,
    signature: bytes,
    files: Iterable[tuple[FileEntry, SupportsRead]],
) -> int:
    """Write the bundle's tar and padding to ``dst`` (usually an age EncryptWriter).

    Streams: memory stays flat whatever the files' sizes. Returns the plaintext size.
    The tar is the one ``tarfile`` writes in ``w|`` pax mode, byte for byte; it is
    framed here so that file data goes to ``dst`` in large writes, not 10 KiB records.

    Raises:
        BundleError: a file's bytes no longer match its manifest entry.
    """
    counter = _Counter(dst)
    _tar_member(counter, MEMBER_MANIFEST, len(manifest_bytes), _BytesReader(manifest_bytes))
    _tar_member(counter, MEMBER_SIGNATURE, len(signature), _BytesReader(signature))
    for entry, src in files:
        reader = _HashingReader(src, entry, "changed while it was being sent")
        _tar_member(counter, FILES_DIR + entry.name, entry.size, reader)
        reader.drain()
    # End of archive (two zero blocks), then zeros to a whole record, as tarfile closes.
    counter.write(bytes(2 * tarfile.BLOCKSIZE))
    if rest := counter.count % tarfile.RECORDSIZE:
        counter.write(bytes(tarfile.RECORDSIZE - rest))
    total = counter.count
    pad = padme(total) - total
    zeros = bytes(min(pad, _COPY))
    while pad:
        n = min(pad, len(zeros))
        dst.write(zeros[:n])
        pad -= n
    return padme(total)


def _tar_member(out: _Counter, name: str, size: int, src: SupportsRead) -> None:
    """One member as ``TarFile.addfile`` writes it: header, data, zeros to a whole block."""
    out.write(_tarinfo(name, size).tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape"))
    left = size
    while left:
        want = min(left, _BIG_COPY)
        data = src.read(want)
        if len(data) != want:
            raise OSError("unexpected end of data")  # as tarfile.copyfileobj says it
        out.write(data)
        left -= want
    if rest := size % tarfile.BLOCKSIZE:
        out.write(bytes(tarfile.BLOCKSIZE - rest))


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else self._pos + n
        chunk = self._data[self._pos : end]
        self._pos += len(chunk)
        return chunk


class _HeaderGuard:
    """Refuses an oversized pax or GNU extended header as it streams past, before tarfile.

    tarfile reads an extended header's data (types ``x``, ``g``, ``L``, ``K``) into memory
    in one piece, before the manifest's signature can be checked: a hostile sender could
    declare gigabytes there. This follows the 512-byte header blocks through the stream
    (each member's data is skipped by its declared size) and checks each one's type and
    size, so no more than ``MAX_EXTENDED`` bytes are ever read that way.
    """

    MAX_EXTENDED = 64 * 1024

    def __init__(self, src: SupportsRead) -> None:
        self._src = src
        self._pos = 0  # bytes read so far
        self._next = 0  # where the next header block starts
        self._block = bytearray()
        self._done = False  # past the end-of-archive marker: only padding follows

    def read(self, n: int = -1) -> bytes:
        data = self._src.read(n)
        if data and not self._done:
            self._scan(data)
        self._pos += len(data)
        return data

    def _scan(self, data: bytes) -> None:
        i = 0
        while i < len(data) and not self._done:
            at = self._pos + i
            if at < self._next:
                i += min(len(data) - i, self._next - at)
                continue
            take = data[i : i + 512 - len(self._block)]
            self._block += take
            i += len(take)
            if len(self._block) == 512:
                self._check(bytes(self._block))
                self._block.clear()

    def _check(self, block: bytes) -> None:
        if block.count(0) == len(block):
            self._done = True
            return
        field = block[124:136]
        try:
            size = (int.from_bytes(field[1:], "big") if field[0] & 0x80
                    else int(field.rstrip(b"\x00 ").decode("ascii") or "0", 8))
        except (UnicodeDecodeError, ValueError) as e:
            raise BundleError("bundle container: a tar header has a malformed size") from e
        if block[156:157] in (b"x", b"g", b"L", b"K") and size > self.MAX_EXTENDED:
            raise LimitError(f"bundle container: an extended tar header of {size} bytes")
        self._next = self._next + 512 + -(-size // 512) * 512


class _RecentReader:
    """Passes reads through, keeping the most recent bytes so the tar's tail can be checked.

    tarfile's stream mode buffers less than one read (``_TAR_READ``) ahead of what it
    has parsed, so keeping the last ``_KEEP`` bytes (at least) covers everything it read
    but did not use.
    """

    _KEEP = 4 * _TAR_READ

    def __init__(self, src: SupportsRead) -> None:
        self._src = src
        self._recent: list[bytes] = []
        self._kept = 0
        self.pos = 0  # bytes handed out so far

    def read(self, n: int = -1) -> bytes:
        data = self._src.read(n)
        if data:
            self._recent.append(data)
            self._kept += len(data)
            self.pos += len(data)
            while self._kept - len(self._recent[0]) >= self._KEEP:
                self._kept -= len(self._recent.pop(0))
        return data

    def check_zero_from(self, offset: int, *, at_least: int) -> None:
        """Check the bytes handed out from ``offset`` on are zero and number ``at_least``.

        Raises:
            BundleError: a non-zero byte, or the end-of-archive marker is missing.
        """
        tail = b"".join(self._recent)
        start = offset - (self.pos - len(tail))
        if start < 0:
            raise BundleError("bundle container: cannot check its end")
        rest = tail[start:]
        if rest.count(0) != len(rest):
            raise BundleError("bundle padding is not zero (data after the last member)")
        if len(rest) < at_least:
            more = self._src.read(at_least - len(rest))
            if len(rest) + len(more) < at_least or more.count(0) != len(more):
                raise BundleError("bundle container has no end-of-archive marker")


class BundleReader:
    """Reads a decrypted bundle as a stream: verify first, then release files.

    On construction it reads the manifest and its signature, verifies the signature
    with the *expected* sender's key (the device the relay authenticated as the
    envelope's sender), and only then decodes the manifest and checks it against the
    envelope: same envelope id, same recipients, this device among them (or the sender
    rereading). ``files()`` yields each file as a reader that checks size and SHA-256
    at its end; ``finish()`` checks nothing follows and reads the padding to the end,
    so the age stream is authenticated through its final chunk.
    """

    def __init__(
        self,
        plaintext: SupportsRead,
        *,
        sender: DevicePublic,
        envelope: EnvelopeHeader,
        me: bytes,
    ) -> None:
        self._src = _RecentReader(_HeaderGuard(plaintext))
        try:
            self._tar = tarfile.open(fileobj=self._src, mode="r|", bufsize=_TAR_READ)  # type: ignore[call-overload]  # noqa: SIM115 - lives as long as the reader
            raw = self._member(MEMBER_MANIFEST, max_size=MAX_MANIFEST)
            sig = self._member(MEMBER_SIGNATURE, max_size=64)
        except tarfile.TarError as e:
            raise BundleError(f"not a valid bundle container: {e}") from e
        verify(sender.verify_key, CTX_BUNDLE, raw, sig)
        m = Manifest.from_bytes(raw)
        if m.sender.sign_key != sender.sign_key or m.sender.enc_key != sender.enc_key:
            raise BundleError("the bundle names another sender than the envelope's")
        if m.envelope_id != envelope.id:
            raise BundleError("the bundle was signed for another envelope")
        if m.sender.device_id != envelope.sender:
            raise BundleError("the envelope was sent by another device than the bundle's signer")
        if set(m.recipients) != set(envelope.to):
            raise BundleError("the bundle's signed recipients differ from the envelope's")
        if me not in m.recipients and me != m.sender.device_id:
            raise NotARecipientError("this device is not among the bundle's signed recipients")
        self.manifest = m
        self.manifest_bytes = raw
        self.signature = sig

    def _member(self, name: str, *, max_size: int) -> bytes:
        info = self._tar.next()
        if info is None or info.name != name or not info.isreg():
            raise BundleError(f"bundle member {name!r} expected")
        if info.size > max_size:
            raise LimitError(f"bundle member {name!r} over {max_size} bytes")
        f = self._tar.extractfile(info)
        if f is None:
            raise BundleError(f"bundle member {name!r} unreadable")
        data: bytes = f.read()
        if len(data) != info.size:
            raise BundleError(f"bundle member {name!r} is truncated")
        return data

    def files(self) -> Iterator[tuple[FileEntry, SupportsRead]]:
        """Yield each file with a reader; read each to its end before the next."""
        for entry in self.manifest.files:
            try:
                info = self._tar.next()
            except tarfile.TarError as e:
                raise BundleError(f"bundle container broken before {entry.name!r}: {e}") from e
            if info is None or info.name != FILES_DIR + entry.name or not info.isreg():
                raise BundleError(f"bundle member for {entry.name!r} missing or out of order")
            if info.size != entry.size:
                raise BundleError(f"file {entry.name!r} has another size than signed")
            f = self._tar.extractfile(info)
            if f is None:
                raise BundleError(f"bundle member {entry.name!r} unreadable")
            reader = _HashingReader(f, entry, "does not match the sender's signed hash")
            yield entry, reader
            reader.drain()

    def finish(self) -> None:
        """Refuse anything after the last file; read the zero padding to the age stream's end.

        Raises:
            BundleError: an extra member or non-zero padding.
            DecryptError: (from the age reader) the stream was cut or altered.
        """
        try:
            extra = self._tar.next()
        except tarfile.TarError as e:
            raise BundleError(f"bundle container broken at its end: {e}") from e
        if extra is not None:
            raise BundleError(f"unexpected bundle member {extra.name!r}")
        # tarfile reads ahead and stops at the first block that is not a valid header
        # (zero or garbage), so check every byte from there: the end-of-archive marker,
        # the record padding and the Padme padding must all be zero (SPEC.md §6, step 4).
        self._src.check_zero_from(self._tar.offset, at_least=2 * tarfile.BLOCKSIZE)
        while True:
            chunk = self._src.read(_COPY)
            if not chunk:
                break
            if chunk.count(0) != len(chunk):
                raise BundleError("bundle padding is not zero")
