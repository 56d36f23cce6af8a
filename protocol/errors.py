"""Typed errors of the Pli protocol.

Every refusal in Pli is one of these, with a stable ``code`` that clients, relays and
auditors can match on (they travel in ``application/problem+json`` bodies as ``code``)
and an HTTP status hint for the relay. Parsers translate whatever their dependencies
raise (msgpack, tarfile, base64, PyNaCl) into these at the boundary, with
``raise X(...) from e``; nothing else escapes a ``protocol`` decoder.

The tree::

    PliError                          root of everything the protocol raises
    ├── DecodeError        malformed  bytes that do not parse as the format says
    │   ├── LimitError     too_large  a length or count over its limit (checked first)
    │   └── VersionError   unsupported_version
    ├── SignatureError     bad_signature     an Ed25519 signature does not verify
    ├── DecryptError       decryption_failed one opaque error for every way
    │   │                                    decryption can fail, with
    │   ├── NoIdentityError  no_matching_key   ...its age test-kit distinctions
    │   ├── HeaderMacError   header_mac        kept as subclasses
    │   └── PayloadError     payload_corrupt
    ├── BundleError        bad_bundle  a decrypted bundle fails its own rules
    │   └── NotARecipientError not_a_recipient
    └── AuthError          unauthorized   an HTTP message signature is refused
        ├── StaleSignatureError stale_signature
        └── ReplayError    replayed_request
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "BundleError",
    "DecodeError",
    "DecryptError",
    "HeaderMacError",
    "LimitError",
    "NoIdentityError",
    "NotARecipientError",
    "PayloadError",
    "PliError",
    "ReplayError",
    "SignatureError",
    "StaleSignatureError",
    "VersionError",
]


class PliError(Exception):
    """Root of every error Pli raises on purpose.

    ``code`` is stable and machine-readable; ``status`` is the HTTP status a relay
    answers with when this error is the client's fault.
    """

    code: str = "error"
    status: int = 400

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class DecodeError(PliError):
    code = "malformed"


class LimitError(DecodeError):
    code = "too_large"
    status = 413


class VersionError(DecodeError):
    code = "unsupported_version"


class SignatureError(PliError):
    code = "bad_signature"


class DecryptError(PliError):
    """Decryption failed. Callers that only need to know *that* it failed catch this."""

    code = "decryption_failed"


class NoIdentityError(DecryptError):
    code = "no_matching_key"


class HeaderMacError(DecryptError):
    code = "header_mac"


class PayloadError(DecryptError):
    code = "payload_corrupt"


class BundleError(PliError):
    code = "bad_bundle"


class NotARecipientError(BundleError):
    code = "not_a_recipient"


class AuthError(PliError):
    code = "unauthorized"
    status = 401


class StaleSignatureError(AuthError):
    code = "stale_signature"


class ReplayError(AuthError):
    code = "replayed_request"
