"""Device identities: who signs, who can decrypt, and how people compare keys aloud.

A device holds two separate keys (SPEC.md §3): an Ed25519 key that signs and an X25519
key that receives age stanzas. The X25519 key is certified by the Ed25519 key, so a
directory entry cannot pair someone's signing key with an attacker's encryption key.

Every signature in Pli is over ``context || 0x00 || message`` with a context such as
``pli/bundle/v1``: a signature made for one purpose can never be replayed as another.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

import nacl.exceptions
import nacl.pwhash
import nacl.secret
import nacl.signing
import nacl.utils
from nacl.bindings import crypto_scalarmult_base

from protocol import codec
from protocol.age import X25519Identity, X25519Recipient
from protocol.errors import DecodeError, DecryptError, SignatureError

__all__ = [
    "CTX_BUNDLE",
    "CTX_DEVICE_CERT",
    "CTX_ENVELOPE",
    "DeviceKeys",
    "DevicePublic",
    "device_id_of",
    "fingerprint",
    "sign",
    "verify",
]

CTX_DEVICE_CERT = b"pli/device-cert/v1"
CTX_BUNDLE = b"pli/bundle/v1"
CTX_ENVELOPE = b"pli/envelope/v1"

DEVICE_ID_SIZE = 16
_FINGERPRINT_ITERATIONS = 5200
_MAX_OPS = 4 * nacl.pwhash.argon2id.OPSLIMIT_SENSITIVE
_MAX_MEM = nacl.pwhash.argon2id.MEMLIMIT_SENSITIVE  # as Signal's NumericFingerprintGenerator


def sign(key: nacl.signing.SigningKey, context: bytes, message: bytes) -> bytes:
    """Sign ``message`` for one purpose only (SPEC.md §3.1). Returns the 64-byte signature."""
    return key.sign(context + b"\x00" + message).signature


def verify(key: nacl.signing.VerifyKey, context: bytes, message: bytes, signature: bytes) -> None:
    """Verify a signature made by :func:`sign` with the same ``context``.

    Raises:
        SignatureError: the signature is not ``key``'s over this context and message.
    """
    if len(signature) != 64:
        raise SignatureError("an Ed25519 signature is 64 bytes")
    try:
        key.verify(context + b"\x00" + message, signature)
    except nacl.exceptions.BadSignatureError as e:
        raise SignatureError(f"signature does not verify ({context.decode()})") from e


def device_id_of(sign_key: bytes) -> bytes:
    """A device's stable id: the first 16 bytes of SHA-256("pli/device-id/v1" || 0x00 || key)."""
    return hashlib.sha256(b"pli/device-id/v1\x00" + sign_key).digest()[:DEVICE_ID_SIZE]


def fingerprint(sign_key: bytes, enc_key: bytes) -> str:
    """Thirty digits in six groups of five, to read aloud (SPEC.md §3.3).

    The construction is Signal's numeric fingerprint for one party: SHA-512 iterated
    5200 times over version, key material and label, then six 5-byte big-endian
    chunks each reduced mod 100000. Iteration makes a near-collision search costly.
    """
    digest = b"\x00\x00" + sign_key + enc_key + b"pli/fingerprint/v1"
    for _ in range(_FINGERPRINT_ITERATIONS):
        digest = hashlib.sha512(digest + sign_key + enc_key).digest()
    groups = [int.from_bytes(digest[i : i + 5], "big") % 100000 for i in range(0, 30, 5)]
    return " ".join(f"{g:05d}" for g in groups)


@dataclass(frozen=True)
class DevicePublic:
    """A device's public keys, as certified by its own signing key.

    Travels as ``{"sign_key": bin32, "cert": bin, "sig": bin64}`` (SPEC.md §3.2): the
    signature is checked over the exact ``cert`` bytes before they are decoded, and
    the key inside the certificate must be the one that signed it.
    """

    sign_key: bytes
    enc_key: bytes
    created: int
    cert: bytes = field(repr=False)
    sig: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.sign_key) != 32 or len(self.enc_key) != 32 or len(self.sig) != 64:
            raise DecodeError("device keys: wrong key or signature length")

    @property
    def device_id(self) -> bytes:
        return device_id_of(self.sign_key)

    @property
    def verify_key(self) -> nacl.signing.VerifyKey:
        return nacl.signing.VerifyKey(self.sign_key)

    @property
    def recipient(self) -> X25519Recipient:
        return X25519Recipient.from_bytes(self.enc_key)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.sign_key, self.enc_key)

    def to_record(self) -> dict[str, bytes]:
        return {"sign_key": self.sign_key, "cert": self.cert, "sig": self.sig}

    def to_bytes(self) -> bytes:
        return codec.encode(self.to_record())

    @classmethod
    def from_record(cls, obj: object) -> DevicePublic:
        """Verify then decode a device record.

        Raises:
            DecodeError: not a well-formed record or certificate.
            SignatureError: the certificate is not signed by the key it names.
        """
        r = codec.MapReader(obj, "device")
        sign_key = r.bytes_("sign_key", size=32)
        cert = r.bytes_("cert", max_size=256)
        sig = r.bytes_("sig", size=64)
        r.done()
        verify(nacl.signing.VerifyKey(sign_key), CTX_DEVICE_CERT, cert, sig)
        c = codec.MapReader(codec.decode(cert), "device certificate")
        codec.expect_version(c, (1,))
        inner_sign = c.bytes_("sign_key", size=32)
        enc_key = c.bytes_("enc_key", size=32)
        created = c.int_("created")
        c.done()
        if not hmac.compare_digest(inner_sign, sign_key):
            raise SignatureError("device certificate names another signing key")
        return cls(sign_key=sign_key, enc_key=enc_key, created=created, cert=cert, sig=sig)

    @classmethod
    def from_bytes(cls, data: bytes) -> DevicePublic:
        return cls.from_record(codec.decode(data))


