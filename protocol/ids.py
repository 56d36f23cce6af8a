"""National identifiers of health professionals, checked at entry with a useful message.

Practitioners report that entering these numbers "fails half the time"; a message
that says which digit is wrong and what was expected turns a support call into a
correction (DOMAIN.md, Identifiers).
"""

from __future__ import annotations

from protocol.errors import DecodeError

__all__ = ["InvalidIdentifier", "check_rpps", "luhn_ok"]


class InvalidIdentifier(DecodeError):
    code = "invalid_identifier"


def _luhn_sum(digits: str) -> int:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total


def luhn_ok(digits: str) -> bool:
    return digits.isascii() and digits.isdigit() and _luhn_sum(digits) % 10 == 0


def check_rpps(value: str) -> str:
    """Return the RPPS number (11 digits, starting with 1, Luhn) or explain what is wrong.

    Accepts the 12-digit national id (``8`` + RPPS) and spaces, as printed on a CPS card.

    Raises:
        InvalidIdentifier: with a message naming the faulty position or the expected check digit.
    """
    v = "".join(value.split())
    if len(v) == 12 and v.startswith("8"):
        v = v[1:]
    for pos, ch in enumerate(v, start=1):
        if not (ch.isascii() and ch.isdigit()):
            raise InvalidIdentifier(
                f"RPPS {value!r}: character {pos} ({ch!r}) is not a digit; an RPPS has 11 digits"
            )
    if len(v) != 11:
        raise InvalidIdentifier(f"RPPS {value!r}: {len(v)} digits, an RPPS has 11")
    if v[0] != "1":
        raise InvalidIdentifier(f"RPPS {value!r}: an RPPS starts with 1, not {v[0]}")
    if not luhn_ok(v):
        expected = (10 - _luhn_sum(v[:-1] + "0") % 10) % 10
        raise InvalidIdentifier(
            f"RPPS {value!r}: the last digit (check digit) should be {expected}, not {v[-1]}; "
            "one of the digits is probably mistyped"
        )
    return v
