"""Pli request signatures: the RFC's own vector, our committed vector, and every refusal."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import httpsig
from protocol.errors import AuthError, StaleSignatureError

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "protocol" / "vectors" / "httpsig.json"


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "vectors_httpsig", ROOT / "tools" / "vectors_httpsig.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


# --- RFC 9421 Appendix B.2.6 (key: Appendix B.1.4) ---------------------------------------

# PKCS#8 DER of test-key-ed25519: a fixed 16-byte prefix then the 32-byte seed.
RFC_PRIVATE_PKCS8 = "MC4CAQAwBQYDK2VwBCIEIJ+DYvh6SEqVTm50DFtMDoQikTmiCqirVv9mWG9qfSnF"
RFC_PUBLIC_SPKI = "MCowBQYDK2VwAyEAJrQLj5P/89iXES9+vFgrIy29clF9CC/oPPsw3c5D0bs="
RFC_B26_PARAMS = (
    '("date" "@method" "@path" "@authority" "content-type" "content-length")'
    ';created=1618884473;keyid="test-key-ed25519"'
)
RFC_B26_BASE = (
    '"date": Tue, 20 Apr 2021 02:07:55 GMT\n'
    '"@method": POST\n'
    '"@path": /foo\n'
    '"@authority": example.com\n'
    '"content-type": application/json\n'
    '"content-length": 18\n'
    '"@signature-params": ("date" "@method" "@path" "@authority" "content-type" '
    '"content-length");created=1618884473;keyid="test-key-ed25519"'
).encode("ascii")
RFC_B26_SIGNATURE = (
    "wqcAqbmYJ2ji2glfAMaRy4gruYYnx2nEFN2HN6jrnDnQCK1u02Gb04v9EDgwUPiu4A0w6vuQv5lIp5WPpBKRCw=="
)


def test_rfc9421_b26_signature_base_and_signature() -> None:
    der = base64.b64decode(RFC_PRIVATE_PKCS8)
    assert der[:16] == bytes.fromhex("302e020100300506032b657004220420")
    key = nacl.signing.SigningKey(der[16:])
    assert bytes(key.verify_key) == base64.b64decode(RFC_PUBLIC_SPKI)[12:]

    base = httpsig.signature_base(
        [
            ("date", "Tue, 20 Apr 2021 02:07:55 GMT"),
            ("@method", "POST"),
            ("@path", "/foo"),
            ("@authority", httpsig.authority("example.com", None, "https")),
            ("content-type", "application/json"),
            ("content-length", "18"),
        ],
        RFC_B26_PARAMS,
    )
    assert base == RFC_B26_BASE
    signature = key.sign(base).signature
    assert base64.b64encode(signature).decode() == RFC_B26_SIGNATURE
    key.verify_key.verify(base, base64.b64decode(RFC_B26_SIGNATURE))


def test_rfc9530_content_digest_example() -> None:
    # RFC 9530 examples use {"hello": "world"}; its sha-256 is well known.
    digest = hashlib.sha256(b'{"hello": "world"}').digest()
    value = httpsig.content_digest(digest)
    assert value == "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:"
    assert httpsig.parse_content_digest(value) == digest
    empty = httpsig.content_digest(hashlib.sha256(b"").digest())
    assert empty == "sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:"


# --- our committed vector -----------------------------------------------------------------


def _vectors() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(VECTORS.read_text(encoding="utf-8"))
    return data


def test_vector_file_matches_generator() -> None:
    generator = _load_generator()
    assert VECTORS.read_text(encoding="utf-8") == generator.render()


def test_vector_sign_exactly() -> None:
    data = _vectors()
    key = nacl.signing.SigningKey(bytes.fromhex(data["seed_hex"]))
    assert bytes(key.verify_key).hex() == data["public_key_hex"]
    for case in data["cases"]:
        body = case["body_utf8"].encode("utf-8")
        digest = httpsig.content_digest(hashlib.sha256(body).digest())
        auth = httpsig.authority(case["host"], case["port"], case["scheme"])
        assert auth == case["authority"]
        nonce = httpsig.encode_nonce(bytes.fromhex(case["nonce_bytes_hex"]))
        assert nonce == case["nonce"]
        headers = httpsig.sign_request(
            method=case["method"],
            authority=auth,
            path=case["path"],
            query=case["query"],
            content_digest=digest,
            signing_key=key,
            keyid=data["keyid"],
            created=case["created"],
            nonce=nonce,
        )
        assert headers == case["headers"]
        params = headers["Signature-Input"].removeprefix("pli=")
        base = httpsig.signature_base(
            [
                ("@method", case["method"]),
                ("@authority", auth),
                ("@path", case["path"]),
                ("@query", "?" + case["query"]),
                ("content-digest", digest),
            ],
            params,
        )
        assert base.decode("ascii") == case["signature_base"]


def test_vector_verifies() -> None:
    data = _vectors()
    verify_key = nacl.signing.VerifyKey(bytes.fromhex(data["public_key_hex"]))
    for case in data["cases"]:
        got = httpsig.verify_request(
            method=case["method"],
            authority=case["authority"],
            path=case["path"],
            query=case["query"],
            headers=case["headers"],
            resolve_key=lambda keyid: verify_key if keyid == data["keyid"] else _unknown(keyid),
            now=case["created"],
        )
        body = case["body_utf8"].encode("utf-8")
        assert got == httpsig.VerifiedRequest(
            keyid=data["keyid"],
            created=case["created"],
            nonce=case["nonce"],
            content_digest=hashlib.sha256(body).digest(),
        )


# --- a fresh request to tamper with -------------------------------------------------------

KEY = nacl.signing.SigningKey(bytes(range(32)))
KEYID = "0123456789abcdef0123456789abcdef"
NONCE = httpsig.encode_nonce(bytes(16))
NOW = 1_700_000_000
BODY_DIGEST = hashlib.sha256(b"body").digest()
REQ = {"method": "PUT", "authority": "relay.test:8443", "path": "/v1/x", "query": "a=1"}


def _unknown(keyid: str) -> nacl.signing.VerifyKey:
    raise AuthError("unknown key")


def _resolve(keyid: str) -> nacl.signing.VerifyKey:
    if keyid != KEYID:
        return _unknown(keyid)
    return KEY.verify_key


def _signed(**overrides: Any) -> dict[str, str]:
    args: dict[str, Any] = {
        **REQ,
        "content_digest": httpsig.content_digest(BODY_DIGEST),
        "signing_key": KEY,
        "keyid": KEYID,
        "created": NOW,
        "nonce": NONCE,
    }
    args.update(overrides)
    return httpsig.sign_request(**args)


def _verify(
    headers: Mapping[str, str],
    *,
    now: int = NOW,
    resolve: Callable[[str], nacl.signing.VerifyKey] = _resolve,
    method: str = REQ["method"],
    authority: str = REQ["authority"],
    path: str = REQ["path"],
    query: str = REQ["query"],
) -> httpsig.VerifiedRequest:
    return httpsig.verify_request(
        method=method,
        authority=authority,
        path=path,
        query=query,
        headers=headers,
        resolve_key=resolve,
        now=now,
    )


def _verify_target(headers: Mapping[str, str], target: dict[str, str]) -> None:
    request = {**REQ, **target}
    _verify(
        headers,
        method=request["method"],
        authority=request["authority"],
        path=request["path"],
        query=request["query"],
    )


def test_round_trip() -> None:
    got = _verify(_signed())
    assert got == httpsig.VerifiedRequest(KEYID, NOW, NONCE, BODY_DIGEST)


def test_round_trip_case_insensitive_multidict() -> None:
    multidict = pytest.importorskip("multidict")
    headers = multidict.CIMultiDict({k.lower(): v for k, v in _signed().items()})
    assert _verify(multidict.CIMultiDictProxy(headers)).keyid == KEYID


def test_duplicate_field_in_multidict_refused() -> None:
    multidict = pytest.importorskip("multidict")
    signed = _signed()
    headers = multidict.CIMultiDict(signed)
    headers.add("Signature", signed["Signature"])
    with pytest.raises(AuthError, match="once"):
        _verify(headers)


def test_surrounding_whitespace_is_ignored() -> None:
    headers = {k: f" {v}\t" for k, v in _signed().items()}
    assert _verify(headers).nonce == NONCE


def test_empty_path_is_slash() -> None:
    assert _verify(_signed(path="/"), path="").keyid == KEYID


@pytest.mark.parametrize("skew", [-300, 0, 300])
def test_skew_within_window(skew: int) -> None:
    assert _verify(_signed(), now=NOW + skew).created == NOW


@pytest.mark.parametrize("skew", [301, -301, 10**9, -(10**9)])
def test_stale_or_future(skew: int) -> None:
    with pytest.raises(StaleSignatureError):
        _verify(_signed(), now=NOW + skew)


def test_custom_max_skew() -> None:
    with pytest.raises(StaleSignatureError):
        httpsig.verify_request(
            method=REQ["method"],
            authority=REQ["authority"],
            path=REQ["path"],
            query=REQ["query"],
            headers=_signed(),
            resolve_key=_resolve,
            now=NOW + 31,
            max_skew=30,
        )


def test_stale_checked_before_key_lookup() -> None:
    def boom(keyid: str) -> nacl.signing.VerifyKey:
        raise AssertionError("key looked up for a stale request")

    with pytest.raises(StaleSignatureError):
        _verify(_signed(), now=NOW + 1000, resolve=boom)


@pytest.mark.parametrize("name", ["Signature-Input", "Signature", "Content-Digest"])
def test_missing_header(name: str) -> None:
    headers = _signed()
    del headers[name]
    with pytest.raises(AuthError, match=f"missing {name}"):
        _verify(headers)


@pytest.mark.parametrize("name", ["Signature-Input", "Signature", "Content-Digest"])
def test_oversized_header(name: str) -> None:
    headers = _signed()
    headers[name] += " " * 1100
    with pytest.raises(AuthError, match="too long"):
        _verify(headers)


def _mutate_input(old: str, new: str) -> dict[str, str]:
    headers = _signed()
    assert old in headers["Signature-Input"]
    headers["Signature-Input"] = headers["Signature-Input"].replace(old, new, 1)
    return headers


COVERED = '("@method" "@authority" "@path" "@query" "content-digest")'
CREATED = f";created={NOW}"
KEYID_P = f';keyid="{KEYID}"'
NONCE_P = f';nonce="{NONCE}"'
ALG_P = ';alg="ed25519"'


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        # labels and dictionary shape
        ("pli=", "sig1=", "label"),
        ("pli=", "PLI=", "dictionary member"),
        ("pli=", "", "dictionary member"),
        (ALG_P, ALG_P + ', sig2=("@method");created=1', "exactly one signature"),
        # covered components
        (COVERED, '("@method" "@authority" "@path" "@query")', "cover exactly"),
        (COVERED, COVERED[:-1] + ' "content-type")', "cover exactly"),
        (COVERED, '("@authority" "@method" "@path" "@query" "content-digest")', "cover exactly"),
        (COVERED, '("@method" "@authority" "@path" "@query" "content-digest";sf)', "cover exactly"),
        (COVERED, COVERED.replace(" ", "  "), "cover exactly"),
        (COVERED, COVERED.replace('"@path"', '"@target-uri"'), "cover exactly"),
        # parameters: missing, duplicated, unknown, malformed
        (CREATED, "", "lacks the created"),
        (KEYID_P, "", "lacks the keyid"),
        (NONCE_P, "", "lacks the nonce"),
        (ALG_P, "", "lacks the alg"),
        (CREATED + KEYID_P + NONCE_P + ALG_P, "", "no signature parameters"),
        (CREATED, CREATED + CREATED, "repeats the created"),
        (NONCE_P, NONCE_P + ';nonce="' + "B" * 22 + '"', "repeats the nonce"),
        (ALG_P, ALG_P + ";expires=1700000300", "unknown"),
        (ALG_P, ALG_P + ';tag="pli"', "unknown"),
        (ALG_P, ALG_P + ";", "unknown"),
        (ALG_P, ALG_P + ";x", "unknown"),
        (ALG_P, ';alg="rsa-pss-sha512"', "alg must be"),
        (ALG_P, ';alg="ED25519"', "alg must be"),
        (ALG_P, ";alg=ed25519", "alg must be"),
        (CREATED, f';created="{NOW}"', "malformed created"),
        (CREATED, f";created=0{NOW}", "malformed created"),
        (CREATED, f";created=-{NOW}", "malformed created"),
        (CREATED, f";created={NOW}.0", "malformed created"),
        (CREATED, ";created=1234567890123456", "malformed created"),
        (KEYID_P, f';keyid="{KEYID.upper()}"', "malformed keyid"),
        (KEYID_P, f';keyid="{KEYID[:-1]}"', "malformed keyid"),
        (KEYID_P, f";keyid={KEYID}", "malformed keyid"),
        (NONCE_P, ';nonce="' + "A" * 21 + '"', "malformed nonce"),
        (NONCE_P, ';nonce="' + "A" * 65 + '"', "malformed nonce"),
        (NONCE_P, ';nonce="' + "A" * 21 + '="', "malformed nonce"),
        (NONCE_P, ';nonce="' + "A" * 21 + '+"', "malformed nonce"),
        (NONCE_P, ';nonce="' + "A" * 22 + ';x"', "malformed nonce"),
        (CREATED, "; created=" + str(NOW), "unknown"),
    ],
)
def test_malformed_signature_input(old: str, new: str, message: str) -> None:
    with pytest.raises(AuthError, match=message) as info:
        _verify(_mutate_input(old, new))
    assert info.type is AuthError
    assert info.value.code == "unauthorized"


def test_reordered_parameters_break_the_signature_not_the_parser() -> None:
    # Any order of the four parameters parses (RFC 9421 §2.3 leaves order to the signer),
    # but the order is part of @signature-params, so a reorder by a third party fails.
    headers = _mutate_input(CREATED + KEYID_P, KEYID_P + CREATED)
    with pytest.raises(AuthError, match="does not verify"):
        _verify(headers)


def test_parameters_in_another_order_verify_when_signed_so() -> None:
    params = f"{COVERED}{ALG_P}{NONCE_P}{KEYID_P}{CREATED}"
    digest = httpsig.content_digest(BODY_DIGEST)
    base = httpsig.signature_base(
        [
            ("@method", REQ["method"]),
            ("@authority", REQ["authority"]),
            ("@path", REQ["path"]),
            ("@query", "?" + REQ["query"]),
            ("content-digest", digest),
        ],
        params,
    )
    signature = base64.b64encode(KEY.sign(base).signature).decode()
    headers = {
        "Signature-Input": f"pli={params}",
        "Signature": f"pli=:{signature}:",
        "Content-Digest": digest,
    }
    assert _verify(headers).nonce == NONCE


@pytest.mark.parametrize(
    ("field", "target"),
    [
        ("method", {"method": "POST"}),
        ("method", {"method": "put"}),
        ("authority", {"authority": "relay.test"}),
        ("authority", {"authority": "evil.test:8443"}),
        ("path", {"path": "/v1/y"}),
        ("path", {"path": "/v1/x/"}),
        ("query", {"query": ""}),
        ("query", {"query": "a=2"}),
        ("query", {"query": "a=1&b=2"}),
    ],
)
def test_tampered_request(field: str, target: dict[str, str]) -> None:
    with pytest.raises(AuthError, match="does not verify") as info:
        _verify_target(_signed(), target)
    assert info.type is AuthError


def test_tampered_digest() -> None:
    headers = _signed()
    headers["Content-Digest"] = httpsig.content_digest(hashlib.sha256(b"other").digest())
    with pytest.raises(AuthError, match="does not verify"):
        _verify(headers)


def test_tampered_signature() -> None:
    headers = _signed()
    raw = bytearray(base64.b64decode(headers["Signature"][5:-1]))
    raw[10] ^= 1
    headers["Signature"] = "pli=:" + base64.b64encode(raw).decode() + ":"
    with pytest.raises(AuthError, match="does not verify"):
        _verify(headers)


def test_signature_from_another_key() -> None:
    other = nacl.signing.SigningKey(bytes(32))
    with pytest.raises(AuthError, match="does not verify"):
        _verify(_signed(signing_key=other))


def test_tampered_nonce_and_created() -> None:
    with pytest.raises(AuthError, match="does not verify"):
        _verify(_mutate_input(NONCE_P, ';nonce="' + "Z" * 22 + '"'))
    with pytest.raises(AuthError, match="does not verify"):
        _verify(_mutate_input(CREATED, f";created={NOW + 1}"))


def test_unknown_keyid() -> None:
    other = "f" * 32
    with pytest.raises(AuthError, match="unknown key") as info:
        _verify(_signed(keyid=other))
    assert info.type is AuthError


@pytest.mark.parametrize(
    "value",
    [
        "sig1=:{sig}:",
        "pli={sig}",
        "pli=:{sig}",
        "pli=:{short}:",
        "pli=:{long}:",
        "pli=:{nopad}:",
        "pli=:{urlsafe}:",
        "pli=:{noncanonical}:",
        "pli=:{sig}:, other=:{sig}:",
        "pli=:{sig}:;x=1",
        "pli=?1",
        "",
    ],
)
def test_malformed_signature(value: str) -> None:
    headers = _signed()
    sig = headers["Signature"][5:-1]
    raw = base64.b64decode(sig)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    # 64 bytes leave 4 pad bits in the 86th character; set one of them.
    noncanonical = sig[:85] + alphabet[alphabet.index(sig[85]) | 1] + "=="
    assert base64.b64decode(noncanonical) == raw
    assert noncanonical != sig
    headers["Signature"] = value.format(
        sig=sig,
        short=base64.b64encode(raw[:63]).decode(),
        long=base64.b64encode(raw + b"\x00").decode(),
        nopad=sig.rstrip("="),
        urlsafe="-" + sig[1:],
        noncanonical=noncanonical,
    )
    with pytest.raises(AuthError) as info:
        _verify(headers)
    assert info.type is AuthError


@pytest.mark.parametrize(
    "value",
    [
        "sha-256=:{d}",
        "sha-256={d}",
        "SHA-256=:{d}:",
        "sha256=:{d}:",
        "sha-512=:{d}:",
        "sha-256=:{d}:, sha-512=:{d}:",
        "sha-256=:{nopad}:",
        "sha-256=:{short}:",
        "sha-256=:{noncanonical}:",
        "sha-256=:{d}:;x",
        "",
    ],
)
def test_malformed_content_digest(value: str) -> None:
    digest = base64.b64encode(BODY_DIGEST).decode()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    # 32 bytes leave 2 pad bits in the 43rd character; set one of them.
    noncanonical = digest[:42] + alphabet[alphabet.index(digest[42]) | 1] + "="
    assert base64.b64decode(noncanonical) == BODY_DIGEST
    assert noncanonical != digest
    headers = _signed()
    headers["Content-Digest"] = value.format(
        d=digest,
        nopad=digest.rstrip("="),
        short=base64.b64encode(BODY_DIGEST[:31]).decode(),
        noncanonical=noncanonical,
    )
    with pytest.raises(AuthError) as info:
        _verify(headers)
    assert info.type is AuthError
    with pytest.raises(AuthError):
        httpsig.parse_content_digest(headers["Content-Digest"])


@pytest.mark.parametrize(
    "target",
    [
        {"path": "/v1/x\n"},
        {"path": "/v1/\u00e9"},
        {"query": "a=1\r\n"},
        {"method": "P\x00T"},
        {"authority": "relay.test\t"},
    ],
)
def test_unsignable_request_target(target: dict[str, str]) -> None:
    with pytest.raises(AuthError, match="cannot be verified"):
        _verify_target(_signed(), target)


@pytest.mark.parametrize(
    ("host", "port", "scheme", "expected"),
    [
        ("Example.COM", None, "https", "example.com"),
        ("example.com", 443, "https", "example.com"),
        ("example.com", 443, "HTTPS", "example.com"),
        ("example.com", 80, "http", "example.com"),
        ("example.com", 80, "https", "example.com:80"),
        ("example.com", 8443, "https", "example.com:8443"),
        ("::1", 8443, "https", "[::1]:8443"),
        ("[::1]", None, "http", "[::1]"),
        ("127.0.0.1", 8080, "http", "127.0.0.1:8080"),
    ],
)
def test_authority(host: str, port: int | None, scheme: str, expected: str) -> None:
    assert httpsig.authority(host, port, scheme) == expected


@pytest.mark.parametrize(
    ("host", "port"), [("", None), ("a b", None), ("a\nb", None), ("a", 0), ("a", 70000)]
)
def test_authority_refusals(host: str, port: int | None) -> None:
    with pytest.raises(AuthError):
        httpsig.authority(host, port, "https")


def test_sign_request_refuses_misuse() -> None:
    with pytest.raises(ValueError, match="keyid"):
        _signed(keyid="ABC")
    with pytest.raises(ValueError, match="nonce"):
        _signed(nonce="short")
    with pytest.raises(ValueError, match="created"):
        _signed(created=-1)
    with pytest.raises(ValueError, match="sha-256"):
        _signed(content_digest="sha-512=:x:")
    with pytest.raises(ValueError, match="cannot be signed"):
        _signed(path="/a\nb")
    with pytest.raises(ValueError, match="32 bytes"):
        httpsig.content_digest(b"short")
    with pytest.raises(ValueError, match="16 to 48"):
        httpsig.encode_nonce(bytes(15))


def test_signature_base_refuses_injection() -> None:
    with pytest.raises(ValueError, match="cannot be signed"):
        httpsig.signature_base([("@path", "/a\n")], "()")
    with pytest.raises(ValueError, match="component name"):
        httpsig.signature_base([("Date", "x")], "()")
    with pytest.raises(ValueError, match="never covered"):
        httpsig.signature_base([("@signature-params", "x")], "()")
    with pytest.raises(ValueError, match="parameters"):
        httpsig.signature_base([], "()\n")


def test_encode_nonce_is_unpadded_base64url() -> None:
    nonce = httpsig.encode_nonce(b"\xff" * 16)
    assert nonce == "_____________________w"
    assert len(nonce) == 22


def test_resolver_errors_other_than_auth_propagate() -> None:
    # A broken key store is the relay's failure (500), not the client's (401).
    def broken(keyid: str) -> nacl.signing.VerifyKey:
        raise RuntimeError("database is down")

    with pytest.raises(RuntimeError):
        _verify(_signed(), resolve=broken)


# --- nothing but AuthError escapes, whatever the client sends -----------------------------

_SIGNED = _signed()
_fragments = st.sampled_from(
    [
        "pli=",
        "sig=",
        COVERED,
        "(",
        ")",
        '"',
        ";",
        ",",
        "=",
        ":",
        " ",
        CREATED,
        KEYID_P,
        NONCE_P,
        ALG_P,
        ";created=",
        ";alg=",
        ";nonce=",
        ";keyid=",
        _SIGNED["Signature"],
        _SIGNED["Signature"][4:],
        "==",
        "\\",
        "\x00",
        "\udcff",
        "é",
    ]
)
_header_text = st.one_of(
    st.text(max_size=300),
    st.lists(st.one_of(_fragments, st.text(max_size=5)), max_size=12).map("".join),
)


@settings(max_examples=400, deadline=None)
@given(signature_input=_header_text, signature=_header_text, digest=_header_text)
def test_arbitrary_headers_only_raise_auth_error(
    signature_input: str, signature: str, digest: str
) -> None:
    for headers in (
        {**_SIGNED, "Signature-Input": signature_input},
        {**_SIGNED, "Signature": signature},
        {**_SIGNED, "Content-Digest": digest},
        {"Signature-Input": signature_input, "Signature": signature, "Content-Digest": digest},
    ):
        with contextlib.suppress(AuthError):
            _verify(headers)


@settings(max_examples=200, deadline=None)
@given(
    method=st.text(max_size=10),
    authority=st.text(max_size=30),
    path=st.text(max_size=30),
    query=st.text(max_size=30),
)
def test_arbitrary_request_target_only_raises_auth_error(
    method: str, authority: str, path: str, query: str
) -> None:
    with contextlib.suppress(AuthError):
        _verify(_SIGNED, method=method, authority=authority, path=path, query=query)
