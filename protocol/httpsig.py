"""Pli's profile of HTTP Message Signatures (RFC 9421) with Ed25519 and Content-Digest (RFC 9530).

Every request a client sends to a relay is signed with the device's Ed25519 key, so the
relay knows which device is speaking without passwords, cookies or bearer tokens that
could be replayed from a log. The profile is deliberately narrow: one signature, labelled
``pli``, over one fixed list of components, with one fixed set of parameters. A generic
RFC 9421 verifier has to interpret whatever the sender chose to cover; ours only has to
check that the sender chose exactly what we require, which keeps the relay's hot path to
a few string comparisons, a handful of anchored regular expressions and one Ed25519
verification, and removes every "the signature was valid but covered the wrong things"
class of bug.

The module is pure: no clock (``now`` is a parameter), no randomness (``nonce`` is a
parameter), no I/O. Checking the body against ``Content-Digest`` and the nonce against a
replay store are the caller's job, because the relay streams bodies and owns the store;
:func:`verify_request` hands back the parsed digest and nonce for that purpose.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import nacl.exceptions
import nacl.signing

from protocol.errors import AuthError, StaleSignatureError

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

__all__ = [
    "ALG",
    "COVERED",
    "DEFAULT_MAX_SKEW",
    "LABEL",
    "MAX_FIELD_LENGTH",
    "PreparedRequest",
    "VerifiedRequest",
    "authority",
    "content_digest",
    "encode_nonce",
    "parse_content_digest",
    "prepare_request",
    "sign_request",
    "signature_base",
    "signature_params",
    "verify_request",
]

LABEL: Final = "pli"
ALG: Final = "ed25519"
COVERED: Final = ("@method", "@authority", "@path", "@query", "content-digest")
DEFAULT_MAX_SKEW: Final = 300
# Longer than any value this profile can produce (about 200 bytes), short enough that a
# hostile header never reaches a parser.
MAX_FIELD_LENGTH: Final = 1024

_SIGNATURE_INPUT: Final = "Signature-Input"
_SIGNATURE: Final = "Signature"
_CONTENT_DIGEST: Final = "Content-Digest"

# RFC 8941 §4.1.1.1: an Inner List of sf-strings, space separated, in parentheses. It is
# the only covered-component list accepted, byte for byte.
_COVERED_INNER_LIST: Final = "(" + " ".join(f'"{c}"' for c in COVERED) + ")"

# RFC 9421 §2.3 parameters. Each value is matched in its canonical RFC 8941 serialization
# (§3.3.1 Integer without sign or leading zeros, §3.3.3 String without escapes), so the
# text received is exactly the text a serializer would produce and can be used verbatim
# as the @signature-params value (RFC 9421 §3.2 step 7).
_PARAM_PATTERNS: Final[dict[str, re.Pattern[str]]] = {
    "created": re.compile(r"0|[1-9][0-9]{0,14}"),
    "keyid": re.compile(r'"[0-9a-f]{32}"'),
    "nonce": re.compile(r'"[A-Za-z0-9_-]{22,64}"'),
    "alg": re.compile(r'"ed25519"'),
}
_PARAM_ORDER: Final = ("created", "keyid", "nonce", "alg")
_KEYID_RE: Final = re.compile(r"[0-9a-f]{32}")
_NONCE_RE: Final = re.compile(r"[A-Za-z0-9_-]{22,64}")
_SF_KEY_RE: Final = re.compile(r"[a-z*][a-z0-9_.*-]{0,63}")

# RFC 8941 §3.3.5 Byte Sequence holding base64 (RFC 4648 §4, padded). A 64-byte
# signature is 88 characters ending "=="; a 32-byte SHA-256 digest is 44 ending "=".
_SIGNATURE_VALUE_RE: Final = re.compile(r":([A-Za-z0-9+/]{86}==):")
# RFC 9530 §2: Content-Digest is a Dictionary of algorithm -> Byte Sequence; Pli sends
# and accepts exactly one member, sha-256 (RFC 9530 §5).
_CONTENT_DIGEST_RE: Final = re.compile(r"sha-256=:([A-Za-z0-9+/]{43}=):")

# The two signature fields exactly as sign_request writes them (what every Pli client
# sends): matched in one go. Anything else takes the general parse below, which accepts
# the same texts and more (parameters in another order), and says what is wrong.
_FAST_SIGNATURE_INPUT: Final = re.compile(
    re.escape(f"{LABEL}=")
    + "("
    + re.escape(_COVERED_INNER_LIST)
    + r';created=(0|[1-9][0-9]{0,14});keyid="([0-9a-f]{32})";nonce="([A-Za-z0-9_-]{22,64})";alg="ed25519")'
)
_FAST_SIGNATURE: Final = re.compile(re.escape(f"{LABEL}=") + r":([A-Za-z0-9+/]{86}==):")

_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_OWS: Final = " \t"


@dataclass(frozen=True, slots=True)
class VerifiedRequest:
    """What a verified signature proves, and what the caller still has to check.

    ``keyid`` is authenticated. ``content_digest`` is the signed SHA-256 the body must
    hash to, and ``nonce`` must be unseen within the skew window; the relay checks both
    because it holds the body stream and the replay store.
    """

    keyid: str
    created: int
    nonce: str
    content_digest: bytes


def content_digest(body_sha256: bytes) -> str:
    """Content-Digest field value for a body whose SHA-256 the caller computed.

    Takes the digest rather than the body so clients can hash while streaming.
    """
    if len(body_sha256) != 32:
        raise ValueError("a SHA-256 digest is 32 bytes")
    return "sha-256=:" + base64.b64encode(body_sha256).decode("ascii") + ":"


def parse_content_digest(value: str) -> bytes:
    """The 32-byte SHA-256 a Content-Digest field claims, refusing any other shape.

    Only the exact form :func:`content_digest` produces is accepted: the field value is
    itself a signed component, so a second spelling of the same digest would be a
    second message with the same meaning, which the profile does not need.
    """
    if len(value) > MAX_FIELD_LENGTH:
        raise AuthError("Content-Digest is too long")
    match = _CONTENT_DIGEST_RE.fullmatch(value.strip(_OWS))
    if match is None:
        raise AuthError("Content-Digest must be exactly one sha-256 byte sequence")
    return _b64decode_canonical(match.group(1), "Content-Digest")


def encode_nonce(random_bytes: bytes) -> str:
    """Nonce parameter text for fresh random bytes (the caller draws them, e.g. os.urandom).

    Base64url without padding keeps the value inside the sf-string alphabet with no
    escaping; 16 bytes give 22 characters.
    """
    if not 16 <= len(random_bytes) <= 48:
        raise ValueError("a nonce is 16 to 48 random bytes")
    return base64.urlsafe_b64encode(random_bytes).rstrip(b"=").decode("ascii")


def authority(host: str, port: int | None, scheme: str) -> str:
    """@authority value, normalized so client and relay derive the same text.

    RFC 9421 §2.2.3 defers to RFC 9110 §4.2.3: the host is lowercased and the port is
    omitted when it is the scheme's default. IPv6 literals keep (or gain) their brackets
    as in RFC 3986 §3.2.2.
    """
    scheme = scheme.lower()
    host = host.lower()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    if not host or not _is_signable(host) or " " in host:
        raise AuthError("the request authority is not a valid host")
    if port is None or _DEFAULT_PORTS.get(scheme) == port:
        return host
    if not 0 < port < 65536:
        raise AuthError("the request authority has an invalid port")
    return f"{host}:{port}"


def signature_params(*, created: int, keyid: str, nonce: str) -> str:
    """@signature-params value (RFC 9421 §2.3) in the profile's canonical form.

    The same text is the Signature-Input member value (RFC 9421 §4.1), which is why it
    is built once and reused for both.
    """
    return f'{_COVERED_INNER_LIST};created={created};keyid="{keyid}";nonce="{nonce}";alg="{ALG}"'


def signature_base(components: Sequence[tuple[str, str]], signature_params: str) -> bytes:
    """RFC 9421 §2.5 signature base for any covered components, not only Pli's.

    General so it can be checked against the RFC's own examples (Appendix B.2); the
    profile calls the same construction with its fixed list.
    """
    for name, value in components:
        # RFC 9421 §2: component names are lowercased sf-strings; §2.1/§2.2: values never
        # contain newlines (and are US-ASCII, §2.5), or lines could be forged.
        if not name or name != name.lower() or not _is_signable(name) or '"' in name:
            raise ValueError(f"invalid component name {name!r}")
        if name == "@signature-params":
            raise ValueError("@signature-params is always the last line, never covered")
        if not _is_signable(value):
            raise ValueError(f"component {name!r} has a value that cannot be signed")
    if not _is_signable(signature_params):
        raise ValueError("signature parameters cannot be signed")
    return _base(components, signature_params)


def sign_request(
    *,
    method: str,
    authority: str,
    path: str,
    query: str,
    content_digest: str,
    signing_key: nacl.signing.SigningKey,
    keyid: str,
    created: int,
    nonce: str,
) -> dict[str, str]:
    """Headers that authenticate one request as coming from the device holding ``signing_key``.

    ``path`` and ``query`` are the raw (still percent-encoded) strings sent on the wire,
    ``query`` without its "?". Misuse raises ValueError: a client bug, not a refusal.
    """
    if not _KEYID_RE.fullmatch(keyid):
        raise ValueError("keyid is a device id: 32 lowercase hex characters")
    if not _NONCE_RE.fullmatch(nonce):
        raise ValueError("nonce is 22 to 64 base64url characters (see encode_nonce)")
    if not 0 <= created < 10**15:
        raise ValueError("created is a non-negative Unix time in seconds")
    try:
        parse_content_digest(content_digest)
    except AuthError as e:
        raise ValueError(str(e)) from e
    params = signature_params(created=created, keyid=keyid, nonce=nonce)
    base = signature_base(_components(method, authority, path, query, content_digest), params)
    signature = signing_key.sign(base).signature
    return {
        _SIGNATURE_INPUT: f"{LABEL}={params}",
        _SIGNATURE: f"{LABEL}=:{base64.b64encode(signature).decode('ascii')}:",
        _CONTENT_DIGEST: content_digest,
    }


def verify_request(
    *,
    method: str,
    authority: str,
    path: str,
    query: str,
    headers: Mapping[str, str],
    resolve_key: Callable[[str], nacl.signing.VerifyKey],
    now: int,
    max_skew: int = DEFAULT_MAX_SKEW,
) -> VerifiedRequest:
    """Authenticate a request, or raise AuthError (StaleSignatureError for a bad clock).

    Cheap refusals come first (lengths, syntax, freshness) so a flood of junk costs no
    key lookup and no curve arithmetic. ``resolve_key`` raises AuthError for an unknown
    device; any other exception it raises is the caller's failure and propagates.
    ``headers`` should be case-insensitive (aiohttp's CIMultiDictProxy); when it is a
    multidict, repeated signature fields are refused rather than silently picking one.
    """
    prepared = prepare_request(method=method, authority=authority, path=path, query=query, headers=headers,
                               resolve_key=resolve_key, now=now, max_skew=max_skew)
    prepared.check()
    return prepared.request


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A request whose every check but the Ed25519 one passed (:func:`prepare_request`):
    :meth:`check` it (or check ``signature`` over ``base`` with ``key`` elsewhere, the
    same way) before trusting ``request``."""

    request: VerifiedRequest
    key: nacl.signing.VerifyKey
    base: bytes
    signature: bytes

    def check(self) -> None:
        """Raise AuthError unless the signature verifies."""
        try:
            # RFC 9421 §3.3.6: Ed25519 (RFC 8032 §5.1.7) over the base, no pre-hash.
            self.key.verify(self.base, self.signature)
        except (nacl.exceptions.CryptoError, ValueError, TypeError) as e:
            raise AuthError("signature does not verify") from e


def prepare_request(
    *,
    method: str,
    authority: str,
    path: str,
    query: str,
    headers: Mapping[str, str],
    resolve_key: Callable[[str], nacl.signing.VerifyKey],
    now: int,
    max_skew: int = DEFAULT_MAX_SKEW,
) -> PreparedRequest:
    """:func:`verify_request` but for the signature check itself, left to the caller
    (:meth:`PreparedRequest.check`): a server may run it on another thread."""
    signature_input_value = _field(headers, _SIGNATURE_INPUT)
    signature_value = _field(headers, _SIGNATURE)
    digest_value = _field(headers, _CONTENT_DIGEST)

    params, created, keyid, nonce = _parse_signature_input(signature_input_value)
    signature = _parse_signature(signature_value)
    digest_value = digest_value.strip(_OWS)
    digest = parse_content_digest(digest_value)

    # RFC 9421 §3.2.1: the application enforces a maximum age; Pli also refuses
    # signatures from the future, so a skewed clock cannot mint long-lived requests.
    if abs(now - created) > max_skew:
        raise StaleSignatureError("signature created outside the accepted clock skew")

    if path == "":
        path = "/"  # RFC 9421 §2.2.6: an empty path is normalized to "/"
    for value in (method, authority, path, query):
        if not _is_signable(value):
            raise AuthError("request target cannot be verified")

    verify_key = resolve_key(keyid)
    base = _base(_components(method, authority, path, query, digest_value), params)
    return PreparedRequest(VerifiedRequest(keyid=keyid, created=created, nonce=nonce, content_digest=digest),
                           verify_key, base, signature)


def _components(
    method: str, authority: str, path: str, query: str, content_digest: str
) -> tuple[tuple[str, str], ...]:
    # Same order as COVERED. RFC 9421 §2.2.7: @query keeps its leading "?", and is "?"
    # alone when the request has no query.
    return (
        ("@method", method),
        ("@authority", authority),
        ("@path", path),
        ("@query", "?" + query),
        ("content-digest", content_digest),
    )


def _base(components: Sequence[tuple[str, str]], params: str) -> bytes:
    # RFC 9421 §2.5: one `"name": value` line per component, each ending in LF, then the
    # @signature-params line with no trailing LF.
    lines = [f'"{name}": {value}\n' for name, value in components]
    lines.append(f'"@signature-params": {params}')
    return "".join(lines).encode("ascii")


def _is_signable(value: str) -> bool:
    # RFC 9421 §2.2: derived values are printable characters and spaces, never a newline;
    # the base is US-ASCII (§2.5). isprintable() on ASCII excludes every control byte.
    return value.isascii() and value.isprintable()


def _field(headers: Mapping[str, str], name: str) -> str:
    # A multidict (aiohttp) can hold the field several times; RFC 9421 §4.1/§4.2 would
    # merge them into one Dictionary, and Pli accepts exactly one signature, so refuse.
    getall: Callable[[str, list[str]], list[str]] | None = getattr(headers, "getall", None)
    if getall is not None:
        values = getall(name, [])
        if len(values) > 1:
            raise AuthError(f"{name} must appear once")
        value = values[0] if values else None
    else:
        value = headers.get(name)
    if value is None:
        raise AuthError(f"missing {name} header")
    if not isinstance(value, str):
        raise AuthError(f"{name} is not text")
    if len(value) > MAX_FIELD_LENGTH:
        raise AuthError(f"{name} is too long")
    return value


def _split_member(value: str, name: str) -> str:
    """Value of the single ``pli`` member of an RFC 8941 §3.2 Dictionary field."""
    value = value.strip(_OWS)
    # No value this profile accepts contains a comma, so any comma separates members.
    if "," in value:
        raise AuthError(f"{name} must hold exactly one signature, labelled {LABEL!r}")
    label, eq, member = value.partition("=")
    if not eq or not _SF_KEY_RE.fullmatch(label):
        raise AuthError(f"{name} is not a structured-field dictionary member")
    if label != LABEL:
        raise AuthError(f"{name} label must be {LABEL!r}")
    return member


def _parse_signature_input(value: str) -> tuple[str, int, str, str]:
    """Signature parameters text, created, keyid and nonce from Signature-Input (RFC 9421 §4.1)."""
    fast = _FAST_SIGNATURE_INPUT.fullmatch(value.strip(_OWS))
    if fast is not None:
        return fast.group(1), int(fast.group(2)), fast.group(3), fast.group(4)
    return _parse_signature_input_member(value)


def _parse_signature_input_member(value: str) -> tuple[str, int, str, str]:
    """:func:`_parse_signature_input` of any text (the general parse, with its precise refusals)."""
    member = _split_member(value, _SIGNATURE_INPUT)
    if not member.startswith(_COVERED_INNER_LIST):
        raise AuthError(f"Signature-Input must cover exactly {_COVERED_INNER_LIST}")
    rest = member[len(_COVERED_INNER_LIST) :]
    if not rest.startswith(";"):
        raise AuthError("Signature-Input has no signature parameters")
    # RFC 8941 §3.1.2 parameters: ";" key "=" value. None of the accepted values can
    # contain ";", so splitting on it is exact for everything we accept; the profile's
    # canonical form has no whitespace around ";".
    found: dict[str, str] = {}
    for item in rest[1:].split(";"):
        key, eq, raw = item.partition("=")
        pattern = _PARAM_PATTERNS.get(key)
        if pattern is None:
            raise AuthError("Signature-Input has an unknown signature parameter")
        if key in found:
            raise AuthError(f"Signature-Input repeats the {key} parameter")
        if not eq or pattern.fullmatch(raw) is None:
            if key == "alg":
                raise AuthError(f"Signature-Input alg must be {ALG!r}")
            raise AuthError(f"Signature-Input has a malformed {key} parameter")
        found[key] = raw
    for key in _PARAM_ORDER:
        if key not in found:
            raise AuthError(f"Signature-Input lacks the {key} parameter")
    return member, int(found["created"]), found["keyid"][1:-1], found["nonce"][1:-1]


def _parse_signature(value: str) -> bytes:
    """The 64 signature bytes from the Signature field (RFC 9421 §4.2)."""
    fast = _FAST_SIGNATURE.fullmatch(value.strip(_OWS))
    if fast is not None:
        return _b64decode_canonical(fast.group(1), _SIGNATURE)
    member = _split_member(value, _SIGNATURE)
    match = _SIGNATURE_VALUE_RE.fullmatch(member)
    if match is None:
        raise AuthError("Signature must be one 64-byte base64 byte sequence")
    return _b64decode_canonical(match.group(1), _SIGNATURE)


def _b64decode_canonical(text: str, name: str) -> bytes:
    # RFC 8941 §4.2.7 lets parsers tolerate missing padding and non-zero pad bits; Pli
    # does not, so each value has exactly one spelling (RFC 4648 §3.5 canonical form).
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise AuthError(f"{name} is not valid base64") from e
    if base64.b64encode(raw).decode("ascii") != text:
        raise AuthError(f"{name} is not canonical base64")
    return raw
