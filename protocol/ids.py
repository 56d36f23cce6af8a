"""Entry checks for what a téléexpertise request carries, explained to a doctor in two languages.

Practitioners report that entering these numbers "fails half the time" (DOMAIN.md, Rules):
a message that says which character is wrong and what was expected turns a support call
into a correction. Every check takes what a person typed, drops the separators people type
(spaces, dots, dashes), and either returns the normalised value or raises
:class:`InvalidIdentifier`, whose ``str(e)`` is English, ``e.message_fr`` French and
``e.field`` the entry field at fault, so a UI can render it in either language::

    check_rpps       "rpps"        11 digits, starts with 1, Luhn     10000005479 (also 8 + RPPS)
    check_adeli      "adeli"       9 digits, Luhn                     879101558
    check_finess     "finess"      9 chars, département first, Luhn   750712184, 2A0000016
    check_nir        "ins"         13 chars + key 97 - (N mod 97)    2550814168025 38
    check_date       caller's      YYYY-MM-DD or DD/MM/YYYY, bounded
    check_sex        "sex"         F, M or U
    check_profession "profession"  national table TRE_G15 (PROFESSIONS)
    check_specialty  "specialty"   SM + 2 digits, then an optional label

Pure: no I/O and no clock; "today" is a parameter of :func:`check_date`.
"""

from __future__ import annotations

import calendar
import datetime as dt
import re
import unicodedata
from dataclasses import dataclass
from typing import Final

from protocol.errors import DecodeError

__all__ = [
    "PROFESSIONS",
    "InvalidIdentifier",
    "Profession",
    "check_adeli",
    "check_date",
    "check_finess",
    "check_may_answer",
    "check_may_request",
    "check_nir",
    "check_profession",
    "check_rpps",
    "check_sex",
    "check_specialty",
    "luhn_ok",
]


class InvalidIdentifier(DecodeError):
    """An identifier or entry field that fails its check, explained in English and French.

    ``str(e)`` and ``e.message`` are English, like every other Pli error; ``e.message_fr``
    is the same explanation in French and ``e.field`` names the entry field to highlight
    ("rpps", "adeli", "finess", "ins", "date" or the caller's date field, "profession",
    "sex", "specialty"). ``fr`` and ``field`` have defaults so that code raising it with a
    message alone, as before they existed, keeps working.
    """

    code = "invalid_identifier"

    def __init__(self, en: str, *, fr: str | None = None, field: str = "identifier", code: str | None = None) -> None:
        super().__init__(en, code=code)
        self.message_fr = en if fr is None else fr
        self.field = field


# Separators people type inside a number ("2 55 08 14 168 025 38", "75.071.218.4", "10-00-...").
_SEPARATORS = re.compile(r"[\s.\-]+")
_DIGITS: Final = frozenset("0123456789")


def _compact(value: str) -> str:
    return _SEPARATORS.sub("", value)


_AB_UPPER: Final = str.maketrans("ab", "AB")


def _corsica_upper(v: str) -> str:
    """2a/2b typed in lower case; other letters keep their case, so a message quotes them as typed."""
    return v.translate(_AB_UPPER)


def _first_non_digit(v: str) -> tuple[int, str] | None:
    """Position (1-based) and character of the first non-digit: isdigit() would let '²' and '٣' in."""
    for pos, ch in enumerate(v, start=1):
        if ch not in _DIGITS:
            return pos, ch
    return None


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


def _luhn_digit(payload: str) -> int:
    """The check digit that makes ``payload`` + digit pass Luhn."""
    return (10 - _luhn_sum(payload + "0") % 10) % 10


def luhn_ok(digits: str) -> bool:
    """Whether ``digits`` (ASCII digits only) passes the Luhn check used by RPPS, ADELI and FINESS."""
    return bool(digits) and _first_non_digit(digits) is None and _luhn_sum(digits) % 10 == 0


