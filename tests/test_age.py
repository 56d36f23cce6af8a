"""Tests of protocol/age.py: the C2SP test kit, the age CLI, our vectors, properties."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import _bech32, age
from protocol.errors import (
    DecodeError,
    DecryptError,
    HeaderMacError,
    LimitError,
    NoIdentityError,
    PayloadError,
    PliError,
    VersionError,
)
from tools import vectors_age

CHUNK = age.CHUNK_SIZE
ENC_CHUNK = CHUNK + 16
VECTORS = Path(__file__).resolve().parents[1] / "protocol" / "vectors" / "age.json"
ALICE = age.X25519Identity.from_bytes(bytes(range(1, 33)))
BOB = age.X25519Identity.from_bytes(bytes(range(33, 65)))
MALLORY = age.X25519Identity.from_bytes(bytes(range(65, 97)))


def _data(size: int, seed: bytes = b"pli") -> bytes:
    return hashlib.shake_256(seed + size.to_bytes(8, "big")).digest(size) if size else b""


def _encrypt(plaintext: bytes, recipients: list[age.X25519Recipient]) -> bytes:
    """Deterministic encryption, so a failing example is reproducible."""
    out = io.BytesIO()
    with age.EncryptWriter._from_parts(
        out,
        recipients,
        file_key=bytes(range(16)),
        ephemeral_secrets=[bytes([i + 1]) * 32 for i in range(len(recipients))],
        payload_nonce=bytes(range(100, 116)),
    ) as w:
        w.write(plaintext)
    return out.getvalue()


def _read_all(reader: age.DecryptReader, n: int = CHUNK) -> bytes:
    parts = []
    while chunk := reader.read(n):
        parts.append(chunk)
    return b"".join(parts)


# --- C2SP CCTV age test kit -----------------------------------------------------------


def _testkit_dir() -> Path:
    env = os.environ.get("PLI_AGE_TESTKIT")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "vectors" / "age"


TESTKIT = _testkit_dir()
TESTKIT_FILES = (
    sorted(
        p.name for p in TESTKIT.iterdir() if p.is_file() and p.name not in {"README.md", "LICENSE"}
    )
    if TESTKIT.is_dir()
    else []
)


@dataclass
class KitVector:
    expect: str
    body: bytes
    payload: str | None = None
    identities: list[str] = field(default_factory=list)
    passphrases: list[str] = field(default_factory=list)
    armored: bool = False


def _load_kit_vector(path: Path) -> KitVector:
    raw = path.read_bytes()
    head, sep, body = raw.partition(b"\n\n")
    assert sep, f"{path.name}: no blank line after the test header"
    fields: dict[str, list[str]] = {}
    for line in head.decode("utf-8").split("\n"):
        key, _, value = line.partition(": ")
        fields.setdefault(key, []).append(value)
    if fields.get("compressed") == ["zlib"]:
        body = zlib.decompress(body)
    return KitVector(
        expect=fields["expect"][0],
        body=body,
        payload=fields.get("payload", [None])[0],
        identities=fields.get("identity", []),
        passphrases=fields.get("passphrase", []),
        armored=fields.get("armored") == ["yes"],
    )


def _drain(reader: age.DecryptReader, released: bytearray) -> None:
    while chunk := reader.read(CHUNK):
        released += chunk


def _released_before_failure(vector: KitVector, identities: list[age.X25519Identity]) -> bytes:
    reader = age.DecryptReader(io.BytesIO(vector.body), identities)
    released = bytearray()
    with pytest.raises(PayloadError):
        _drain(reader, released)
    return bytes(released)


def _kit_header_failure(vector: KitVector, identities: list[age.X25519Identity]) -> None:
    if not identities:  # nothing to decrypt with: the header alone must be refused
        with pytest.raises(DecodeError) as info:
            age.Header.decode_prefix(vector.body)
    else:
        with pytest.raises(DecodeError) as info:
            age.DecryptReader(io.BytesIO(vector.body), identities)
    assert not isinstance(info.value, DecryptError)


def _kit_success(vector: KitVector, identities: list[age.X25519Identity]) -> None:
    reader = age.DecryptReader(io.BytesIO(vector.body), identities)
    assert reader.header == vector.body[: len(reader.header)]
    assert hashlib.sha256(_read_all(reader)).hexdigest() == vector.payload
    out = io.BytesIO()
    age.decrypt_stream(io.BytesIO(vector.body), out, identities)
    assert hashlib.sha256(out.getvalue()).hexdigest() == vector.payload


def _kit_no_match(vector: KitVector, identities: list[age.X25519Identity]) -> None:
    with pytest.raises(NoIdentityError):
        age.DecryptReader(io.BytesIO(vector.body), identities)


def _kit_hmac_failure(vector: KitVector, identities: list[age.X25519Identity]) -> None:
    with pytest.raises(HeaderMacError):
        age.DecryptReader(io.BytesIO(vector.body), identities)


def _kit_payload_failure(vector: KitVector, identities: list[age.X25519Identity]) -> None:
    released = _released_before_failure(vector, identities)
    assert hashlib.sha256(released).hexdigest() == vector.payload
    out = io.BytesIO()
    with pytest.raises(PayloadError):
        age.decrypt_stream(io.BytesIO(vector.body), out, identities)
    assert hashlib.sha256(out.getvalue()).hexdigest() == vector.payload


KIT_OUTCOMES = {
    "success": _kit_success,
    "no match": _kit_no_match,
    "HMAC failure": _kit_hmac_failure,
    "payload failure": _kit_payload_failure,
}


@pytest.mark.parametrize("name", TESTKIT_FILES or ["<missing>"])
def test_testkit(name: str) -> None:
    if not TESTKIT_FILES:
        pytest.skip(f"age test kit not found at {TESTKIT}; set PLI_AGE_TESTKIT")
    vector = _load_kit_vector(TESTKIT / name)
    if vector.armored:
        pytest.skip("ASCII armor is not implemented: Pli never reads or writes armored files")
    if vector.passphrases or name.startswith("scrypt"):
        pytest.skip("scrypt passphrase recipients are not used by Pli: keys are X25519 only")
    if name.startswith("hybrid") or any(
        i.startswith("AGE-SECRET-KEY-PQ-") for i in vector.identities
    ):
        pytest.skip("ML-KEM-768+X25519 hybrid recipients are not used by Pli: keys are X25519 only")
    identities = [age.X25519Identity.from_string(s) for s in vector.identities]
    assert all(i.to_string() == s for i, s in zip(identities, vector.identities, strict=True))

    if vector.expect == "header failure":
        _kit_header_failure(vector, identities)
        return
    # Every other outcome starts from a header that parses and re-encodes exactly.
    header, size = age.Header.decode_prefix(vector.body)
    assert header.encode() == vector.body[:size]
    assert identities, f"{name}: expected a decryption outcome but no identity is given"
    KIT_OUTCOMES[vector.expect](vector, identities)


# --- interoperability with the age CLI ------------------------------------------------

AGE = shutil.which("age")
AGE_KEYGEN = shutil.which("age-keygen")
needs_age = pytest.mark.skipif(
    AGE is None or AGE_KEYGEN is None, reason="the age and age-keygen tools are not installed"
)


def _keygen(path: Path) -> tuple[str, str]:
    assert AGE_KEYGEN is not None
    subprocess.run([AGE_KEYGEN, "-o", str(path)], check=True, capture_output=True)
    secret = next(ln for ln in path.read_text().splitlines() if ln.startswith("AGE-SECRET-KEY-"))
    public = subprocess.run(
        [AGE_KEYGEN, "-y", str(path)], check=True, capture_output=True, text=True
    ).stdout.strip()
    return secret, public


@needs_age
def test_age_keygen_strings_round_trip(tmp_path: Path) -> None:
    secret, public = _keygen(tmp_path / "key.txt")
    identity = age.X25519Identity.from_string(secret)
    assert identity.to_string() == secret
    assert identity.recipient.to_string() == public
    assert age.X25519Recipient.from_string(public).to_string() == public


@needs_age
@pytest.mark.parametrize("size", [0, 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5])
def test_pli_encrypts_age_decrypts(tmp_path: Path, size: int) -> None:
    assert AGE is not None
    secret, _ = _keygen(tmp_path / "key.txt")
    plaintext = _data(size)
    ciphertext = age.encrypt(
        plaintext, [MALLORY.recipient, age.X25519Identity.from_string(secret).recipient]
    )
    assert len(ciphertext) == age.ciphertext_size(size, age.header_size(2))
    out = subprocess.run(
        [AGE, "-d", "-i", str(tmp_path / "key.txt")],
        input=ciphertext,
        capture_output=True,
        check=True,
    )
    assert out.stdout == plaintext


@needs_age
@pytest.mark.parametrize("size", [0, 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5])
def test_age_encrypts_pli_decrypts(tmp_path: Path, size: int) -> None:
    assert AGE is not None
    secret, public = _keygen(tmp_path / "key.txt")
    plaintext = _data(size)
    ciphertext = subprocess.run(
        [AGE, "-r", ALICE.recipient.to_string(), "-r", public],
        input=plaintext,
        capture_output=True,
        check=True,
    ).stdout
    assert len(ciphertext) == age.ciphertext_size(size, age.header_size(2))
    assert age.decrypt(ciphertext, [age.X25519Identity.from_string(secret)]) == plaintext
    assert age.decrypt(ciphertext, [MALLORY, ALICE]) == plaintext
    out = io.BytesIO()
    assert age.decrypt_stream(io.BytesIO(ciphertext), out, [ALICE]) == size
    assert out.getvalue() == plaintext


# --- our vectors ----------------------------------------------------------------------


def test_vectors_file_is_up_to_date() -> None:
    assert VECTORS.read_text(encoding="utf-8") == vectors_age.render()


def test_vectors_encrypt_and_decrypt() -> None:
    data = json.loads(VECTORS.read_text(encoding="utf-8"))
    gen = vectors_age
    assert len(data["cases"]) == len(gen.CASES)
    for entry, case in zip(data["cases"], gen.CASES, strict=True):
        plaintext = (
            bytes.fromhex(entry["plaintext_hex"])
            if "plaintext_hex" in entry
            else gen.pattern(entry["plaintext_size"])
        )
        assert hashlib.sha256(plaintext).hexdigest() == entry["plaintext_sha256"]
        recipients = [age.X25519Recipient.from_string(r) for r in entry["recipients"]]
        out = io.BytesIO()
        with age.EncryptWriter._from_parts(
            out,
            recipients,
            file_key=bytes.fromhex(entry["file_key_hex"]),
            ephemeral_secrets=[bytes.fromhex(e) for e in entry["ephemeral_secrets_hex"]],
            payload_nonce=bytes.fromhex(entry["payload_nonce_hex"]),
        ) as w:
            w.write(plaintext)
        ciphertext = out.getvalue()
        assert plaintext == case.plaintext
        assert len(ciphertext) == entry["ciphertext_size"]
        assert hashlib.sha256(ciphertext).hexdigest() == entry["ciphertext_sha256"]
        assert ciphertext.startswith(entry["header"].encode("ascii"))
        assert len(entry["header"]) == age.header_size(len(recipients))
        assert len(ciphertext) == age.ciphertext_size(len(plaintext), len(entry["header"]))
        if "ciphertext_hex" in entry:
            assert ciphertext.hex() == entry["ciphertext_hex"]
        for secret in entry["identities"]:
            identity = age.X25519Identity.from_string(secret)
            assert age.decrypt(ciphertext, [identity]) == plaintext
        with pytest.raises(NoIdentityError):
            age.decrypt(ciphertext, [MALLORY])


# --- keys and Bech32 ------------------------------------------------------------------


def test_bech32_round_trip_and_rejections() -> None:
    s = ALICE.to_string()
    assert s.startswith("AGE-SECRET-KEY-1")
    assert s.isupper()
    assert age.X25519Identity.from_string(s) == ALICE
    r = ALICE.recipient.to_string()
    assert r.startswith("age1")
    assert age.X25519Recipient.from_string(r) == ALICE.recipient
    for bad in (
        s.lower(),  # identities are uppercase only, as age writes them
        r.upper(),
        s[:-1] + ("Q" if s[-1] != "Q" else "P"),  # checksum
        r[:10] + r[10:].upper(),  # mixed case
        r + "q",
        "age1",
        "",
    ):
        with pytest.raises(DecodeError):
            (age.X25519Identity if bad.upper() == bad and bad else age.X25519Recipient).from_string(
                bad
            )
    with pytest.raises(DecodeError):
        age.X25519Identity.from_string(r)
    with pytest.raises(DecodeError):
        age.X25519Recipient.from_string(s)
    # No 90-character limit (c2sp.org/age "Conventions").
    long = _bech32.encode("age", bytes(100))
    assert _bech32.decode(long) == ("age", bytes(100))


def test_key_sizes_and_low_order_recipient() -> None:
    with pytest.raises(DecodeError):
        age.X25519Identity.from_bytes(bytes(31))
    with pytest.raises(DecodeError):
        age.X25519Recipient.from_bytes(bytes(33))
    with pytest.raises(DecodeError):
        age.X25519Recipient.from_bytes(bytes(32))  # the identity point
    assert "SECRET" not in repr(ALICE)
    assert age.X25519Identity.generate() != age.X25519Identity.generate()


# --- header rules and limits ----------------------------------------------------------


def test_header_size_and_ciphertext_size() -> None:
    for n in (1, 2, 5):
        recipients = [age.X25519Identity.generate().recipient for _ in range(n)]
        for size in (0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK):
            ct = age.encrypt(_data(size), recipients)
            assert len(ct) == age.ciphertext_size(size, age.header_size(n))
        _, hlen = age.Header.decode_prefix(ct)
        assert hlen == age.header_size(n) == 70 + 98 * n


def test_oversized_header_is_a_limit_error() -> None:
    line = b"-> grease " + b"a" * 60 + b"\n\n"
    hostile = b"age-encryption.org/v1\n" + line * (age.MAX_HEADER_SIZE // len(line) + 1)
    with pytest.raises(LimitError):
        age.DecryptReader(io.BytesIO(hostile + b"--- " + b"A" * 43 + b"\n"), [ALICE])
    with pytest.raises(LimitError):
        age.DecryptReader(
            io.BytesIO(b"age-encryption.org/v1\n-> " + b"a" * (2 * age.MAX_HEADER_SIZE)), [ALICE]
        )
    too_many = (age.MAX_HEADER_SIZE // 98) + 1
    with pytest.raises(LimitError):
        age.encrypt(b"", [ALICE.recipient] * too_many)


def test_header_rules() -> None:
    ct = _encrypt(b"hello", [ALICE.recipient])
    with pytest.raises(VersionError):
        age.decrypt(ct.replace(b"/v1\n", b"/v2\n", 1), [ALICE])
    with pytest.raises(DecodeError):
        age.decrypt(b"", [ALICE])
    no_stanza = b"age-encryption.org/v1\n--- " + b"A" * 43 + b"\n"
    with pytest.raises(DecodeError):
        age.Header.decode_prefix(no_stanza)
    # Unknown stanzas are parsed, kept in the header, and ignored; the MAC covers them.
    header, size = age.Header.decode_prefix(ct)
    assert [s.type for s in header.stanzas] == ["X25519"]
    stanza = age.Stanza("example.org/unknown", ("a", "b"), bytes(48))
    assert stanza.encode().endswith(b"\n\n")  # a full final line is followed by an empty one
    with pytest.raises(ValueError, match="VCHAR"):
        age.Stanza("bad type", (), b"").encode()
    assert size == age.header_size(1)


def test_no_identities_or_recipients_is_a_caller_error() -> None:
    with pytest.raises(ValueError, match="recipient"):
        age.encrypt(b"", [])
    with pytest.raises(ValueError, match="identity"):
        age.decrypt(_encrypt(b"", [ALICE.recipient]), [])


# --- writer and reader behaviour ------------------------------------------------------


def test_writer_abandoned_by_exception_never_seals_final_chunk() -> None:
    out = io.BytesIO()
    w = age.EncryptWriter(out, [ALICE.recipient])

    def abandon() -> None:
        with w:
            w.write(b"half of the case")
            raise RuntimeError

    with pytest.raises(RuntimeError):
        abandon()
    with pytest.raises(PayloadError):
        age.decrypt(out.getvalue(), [ALICE])
    with pytest.raises(ValueError, match="closed"):
        w.write(b"more")
    w.close()  # idempotent, and still does not seal


def test_reader_errors_are_sticky_and_read_sizes() -> None:
    plaintext = _data(2 * CHUNK + 10)
    ct = bytearray(_encrypt(plaintext, [ALICE.recipient]))
    reader = age.DecryptReader(io.BytesIO(bytes(ct)), [ALICE])
    assert reader.read(0) == b""
    assert reader.read(3) == plaintext[:3]
    buf = bytearray(CHUNK)
    assert reader.readinto(buf) == CHUNK
    assert bytes(buf) == plaintext[3 : 3 + CHUNK]
    assert reader.read() == plaintext[3 + CHUNK :]
    assert reader.read() == b""
    ct[-1] ^= 1
    reader = age.DecryptReader(io.BytesIO(bytes(ct)), [ALICE])
    assert reader.read() == plaintext[: 2 * CHUNK]  # verified chunks first...
    with pytest.raises(PayloadError):
        reader.read()  # ...then the error, again and again
    with pytest.raises(PayloadError):
        reader.read(1)


class _Trickle:
    """A reader returning at most 7 bytes per call, like a slow pipe."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def read(self, n: int) -> bytes:
        return self._data.read(min(n, 7))


