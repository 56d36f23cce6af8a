"""Generate protocol/vectors/{codec,keys,envelope,bundle}.json: Pli's own formats, byte for byte.

Run from the repository root: ``python -m tools.vectors_pli``. Every key, seed, id, time,
salt and nonce is fixed here, so the output is reproducible (Ed25519 is deterministic;
the age encryption of the bundle takes its file key, ephemeral secrets and payload nonce
from here; the sealed key file is built from a fixed salt and nonce). tests/test_codec.py,
test_keys.py, test_envelope.py and test_bundle.py check each file both ways and
regenerate it with :func:`codec_vectors`, :func:`keys_vectors`, :func:`envelope_vectors`
and :func:`bundle_vectors` to compare with the committed one.

Bytes are lowercase hex everywhere. In codec.json a msgpack value is written as a tagged
JSON object so that text and bytes stay apart: ``{"int": n}``, ``{"str": s}``,
``{"bin": hex}``, ``{"bool": b}``, ``{"nil": null}``, ``{"array": [...]}`` and
``{"map": [[key, value], ...]}`` (pairs in canonical order).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.pwhash
import nacl.secret
import nacl.signing

from protocol import age, bundle, codec, envelope, keys
from tools.case_samples import answer_body, request_body

VECTORS_DIR = Path(__file__).resolve().parent.parent / "protocol" / "vectors"

# --- test keys, published here on purpose: never use them for anything real -----------


@dataclass(frozen=True)
class Device:
    name: str
    sign_seed: bytes
    enc_secret: bytes
    created: int
    rpps: str
    practitioner: str

    @property
    def keys(self) -> keys.DeviceKeys:
        return keys.DeviceKeys(sign_seed=self.sign_seed, enc_secret=self.enc_secret, created=self.created)


ALICE = Device(
    name="alice",
    sign_seed=bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"),
    enc_secret=bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"),
    created=1767225600,  # 2026-01-01T00:00:00Z
    rpps="10000005479",
    practitioner="Dr Claire Martin",
)
BOB = Device(
    name="bob",
    sign_seed=bytes.fromhex("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb"),
    enc_secret=bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"),
    created=1767229200,
    rpps="10000012343",
    practitioner="Dr Paul Durand",
)
CAROL = Device(
    name="carol",
    sign_seed=bytes.fromhex("c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7"),
    enc_secret=bytes.fromhex("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4"),
    created=1767232800,
    rpps="10000023456",
    practitioner="Dr Anne Leroy",
)
DEVICES = (ALICE, BOB, CAROL)


def device(name: str) -> Device:
    return {d.name: d for d in DEVICES}[name]


# --- codec.json -------------------------------------------------------------------------


def to_json(value: Any) -> Any:  # noqa: PLR0911 - one return per msgpack type
    """A msgpack value as tagged JSON (see the module docstring)."""
    if isinstance(value, bool):
        return {"bool": value}
    if value is None:
        return {"nil": None}
    if isinstance(value, int):
        return {"int": value}
    if isinstance(value, str):
        return {"str": value}
    if isinstance(value, bytes):
        return {"bin": value.hex()}
    if isinstance(value, list):
        return {"array": [to_json(v) for v in value]}
    if isinstance(value, dict):
        pairs = sorted(value.items(), key=lambda kv: kv[0].encode("utf-8"))
        return {"map": [[k, to_json(v)] for k, v in pairs]}
    raise TypeError(type(value).__name__)


def from_json(tagged: Any) -> Any:
    """The inverse of :func:`to_json`."""
    ((tag, v),) = tagged.items()
    if tag == "bool":
        return bool(v)
    if tag == "nil":
        return None
    if tag in {"int", "str"}:
        return v
    if tag == "bin":
        return bytes.fromhex(v)
    if tag == "array":
        return [from_json(x) for x in v]
    if tag == "map":
        return {k: from_json(x) for k, x in v}
    raise ValueError(tag)


CODEC_VALID: tuple[tuple[str, Any], ...] = (
    ("positive fixint 0", 0),
    ("positive fixint 127", 127),
    ("uint8 128", 128),
    ("uint8 255", 255),
    ("uint16 256", 256),
    ("uint16 65535", 65535),
    ("uint32 65536", 65536),
    ("uint32 2^32-1", (1 << 32) - 1),
    ("uint64 2^32", 1 << 32),
    ("uint64 2^64-1", (1 << 64) - 1),
    ("negative fixint -1", -1),
    ("negative fixint -32", -32),
    ("int8 -33", -33),
    ("int8 -128", -128),
    ("int16 -129", -129),
    ("int16 -32768", -32768),
    ("int32 -32769", -32769),
    ("int32 -2^31", -(1 << 31)),
    ("int64 -2^31-1", -(1 << 31) - 1),
    ("int64 -2^63", -(1 << 63)),
    ("a Unix time", 1767225600),
    ("false", False),
    ("true", True),
    ("nil (the codec carries it; formats refuse it where they expect another type)", None),
    ("empty fixstr", ""),
    ("fixstr", "pli"),
    ("fixstr of 31 bytes", "a" * 31),
    ("str8 of 32 bytes", "b" * 32),
    ("UTF-8 text (length in bytes, not characters)", "télé-expertise ✓"),
    ("str16 of 256 bytes", "c" * 256),
    ("empty bin8 (bytes are never str)", b""),
    ("bin8", bytes.fromhex("00ff10")),
    ("bin8 of 16 bytes (an id)", bytes(range(16))),
    ("bin16 of 256 bytes", bytes(range(256))),
    ("empty fixarray", []),
    ("fixarray of mixed items", [1, "a", b"b", True, [2]]),
    ("array16 of 16 items", list(range(16))),
    ("empty fixmap", {}),
    ("map keys sorted: a before b", {"b": 1, "a": 2}),
    (
        "map keys sorted by UTF-8 bytes (not by length, not by UTF-16 units)",
        {"b": 1, "aa": 2, "": 3, "B": 4, "é": 5, "\uff61": 6, "\U0001f600": 7},
    ),
    ("map16 of 16 pairs", {f"k{i:02d}": i for i in range(16)}),
    (
        "nested maps and arrays",
        {"v": 1, "to": [bytes(16), bytes([1]) * 16], "meta": {"z": -1, "a": {"x": []}}},
    ),
)

# (name, bytes, accepted error codes): what a strict decoder must refuse
CODEC_INVALID: tuple[tuple[str, bytes, tuple[str, ...]], ...] = (
    ("map keys out of order", bytes.fromhex("82a16201a16102"), ("malformed",)),
    ("duplicate map key", bytes.fromhex("82a16101a16102"), ("malformed",)),
    ("uint8 where a fixint fits", bytes.fromhex("cc01"), ("malformed",)),
    ("uint16 where a uint8 fits", bytes.fromhex("cd00ff"), ("malformed",)),
    ("uint64 where a fixint fits", bytes.fromhex("cf0000000000000001"), ("malformed",)),
    ("int8 for a positive value", bytes.fromhex("d001"), ("malformed",)),
    ("int8 where a negative fixint fits", bytes.fromhex("d0ff"), ("malformed",)),
    ("int16 where an int8 fits", bytes.fromhex("d1ff80"), ("malformed",)),
    ("str8 where a fixstr fits", bytes.fromhex("d90161"), ("malformed",)),
    ("str16 where a fixstr fits", bytes.fromhex("da000161"), ("malformed",)),
    ("bin16 where a bin8 fits", bytes.fromhex("c5000161"), ("malformed",)),
    ("array16 where a fixarray fits", bytes.fromhex("dc000101"), ("malformed",)),
    ("map16 where a fixmap fits", bytes.fromhex("de0001a16101"), ("malformed",)),
    ("float32", bytes.fromhex("ca3f800000"), ("malformed",)),
    ("float64", bytes.fromhex("cb3ff0000000000000"), ("malformed",)),
    ("float64 inside a map", bytes.fromhex("81a178cb0000000000000000"), ("malformed",)),
    ("fixext1", bytes.fromhex("d40100"), ("malformed",)),
    ("ext8 of 1 byte", bytes.fromhex("c7010500"), ("malformed",)),
    ("ext8 of 0 bytes", bytes.fromhex("c70005"), ("malformed",)),
    ("trailing byte", bytes.fromhex("0102"), ("malformed",)),
    ("integer map key", bytes.fromhex("810102"), ("malformed",)),
    ("bin map key", bytes.fromhex("81c4016102"), ("malformed",)),
    ("nil map key", bytes.fromhex("81c002"), ("malformed",)),
    ("invalid UTF-8 in str", bytes.fromhex("a2fffe"), ("malformed",)),
    ("reserved byte 0xc1", bytes.fromhex("c1"), ("malformed",)),
    ("empty input", b"", ("malformed",)),
    ("truncated str", bytes.fromhex("a561"), ("malformed",)),
    ("nesting deeper than 16 levels", bytes.fromhex("91" * 17 + "01"), ("malformed",)),
    ("bin32 declaring 4 GiB, 10 bytes follow", bytes.fromhex("c6ffffffff") + bytes(10), ("too_large", "malformed")),
    ("str32 declaring 4 GiB, 10 bytes follow", bytes.fromhex("dbffffffff") + bytes(10), ("too_large", "malformed")),
    ("array32 declaring 2^32-1 items", bytes.fromhex("ddffffffff") + bytes(10), ("too_large", "malformed")),
    ("map32 declaring 2^32-1 pairs", bytes.fromhex("dfffffffff") + bytes(10), ("too_large", "malformed")),
)


def codec_vectors() -> dict[str, Any]:
    return {
        "description": (
            "Canonical msgpack (SPEC.md section 2). 'valid': encode(value) must give exactly "
            "'hex' and decode('hex') must give 'value'; values are tagged JSON: {'int': n}, "
            "{'str': s}, {'bin': hex}, {'bool': b}, {'nil': null}, {'array': [...]}, "
            "{'map': [[key, value], ...]} with pairs in canonical order (keys sorted by their "
            "UTF-8 bytes). 'invalid': a strict decoder (default limits: 1 MiB object, 64 KiB "
            "str, 1 MiB bin, 4096 array items, 256 map pairs, 16 levels of nesting) must "
            "refuse 'hex' with one of the error codes in 'errors', without allocating what "
            "a length field claims."
        ),
        "valid": [{"name": n, "value": to_json(v), "hex": codec.encode(v).hex()} for n, v in CODEC_VALID],
        "invalid": [{"name": n, "hex": b.hex(), "errors": list(e)} for n, b, e in CODEC_INVALID],
    }


# --- keys.json --------------------------------------------------------------------------

SIGNED_MESSAGE = b"the same message, signed for each purpose"

SEALED_PASSPHRASE = "correct horse battery staple, Pli test only"  # noqa: S105 - published test vector
SEALED_OPS = nacl.pwhash.argon2id.OPSLIMIT_MIN
SEALED_MEM = nacl.pwhash.argon2id.MEMLIMIT_MIN
SEALED_SALT = bytes.fromhex("5a17ed5a17ed5a17ed5a17ed5a17ed00")
SEALED_NONCE = bytes.fromhex("0102030405060708090a0b0c0d0e0f101112131415161718")


def sealed_key_file(dev: Device) -> tuple[bytes, bytes]:
    """A key file as SPEC.md §3.4 describes it, from the fixed salt and nonce: (inner, file)."""
    inner = codec.encode({"v": 1, "sign_seed": dev.sign_seed, "enc_secret": dev.enc_secret, "created": dev.created})
    key = nacl.pwhash.argon2id.kdf(
        32, SEALED_PASSPHRASE.encode("utf-8"), SEALED_SALT, opslimit=SEALED_OPS, memlimit=SEALED_MEM
    )
    box = nacl.secret.SecretBox(key).encrypt(inner, SEALED_NONCE)
    sealed = codec.encode(
        {"v": 1, "kdf": "argon2id13", "ops": SEALED_OPS, "mem": SEALED_MEM, "salt": SEALED_SALT, "box": bytes(box)}
    )
    return inner, sealed


def _device_entry(dev: Device) -> dict[str, Any]:
    pub = dev.keys.public()
    return {
        "name": dev.name,
        "sign_seed_hex": dev.sign_seed.hex(),
        "enc_secret_hex": dev.enc_secret.hex(),
        "created": dev.created,
        "sign_key_hex": pub.sign_key.hex(),
        "enc_key_hex": pub.enc_key.hex(),
        "age_recipient": pub.recipient.to_string(),
        "cert_hex": pub.cert.hex(),
        "sig_hex": pub.sig.hex(),
        "record_hex": pub.to_bytes().hex(),
        "device_id_hex": pub.device_id.hex(),
        "fingerprint": pub.fingerprint,
    }


def keys_vectors() -> dict[str, Any]:
    signer = ALICE.keys.signing_key
    inner, sealed = sealed_key_file(ALICE)
    return {
        "description": (
            "Device keys (SPEC.md section 3). 'devices': from sign_seed (Ed25519 seed) and "
            "enc_secret (X25519 secret), the public keys, the certificate (canonical msgpack "
            "{v, sign_key, enc_key, created}), its signature over 'pli/device-cert/v1' || 0x00 "
            "|| cert, the device record {sign_key, cert, sig} as canonical msgpack, the device "
            "id and the fingerprint. 'signatures': one message signed by alice under each "
            "context: a signature verifies only under its own context. 'sealed': alice's "
            "private keys sealed under 'passphrase' (UTF-8) with Argon2id (ops, mem, salt) "
            "and a secretbox with the given 24-byte nonce; 'inner_hex' is the plaintext."
        ),
        "devices": [_device_entry(d) for d in DEVICES],
        "signatures": [
            {
                "signer": ALICE.name,
                "context": ctx.decode("ascii"),
                "message_hex": SIGNED_MESSAGE.hex(),
                "signature_hex": keys.sign(signer, ctx, SIGNED_MESSAGE).hex(),
            }
            for ctx in (keys.CTX_DEVICE_CERT, keys.CTX_ENVELOPE, keys.CTX_BUNDLE)
        ],
        "sealed": {
            "device": ALICE.name,
            "passphrase": SEALED_PASSPHRASE,
            "ops": SEALED_OPS,
            "mem": SEALED_MEM,
            "salt_hex": SEALED_SALT.hex(),
            "nonce_hex": SEALED_NONCE.hex(),
            "inner_hex": inner.hex(),
            "sealed_hex": sealed.hex(),
        },
    }


# --- envelope.json ----------------------------------------------------------------------


@dataclass(frozen=True)
class EnvelopeCase:
    name: str
    sender: Device
    header: envelope.EnvelopeHeader


def _header(
    sender: Device, to: tuple[Device, ...], *, id_hex: str, size: int, sha256: bytes
) -> envelope.EnvelopeHeader:
    return envelope.EnvelopeHeader(
        id=bytes.fromhex(id_hex),
        sender=sender.keys.device_id,
        to=tuple(d.keys.device_id for d in to),
        created=1767261600,  # 2026-01-01T10:00:00Z
        expires=1767261600 + 30 * 86400,
        size=size,
        sha256=sha256,
    )


ENVELOPE_CASES = (
    EnvelopeCase(
        name="one recipient",
        sender=ALICE,
        header=_header(
            ALICE,
            (BOB,),
            id_hex="0f8e2c1a9b7d4e3f5a6b7c8d9e0f1a2b",
            size=0x1234,
            sha256=hashlib.sha256(b"ciphertext stand-in").digest(),
        ),
    ),
    EnvelopeCase(
        name="two recipients, a 3 GB ciphertext (uint32 size)",
        sender=BOB,
        header=_header(
            BOB,
            (ALICE, CAROL),
            id_hex="a0b1c2d3e4f5061728394a5b6c7d8e9f",
            size=3_000_000_000,
            sha256=bytes(range(32)),
        ),
    ),
)


def _invalid_prefixes() -> list[dict[str, Any]]:
    """Prefixes a reader must refuse, each with the error code and the device it expects."""
    good = envelope.seal_header(ENVELOPE_CASES[0].header, ALICE.keys.signing_key)
    magic = envelope.MAGIC
    v2_raw = codec.encode({**codec.decode(good.raw), "v": 2})
    v2 = envelope.SignedHeader(
        raw=v2_raw, signature=keys.sign(ALICE.keys.signing_key, keys.CTX_ENVELOPE, hashlib.sha256(v2_raw).digest())
    )
    other_from = envelope.seal_header(
        _header(BOB, (CAROL,), id_hex="11" * 16, size=1, sha256=bytes(32)), ALICE.keys.signing_key
    )
    bundle_ctx = envelope.SignedHeader(
        raw=good.raw, signature=keys.sign(ALICE.keys.signing_key, keys.CTX_BUNDLE, good.envelope_hash)
    )
    flipped = bytearray(good.prefix)
    flipped[len(magic) + 2 + 5] ^= 0x01
    cases: list[tuple[str, bytes, str]] = [
        ("bad magic (refused from its first wrong byte)", b"pli-envelope/v2\n" + good.prefix[16:], "malformed"),
        ("header length 0", magic + b"\x00\x00", "malformed"),
        ("header length 4097 (refused once the two length bytes are in)", magic + b"\x10\x01", "too_large"),
        ("one header bit flipped", bytes(flipped), "bad_signature"),
        ("signed under the pli/bundle/v1 context", bundle_ctx.prefix, "bad_signature"),
        ("v = 2, correctly signed", v2.prefix, "unsupported_version"),
        ("'from' names bob, signed by alice", other_from.prefix, "bad_signature"),
    ]
    return [{"name": n, "expected_signer": ALICE.name, "prefix_hex": p.hex(), "error": e} for n, p, e in cases]


def envelope_vectors() -> dict[str, Any]:
    out = []
    for case in ENVELOPE_CASES:
        h = case.header
        signed = envelope.seal_header(h, case.sender.keys.signing_key)
        out.append(
            {
                "name": case.name,
                "sender": case.sender.name,
                "id_hex": h.id.hex(),
                "from_hex": h.sender.hex(),
                "to_hex": [t.hex() for t in h.to],
                "created": h.created,
                "expires": h.expires,
                "size": h.size,
                "sha256_hex": h.sha256.hex(),
                "header_hex": signed.raw.hex(),
                "signature_hex": signed.signature.hex(),
                "prefix_hex": signed.prefix.hex(),
                "envelope_hash_hex": signed.envelope_hash.hex(),
            }
        )
    return {
        "description": (
            "Envelope prefixes (SPEC.md section 5): 'pli-envelope/v1\\n' || u16be(len(header)) "
            "|| header || Ed25519 signature by the sender over 'pli/envelope/v1' || 0x00 || "
            "header. Devices are those of keys.json. 'valid': the header fields, the header "
            "bytes (canonical msgpack), the signature, the whole prefix and the envelope "
            "hash SHA-256(header). 'invalid': prefixes a reader expecting 'expected_signer' "
            "must refuse with 'error'."
        ),
        "valid": out,
        "invalid": _invalid_prefixes(),
    }


# --- bundle.json ------------------------------------------------------------------------

BUNDLE_ENVELOPE_ID = bytes.fromhex("5e1f0a2b3c4d5e6f708192a3b4c5d6e7")
BUNDLE_CASE_ID = bytes.fromhex("c0ffee00c0ffee01c0ffee02c0ffee03")
BUNDLE_CREATED = 1767261600
BUNDLE_FILES: tuple[tuple[str, str, bytes], ...] = (
    ("demande-teleexpertise.pdf", "application/pdf", b"%PDF-1.4\n% the pre-filled dossier (stand-in)\n%%EOF\n"),
    ("observation.txt", "text/plain", "Lésion pigmentée du dos, 7 mm, bords irréguliers.\n".encode()),
    ("vide.bin", "application/octet-stream", b""),
    ("photo épaule.jpg", "image/jpeg", bytes((i * 7 + 3) % 256 for i in range(700))),
)
BUNDLE_BODY = request_body(dossier="demande-teleexpertise.pdf")
# age: stanzas for the recipient (bob) then the sender (alice), so the sender can reread
BUNDLE_AGE_FILE_KEY = bytes.fromhex("b0b1b2b3b4b5b6b7b8b9babbbcbdbebf")
BUNDLE_AGE_EPHEMERAL = (bytes(range(0x40, 0x60)), bytes(range(0x60, 0x80)))
BUNDLE_AGE_NONCE = bytes.fromhex("f0e1d2c3b4a5968778695a4b3c2d1e0f")
BUNDLE_EXPIRES = BUNDLE_CREATED + 30 * 86400


def bundle_manifest() -> bundle.Manifest:
    pub = ALICE.keys.public()
    return bundle.Manifest(
        kind="request",
        case_id=BUNDLE_CASE_ID,
        envelope_id=BUNDLE_ENVELOPE_ID,
        created=BUNDLE_CREATED,
        sender=bundle.Sender(pub.sign_key, pub.enc_key, ALICE.rpps, ALICE.practitioner),
        recipients=(BOB.keys.device_id,),
        files=tuple(bundle.FileEntry(n, t, len(d), hashlib.sha256(d).digest()) for n, t, d in BUNDLE_FILES),
        body=dict(BUNDLE_BODY),
    )


def bundle_plaintext() -> tuple[bytes, bytes, bytes]:
    """(manifest bytes, manifest signature, the tar plaintext with its padding)."""
    m = bundle_manifest()
    raw, sig = bundle.sign_manifest(m, ALICE.keys.signing_key)
    out = io.BytesIO()
    bundle.write_bundle(out, raw, sig, [(e, io.BytesIO(d)) for e, (_, _, d) in zip(m.files, BUNDLE_FILES, strict=True)])
    return raw, sig, out.getvalue()


def bundle_ciphertext(plaintext: bytes) -> bytes:
    out = io.BytesIO()
    with age.EncryptWriter._from_parts(  # noqa: SLF001 (fixed randomness, for vectors)
        out,
        [BOB.keys.public().recipient, ALICE.keys.public().recipient],
        file_key=BUNDLE_AGE_FILE_KEY,
        ephemeral_secrets=BUNDLE_AGE_EPHEMERAL,
        payload_nonce=BUNDLE_AGE_NONCE,
    ) as w:
        w.write(plaintext)
    return out.getvalue()


def bundle_envelope_header(ciphertext: bytes) -> envelope.EnvelopeHeader:
    return envelope.EnvelopeHeader(
        id=BUNDLE_ENVELOPE_ID,
        sender=ALICE.keys.device_id,
        to=(BOB.keys.device_id,),
        created=BUNDLE_CREATED,
        expires=BUNDLE_EXPIRES,
        size=len(ciphertext),
        sha256=hashlib.sha256(ciphertext).digest(),
    )


def _tar_length(plaintext: bytes) -> int:
    """Length of the tar archive (end marker and record padding included), before Padmé."""
    with tarfile.open(fileobj=io.BytesIO(plaintext), mode="r:") as tar:
        last = tar.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512
    record = 20 * 512
    return max(record, -(-(end + 1024) // record) * record)


def bundle_vectors() -> dict[str, Any]:
    raw, sig, plaintext = bundle_plaintext()
    ciphertext = bundle_ciphertext(plaintext)
    header = bundle_envelope_header(ciphertext)
    signed = envelope.seal_header(header, ALICE.keys.signing_key)
    return {
        "description": (
            "A request bundle (SPEC.md section 6) from alice to bob (devices of keys.json). "
            "'manifest_hex' is the canonical manifest, 'manifest_sig_hex' alice's signature "
            "over 'pli/bundle/v1' || 0x00 || manifest. The plaintext is the pax tar "
            "(pli/manifest, pli/manifest.sig, files/<name> in order; mode 0644, uid/gid 0, "
            "mtime 0, empty owner names; non-ASCII names in pax 'path' records) then zero "
            "bytes to the Padme length; it is too large to store, so only its length and "
            "SHA-256 are given. It is encrypted with age to bob then alice with the fixed "
            "file key, ephemeral secrets (in stanza order) and payload nonce; 'age_header' "
            "is the exact age header. 'envelope_prefix_hex' is alice's signed envelope "
            "prefix for that ciphertext: the envelope is that prefix followed by the "
            "ciphertext."
        ),
        "sender": ALICE.name,
        "recipients": [BOB.name],
        "kind": "request",
        "case_hex": BUNDLE_CASE_ID.hex(),
        "envelope_hex": BUNDLE_ENVELOPE_ID.hex(),
        "created": BUNDLE_CREATED,
        "sender_rpps": ALICE.rpps,
        "sender_name": ALICE.practitioner,
        "body": BUNDLE_BODY,
        "files": [
            {"name": n, "type": t, "size": len(d), "sha256_hex": hashlib.sha256(d).hexdigest(), "content_hex": d.hex()}
            for n, t, d in BUNDLE_FILES
        ],
        "manifest_hex": raw.hex(),
        "manifest_sig_hex": sig.hex(),
        "tar_size": _tar_length(plaintext),
        "plaintext_size": len(plaintext),
        "plaintext_sha256_hex": hashlib.sha256(plaintext).hexdigest(),
        "age_stanza_order": [BOB.name, ALICE.name],
        "age_file_key_hex": BUNDLE_AGE_FILE_KEY.hex(),
        "age_ephemeral_secrets_hex": [e.hex() for e in BUNDLE_AGE_EPHEMERAL],
        "age_payload_nonce_hex": BUNDLE_AGE_NONCE.hex(),
        "age_header": ciphertext[: age.header_size(2)].decode("ascii"),
        "ciphertext_size": len(ciphertext),
        "ciphertext_sha256_hex": hashlib.sha256(ciphertext).hexdigest(),
        "envelope_expires": BUNDLE_EXPIRES,
        "envelope_prefix_hex": signed.prefix.hex(),
        "envelope_hash_hex": signed.envelope_hash.hex(),
        "answers": answer_manifests(),
    }


ANSWER_KINDS = ("complement_request", "complement", "avis", "refus", "presentiel")


def answer_manifests() -> list[dict[str, Any]]:
    """One manifest of every other kind (SPEC.md §6.3), each answering the request above.

    The requis kinds are signed by bob, ``complement`` by alice; no files.
    """
    out = []
    for i, kind in enumerate(ANSWER_KINDS):
        author = ALICE if kind == "complement" else BOB
        peer = BOB if kind == "complement" else ALICE
        body = answer_body(kind, BUNDLE_ENVELOPE_ID, text="Photo dermoscopique, s'il vous plaît.")
        if kind == "avis":
            body.update(avis="Naevus atypique ; exérèse conseillée.", prescriptions=["Exérèse avec marges de 2 mm"])
        pub = author.keys.public()
        m = bundle.Manifest(
            kind=kind, case_id=BUNDLE_CASE_ID, envelope_id=bytes([0xA0 + i]) * 16,
            created=BUNDLE_CREATED + 60 * (i + 1),
            sender=bundle.Sender(pub.sign_key, pub.enc_key, author.rpps, author.practitioner),
            recipients=(peer.keys.device_id,), files=(), body=body,
        )
        raw, sig = bundle.sign_manifest(m, author.keys.signing_key)
        out.append({"kind": kind, "sender": author.name, "body": to_json(body), "manifest_hex": raw.hex(),
                    "manifest_sig_hex": sig.hex()})
    return out


# --- files ------------------------------------------------------------------------------

GENERATORS: dict[str, Callable[[], dict[str, Any]]] = {
    "codec.json": codec_vectors,
    "keys.json": keys_vectors,
    "envelope.json": envelope_vectors,
    "bundle.json": bundle_vectors,
}


def render(obj: dict[str, Any]) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    for name, build in GENERATORS.items():
        path = VECTORS_DIR / name
        path.write_text(render(build()), encoding="utf-8")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