# -- professionals: RPPS, ADELI, FINESS -------------------------------------------------------


def check_rpps(value: str) -> str:
    """Return the RPPS number (11 digits, starting with 1, Luhn) or explain what is wrong.

    Accepts the 12-digit national id (``8`` + RPPS) and the spaces, dots and dashes
    people type, as printed on a CPS card.

    Args:
        value: the RPPS as typed.

    Returns:
        The 11 digits.

    Raises:
        InvalidIdentifier: ``field="rpps"``, naming the faulty position or the expected check digit.
    """
    v = _compact(value)
    if len(v) == 12 and v.startswith("8"):
        v = v[1:]  # the national id of a professional is 8 + RPPS (DOMAIN.md, Identifiers)
    bad = _first_non_digit(v)
    if bad is not None:
        pos, ch = bad
        raise InvalidIdentifier(
            f"RPPS {value!r}: character {pos} ({ch!r}) is not a digit; an RPPS has 11 digits",
            fr=f"RPPS {value!r} : le caractère {pos} ({ch!r}) n'est pas un chiffre ; un RPPS a 11 chiffres",
            field="rpps",
        )
    if len(v) != 11:
        # A 9-digit number is the likeliest confusion: the ADELI number sits next to it on old forms.
        hint_en = " (9 digits is an ADELI or FINESS number)" if len(v) == 9 else ""
        hint_fr = " (9 chiffres : c'est un numéro ADELI ou FINESS)" if len(v) == 9 else ""
        raise InvalidIdentifier(
            f"RPPS {value!r}: {len(v)} digits, an RPPS has 11{hint_en}",
            fr=f"RPPS {value!r} : {len(v)} chiffres, un RPPS en a 11{hint_fr}",
            field="rpps",
        )
    if v[0] != "1":
        raise InvalidIdentifier(
            f"RPPS {value!r}: an RPPS starts with 1, not {v[0]}",
            fr=f"RPPS {value!r} : un RPPS commence par 1, pas par {v[0]}",
            field="rpps",
        )
    if not luhn_ok(v):
        expected = _luhn_digit(v[:-1])
        raise InvalidIdentifier(
            f"RPPS {value!r}: the last digit (check digit) should be {expected}, not {v[-1]}; "
            "one of the digits is probably mistyped",
            fr=f"RPPS {value!r} : le dernier chiffre (clé de contrôle) devrait être {expected}, pas {v[-1]} ; "
            "un des chiffres a probablement été mal saisi",
            field="rpps",
        )
    return v


def check_adeli(value: str) -> str:
    """Return the ADELI number (9 digits, Luhn) or explain what is wrong.

    The digits are département (2), profession (2), order (4) and key (1). The profession
    digits are not checked against the table: old numbers carry codes that have since
    changed, and the key already catches a mistyped digit.

    Args:
        value: the ADELI number as typed.

    Returns:
        The 9 digits.

    Raises:
        InvalidIdentifier: ``field="adeli"``, naming the faulty position or the expected last digit.
    """
    v = _compact(value)
    bad = _first_non_digit(v)
    if bad is not None:
        pos, ch = bad
        raise InvalidIdentifier(
            f"ADELI {value!r}: character {pos} ({ch!r}) is not a digit; an ADELI number has 9 digits",
            fr=f"ADELI {value!r} : le caractère {pos} ({ch!r}) n'est pas un chiffre ; "
            "un numéro ADELI a 9 chiffres",
            field="adeli",
        )
    if len(v) != 9:
        rpps = len(v) == 11 and v.startswith("1")
        hint_en = " (11 digits starting with 1 is an RPPS number)" if rpps else ""
        hint_fr = " (11 chiffres commençant par 1 : c'est un numéro RPPS)" if rpps else ""
        raise InvalidIdentifier(
            f"ADELI {value!r}: {len(v)} digits, an ADELI number has 9 "
            f"(département, profession, order, key){hint_en}",
            fr=f"ADELI {value!r} : {len(v)} chiffres, un numéro ADELI en a 9 "
            f"(département, profession, ordre, clé){hint_fr}",
            field="adeli",
        )
    if not luhn_ok(v):
        expected = _luhn_digit(v[:-1])
        raise InvalidIdentifier(
            f"ADELI {value!r}: the last digit (check digit) should be {expected}, not {v[-1]}; "
            "one of the digits is probably mistyped",
            fr=f"ADELI {value!r} : le dernier chiffre (clé de contrôle) devrait être {expected}, pas {v[-1]} ; "
            "un des chiffres a probablement été mal saisi",
            field="adeli",
        )
    return v