def test_short_reads_from_source() -> None:
    plaintext = _data(CHUNK + 100)
    ct = _encrypt(plaintext, [ALICE.recipient])
    assert _read_all(age.DecryptReader(_Trickle(ct), [ALICE])) == plaintext
    out = io.BytesIO()
    age.encrypt_stream(_Trickle(plaintext), out, [ALICE.recipient])
    assert age.decrypt(out.getvalue(), [ALICE]) == plaintext


# --- properties -----------------------------------------------------------------------

SIZES = st.one_of(
    st.sampled_from(
        [k * CHUNK + d for k in range(4) for d in (-2, -1, 0, 1, 2) if k * CHUNK + d >= 0]
    ),
    st.integers(min_value=0, max_value=3 * CHUNK + 17),
)
PROPS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(size=SIZES, splits=st.lists(st.integers(min_value=0, max_value=3 * CHUNK), max_size=6))
def test_round_trip_any_size_and_write_pattern(size: int, splits: list[int]) -> None:
    plaintext = _data(size)
    expected = _encrypt(plaintext, [ALICE.recipient, BOB.recipient])
    # The same file whatever the write() boundaries, through the pipelined copy too.
    out = io.BytesIO()
    with age.EncryptWriter._from_parts(
        out,
        [ALICE.recipient, BOB.recipient],
        file_key=bytes(range(16)),
        ephemeral_secrets=[bytes([1]) * 32, bytes([2]) * 32],
        payload_nonce=bytes(range(100, 116)),
    ) as w:
        pos = 0
        for cut in sorted(min(s, size) for s in splits):
            w.write(memoryview(plaintext)[pos:cut] if cut >= pos else b"")
            pos = max(pos, cut)
        w.write(bytearray(plaintext[pos:]))
    assert out.getvalue() == expected
    piped = io.BytesIO()
    age.EncryptWriter._from_parts(
        piped,
        [ALICE.recipient, BOB.recipient],
        file_key=bytes(range(16)),
        ephemeral_secrets=[bytes([1]) * 32, bytes([2]) * 32],
        payload_nonce=bytes(range(100, 116)),
    )._copy_from(age._Source(io.BytesIO(plaintext)))
    assert piped.getvalue() == expected
    assert len(expected) == age.ciphertext_size(size, age.header_size(2))
    assert age.decrypt(expected, [BOB]) == plaintext
    assert _read_all(age.DecryptReader(io.BytesIO(expected), [ALICE]), n=1000) == plaintext