@dataclass(frozen=True)
class DeviceKeys:
    """A device's private keys. Never leaves the device except sealed by a passphrase."""

    sign_seed: bytes = field(repr=False)
    enc_secret: bytes = field(repr=False)
    created: int

    def __post_init__(self) -> None:
        if len(self.sign_seed) != 32 or len(self.enc_secret) != 32:
            raise DecodeError("device keys: seeds are 32 bytes")

    @classmethod
    def generate(cls, *, now: int) -> DeviceKeys:
        return cls(sign_seed=nacl.utils.random(32), enc_secret=nacl.utils.random(32), created=now)

    @property
    def signing_key(self) -> nacl.signing.SigningKey:
        return nacl.signing.SigningKey(self.sign_seed)

    @property
    def identity(self) -> X25519Identity:
        return X25519Identity.from_bytes(self.enc_secret)

    @property
    def device_id(self) -> bytes:
        return device_id_of(bytes(self.signing_key.verify_key))

    def public(self) -> DevicePublic:
        """The certified public half (deterministic: same keys, same bytes)."""
        sign_key = bytes(self.signing_key.verify_key)
        enc_key = crypto_scalarmult_base(self.enc_secret)
        cert = codec.encode(
            {"v": 1, "sign_key": sign_key, "enc_key": enc_key, "created": self.created}
        )
        sig = sign(self.signing_key, CTX_DEVICE_CERT, cert)
        return DevicePublic(sign_key=sign_key, enc_key=enc_key, created=self.created, cert=cert, sig=sig)

    # -- sealed storage (SPEC.md §3.4) -------------------------------------------------

    def seal(
        self,
        passphrase: bytes,
        *,
        opslimit: int = nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE,
        memlimit: int = nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE,
    ) -> bytes:
        """Encrypt the private keys under a passphrase (Argon2id, then XSalsa20-Poly1305)."""
        salt = nacl.utils.random(nacl.pwhash.argon2id.SALTBYTES)
        key = nacl.pwhash.argon2id.kdf(32, passphrase, salt, opslimit=opslimit, memlimit=memlimit)
        inner = codec.encode(
            {"v": 1, "sign_seed": self.sign_seed, "enc_secret": self.enc_secret, "created": self.created}
        )
        box = nacl.secret.SecretBox(key).encrypt(inner)
        return codec.encode(
            {"v": 1, "kdf": "argon2id13", "ops": opslimit, "mem": memlimit, "salt": salt, "box": bytes(box)}
        )

    @classmethod
    def unseal(cls, sealed: bytes, passphrase: bytes) -> DeviceKeys:
        """Open what :meth:`seal` wrote.

        Raises:
            DecryptError: wrong passphrase or altered file (one opaque error).
            DecodeError: not a sealed key file.
        """
        r = codec.MapReader(codec.decode(sealed), "key file")
        codec.expect_version(r, (1,))
        if r.str_("kdf", max_len=32) != "argon2id13":
            raise DecodeError("key file: unknown key-derivation function")
        # Bounded, so a tampered key file cannot make unlocking run for hours or take
        # more memory than libsodium's SENSITIVE level before the passphrase is checked.
        ops = r.int_("ops", min_value=nacl.pwhash.argon2id.OPSLIMIT_MIN, max_value=_MAX_OPS)
        mem = r.int_("mem", min_value=nacl.pwhash.argon2id.MEMLIMIT_MIN, max_value=_MAX_MEM)
        salt = r.bytes_("salt", size=nacl.pwhash.argon2id.SALTBYTES)
        box = r.bytes_("box", max_size=1024)
        r.done()
        key = nacl.pwhash.argon2id.kdf(32, passphrase, salt, opslimit=ops, memlimit=mem)
        try:
            inner = nacl.secret.SecretBox(key).decrypt(box)
        except nacl.exceptions.CryptoError as e:
            raise DecryptError("wrong passphrase, or the key file was altered") from e
        i = codec.MapReader(codec.decode(inner), "key file contents")
        codec.expect_version(i, (1,))
        keys = cls(
            sign_seed=i.bytes_("sign_seed", size=32),
            enc_secret=i.bytes_("enc_secret", size=32),
            created=i.int_("created"),
        )
        i.done()
        return keys