_CORSICA: Final = ("2A", "2B")


def check_finess(value: str) -> str:
    """Return the FINESS number of a facility (9 characters, Luhn) or explain what is wrong.

    The first two characters are the département: two digits, or 2A / 2B in Corsica. For
    Corsica the Luhn key is computed with 2A and 2B counted as 20, the département's code
    before 1976 (the same as reading A and B as 0, as many validators do). No official
    statement of the rule was found: should it differ (say 19/18 as in the NIR), only the
    line computing ``digits`` changes.

    Args:
        value: the FINESS number as typed.

    Returns:
        The 9 characters, letters upper-case.

    Raises:
        InvalidIdentifier: ``field="finess"``, naming the faulty position or the expected last digit.
    """
    v = _corsica_upper(_compact(value))
    dept, rest = v[:2], v[2:]
    if dept not in _CORSICA:
        bad = _first_non_digit(dept)
        if bad is not None:
            pos, ch = bad
            raise InvalidIdentifier(
                f"FINESS {value!r}: characters 1-2 are the département, two digits or 2A/2B "
                f"for Corsica; character {pos} ({ch!r}) is not a digit",
                fr=f"FINESS {value!r} : les caractères 1 et 2 sont le département, deux chiffres ou 2A/2B "
                f"pour la Corse ; le caractère {pos} ({ch!r}) n'est pas un chiffre",
                field="finess",
            )
    bad = _first_non_digit(rest)
    if bad is not None:
        pos, ch = bad
        raise InvalidIdentifier(
            f"FINESS {value!r}: character {pos + 2} ({ch!r}) is not a digit; a FINESS number has 9 characters, "
            "all digits but 2A/2B at the start for Corsica",
            fr=f"FINESS {value!r} : le caractère {pos + 2} ({ch!r}) n'est pas un chiffre ; un numéro FINESS a "
            "9 caractères, tous des chiffres sauf 2A/2B au début pour la Corse",
            field="finess",
        )
    if len(v) != 9:
        raise InvalidIdentifier(
            f"FINESS {value!r}: {len(v)} characters, a FINESS number has 9",
            fr=f"FINESS {value!r} : {len(v)} caractères, un numéro FINESS en a 9",
            field="finess",
        )
    digits = ("20" if dept in _CORSICA else dept) + rest
    if not luhn_ok(digits):
        expected = _luhn_digit(digits[:-1])
        raise InvalidIdentifier(
            f"FINESS {value!r}: the last digit (check digit) should be {expected}, not {v[-1]}; "
            "one of the characters is probably mistyped",
            fr=f"FINESS {value!r} : le dernier chiffre (clé de contrôle) devrait être {expected}, pas {v[-1]} ; "
            "un des caractères a probablement été mal saisi",
            field="finess",
        )
    return v


# -- the patient: NIR / INS matricule, sex, dates ---------------------------------------------

# Key computation for Corsica: 2A counts as 19 and 2B as 18 (DOMAIN.md, Identifiers).
_NIR_CORSICA: Final = {"2A": "19", "2B": "18"}
# Sex digit: 1 man, 2 woman; 3, 4 (older) and 7, 8 for provisional numbers.
_NIR_SEX: Final = frozenset("123478")