_SMALL_CT = _encrypt(_data(2 * CHUNK + 300), [ALICE.recipient])


@PROPS
@given(index=st.integers(min_value=0, max_value=len(_SMALL_CT) - 1), xor=st.integers(1, 255))
def test_any_flipped_byte_is_refused(index: int, xor: int) -> None:
    ct = bytearray(_SMALL_CT)
    ct[index] ^= xor
    with pytest.raises((DecryptError, DecodeError)):
        age.decrypt(bytes(ct), [ALICE])


@PROPS
@given(cut=st.integers(min_value=0, max_value=len(_SMALL_CT) - 1))
def test_any_truncation_is_refused(cut: int) -> None:
    with pytest.raises(PliError):
        age.decrypt(_SMALL_CT[:cut], [ALICE])
    with pytest.raises(PliError):
        age.decrypt_stream(io.BytesIO(_SMALL_CT[:cut]), io.BytesIO(), [ALICE])


@PROPS
@given(extra=st.binary(min_size=1, max_size=2 * ENC_CHUNK))
def test_appended_bytes_are_refused(extra: bytes) -> None:
    with pytest.raises(PayloadError):
        age.decrypt(_SMALL_CT + extra, [ALICE])


@PROPS
@given(size=SIZES)
def test_non_recipient_has_no_identity(size: int) -> None:
    ct = _encrypt(_data(size), [ALICE.recipient, BOB.recipient])
    with pytest.raises(NoIdentityError):
        age.decrypt(ct, [MALLORY])
    assert age.decrypt(ct, [MALLORY, BOB]) == _data(size)


@PROPS
@given(
    n_full=st.integers(min_value=2, max_value=4),
    tail=st.integers(min_value=1, max_value=CHUNK),
    data=st.data(),
)
def test_swapped_chunks_are_refused(n_full: int, tail: int, data: st.DataObject) -> None:
    plaintext = _data(n_full * CHUNK + tail)
    ct = _encrypt(plaintext, [ALICE.recipient])
    start = age.header_size(1) + 16
    chunks = [ct[i : i + ENC_CHUNK] for i in range(start, len(ct), ENC_CHUNK)]
    i, j = data.draw(
        st.tuples(st.integers(0, len(chunks) - 1), st.integers(0, len(chunks) - 1)).filter(
            lambda p: p[0] != p[1]
        )
    )
    chunks[i], chunks[j] = chunks[j], chunks[i]
    with pytest.raises(PayloadError):
        age.decrypt(ct[:start] + b"".join(chunks), [ALICE])
    out = io.BytesIO()
    with pytest.raises(PayloadError):
        age.decrypt_stream(io.BytesIO(ct[:start] + b"".join(chunks)), out, [ALICE])
    assert out.getvalue() == plaintext[: min(i, j) * CHUNK]
