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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Self, cast

import nacl.signing

from protocol import case, codec
from protocol.age import SupportsRead, SupportsWrite
from protocol.envelope import ID_SIZE, MAX_RECIPIENTS, EnvelopeHeader
from protocol.errors import BundleError, DecodeError, LimitError, NotARecipientError, PliError
from protocol.keys import CTX_BUNDLE, DEVICE_ID_SIZE, DevicePublic, device_id_of, sign, verify

__all__ = [
    "KINDS",
    "MAX_FILES",
    "BundleReader",
    "FileEntry",
    "FileReader",
    "Layout",
    "Manifest",
    "Sender",
    "bundle_layout",
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
_READ = 1 << 16  # the decrypted stream is read an age chunk at a time: DecryptReader hands it over uncopied
_ZEROS = bytes(_READ)

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


# --- writing ---------------------------------------------------------------------------

_CHANGED = "changed while it was being sent"


@dataclass(frozen=True)
class Layout:
    """The bundle's plaintext as ``write_bundle`` writes it, known before any file is read.

    ``parts`` alternates tar framing (``bytes``: headers, the manifest and its signature,
    block padding, the end-of-archive marker and record padding) and file data (the
    ``FileEntry`` whose ``size`` bytes go there, in manifest order); ``padding`` zero
    bytes follow, up to ``size``, the Padmé length. Everything but the files' bytes
    follows from the manifest, so a caller may lay the stream out in its own buffers.
    """

    parts: tuple[bytes | FileEntry, ...]
    padding: int
    size: int


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def _header_block(name: str, size: int) -> bytes:
    block: bytes = _tarinfo(name, size).tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
    return block


def bundle_layout(manifest_bytes: bytes, signature: bytes, files: Sequence[FileEntry]) -> Layout:
    """Lay out a bundle's plaintext (SPEC.md §6): the tar that ``tarfile`` writes in ``w|``
    pax mode, byte for byte, then the Padmé padding.

    ``files`` are the manifest's entries, in its order.
    """
    parts: list[bytes | FileEntry] = []
    framing = bytearray()
    for name, data in ((MEMBER_MANIFEST, manifest_bytes), (MEMBER_SIGNATURE, signature)):
        framing += _header_block(name, len(data)) + data + bytes(-len(data) % tarfile.BLOCKSIZE)
    total = 0
    for entry in files:
        framing += _header_block(FILES_DIR + entry.name, entry.size)
        parts += (bytes(framing), entry)
        total += len(framing) + entry.size
        framing[:] = bytes(-entry.size % tarfile.BLOCKSIZE)
    # End of archive (two zero blocks), then zeros to a whole record, as tarfile closes.
    framing += bytes(2 * tarfile.BLOCKSIZE)
    framing += bytes(-(total + len(framing)) % tarfile.RECORDSIZE)
    parts.append(bytes(framing))
    total += len(framing)
    size = padme(total)
    return Layout(parts=tuple(parts), padding=size - total, size=size)


class _HashingReader:
    """Reads ``entry.size`` bytes and checks them against the manifest hash at their end."""

    def __init__(self, src: SupportsRead, entry: FileEntry) -> None:
        self._src = src
        self._entry = entry
        self._h = hashlib.sha256()
        self._n = 0

    def read(self, n: int) -> bytes:
        data = self._src.read(min(n, self._entry.size - self._n))
        self._h.update(data)
        self._n += len(data)
        return data

    def check(self) -> None:
        if self._n != self._entry.size or not hmac.compare_digest(self._h.digest(), self._entry.sha256):
            raise BundleError(f"file {self._entry.name!r} {_CHANGED}")


def write_bundle(
    dst: SupportsWrite,
    manifest_bytes: bytes,
    signature: bytes,
    files: Iterable[tuple[FileEntry, SupportsRead]],
) -> int:
    """Write the bundle's tar and padding to ``dst`` (usually an age EncryptWriter).

    Streams: memory stays flat whatever the files' sizes. Returns the plaintext size.
    The bytes are ``bundle_layout``'s; file data goes to ``dst`` in large writes. Each
    file is hashed again as it is written. (``client.core`` lays the stream out itself
    from ``bundle_layout``, and checks instead that each file kept the identity, size
    and times it had when hashed.)

    Raises:
        BundleError: a file's bytes no longer match its manifest entry.
    """
    pairs = list(files)
    layout = bundle_layout(manifest_bytes, signature, [entry for entry, _ in pairs])
    sources = iter(pairs)
    for part in layout.parts:
        if isinstance(part, bytes):
            dst.write(part)
            continue
        entry, src = next(sources)
        reader = _HashingReader(src, entry)
        left = entry.size
        while left:
            data = reader.read(min(left, _BIG_COPY))
            if not data:
                break
            dst.write(data)
            left -= len(data)
        reader.check()
    pad = layout.padding
    zeros = bytes(min(pad, _COPY))
    while pad:
        n = min(pad, len(zeros))
        dst.write(zeros[:n])
        pad -= n
    return layout.size


# --- reading ---------------------------------------------------------------------------


class _Source:
    """The decrypted stream, taken in the pieces its reader returns (one age chunk each
    from ``DecryptReader``), so file data can be handed on without copies."""

    def __init__(self, src: SupportsRead) -> None:
        self._src = src
        self._buf = b""
        self._pos = 0
        self._eof = False
        self.offset = 0  # stream position of the next byte

    def view(self, n: int) -> memoryview | None:
        """Up to ``n`` (> 0) bytes of the current piece, uncopied; None at the end."""
        if self._pos == len(self._buf):
            if self._eof:
                return None
            data = self._src.read(_READ)
            if not data:
                self._eof = True
                return None
            self._buf = data if type(data) is bytes else bytes(data)
            self._pos = 0
        take = min(n, len(self._buf) - self._pos)
        view = memoryview(self._buf)[self._pos : self._pos + take]
        self._pos += take
        self.offset += take
        return view

    def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes, or fewer at the end of the stream."""
        parts: list[memoryview] = []
        while n > 0 and (view := self.view(n)) is not None:
            parts.append(view)
            n -= len(view)
        return b"".join(parts)

    def skip(self, n: int) -> None:
        while n > 0 and (view := self.view(n)) is not None:
            n -= len(view)


class _TarInfo(tarfile.TarInfo):
    """tarfile's header parsing, with extended headers bounded before their data is read.

    tarfile reads an extended header's data (types ``x``, ``g``, ``L``, ``K``) into memory
    in one piece, before the manifest's signature can be checked: a hostile sender could
    declare gigabytes there, or chain headers without end. Each header block is checked
    as it is parsed, before anything it announces is read.
    """

    MAX_EXTENDED = 64 * 1024
    MAX_BLOCKS = 8  # header blocks for one member: pax, GNU long name and link, the header

    @classmethod
    def fromtarfile(cls, tarfile: tarfile.TarFile) -> Self:
        headers = cast("_Headers", tarfile)
        headers.blocks += 1
        if headers.blocks > cls.MAX_BLOCKS:
            raise LimitError(f"bundle container: over {cls.MAX_BLOCKS} header blocks for one member")
        return super().fromtarfile(tarfile)

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Self:
        info = super().frombuf(buf, encoding, errors)
        if info.size < 0:  # a base-256 size field with its sign bit set
            raise BundleError(f"bundle container: a tar header with a negative size ({info.size})")
        if info.type in _REFUSED_TYPES:
            # Never written by a Pli sender, and each makes tarfile keep or read more than a
            # member's header budget (global pax records for the whole archive, old GNU
            # sparse maps, Solaris extended headers).
            raise BundleError(f"bundle container: tar header type {info.type!r} is not allowed")
        if info.type in _EXTENDED_TYPES and info.size > cls.MAX_EXTENDED:
            raise LimitError(f"bundle container: an extended tar header of {info.size} bytes")
        return info


_EXTENDED_TYPES = (tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
_REFUSED_TYPES = (tarfile.XGLTYPE, tarfile.GNUTYPE_SPARSE, tarfile.SOLARIS_XHDTYPE)
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)


class _Headers:
    """What ``TarInfo.fromtarfile`` uses of a TarFile: the stream (as ``fileobj``), the
    text codec and the pax global headers. It reads nothing but headers: member data
    goes through ``_Source`` directly, in the pieces it was decrypted in."""

    encoding = tarfile.ENCODING
    errors = "surrogateescape"

    # What one member's headers may take: its header blocks, and extended data for a pax
    # header, a GNU long name and a GNU long link name (old GNU sparse maps count too).
    MAX_BYTES = _TarInfo.MAX_BLOCKS * tarfile.BLOCKSIZE + 3 * _TarInfo.MAX_EXTENDED

    def __init__(self, source: _Source) -> None:
        self._source = source
        self.fileobj = self
        self.offset = 0
        self.pax_headers: dict[str, str] = {}
        self.blocks = 0
        self._budget = 0
        self.seen: list[bytes] | None = None  # the bytes read, when asked to keep them

    def read(self, n: int) -> bytes:
        if n < 0 or n > self._budget:
            raise LimitError(f"bundle container: a member's tar headers take over {self.MAX_BYTES} bytes")
        self._budget -= n
        data = self._source.read(n)
        if self.seen is not None:
            self.seen.append(data)
        return data

    def tell(self) -> int:
        return self._source.offset

    def next(self) -> tarfile.TarInfo | None:
        """The next member's header, pax and GNU records applied; None where tarfile's
        stream mode would end the archive (a zero, invalid or cut header block).

        Raises:
            BundleError: a malformed extended record.
            LimitError: an extended header over ``MAX_EXTENDED`` bytes, or too many.
        """
        self.blocks = 0
        self._budget = self.MAX_BYTES
        try:
            return _TarInfo.fromtarfile(cast("tarfile.TarFile", self))
        except tarfile.HeaderError:  # also an extended header followed by no valid one
            return None
        except PliError:
            raise
        except Exception as e:  # whatever tarfile raises on a malformed record: a bundle error
            raise BundleError(f"bundle container: {type(e).__name__}: {e}") from e


def _is_zero(data: bytes | memoryview) -> bool:
    n = len(data)
    return bytes(data) == (_ZEROS if n == _READ else bytes(n))


def _is_file(info: tarfile.TarInfo | None, name: str) -> bool:
    return info is not None and info.name == name and info.type in _FILE_TYPES and info.sparse is None


class FileReader:
    """One file's bytes from a bundle, checked against its signed size and SHA-256.

    ``read`` gives bytes, ``chunks`` read-only views of the decrypted stream (no copies);
    either way the check comes at the file's end, after its last bytes: a caller must
    not use them before the whole bundle checked out (``BundleReader.finish``).
    """

    def __init__(self, source: _Source, entry: FileEntry) -> None:
        self._src = source
        self._entry = entry
        self._left = entry.size
        self._h = hashlib.sha256()
        self._checked = False

    def _take(self, n: int) -> memoryview:
        view = self._src.view(min(n, self._left))
        if view is None:
            raise BundleError(f"file {self._entry.name!r} is cut short")
        self._h.update(view)
        self._left -= len(view)
        return view

    def _check(self) -> None:
        if not self._checked:
            self._checked = True
            if self._left or not hmac.compare_digest(self._h.digest(), self._entry.sha256):
                raise BundleError(f"file {self._entry.name!r} does not match the sender's signed hash")

    def read(self, n: int, /) -> bytes:
        """Up to ``n`` bytes (``SupportsRead``); ``b""`` once all were read and checked.

        Raises:
            BundleError: the file is cut short, or (after its last byte) its hash differs.
        """
        want = min(n, self._left)
        parts: list[memoryview] = []
        while want > 0:
            parts.append(self._take(want))
            want -= len(parts[-1])
        if not parts:
            self._check()
            return b""
        return parts[0].tobytes() if len(parts) == 1 else b"".join(parts)

    def chunks(self) -> Iterator[memoryview]:
        """The rest of the file, piece by piece as decrypted, then the check.

        Raises:
            BundleError: as ``read``.
        """
        while self._left:
            yield self._take(_READ)
        self._check()

    def drain(self) -> None:
        while self._left:
            self._take(_READ)
        self._check()


class BundleReader:
    """Reads a decrypted bundle as a stream: verify first, then release files.

    On construction it reads the manifest and its signature, verifies the signature
    with the *expected* sender's key (the device the relay authenticated as the
    envelope's sender), and only then decodes the manifest and checks it against the
    envelope: same envelope id, same recipients, this device among them (or the sender
    rereading). ``files()`` yields each file as a ``FileReader`` that checks size and
    SHA-256 at its end; ``finish()`` checks nothing follows and reads the padding to the
    end, so the age stream is authenticated through its final chunk.

    Tar headers are parsed by ``tarfile`` (any pax or GNU framing of regular members is
    accepted, SPEC.md §6); member data is read here, in the stream's own pieces.
    """

    def __init__(
        self,
        plaintext: SupportsRead,
        *,
        sender: DevicePublic,
        envelope: EnvelopeHeader,
        me: bytes,
    ) -> None:
        self._src = _Source(plaintext)
        self._tar = _Headers(self._src)
        raw = self._member(MEMBER_MANIFEST, max_size=MAX_MANIFEST)
        sig = self._member(MEMBER_SIGNATURE, max_size=64)
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
        if info is None or not _is_file(info, name):
            raise BundleError(f"bundle member {name!r} expected")
        if info.size > max_size:
            raise LimitError(f"bundle member {name!r} over {max_size} bytes")
        data = self._src.read(info.size)
        if len(data) != info.size:
            raise BundleError(f"bundle member {name!r} is truncated")
        self._src.skip(-info.size % tarfile.BLOCKSIZE)
        return data

    def files(self) -> Iterator[tuple[FileEntry, FileReader]]:
        """Yield each file with its reader; a file left unread is read and checked anyway."""
        for entry in self.manifest.files:
            info = self._tar.next()
            if not _is_file(info, FILES_DIR + entry.name):
                raise BundleError(f"bundle member for {entry.name!r} missing or out of order")
            if entry.size != cast("tarfile.TarInfo", info).size:
                raise BundleError(f"file {entry.name!r} has another size than signed")
            reader = FileReader(self._src, entry)
            yield entry, reader
            reader.drain()
            self._src.skip(-entry.size % tarfile.BLOCKSIZE)

    def finish(self) -> None:
        """Refuse anything after the last file; read the zero padding to the age stream's end.

        Raises:
            BundleError: an extra member or non-zero padding.
            DecryptError: (from the age reader) the stream was cut or altered.
        """
        # The end-of-archive marker, the record padding and the Padmé padding must all be
        # zero (SPEC.md §6, step 4), and the marker's two blocks must be there.
        self._tar.seen = []
        extra = self._tar.next()
        if extra is not None:
            raise BundleError(f"unexpected bundle member {extra.name!r}")
        zeros = 0
        for data in self._tar.seen:
            if not _is_zero(data):
                raise BundleError("bundle padding is not zero (data after the last member)")
            zeros += len(data)
        while (view := self._src.view(_READ)) is not None:
            if not _is_zero(view):
                raise BundleError("bundle padding is not zero")
            zeros += len(view)
        if zeros < 2 * tarfile.BLOCKSIZE:
            raise BundleError("bundle container has no end-of-archive marker")