def _nir_month_ok(mm: int) -> bool:
    # 01-12 a month; 20-42 and 50-99 are used when the month is unknown or for special numbers.
    return 1 <= mm <= 12 or 20 <= mm <= 42 or mm >= 50


def _nir_key(body: str) -> int:
    """97 - (N mod 97), N being the 13 characters with 2A → 19 and 2B → 18."""
    n = body[:5] + _NIR_CORSICA.get(body[5:7], body[5:7]) + body[7:]
    return 97 - int(n) % 97


def _nir_spaced(v: str) -> str:
    """The NIR grouped as on a carte Vitale: sex, year, month, département, commune, order, key."""
    return " ".join(p for p in (v[0], v[1:3], v[3:5], v[5:7], v[7:10], v[10:13], v[13:15]) if p)


def _fr_date(d: dt.date) -> str:
    return f"{d.day:02d}/{d.month:02d}/{d.year:04d}"


def check_nir(
    value: str,
    *,
    sex: str | None = None,
    birth_date: dt.date | None = None,
    key_required: bool = True,
) -> str:
    """Return the NIR (the INS matricule) or explain what is wrong, position by position.

    Layout: 1 sex (1, 2; 3, 4, 7, 8 provisional), 2-3 year, 4-5 month (01-12; 20-42 or
    50-99 when unknown), 6-7 département (digits, 2A, 2B; 20 before 1976, 97-99 overseas
    and abroad), 8-10 commune, 11-13 order, 14-15 key = 97 - (N mod 97) where N is the 13
    characters with 2A → 19 and 2B → 18. The key is checked before the consistency with
    ``sex`` and ``birth_date``: a wrong key means a mistyped digit, which could be the very
    one that disagrees.

    Args:
        value: the NIR as typed, spaces allowed.
        sex: the patient's sex ("F", "M", "U" or what :func:`check_sex` accepts); checked
            against the first digit when that is 1 or 2.
        birth_date: checked against characters 2-5 when the month there is 01-12.
        key_required: accept the 13 characters alone when False.

    Returns:
        The 15 characters (13 without a key when allowed), 2A/2B upper-case, no spaces.

    Raises:
        InvalidIdentifier: ``field="ins"`` for the number and its consistency with ``sex``
            and ``birth_date``; ``field="sex"`` if ``sex`` itself is not a sex.
    """
    v = _corsica_upper(_compact(value))
    _nir_layout(value, v, key_required=key_required)
    if len(v) == 15:
        expected = f"{_nir_key(v[:13]):02d}"
        if v[13:] != expected:
            raise InvalidIdentifier(
                f"NIR {_nir_spaced(v)}: the key (last two digits) should be {expected}, not {v[13:]}; "
                "a digit is probably mistyped",
                fr=f"NIR {_nir_spaced(v)} : la clé (deux derniers chiffres) devrait être {expected}, "
                f"pas {v[13:]} ; un chiffre a probablement été mal saisi",
                field="ins",
            )
    _nir_matches(v, sex=sex, birth_date=birth_date)
    return v


