"""Tests of the fast bundle paths: age's block API, the bundle layout and reader, and the
client's pipelined encryption and decryption of real files (with their change checks).

The block paths must give the very bytes of the simple ones (EncryptWriter, DecryptReader,
write_bundle), refuse what they refuse, and the client must still refuse a file that
changed between hashing and sending, and never leave a half-opened bundle in a case folder.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client import core
from client.home import Home
from protocol import age, bundle
from protocol.bundle import BundleReader, FileEntry, Manifest, Sender, bundle_layout, sign_manifest, write_bundle
from protocol.envelope import EnvelopeHeader, seal_header
from protocol.errors import BundleError, DecodeError, LimitError, PayloadError
from protocol.keys import DeviceKeys
from tools.case_samples import request_body

CHUNK = age.CHUNK_SIZE
SEALED = CHUNK + 16
ALICE = age.X25519Identity.from_bytes(bytes(range(1, 33)))
PARTS = {"file_key": bytes(range(16)), "ephemeral_secrets": [b"\x01" * 32], "payload_nonce": bytes(range(100, 116))}
SENDER = DeviceKeys(sign_seed=b"\x11" * 32, enc_secret=b"\x22" * 32, created=1_767_225_600)
RECIPIENT = DeviceKeys(sign_seed=b"\x33" * 32, enc_secret=b"\x44" * 32, created=1_767_225_600)
ENVELOPE_ID = bytes(range(16))
LATER = time.time_ns() + 3600 * 10**9  # hashed "an hour from now": no file here looks recently changed


def _data(size: int, seed: bytes = b"pli") -> bytes:
    return hashlib.shake_256(seed + size.to_bytes(8, "big")).digest(size) if size else b""


def _reference(plaintext: bytes) -> bytes:
    out = io.BytesIO()
    with age.EncryptWriter._from_parts(out, [ALICE.recipient], **PARTS) as w:  # type: ignore[arg-type]
        w.write(plaintext)
    return out.getvalue()


def _sealed_in_blocks(plaintext: bytes, chunks_per_block: int) -> bytes:
    header, sealer = age._start_encryption([ALICE.recipient], **PARTS)  # type: ignore[arg-type]
    out = bytearray(header)
    block = chunks_per_block * CHUNK
    buf = bytearray(age.sealed_size(block))
    pos = 0
    while True:
        piece = plaintext[pos : pos + block]
        pos += len(piece)
        final = pos == len(plaintext)
        out += buf[: sealer.seal_into(piece, buf, final=final)]
        if final:
            return bytes(out)


def _opened_in_blocks(ciphertext: bytes, chunks_per_block: int) -> bytes:
    opener, start = age.start_decryption(ciphertext[: age.MAX_HEADER_SIZE + 16], [ALICE])
    out = []
    pos = start
    while True:
        piece = ciphertext[pos : pos + chunks_per_block * SEALED]
        pos += len(piece)
        final = pos == len(ciphertext)
        out += opener.open(memoryview(piece), final=final)
        if final:
            return b"".join(out)


# --- age: blocks -----------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 16 * CHUNK, 16 * CHUNK + 5, 40 * CHUNK])
@pytest.mark.parametrize("per_block", [1, 3, 16])
def test_blocks_give_the_bytes_of_the_writer_and_open_back(size: int, per_block: int) -> None:
    plaintext = _data(size)
    ciphertext = _sealed_in_blocks(plaintext, per_block)
    assert ciphertext == _reference(plaintext)
    assert len(ciphertext) == age.ciphertext_size(size, age.header_size(1))
    assert _opened_in_blocks(ciphertext, per_block) == plaintext


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 5 * CHUNK), st.integers(1, 4), st.integers(1, 4))
def test_blocks_round_trip_any_size_and_split(size: int, seal_per_block: int, open_per_block: int) -> None:
    plaintext = _data(size)
    ciphertext = _sealed_in_blocks(plaintext, seal_per_block)
    assert ciphertext == _reference(plaintext)
    assert _opened_in_blocks(ciphertext, open_per_block) == plaintext


def test_opener_refuses_what_the_reader_refuses() -> None:
    ct = _reference(_data(3 * CHUNK + 10))
    start = len(ct) - age.sealed_size(3 * CHUNK + 10)
    with pytest.raises(PayloadError, match="no final chunk"):  # cut after a whole chunk
        _opened_in_blocks(ct[: start + 2 * SEALED], 1)
    with pytest.raises(PayloadError, match="truncated"):  # cut inside the final chunk's tag
        _opened_in_blocks(ct[: start + 3 * SEALED + 15], 16)
    with pytest.raises(PayloadError, match="no chunks"):
        _opened_in_blocks(ct[:start], 16)
    whole = _reference(_data(2 * CHUNK))  # its last chunk is a full final one
    with pytest.raises(PayloadError, match="after its final chunk"):
        _opened_in_blocks(whole + whole[-SEALED:], 1)
    first, second = ct[start : start + SEALED], ct[start + SEALED : start + 2 * SEALED]
    swapped = ct[:start] + second + first + ct[start + 2 * SEALED :]
    with pytest.raises(PayloadError, match="chunk 0 failed"):
        _opened_in_blocks(swapped, 16)
    flipped = bytearray(ct)
    flipped[-1] ^= 1
    with pytest.raises(PayloadError, match="chunk 3 failed"):
        _opened_in_blocks(bytes(flipped), 2)
    empty_final = _reference(_data(CHUNK))[:-16] + _reference(b"")[-16:]
    with pytest.raises(PayloadError):
        _opened_in_blocks(empty_final, 1)


def test_block_api_misuse_is_a_caller_error() -> None:
    _, sealer = age.start_encryption([ALICE.recipient])
    out = bytearray(age.sealed_size(2 * CHUNK))
    with pytest.raises(ValueError, match="whole chunks"):
        sealer.seal_into(b"x", out, final=False)
    with pytest.raises(ValueError, match="too small"):
        sealer.seal_into(bytes(2 * CHUNK), bytearray(10), final=True)
    sealer.seal_into(bytes(CHUNK), out, final=False)
    with pytest.raises(ValueError, match="empty only"):
        sealer.seal_into(b"", out, final=True)
    sealer.seal_into(b"end", out, final=True)
    with pytest.raises(ValueError, match="already sealed"):
        sealer.seal_into(b"more", out, final=True)
    ct = _reference(_data(CHUNK + 1))
    opener, start = age.start_decryption(ct, [ALICE])
    with pytest.raises(ValueError, match="whole sealed chunks"):
        opener.open(ct[start : start + 100], final=False)
    opener.open(ct[start:], final=True)
    with pytest.raises(ValueError, match="already opened"):
        opener.open(ct[start:], final=True)
    with pytest.raises(DecodeError):
        age.start_decryption(ct[:50], [ALICE])
    with pytest.raises(ValueError, match="identity"):
        age.start_decryption(ct, [])


# --- bundle: layout and reader ------------------------------------------------------------


def _manifest(files: tuple[tuple[str, bytes], ...]) -> Manifest:
    pub = SENDER.public()
    return Manifest(
        kind="request", case_id=bytes(16), envelope_id=ENVELOPE_ID, created=1_767_261_600,
        sender=Sender(pub.sign_key, pub.enc_key, "10000005479", "Dr Test"), recipients=(RECIPIENT.device_id,),
        files=tuple(FileEntry(n, "application/octet-stream", len(d), hashlib.sha256(d).digest()) for n, d in files),
        body=request_body(),
    )


FILES = (("a.bin", _data(100_000)), ("é" * 60 + ".bin", _data(7)), ("empty", b""), ("b.bin", _data(3 * CHUNK)))


def test_layout_is_what_write_bundle_writes() -> None:
    m = _manifest(FILES)
    raw, sig = sign_manifest(m, SENDER.signing_key)
    out = io.BytesIO()
    size = write_bundle(out, raw, sig, [(e, io.BytesIO(d)) for e, (_, d) in zip(m.files, FILES, strict=True)])
    layout = bundle_layout(raw, sig, m.files)
    data = iter(d for _, d in FILES)
    laid = b"".join(p if isinstance(p, bytes) else next(data) for p in layout.parts) + bytes(layout.padding)
    assert laid == out.getvalue()
    assert layout.size == size == len(laid) == bundle.padme(size)
    names = [m.name for m in tarfile.open(fileobj=io.BytesIO(laid)).getmembers()]  # noqa: SIM115
    assert names == ["pli/manifest", "pli/manifest.sig", *("files/" + n for n, _ in FILES)]


def test_file_chunks_are_views_of_the_stream_and_checked_at_the_end() -> None:
    m = _manifest(FILES)
    raw, sig = sign_manifest(m, SENDER.signing_key)
    out = io.BytesIO()
    write_bundle(out, raw, sig, [(e, io.BytesIO(d)) for e, (_, d) in zip(m.files, FILES, strict=True)])
    header = EnvelopeHeader(id=ENVELOPE_ID, sender=SENDER.device_id, to=(RECIPIENT.device_id,), created=1,
                            expires=2, size=0, sha256=bytes(32))
    ciphertext = _reference(out.getvalue())
    reader = BundleReader(age.DecryptReader(io.BytesIO(ciphertext), [ALICE]), sender=SENDER.public(),
                          envelope=header, me=RECIPIENT.device_id)
    got = {}
    for entry, f in reader.files():
        pieces = list(f.chunks())
        assert all(isinstance(p, memoryview) and p.readonly and len(p) <= CHUNK for p in pieces)
        got[entry.name] = b"".join(pieces)
        assert f.read(10) == b""
    reader.finish()
    assert got == dict(FILES)


def _tar_with(member: tarfile.TarInfo, data: bytes, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    m = _manifest((("a.bin", data),))
    raw, sig = sign_manifest(m, SENDER.signing_key)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w|", format=fmt) as tar:
        tar.addfile(bundle._tarinfo("pli/manifest", len(raw)), io.BytesIO(raw))
        tar.addfile(bundle._tarinfo("pli/manifest.sig", len(sig)), io.BytesIO(sig))
        tar.addfile(member, io.BytesIO(data))
    return out.getvalue() + bytes(8192)


def _open_tar(plaintext: bytes) -> dict[str, bytes]:
    header = EnvelopeHeader(id=ENVELOPE_ID, sender=SENDER.device_id, to=(RECIPIENT.device_id,), created=1,
                            expires=2, size=0, sha256=bytes(32))
    reader = BundleReader(io.BytesIO(plaintext), sender=SENDER.public(), envelope=header, me=RECIPIENT.device_id)
    got = {entry.name: b"".join(f.chunks()) for entry, f in reader.files()}
    reader.finish()
    return got


def test_other_framings_of_a_regular_file_are_read() -> None:
    data = _data(2000)
    gnu = bundle._tarinfo("files/a.bin", len(data))
    assert _open_tar(_tar_with(gnu, data, tarfile.GNU_FORMAT)) == {"a.bin": data}
    old = bundle._tarinfo("files/a.bin", len(data))
    old.type = tarfile.AREGTYPE
    assert _open_tar(_tar_with(old, data, tarfile.USTAR_FORMAT)) == {"a.bin": data}


def test_sparse_member_is_refused() -> None:
    """New check: a GNU sparse member reads back other bytes than its data blocks hold;
    the spec allows regular files only."""
    data = _data(1000)
    sparse = bundle._tarinfo("files/a.bin", len(data))
    sparse.pax_headers = {"GNU.sparse.size": str(len(data)), "GNU.sparse.offset": "0",
                          "GNU.sparse.numbytes": str(len(data))}
    with pytest.raises(BundleError, match="missing or out of order"):
        _open_tar(_tar_with(sparse, data))


def test_endless_chain_of_extended_headers_is_refused() -> None:
    """New check: tarfile would follow extended headers recursively without end."""
    block = bundle._tarinfo("x", 0)
    block.type = tarfile.XHDTYPE
    chain = b"".join(block.tobuf(tarfile.USTAR_FORMAT) for _ in range(20))
    header = EnvelopeHeader(id=ENVELOPE_ID, sender=SENDER.device_id, to=(RECIPIENT.device_id,), created=1,
                            expires=2, size=0, sha256=bytes(32))
    with pytest.raises(LimitError, match="header blocks"):
        BundleReader(io.BytesIO(chain + bytes(4096)), sender=SENDER.public(), envelope=header, me=RECIPIENT.device_id)


# --- client: real files ----------------------------------------------------------------------


def _write_files(folder: Path, files: tuple[tuple[str, bytes], ...]) -> list[Path]:
    folder.mkdir(exist_ok=True)
    paths = []
    for name, data in files:
        path = folder / name
        path.write_bytes(data)
        paths.append(path)
    return paths


def _encrypt(tmp_path: Path, hashed: list[core._Hashed]) -> tuple[Path, EnvelopeHeader, bytes]:
    pub = SENDER.public()
    m = Manifest(
        kind="request", case_id=bytes(16), envelope_id=ENVELOPE_ID, created=1_767_261_600,
        sender=Sender(pub.sign_key, pub.enc_key, "10000005479", "Dr Test"), recipients=(RECIPIENT.device_id,),
        files=tuple(h.entry for h in hashed), body=request_body(),
    )
    raw, sig = sign_manifest(m, SENDER.signing_key)
    path = tmp_path / "out.age"
    size, digest = core._encrypt_bundle(path, [RECIPIENT.public().recipient, pub.recipient], raw, sig, hashed)
    header = EnvelopeHeader(id=ENVELOPE_ID, sender=SENDER.device_id, to=(RECIPIENT.device_id,), created=1,
                            expires=2, size=size, sha256=digest)
    return path, header, raw


def _decrypt(tmp_path: Path, path: Path, header: EnvelopeHeader) -> core._Opened:
    home = Home(tmp_path / "home")
    signed = seal_header(header, SENDER.signing_key)
    return core._decrypt_bundle(home, RECIPIENT, signed, header, SENDER.public(), path)


BIG = (("scan.dcm", _data(3 * (1 << 20) + 12345)), ("note.txt", b"hello\n"), ("empty.bin", b""),
       ("photo.bin", _data(2 * (1 << 20))))


def test_encrypt_and_decrypt_real_files(tmp_path: Path) -> None:
    paths = _write_files(tmp_path / "in", BIG)
    hashed = core._hash_files(paths)
    assert [h.entry.sha256 for h in hashed] == [hashlib.sha256(d).digest() for _, d in BIG]
    assert [core.file_entry(p) for p in paths] == [h.entry for h in hashed]
    path, header, raw = _encrypt(tmp_path, hashed)
    ciphertext = path.read_bytes()
    assert (header.size, header.sha256) == (len(ciphertext), hashlib.sha256(ciphertext).digest())
    assert not path.with_name("out.age.tmp").exists()
    opened = _decrypt(tmp_path, path, header)
    assert {p.name: p.read_bytes() for p in (opened.folder / "files").iterdir()} == dict(BIG)
    assert (opened.folder / "manifest").read_bytes() == raw
    # The simple paths read what the fast one wrote.
    plaintext = age.decrypt(ciphertext, [RECIPIENT.identity])
    assert len(plaintext) == bundle.padme(len(plaintext))
    assert _open_tar(plaintext) == dict(BIG)


@pytest.mark.skipif(shutil.which("age") is None, reason="the age tool is not installed")
def test_age_tool_opens_a_bundle_and_tar_extracts_it(tmp_path: Path) -> None:
    paths = _write_files(tmp_path / "in", BIG)
    path, _, _ = _encrypt(tmp_path, core._hash_files(paths))
    key = tmp_path / "key"
    key.write_text(RECIPIENT.identity.to_string() + "\n")
    plain = subprocess.run(["age", "-d", "-i", str(key), str(path)], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.name.startswith("files/")}  # type: ignore[union-attr]
    assert files == {"files/" + n: d for n, d in BIG}


def _changed_refused(tmp_path: Path, hashed: list[core._Hashed]) -> None:
    with pytest.raises(BundleError, match="changed while it was being sent"):
        _encrypt(tmp_path, hashed)
    assert not (tmp_path / "out.age").exists()
    assert not (tmp_path / "out.age.tmp").exists()


def test_file_appended_to_between_hashing_and_sending(tmp_path: Path) -> None:
    paths = _write_files(tmp_path / "in", BIG)
    hashed = [core._hash_file(p, now_ns=LATER) for p in paths]
    assert not any(h.racy for h in hashed)
    with paths[1].open("ab") as f:
        f.write(b"!")
    _changed_refused(tmp_path, hashed)


def test_file_rewritten_in_place_between_hashing_and_sending(tmp_path: Path) -> None:
    paths = _write_files(tmp_path / "in", BIG)
    hashed = [core._hash_file(p, now_ns=LATER) for p in paths]
    st = paths[0].stat()
    with paths[0].open("r+b") as f:  # same size, other bytes
        f.write(b"\x00" * 10)
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    _changed_refused(tmp_path, hashed)


def test_file_replaced_between_hashing_and_sending(tmp_path: Path) -> None:
    paths = _write_files(tmp_path / "in", BIG)
    hashed = [core._hash_file(p, now_ns=LATER) for p in paths]
    st = paths[3].stat()
    twin = tmp_path / "twin"
    twin.write_bytes(paths[3].read_bytes())  # the same bytes, in another file
    os.utime(twin, ns=(st.st_atime_ns, st.st_mtime_ns))
    twin.replace(paths[3])
    _changed_refused(tmp_path, hashed)
    paths[1].unlink()
    _changed_refused(tmp_path, [core._hash_file(p, now_ns=LATER) for p in paths if p != paths[1]] + [hashed[1]])


def test_recently_changed_file_is_hashed_again_while_sent(tmp_path: Path) -> None:
    """A file changed within the times' granularity may change again, unseen by its stamp:
    such a file is re-hashed as it is sent (here its stamp still matches, as it would
    after a change within the same clock tick, but its bytes do not)."""
    paths = _write_files(tmp_path / "in", BIG)
    hashed = core._hash_files(paths)
    assert all(h.racy for h in hashed)  # just written
    with paths[0].open("r+b") as f:
        f.write(b"\x00" * 10)
    with paths[0].open("rb") as f:
        stamp = core._Stamp.of(f.fileno())
    sneaky = [core._Hashed(hashed[0].entry, paths[0], stamp, racy=True), *hashed[1:]]
    _changed_refused(tmp_path, sneaky)
    # Had its times been old, the sender would not see it, and the recipient refuses it.
    unseen = [core._Hashed(hashed[0].entry, paths[0], stamp, racy=False), *hashed[1:]]
    path, header, _ = _encrypt(tmp_path, unseen)
    with pytest.raises(BundleError, match="does not match the sender's signed hash"):
        _decrypt(tmp_path, path, header)
    assert not list((tmp_path / "home" / "cases").iterdir())


def test_unchanged_files_hashed_long_after_writing_are_sent(tmp_path: Path) -> None:
    paths = _write_files(tmp_path / "in", BIG)
    hashed = [core._hash_file(p, now_ns=LATER) for p in paths]
    path, header, _ = _encrypt(tmp_path, hashed)
    assert {p.name for p in (_decrypt(tmp_path, path, header).folder / "files").iterdir()} == {n for n, _ in BIG}


@pytest.mark.parametrize("damage", ["flip", "cut", "extend", "header_hash", "header_size"])
def test_damaged_ciphertext_leaves_nothing_in_the_case_folder(tmp_path: Path, damage: str) -> None:
    paths = _write_files(tmp_path / "in", BIG)
    path, header, _ = _encrypt(tmp_path, core._hash_files(paths))
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 1
    elif damage == "cut":
        del data[-(SEALED + 5) :]
    elif damage == "extend":
        data += bytes(16)
    elif damage == "header_hash":
        header = EnvelopeHeader(**{**header.__dict__, "sha256": bytes(32)})
    else:
        header = EnvelopeHeader(**{**header.__dict__, "size": header.size + 1})
    if damage in ("cut", "extend"):  # the signed header follows the file: only the payload speaks
        header = EnvelopeHeader(**{**header.__dict__, "size": len(data), "sha256": hashlib.sha256(data).digest()})
    path.write_bytes(bytes(data))
    with pytest.raises((BundleError, PayloadError)):
        _decrypt(tmp_path, path, header)
    assert not list((tmp_path / "home" / "cases").iterdir())


def test_channel_hands_over_pieces_then_the_error() -> None:
    channel = core._Channel(limit=10)
    channel.write_many([b"abc", b"defg"])
    channel.close(PayloadError("cut"))
    assert channel.read(2) == b"ab"
    assert channel.read(100) == b"c"
    assert channel.read(100) == b"defg"
    with pytest.raises(PayloadError):
        channel.read(1)
    cancelled = core._Channel()
    cancelled.cancel()
    with pytest.raises(core._CancelledError):
        cancelled.write(b"x")


def test_old_gnu_sparse_map_without_end_is_refused() -> None:
    """New check: an old GNU sparse header says "more map blocks follow" in each block, and
    tarfile would read them (and keep their entries) for as long as the stream lasts."""
    sparse = bundle._tarinfo("files/a.bin", 0)
    sparse.type = tarfile.GNUTYPE_SPARSE
    block = bytearray(sparse.tobuf(tarfile.GNU_FORMAT))
    block[482] = 1  # isextended
    block[148:156] = b" " * 8
    block[148:156] = f"{sum(block):06o}\x00 ".encode()
    more = bytearray(512)
    more[0:24] = b"00000000001\x0000000000001\x00"  # one (offset, size) entry
    more[504] = 1  # and more to come
    header = EnvelopeHeader(id=ENVELOPE_ID, sender=SENDER.device_id, to=(RECIPIENT.device_id,), created=1,
                            expires=2, size=0, sha256=bytes(32))
    with pytest.raises(BundleError, match="tar header type b'S' is not allowed"):
        BundleReader(io.BytesIO(bytes(block) + bytes(more) * 2000), sender=SENDER.public(), envelope=header,
                     me=RECIPIENT.device_id)


def _hostile_block(typeflag: bytes, size_field: bytes) -> bytes:
    block = bytearray(bundle._tarinfo("././@PaxHeader", 0).tobuf(tarfile.USTAR_FORMAT))
    block[156:157] = typeflag
    block[124:136] = size_field
    block[148:156] = b" " * 8
    block[148:156] = f"{sum(block):06o}\x00 ".encode()
    return bytes(block)


@pytest.mark.parametrize(("typeflag", "size_field", "error"), [
    # Review finding: a base-256 size with its sign bit set read as a negative length, which
    # raised the header budget instead of spending it (then unbounded memory).
    (b"x", b"\xff" * 12, "negative size"),
    (b"L", b"\xff" * 12, "negative size"),
    (b"0", b"\xff" * 12, "negative size"),
    # Review finding: global pax records were kept for the whole archive and applied to
    # every member; Solaris extended headers and old GNU sparse maps are refused alike.
    (b"g", b"%011o\x00" % 20, "type b'g' is not allowed"),
    (b"X", b"%011o\x00" % 20, "type b'X' is not allowed"),
    (b"S", b"%011o\x00" % 20, "type b'S' is not allowed"),
])
def test_hostile_tar_headers_are_refused_at_their_first_block(typeflag: bytes, size_field: bytes, error: str) -> None:
    header = EnvelopeHeader(id=ENVELOPE_ID, sender=SENDER.device_id, to=(RECIPIENT.device_id,), created=1,
                            expires=2, size=0, sha256=bytes(32))
    stream = io.BytesIO(_hostile_block(typeflag, size_field) + bytes(512) * 4000)
    with pytest.raises(BundleError, match=error):
        BundleReader(stream, sender=SENDER.public(), envelope=header, me=RECIPIENT.device_id)


def test_opener_stays_failed_after_a_bad_chunk() -> None:
    ct = bytearray(_reference(_data(3 * CHUNK)))
    opener, start = age.start_decryption(bytes(ct), [ALICE])
    ct[start + 5] ^= 1
    with pytest.raises(PayloadError, match="chunk 0 failed"):
        opener.open(ct[start : start + SEALED], final=False)
    with pytest.raises(PayloadError, match="chunk 0 failed"):  # the good chunks after it change nothing
        opener.open(ct[start + SEALED : start + 2 * SEALED], final=False)
