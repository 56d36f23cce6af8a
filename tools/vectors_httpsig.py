"""Generate protocol/vectors/httpsig.json: signed Pli requests another implementation must match.

Run from the repository root: ``python -m tools.vectors_httpsig``. The key, times and
nonces are fixed so the output is byte-for-byte reproducible (Ed25519 is deterministic);
tests/test_httpsig.py regenerates it and compares with the committed file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import nacl.signing

from protocol import httpsig

OUTPUT = Path(__file__).resolve().parent.parent / "protocol" / "vectors" / "httpsig.json"

# A test key, published here on purpose: never use it for anything real.
SEED = bytes.fromhex("5f1e3a9c7b2d4e6f80a1b2c3d4e5f60718293a4b5c6d7e8f9011223344556677")


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    scheme: str
    host: str
    port: int
    path: str  # raw, percent-encoded as on the wire
    query: str  # raw, without "?"
    body: str
    created: int
    nonce_bytes: bytes


CASES = (
    Case(
        name="post-with-body",
        method="POST",
        scheme="https",
        host="Relay.Example.org",
        port=443,
        path="/v1/cases",
        query="",
        body='{"hello": "world"}',
        created=1700000000,
        nonce_bytes=bytes(range(16)),
    ),
    Case(
        name="get-empty-body-with-query-and-port",
        method="GET",
        scheme="https",
        host="relay.example.org",
        port=8443,
        path="/v1/inbox/%C3%A9t%C3%A9",
        query="after=42&limit=10",
        body="",
        created=1700000300,
        nonce_bytes=bytes(range(0xF0, 0x100)) + b"\x00\x01",
    ),
)


def device_id(verify_key: nacl.signing.VerifyKey) -> str:
    """Device id as protocol/keys.py defines it, so the vector's keyid is a realistic one."""
    return hashlib.sha256(b"pli/device-id/v1\x00" + bytes(verify_key)).digest()[:16].hex()


def _case(case: Case, signing_key: nacl.signing.SigningKey, keyid: str) -> dict[str, object]:
    digest = httpsig.content_digest(hashlib.sha256(case.body.encode("utf-8")).digest())
    authority = httpsig.authority(case.host, case.port, case.scheme)
    nonce = httpsig.encode_nonce(case.nonce_bytes)
    headers = httpsig.sign_request(
        method=case.method,
        authority=authority,
        path=case.path,
        query=case.query,
        content_digest=digest,
        signing_key=signing_key,
        keyid=keyid,
        created=case.created,
        nonce=nonce,
    )
    components = [
        ("@method", case.method),
        ("@authority", authority),
        ("@path", case.path),
        ("@query", "?" + case.query),
        ("content-digest", digest),
    ]
    params = httpsig.signature_params(created=case.created, keyid=keyid, nonce=nonce)
    base = httpsig.signature_base(components, params)
    return {
        "name": case.name,
        "method": case.method,
        "scheme": case.scheme,
        "host": case.host,
        "port": case.port,
        "authority": authority,
        "path": case.path,
        "query": case.query,
        "body_utf8": case.body,
        "created": case.created,
        "nonce_bytes_hex": case.nonce_bytes.hex(),
        "nonce": nonce,
        "signature_base": base.decode("ascii"),
        "headers": headers,
    }


def build() -> dict[str, object]:
    signing_key = nacl.signing.SigningKey(SEED)
    keyid = device_id(signing_key.verify_key)
    return {
        "description": (
            "Pli request signatures: RFC 9421 HTTP Message Signatures (alg ed25519, label "
            "'pli') covering @method @authority @path @query content-digest, with an RFC 9530 "
            "sha-256 Content-Digest of the body. 'signature_base' is the exact byte string "
            "signed (lines separated by LF, no final LF). Verify each case with now = created."
        ),
        "seed_hex": SEED.hex(),
        "public_key_hex": bytes(signing_key.verify_key).hex(),
        "keyid": keyid,
        "cases": [_case(case, signing_key, keyid) for case in CASES],
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    OUTPUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