def _nir_layout(value: str, v: str, *, key_required: bool) -> None:
    """Characters, length, sex digit and month of a compacted NIR ``v`` (``value`` as typed, for messages)."""
    for pos, ch in enumerate(v, start=1):
        if ch not in _DIGITS and ch not in "AB":
            raise InvalidIdentifier(
                f"NIR {value!r}: character {pos} ({ch!r}) is not a digit",
                fr=f"NIR {value!r} : le caractère {pos} ({ch!r}) n'est pas un chiffre",
                field="ins",
            )
    if len(v) == 13 and key_required:
        raise InvalidIdentifier(
            f"NIR {value!r}: 13 characters, the key (2 more digits) is missing; a NIR has 15",
            fr=f"NIR {value!r} : 13 caractères, il manque la clé (2 chiffres de plus) ; un NIR en a 15",
            field="ins",
        )
    if len(v) not in (13, 15):
        raise InvalidIdentifier(
            f"NIR {value!r}: {len(v)} characters, a NIR has 15 (13 and a 2-digit key)",
            fr=f"NIR {value!r} : {len(v)} caractères, un NIR en a 15 (13 et une clé de 2 chiffres)",
            field="ins",
        )
    # Letters only as 2A/2B in the département: checked once the length says where that is.
    for pos, ch in enumerate(v, start=1):
        if ch not in _DIGITS and not (pos == 7 and v[5:7] in _CORSICA):
            raise InvalidIdentifier(
                f"NIR {value!r}: character {pos} ({ch!r}) is not a digit; only the département "
                "(characters 6-7) may be 2A or 2B, for Corsica",
                fr=f"NIR {value!r} : le caractère {pos} ({ch!r}) n'est pas un chiffre ; seul le département "
                "(caractères 6 et 7) peut être 2A ou 2B, pour la Corse",
                field="ins",
            )
    if v[0] not in _NIR_SEX:
        raise InvalidIdentifier(
            f"NIR {value!r}: the first digit is the sex, 1 (man) or 2 (woman), or 3, 4, 7, 8 "
            f"for a provisional number; not {v[0]}",
            fr=f"NIR {value!r} : le premier chiffre est le sexe, 1 (homme) ou 2 (femme), ou 3, 4, 7, 8 "
            f"pour un numéro provisoire ; pas {v[0]}",
            field="ins",
        )
    if not _nir_month_ok(int(v[3:5])):
        raise InvalidIdentifier(
            f"NIR {value!r}: characters 4-5 are the month of birth, 01 to 12 (20-42 or 50-99 when "
            f"unknown), not {v[3:5]}",
            fr=f"NIR {value!r} : les caractères 4 et 5 sont le mois de naissance, 01 à 12 (20-42 ou 50-99 "
            f"s'il est inconnu), pas {v[3:5]}",
            field="ins",
        )


def _nir_matches(v: str, *, sex: str | None, birth_date: dt.date | None) -> None:
    """The NIR's sex digit and birth year and month agree with what else was entered."""
    given = None if sex is None else check_sex(sex)
    # Only 1 and 2 say the sex for certain; U (unknown) agrees with anything.
    if given in ("F", "M") and v[0] in "12" and given != ("M" if v[0] == "1" else "F"):
        who_en, who_fr = ("a man", "un homme") if v[0] == "1" else ("a woman", "une femme")
        raise InvalidIdentifier(
            f"NIR {_nir_spaced(v)}: the NIR starts with {v[0]} ({who_en}) but the sex given is {given}",
            fr=f"NIR {_nir_spaced(v)} : le NIR commence par {v[0]} ({who_fr}) mais le sexe indiqué est {given}",
            field="ins",
        )
    yy, mm = v[1:3], v[3:5]
    # Months 20-42 and 50-99 stand for an unknown month: nothing to compare then.
    if birth_date is None or not 1 <= int(mm) <= 12:
        return
    if (yy, mm) != (f"{birth_date.year % 100:02d}", f"{birth_date.month:02d}"):
        raise InvalidIdentifier(
            f"NIR {_nir_spaced(v)}: characters 2-5 give the birth year {yy} and month {mm}, but the birth date "
            f"given is {birth_date.isoformat()}",
            fr=f"NIR {_nir_spaced(v)} : les caractères 2 à 5 donnent l'année de naissance {yy} et le mois {mm}, "
            f"mais la date de naissance indiquée est le {_fr_date(birth_date)}",
            field="ins",
        )


def _fold(value: str) -> str:
    """Lower case, no accents, hyphens and apostrophes as spaces: "Sage-Femme" == "sage femme"."""
    decomposed = unicodedata.normalize("NFKD", value.casefold())
    bare = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return " ".join(re.sub("[-_'\u2019.]", " ", bare).split())


