"""The Pli protocol: keys, encodings, envelopes, bundles, signatures; pure functions over bytes.

Nothing here does I/O or reads the clock: time and randomness are parameters, and file-like
objects are passed in by the caller (STYLE §1).
"""

from protocol.errors import (
    AuthError,
    BundleError,
    DecodeError,
    DecryptError,
    HeaderMacError,
    LimitError,
    NoIdentityError,
    NotARecipientError,
    PayloadError,
    PliError,
    ReplayError,
    SignatureError,
    StaleSignatureError,
    VersionError,
)

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
