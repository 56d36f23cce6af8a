"""Generate protocol/vectors/age.json: age files another implementation must reproduce.

Run from the repository root: ``python -m tools.vectors_age``. Every random input of
age encryption (file key, ephemeral X25519 secrets, payload nonce) is fixed here, so
the output is byte-for-byte reproducible; tests/test_age.py encrypts and decrypts each
case and regenerates the file to compare it with the committed one.

Large payloads are not stored: their plaintext is ``bytes(range(256))`` repeated and
cut to ``plaintext_size``, and the file records the SHA-256 of plaintext and ciphertext.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

from protocol import age

OUTPUT = Path(__file__).resolve().parent.parent / "protocol" / "vectors" / "age.json"

# Test keys, published here on purpose: never use them for anything real.
IDENTITY_SECRETS = (
    bytes.fromhex("7e1f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7"),
    bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f00112233445566778899aabbccddeeff0"),
)
INLINE_LIMIT = 1024  # plaintexts up to this size are stored in full


@dataclass(frozen=True)
class Case:
    name: str
    comment: str
    recipients: tuple[int, ...]  # indexes into IDENTITY_SECRETS
    file_key: bytes
    ephemeral_secrets: tuple[bytes, ...]
    payload_nonce: bytes
    plaintext: bytes


def pattern(size: int) -> bytes:
    """The deterministic plaintext of the large cases."""
    return (bytes(range(256)) * (size // 256 + 1))[:size]


CASES = (
    Case(
        name="one-recipient",
        comment="one X25519 stanza, a payload shorter than one chunk",
        recipients=(0,),
        file_key=bytes.fromhex("000102030405060708090a0b0c0d0e0f"),
        ephemeral_secrets=(bytes(range(0x20, 0x40)),),
        payload_nonce=bytes.fromhex("a0a1a2a3a4a5a6a7a8a9aaabacadaeaf"),
        plaintext=b"Pli: avis de t\xc3\xa9l\xc3\xa9expertise, cas n\xc2\xb01\n",
    ),
    Case(
        name="empty-payload",
        comment="an empty plaintext is one empty final chunk",
        recipients=(0,),
        file_key=bytes.fromhex("101112131415161718191a1b1c1d1e1f"),
        ephemeral_secrets=(bytes(range(0x40, 0x60)),),
        payload_nonce=bytes.fromhex("b0b1b2b3b4b5b6b7b8b9babbbcbdbebf"),
        plaintext=b"",
    ),
    Case(
        name="two-recipients",
        comment="two X25519 stanzas in recipient order; either identity decrypts",
        recipients=(0, 1),
        file_key=bytes.fromhex("202122232425262728292a2b2c2d2e2f"),
        ephemeral_secrets=(bytes(range(0x60, 0x80)), bytes(range(0x80, 0xA0))),
        payload_nonce=bytes.fromhex("c0c1c2c3c4c5c6c7c8c9cacbcccdcecf"),
        plaintext=b"two recipients, one file key\n",
    ),
    Case(
        name="full-chunk",
        comment="exactly 64 KiB: a single full chunk, sealed as the final one",
        recipients=(1,),
        file_key=bytes.fromhex("303132333435363738393a3b3c3d3e3f"),
        ephemeral_secrets=(bytes(range(0xA0, 0xC0)),),
        payload_nonce=bytes.fromhex("d0d1d2d3d4d5d6d7d8d9dadbdcdddedf"),
        plaintext=pattern(age.CHUNK_SIZE),
    ),
    Case(
        name="multi-chunk",
        comment="three full chunks and a 5-byte final chunk",
        recipients=(0, 1),
        file_key=bytes.fromhex("404142434445464748494a4b4c4d4e4f"),
        ephemeral_secrets=(bytes(range(0xC0, 0xE0)), bytes(range(0xE0, 0x100))),
        payload_nonce=bytes.fromhex("e0e1e2e3e4e5e6e7e8e9eaebecedeeef"),
        plaintext=pattern(3 * age.CHUNK_SIZE + 5),
    ),
)


def identity(index: int) -> age.X25519Identity:
    return age.X25519Identity.from_bytes(IDENTITY_SECRETS[index])


def encrypt_case(case: Case) -> bytes:
    out = io.BytesIO()
    with age.EncryptWriter._from_parts(  # noqa: SLF001 (fixed randomness, for vectors)
        out,
        [identity(i).recipient for i in case.recipients],
        file_key=case.file_key,
        ephemeral_secrets=case.ephemeral_secrets,
        payload_nonce=case.payload_nonce,
    ) as w:
        w.write(case.plaintext)
    return out.getvalue()


def _case(case: Case) -> dict[str, object]:
    ciphertext = encrypt_case(case)
    header_len = age.header_size(len(case.recipients))
    entry: dict[str, object] = {
        "name": case.name,
        "comment": case.comment,
        "recipients": [identity(i).recipient.to_string() for i in case.recipients],
        "identities": [identity(i).to_string() for i in case.recipients],
        "file_key_hex": case.file_key.hex(),
        "ephemeral_secrets_hex": [e.hex() for e in case.ephemeral_secrets],
        "payload_nonce_hex": case.payload_nonce.hex(),
        "plaintext_size": len(case.plaintext),
        "plaintext_sha256": hashlib.sha256(case.plaintext).hexdigest(),
        "header": ciphertext[:header_len].decode("ascii"),
        "ciphertext_size": len(ciphertext),
        "ciphertext_sha256": hashlib.sha256(ciphertext).hexdigest(),
    }
    if len(case.plaintext) <= INLINE_LIMIT:
        entry["plaintext_hex"] = case.plaintext.hex()
        entry["ciphertext_hex"] = ciphertext.hex()
    else:
        entry["plaintext_pattern"] = "bytes(range(256)) repeated, cut to plaintext_size"
    return entry


def build() -> dict[str, object]:
    return {
        "description": (
            "Pli age v1 files (age-encryption.org/v1, X25519 recipients) with fixed "
            "randomness: file key, one ephemeral secret per stanza (in recipient order) "
            "and the 16-byte payload nonce. 'header' is the exact header text, MAC line "
            "included; the payload (nonce, then STREAM chunks) follows it. Small cases "
            "carry the whole ciphertext in hex; large ones only its SHA-256."
        ),
        "identities": [identity(i).to_string() for i in range(len(IDENTITY_SECRETS))],
        "identity_secrets_hex": [s.hex() for s in IDENTITY_SECRETS],
        "cases": [_case(c) for c in CASES],
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    OUTPUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