_SEXES: Final = {
    **dict.fromkeys(("f", "femme", "feminin", "woman", "female"), "F"),
    # H is what French forms use for a man (homme).
    **dict.fromkeys(("m", "h", "homme", "masculin", "man", "male"), "M"),
    **dict.fromkeys(("u", "inconnu", "indetermine", "unknown"), "U"),
}


def check_sex(value: str) -> str:
    """Return "F", "M" or "U" (unknown) for what a person typed, in English or French.

    Args:
        value: e.g. "F", "M", "U", "H", "femme", "homme", "female", "inconnu".

    Returns:
        "F", "M" or "U".

    Raises:
        InvalidIdentifier: ``field="sex"`` with the accepted values.
    """
    sex = _SEXES.get(_fold(value))
    if sex is None:
        raise InvalidIdentifier(
            f"sex {value!r}: expected F (woman), M (man, also H for homme) or U (unknown)",
            fr=f"sexe {value!r} : attendu F (femme), M ou H (homme), ou U (inconnu)",
            field="sex",
        )
    return sex


_MONTHS_EN: Final = (
    "", "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)
_MONTHS_FR: Final = (
    "", "janvier", "février", "mars", "avril", "mai", "juin",
    "juillet", "août", "septembre", "octobre", "novembre", "décembre",
)
_ISO_DATE = re.compile(r"([0-9]{4})-([0-9]{1,2})-([0-9]{1,2})")
# As French people type it: 14/08/1955, 14.08.1955, 14-08-1955, 1/8/1955.
_FR_DATE = re.compile(r"([0-9]{1,2})[/.\-]([0-9]{1,2})[/.\-]([0-9]{4})")


def check_date(
    value: str,
    *,
    today: dt.date,
    field: str,
    not_after_today: bool = True,
    not_before: dt.date | None = None,
) -> dt.date:
    """Return the date typed as ``YYYY-MM-DD`` or ``DD/MM/YYYY``, or explain what is wrong.

    Args:
        value: the date as typed.
        today: the caller's today (protocol code reads no clock).
        field: the entry field reported in the error, e.g. "birth_date" or "date".
        not_after_today: refuse a date after ``today`` (a birth date, a consent date).
        not_before: refuse a date before this one.

    Returns:
        The date.

    Raises:
        InvalidIdentifier: ``field=field`` for an unreadable format, a day or month that
            does not exist (31/02), a future date, or one before ``not_before``.
    """
    typed = "".join(value.split())
    if m := _ISO_DATE.fullmatch(typed):
        y, mo, d = int(m[1]), int(m[2]), int(m[3])
    elif m := _FR_DATE.fullmatch(typed):
        d, mo, y = int(m[1]), int(m[2]), int(m[3])
    else:
        raise InvalidIdentifier(
            f"date {value!r}: not a date; expected YYYY-MM-DD or DD/MM/YYYY, e.g. 1955-08-14 or 14/08/1955",
            fr=f"date {value!r} : ce n'est pas une date ; attendu JJ/MM/AAAA ou AAAA-MM-JJ, "
            "par exemple 14/08/1955 ou 1955-08-14",
            field=field,
        )
    if y < 1:
        raise InvalidIdentifier(
            f"date {value!r}: year {y:04d} does not exist",
            fr=f"date {value!r} : l'année {y:04d} n'existe pas",
            field=field,
        )
    if not 1 <= mo <= 12:
        raise InvalidIdentifier(
            f"date {value!r}: month {mo:02d} does not exist (01 to 12)",
            fr=f"date {value!r} : le mois {mo:02d} n'existe pas (01 à 12)",
            field=field,
        )
    days = calendar.monthrange(y, mo)[1]
    if not 1 <= d <= days:
        raise InvalidIdentifier(
            f"date {value!r}: {_MONTHS_EN[mo]} {y} has {days} days, there is no day {d}",
            fr=f"date {value!r} : {_MONTHS_FR[mo]} {y} a {days} jours, le {d} n'existe pas",
            field=field,
        )
    date = dt.date(y, mo, d)
    if not_after_today and date > today:
        raise InvalidIdentifier(
            f"date {value!r} is in the future (today is {today.isoformat()})",
            fr=f"la date {value!r} est dans le futur (nous sommes le {_fr_date(today)})",
            field=field,
        )
    if not_before is not None and date < not_before:
        raise InvalidIdentifier(
            f"date {value!r} is before {not_before.isoformat()}, the earliest accepted",
            fr=f"la date {value!r} est antérieure au {_fr_date(not_before)}, la première acceptée",
            field=field,
        )
    return date


# -- professions (TRE_G15) and specialties ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Profession:
    """A health profession of the national table TRE_G15 and what it may do in a téléexpertise.

    ``may_request``: may be requérant (code de la santé publique; DOMAIN.md, Who).
    ``may_answer``: may be requis; only médecins and sages-femmes.
    ``uses_adeli``: billing still needs the ADELI number besides the RPPS.
    ``may_bill_rqd``: may bill the requérant's act RQD.
    """

    code: str
    label_fr: str
    label_en: str
    may_request: bool
    may_answer: bool
    uses_adeli: bool
    may_bill_rqd: bool


def _p(code: str, fr: str, en: str, *, request: bool, answer: bool = False, adeli: bool = False) -> Profession:
    # Every requérant bills RQD for the request (pédicures-podologues included, DOMAIN.md
    # "More rules"), and no one else does: the flag follows may_request.
    return Profession(code, fr, en, may_request=request, may_answer=answer, uses_adeli=adeli, may_bill_rqd=request)


PROFESSIONS: Final[dict[str, Profession]] = {
    p.code: p
    for p in (
        _p("10", "médecin", "doctor", request=True, answer=True),
        _p("21", "pharmacien", "pharmacist", request=False),
        _p("40", "chirurgien-dentiste", "dental surgeon", request=False),
        _p("50", "sage-femme", "midwife", request=True, answer=True),
        _p("60", "infirmier", "nurse", request=True, adeli=True),
        _p("70", "masseur-kinésithérapeute", "physiotherapist", request=True, adeli=True),
        _p("80", "pédicure-podologue", "podiatrist", request=True, adeli=True),
        _p("91", "orthophoniste", "speech therapist", request=True, adeli=True),
        _p("92", "orthoptiste", "orthoptist", request=True, adeli=True),
    )
}

# Other names people type for a profession: feminine forms, short forms, English synonyms.
_ALIASES: Final = {
    "10": ("médecin", "medecin", "physician", "medical doctor"),
    "21": ("pharmacienne",),
    "40": ("chirurgienne-dentiste", "dentiste", "dentist"),
    "50": ("maïeuticien", "sages-femmes"),
    "60": ("infirmière", "IDE", "IDEL"),
    "70": ("masseuse-kinésithérapeute", "kinésithérapeute", "kiné", "physical therapist"),
    "80": ("pédicure", "podologue", "chiropodist"),
    "91": ("speech-language pathologist", "speech and language therapist"),
    "92": (),
}
_PROFESSION_NAMES: Final = {
    _fold(name): code
    for code, p in PROFESSIONS.items()
    for name in (code, p.label_fr, p.label_en, *_ALIASES[code])
}


def check_profession(value: str) -> Profession:
    """Return the profession named by its TRE_G15 code or its name, in French or English.

    Case, accents, hyphens and feminine forms do not matter: "10", "médecin", "Medecin",
    "sage femme", "infirmière", "nurse", "physiotherapist" are all accepted.

    Args:
        value: a code such as "10" or a name.

    Returns:
        The :class:`Profession`.

    Raises:
        InvalidIdentifier: ``field="profession"``, listing the accepted values.
    """
    code = _PROFESSION_NAMES.get(_fold(value))
    if code is None:
        listed = ", ".join(f"{p.code} {p.label_fr}" for p in PROFESSIONS.values())
        listed_en = ", ".join(f"{p.code} {p.label_en}" for p in PROFESSIONS.values())
        raise InvalidIdentifier(
            f"profession {value!r} not recognised; accepted: {listed_en} (or the French names: {listed})",
            fr=f"profession {value!r} non reconnue ; valeurs acceptées : {listed}",
            field="profession",
        )
    return PROFESSIONS[code]


def _profession(profession: Profession | str) -> Profession:
    return profession if isinstance(profession, Profession) else check_profession(profession)


def check_may_request(profession: Profession | str) -> Profession:
    """Return the profession if it may send a téléexpertise request (be requérant).

    Args:
        profession: a :class:`Profession`, or a code or name for :func:`check_profession`.

    Returns:
        The :class:`Profession`.

    Raises:
        InvalidIdentifier: ``field="profession"`` if it may not request, or is unknown.
    """
    p = _profession(profession)
    if not p.may_request:
        names = ", ".join(q.label_fr for q in PROFESSIONS.values() if q.may_request)
        names_en = ", ".join(q.label_en for q in PROFESSIONS.values() if q.may_request)
        raise InvalidIdentifier(
            f"a {p.label_en} ({p.label_fr}) may not request a téléexpertise; requérants are: {names_en}",
            fr=f"la profession {p.label_fr} ne peut pas demander de téléexpertise ; peuvent être requérants : "
            f"{names}",
            field="profession",
        )
    return p


def check_may_answer(profession: Profession | str) -> Profession:
    """Return the profession if it may answer a téléexpertise (be requis): médecin or sage-femme.

    Args:
        profession: a :class:`Profession`, or a code or name for :func:`check_profession`.

    Returns:
        The :class:`Profession`.

    Raises:
        InvalidIdentifier: ``field="profession"`` if it may not answer, or is unknown.
    """
    p = _profession(profession)
    if not p.may_answer:
        raise InvalidIdentifier(
            f"only médecins (doctors) and sages-femmes (midwives) may answer a téléexpertise, "
            f"not a {p.label_en} ({p.label_fr})",
            fr=f"seuls les médecins et les sages-femmes peuvent répondre à une téléexpertise, "
            f"pas la profession {p.label_fr}",
            field="profession",
        )
    return p


# SM + 2 digits (nomenclature of savoir-faire, e.g. SM54 médecine générale), then any label.
_SPECIALTY = re.compile(r"(SM)\s*([0-9]{2})(?!\w)[\s:\-\u2013]*(.*)", re.IGNORECASE | re.DOTALL)


def check_specialty(value: str) -> str:
    """Return a specialty as its code, upper-case, then the label as given: "SM54 médecine générale".

    Deliberately simple: the code must be SM and two digits ("sm 54" is accepted); the
    label is free text, kept with its whitespace collapsed, and not checked against the
    code, because practice software labels specialties in their own words.

    Args:
        value: e.g. "SM54", "sm04 cardiologie", "SM54 - médecine générale".

    Returns:
        "SM54" or "SM54 médecine générale".

    Raises:
        InvalidIdentifier: ``field="specialty"`` if it does not start with a code.
    """
    m = _SPECIALTY.fullmatch(value.strip())
    if m is None:
        raise InvalidIdentifier(
            f"specialty {value!r}: expected a code, SM and two digits, optionally followed by its label, "
            "e.g. 'SM54 médecine générale' or 'SM04'",
            fr=f"spécialité {value!r} : attendu un code, SM et deux chiffres, éventuellement suivi du libellé, "
            "par exemple « SM54 médecine générale » ou « SM04 »",
            field="specialty",
        )
    code = f"SM{m[2]}"
    label = " ".join(m[3].split())
    return f"{code} {label}" if label else code
