"""Bech32 (BIP-173) as the age specification uses it for X25519 keys.

age departs from BIP-173 in one way only: there is no 90-character limit on the
whole string (c2sp.org/age, "Conventions used in this document"). The checksum is
the original Bech32 constant (1), not Bech32m. The human-readable part keeps the
case it was written in, so that callers can insist on ``age`` (lowercase) for
recipients and ``AGE-SECRET-KEY-`` (uppercase) for identities, as age does.

Every malformed input raises :class:`protocol.errors.DecodeError`.
"""

from __future__ import annotations

from protocol.errors import DecodeError

__all__ = ["decode", "encode"]

_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_CHARSET_REV = {c: i for i, c in enumerate(_CHARSET)}
_GENERATOR = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)
_CHECKSUM_LEN = 6


def _polymod(values: list[int]) -> int:
    chk = 1
    for v in values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ v
        for i, g in enumerate(_GENERATOR):
            if (top >> i) & 1:
                chk ^= g
    return chk


def _hrp_expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def _convert_bits(data: bytes | list[int], from_bits: int, to_bits: int, *, pad: bool) -> list[int]:
    acc = 0
    bits = 0
    out: list[int] = []
    maxv = (1 << to_bits) - 1
    for value in data:
        acc = (acc << from_bits) | value
        bits += from_bits
        while bits >= to_bits:
            bits -= to_bits
            out.append((acc >> bits) & maxv)
    if pad:
        if bits:
            out.append((acc << (to_bits - bits)) & maxv)
    # BIP-173: on decoding, at most 4 bits of zero padding may remain.
    elif bits >= from_bits or (acc << (to_bits - bits)) & maxv:
        raise DecodeError("bech32: non-zero or oversized padding")
    return out


def encode(hrp: str, data: bytes) -> str:
    """Encode ``data`` under ``hrp``; the result has the case of ``hrp``."""
    if not hrp or any(not 33 <= ord(c) <= 126 for c in hrp):
        raise ValueError("bech32: invalid human-readable part")
    if hrp.lower() != hrp and hrp.upper() != hrp:
        raise ValueError("bech32: mixed-case human-readable part")
    lower = hrp.lower()
    values = _convert_bits(data, 8, 5, pad=True)
    # The checksum is always computed over the lowercase string (c2sp.org/age).
    poly = _polymod([*_hrp_expand(lower), *values, 0, 0, 0, 0, 0, 0]) ^ 1
    checksum = [(poly >> 5 * (5 - i)) & 31 for i in range(_CHECKSUM_LEN)]
    s = lower + "1" + "".join(_CHARSET[v] for v in values + checksum)
    return s.upper() if hrp.isupper() else s


def decode(s: str) -> tuple[str, bytes]:
    """Return ``(hrp, data)``; ``hrp`` keeps the case it had in ``s``."""
    if any(not 33 <= ord(c) <= 126 for c in s):
        raise DecodeError("bech32: invalid character")
    if s.lower() != s and s.upper() != s:
        raise DecodeError("bech32: mixed case")
    pos = s.rfind("1")
    if pos < 1 or pos + 1 + _CHECKSUM_LEN > len(s):
        raise DecodeError("bech32: separator misplaced")
    hrp = s[:pos]
    lower = s.lower()
    try:
        values = [_CHARSET_REV[c] for c in lower[pos + 1 :]]
    except KeyError as e:
        raise DecodeError("bech32: invalid data character") from e
    if _polymod([*_hrp_expand(lower[:pos]), *values]) != 1:
        raise DecodeError("bech32: invalid checksum")
    data = _convert_bits(values[:-_CHECKSUM_LEN], 5, 8, pad=False)
    return hrp, bytes(data)
