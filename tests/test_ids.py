"""Tests of protocol/ids.py: entry checks that explain, in English and French, what is wrong.

The tables use real-format numbers: DOMAIN.md's worked examples (RPPS 10000005479, ADELI
879101558, FINESS 750712184, NIR 2550814168025 key 38 and 2840519321025 key 52 for a birth
in 2A) and numbers derived from them with one digit changed.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import ids
from protocol.errors import DecodeError
from protocol.ids import (
    PROFESSIONS,
    InvalidIdentifier,
    Profession,
    check_adeli,
    check_date,
    check_finess,
    check_may_answer,
    check_may_request,
    check_nir,
    check_profession,
    check_rpps,
    check_sex,
    check_specialty,
)

TODAY = dt.date(2026, 5, 4)


def birth(value: str, **kw: Any) -> dt.date:
    return check_date(value, today=TODAY, field="birth_date", **kw)


# -- valid entries and what they normalise to ---------------------------------------------------

VALID: list[tuple[Callable[..., object], str, dict[str, Any], object]] = [
    (check_rpps, "10000005479", {}, "10000005479"),
    (check_rpps, "1 00 00 00 547 9", {}, "10000005479"),
    (check_rpps, "810000005479", {}, "10000005479"),  # national id: 8 + RPPS
    (check_adeli, "879101558", {}, "879101558"),
    (check_adeli, "87 91 0155 8", {}, "879101558"),
    (check_adeli, "87.910.155.8", {}, "879101558"),
    (check_finess, "750712184", {}, "750712184"),
    (check_finess, "75 071 218 4", {}, "750712184"),
    (check_finess, "2A0000016", {}, "2A0000016"),  # Corsica, Luhn over 20000001 + 6
    (check_finess, "2a 000 001 6", {}, "2A0000016"),
    (check_finess, "2B0012342", {}, "2B0012342"),  # Haute-Corse, Luhn over 20012342
    (check_nir, "255081416802538", {}, "255081416802538"),
    (check_nir, "2 55 08 14 168 025 38", {}, "255081416802538"),
    (check_nir, "2550814168025", {"key_required": False}, "2550814168025"),
    # Born in Corse-du-Sud: typed with 2A, key computed with 19 in its place.
    (check_nir, "2 84 05 2A 321 025 52", {}, "284052A32102552"),
    (check_nir, "284052a32102552", {}, "284052A32102552"),
    # The same digits with 19 are a birth in Corrèze, and the same key.
    (check_nir, "2840519321025 52", {}, "284051932102552"),
    (check_nir, "2 84 05 2B 321 025 79", {}, "284052B32102579"),  # Haute-Corse: 2B → 18
    (check_nir, "255081416802538", {"sex": "F", "birth_date": dt.date(1955, 8, 14)}, "255081416802538"),
    (check_nir, "255081416802538", {"sex": "femme"}, "255081416802538"),
    (check_nir, "255081416802538", {"sex": "U"}, "255081416802538"),
    # Provisional number (7): its sex digit is not compared with the sex given.
    (check_nir, "7550814168025", {"sex": "M", "key_required": False}, "7550814168025"),
    # Month 20-42 / 50-99: unknown month, the birth date is not compared.
    (check_nir, "1553014168025", {"birth_date": dt.date(1960, 1, 1), "key_required": False}, "1553014168025"),
    (birth, "1955-08-14", {}, dt.date(1955, 8, 14)),
    (birth, "14/08/1955", {}, dt.date(1955, 8, 14)),
    (birth, "1/8/1955", {}, dt.date(1955, 8, 1)),
    (birth, " 29.02.2024 ", {}, dt.date(2024, 2, 29)),
    (birth, "2026-05-04", {}, TODAY),
    (birth, "2030-01-01", {"not_after_today": False}, dt.date(2030, 1, 1)),
    (check_sex, "F", {}, "F"),
    (check_sex, "femme", {}, "F"),
    (check_sex, "H", {}, "M"),
    (check_sex, "Homme", {}, "M"),
    (check_sex, "m", {}, "M"),
    (check_sex, "U", {}, "U"),
    (check_specialty, "SM54", {}, "SM54"),
    (check_specialty, "sm04", {}, "SM04"),
    (check_specialty, "SM 54", {}, "SM54"),
    (check_specialty, "SM54 médecine générale", {}, "SM54 médecine générale"),
    (check_specialty, " sm54 -  médecine   générale ", {}, "SM54 médecine générale"),
]


@pytest.mark.parametrize(("check", "value", "kw", "expected"), VALID, ids=lambda x: x if isinstance(x, str) else "")
def test_valid(check: Callable[..., object], value: str, kw: dict[str, Any], expected: object) -> None:
    assert check(value, **kw) == expected


# -- invalid entries: the field, and a precise fragment in English and in French ---------------

INVALID: list[tuple[Callable[..., object], str, dict[str, Any], str, str, str]] = [
    # RPPS: the existing English wording is kept (tests/test_cli.py and test_relay_cli.py match it).
    (check_rpps, "10000005478", {}, "rpps", "check digit) should be 9, not 8", "devrait être 9, pas 8"),
    (check_rpps, "10000012344", {}, "rpps", "should be 3, not 4", "devrait être 3, pas 4"),
    (check_rpps, "1000000547", {}, "rpps", "10 digits, an RPPS has 11", "10 chiffres, un RPPS en a 11"),
    (check_rpps, "1000000547A", {}, "rpps", "character 11 ('A') is not a digit", "caractère 11 ('A') n'est pas"),
    (check_rpps, "20000005479", {}, "rpps", "starts with 1, not 2", "commence par 1, pas par 2"),
    (check_rpps, "879101558", {}, "rpps", "ADELI", "ADELI"),
    (check_rpps, "", {}, "rpps", "0 digits", "0 chiffres"),
    # ADELI
    (check_adeli, "879101559", {}, "adeli", "should be 8, not 9", "devrait être 8, pas 9"),
    (check_adeli, "879101568", {}, "adeli", "should be 6, not 8", "devrait être 6, pas 8"),  # 5 typed as 6
    (check_adeli, "87910155", {}, "adeli", "8 digits, an ADELI number has 9", "8 chiffres, un numéro ADELI en a 9"),
    (check_adeli, "8791O1558", {}, "adeli", "character 5 ('O') is not a digit", "caractère 5 ('O') n'est pas"),
    (check_adeli, "10000005479", {}, "adeli", "is an RPPS number", "c'est un numéro RPPS"),
    # FINESS
    (check_finess, "750712185", {}, "finess", "should be 4, not 5", "devrait être 4, pas 5"),
    (check_finess, "75071218", {}, "finess", "8 characters, a FINESS number has 9", "8 caractères"),
    (check_finess, "7507121840", {}, "finess", "10 characters", "10 caractères"),
    (check_finess, "2C0012342", {}, "finess", "2A/2B", "2A/2B pour la Corse"),
    (check_finess, "75071B184", {}, "finess", "character 6 ('B') is not a digit", "caractère 6 ('B')"),
    (check_finess, "2A0000015", {}, "finess", "should be 6, not 5", "devrait être 6, pas 5"),
    (check_finess, "2B0012343", {}, "finess", "should be 2, not 3", "devrait être 2, pas 3"),
    # NIR / INS
    (check_nir, "255081416802583", {}, "ins",
     "NIR 2 55 08 14 168 025 83: the key (last two digits) should be 38, not 83",
     "la clé (deux derniers chiffres) devrait être 38, pas 83"),
    # The order 025 typed as 125: the key given no longer fits the number.
    (check_nir, "255081416812538", {}, "ins", "NIR 2 55 08 14 168 125 38: the key (last two digits) should be 35",
     "devrait être 35, pas 38"),
    # 2A read as 20 gives key 25: wrong, Corsica counts 2A as 19.
    (check_nir, "284052A32102525", {}, "ins", "should be 52, not 25", "devrait être 52, pas 25"),
    (check_nir, "284052B32102552", {}, "ins", "should be 79, not 52", "devrait être 79, pas 52"),
    (check_nir, "2550814168025", {}, "ins", "key (2 more digits) is missing", "il manque la clé"),
    (check_nir, "25508141680253", {}, "ins", "14 characters, a NIR has 15", "14 caractères, un NIR en a 15"),
    (check_nir, "2550814168025388", {}, "ins", "16 characters", "16 caractères"),
    (check_nir, "2550814168O2538", {}, "ins", "character 11 ('O') is not a digit", "caractère 11 ('O')"),
    (check_nir, "25508141680A538", {}, "ins", "character 12 ('A') is not a digit; only the département",
     "seul le département"),
    (check_nir, "2550A14168025 38", {}, "ins", "character 5 ('A')", "caractère 5 ('A')"),
    (check_nir, "555081416802538", {}, "ins", "first digit is the sex", "premier chiffre est le sexe"),
    (check_nir, "255131416802538", {}, "ins", "month of birth, 01 to 12", "mois de naissance, 01 à 12"),
    (check_nir, "255001416802538", {}, "ins", "not 00", "pas 00"),
    (check_nir, "255081416802538", {"sex": "M"}, "ins", "starts with 2 (a woman) but the sex given is M",
     "commence par 2 (une femme) mais le sexe indiqué est M"),
    (check_nir, "2840519321025 52", {"sex": "homme"}, "ins", "the sex given is M", "le sexe indiqué est M"),
    (check_nir, "255081416802538", {"birth_date": dt.date(1956, 8, 14)}, "ins",
     "birth year 55 and month 08, but the birth date given is 1956-08-14",
     "l'année de naissance 55 et le mois 08, mais la date de naissance indiquée est le 14/08/1956"),
    (check_nir, "255081416802538", {"birth_date": dt.date(1955, 9, 14)}, "ins", "1955-09-14", "14/09/1955"),
    (check_nir, "255081416802538", {"sex": "X"}, "sex", "sex 'X'", "sexe 'X'"),
    # Dates
    (birth, "31/02/2024", {}, "birth_date", "February 2024 has 29 days, there is no day 31",
     "février 2024 a 29 jours, le 31 n'existe pas"),
    (birth, "2023-02-29", {}, "birth_date", "February 2023 has 28 days", "février 2023 a 28 jours"),
    (birth, "31/04/1990", {}, "birth_date", "April 1990 has 30 days", "avril 1990 a 30 jours"),
    (birth, "14/13/1955", {}, "birth_date", "month 13 does not exist", "le mois 13 n'existe pas"),
    (birth, "00/08/1955", {}, "birth_date", "there is no day 0", "le 0 n'existe pas"),
    (birth, "0000-01-01", {}, "birth_date", "year 0000", "l'année 0000"),
    (birth, "2026-05-05", {}, "birth_date", "is in the future (today is 2026-05-04)",
     "est dans le futur (nous sommes le 04/05/2026)"),
    (birth, "1899-12-31", {"not_before": dt.date(1900, 1, 1)}, "birth_date", "before 1900-01-01",
     "antérieure au 01/01/1900"),
    (birth, "14 août 1955", {}, "birth_date", "expected YYYY-MM-DD or DD/MM/YYYY", "attendu JJ/MM/AAAA"),
    (birth, "55-08-14", {}, "birth_date", "not a date", "ce n'est pas une date"),
    (check_date, "2026-13-01", {"today": TODAY, "field": "date"}, "date", "month 13", "le mois 13"),
    # Sex, profession, specialty
    (check_sex, "X", {}, "sex", "expected F (woman), M (man, also H for homme) or U", "F (femme), M ou H (homme)"),
    (check_sex, "", {}, "sex", "expected F", "attendu F"),
    (check_profession, "vétérinaire", {}, "profession", "not recognised; accepted: 10 doctor",
     "valeurs acceptées : 10 médecin, 21 pharmacien"),
    (check_profession, "11", {}, "profession", "50 midwife", "50 sage-femme"),
    (check_may_answer, "infirmière", {}, "profession", "only médecins (doctors) and sages-femmes (midwives) may answer",
     "seuls les médecins et les sages-femmes peuvent répondre"),
    (check_may_answer, "70", {}, "profession", "not a physiotherapist", "pas la profession masseur-kinésithérapeute"),
    (check_may_request, "pharmacien", {}, "profession", "a pharmacist (pharmacien) may not request",
     "la profession pharmacien ne peut pas demander"),
    (check_may_request, "40", {}, "profession", "requérants are: doctor, midwife", "requérants : médecin, sage-femme"),
    (check_may_request, "plombier", {}, "profession", "not recognised", "non reconnue"),
    (check_specialty, "dermatologie", {}, "specialty", "SM and two digits", "SM et deux chiffres"),
    (check_specialty, "SM5", {}, "specialty", "e.g. 'SM54 médecine générale'", "« SM54 médecine générale »"),
    (check_specialty, "SM540", {}, "specialty", "SM and two digits", "SM et deux chiffres"),
    (check_specialty, "", {}, "specialty", "SM and two digits", "SM et deux chiffres"),
]


@pytest.mark.parametrize(("check", "value", "kw", "field", "en", "fr"), INVALID,
                         ids=lambda x: x if isinstance(x, str) else "")
def test_invalid_is_explained_in_both_languages(
    check: Callable[..., object], value: str, kw: dict[str, Any], field: str, en: str, fr: str
) -> None:
    with pytest.raises(InvalidIdentifier) as info:
        check(value, **kw)
    e = info.value
    assert e.field == field
    assert en in str(e), str(e)
    assert en in e.message
    assert fr in e.message_fr, e.message_fr
    assert e.message_fr != str(e)  # every message has its French version
    assert e.code == "invalid_identifier"
    assert isinstance(e, DecodeError)


def test_domain_keys() -> None:
    # DOMAIN.md, Identifiers: 2550814168025 → key 38; 2840519321025 (born in 2A) → key 52.
    assert ids._nir_key("2550814168025") == 38
    assert ids._nir_key("284052A321025") == 52
    assert ids._nir_key("2840519321025") == 52
    assert ids._nir_key("284052B321025") == ids._nir_key("2840518321025") == 79
    assert ids.luhn_ok("10000005479")
    assert ids.luhn_ok("879101558")
    assert ids.luhn_ok("750712184")
    assert not ids.luhn_ok("")
    assert not ids.luhn_ok("\u0661\u0660")  # Arabic-Indic digits pass str.isdigit(), not this check


def test_error_without_translation_still_works() -> None:
    # Code that raised InvalidIdentifier with a message alone, before fr and field, keeps working.
    e = InvalidIdentifier("bad")
    assert (str(e), e.message_fr, e.field, e.code) == ("bad", "bad", "identifier", "invalid_identifier")


# -- professions ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("typed", "code"), [
    ("10", "10"), ("médecin", "10"), ("Medecin", "10"), ("MÉDECIN", "10"), ("doctor", "10"), ("physician", "10"),
    ("21", "21"), ("pharmacienne", "21"), ("pharmacist", "21"),
    ("dentiste", "40"), ("chirurgien-dentiste", "40"), ("dentist", "40"),
    ("sage-femme", "50"), ("sage femme", "50"), ("Sage-Femme", "50"), ("maïeuticien", "50"), ("midwife", "50"),
    ("infirmier", "60"), ("infirmière", "60"), ("Infirmiere", "60"), ("nurse", "60"), ("IDE", "60"),
    ("masseur-kinésithérapeute", "70"), ("kiné", "70"), ("kinesitherapeute", "70"), ("physiotherapist", "70"),
    ("pédicure-podologue", "80"), ("podologue", "80"), ("podiatrist", "80"),
    ("orthophoniste", "91"), ("speech therapist", "91"),
    ("orthoptiste", "92"), ("orthoptist", "92"), (" 92 ", "92"),
])
def test_profession_by_code_or_name(typed: str, code: str) -> None:
    assert check_profession(typed) is PROFESSIONS[code]


def test_profession_table() -> None:
    assert sorted(PROFESSIONS) == ["10", "21", "40", "50", "60", "70", "80", "91", "92"]
    answer = {c for c, p in PROFESSIONS.items() if p.may_answer}
    request = {c for c, p in PROFESSIONS.items() if p.may_request}
    adeli = {c for c, p in PROFESSIONS.items() if p.uses_adeli}
    rqd = {c for c, p in PROFESSIONS.items() if p.may_bill_rqd}
    assert answer == {"10", "50"}
    assert request == {"10", "50", "60", "70", "80", "91", "92"}
    assert adeli == {"60", "70", "80", "91", "92"}
    assert rqd == request
    for code, p in PROFESSIONS.items():
        assert isinstance(p, Profession)
        assert p.code == code
        assert check_profession(p.label_fr) is p
        assert check_profession(p.label_en) is p
    assert check_may_answer("sage-femme") is PROFESSIONS["50"]
    assert check_may_answer(PROFESSIONS["10"]) is PROFESSIONS["10"]
    assert check_may_request(PROFESSIONS["80"]) is PROFESSIONS["80"]
    with pytest.raises(AttributeError):
        PROFESSIONS["10"].may_answer = False  # type: ignore[misc]


# -- properties ----------------------------------------------------------------------------------

ANY_TEXT = st.one_of(st.text(), st.text(alphabet="0123456789 ABab.-/xX", max_size=20))


def _total(check: Callable[[str], object], value: str) -> None:
    """The check returns, or raises InvalidIdentifier with both messages and a field: nothing else escapes."""
    error: InvalidIdentifier | None = None
    try:
        check(value)
    except InvalidIdentifier as e:
        error = e
    if error is not None:
        assert error.field
        assert str(error)
        assert error.message_fr


@given(ANY_TEXT)
def test_every_check_returns_or_raises_invalid_identifier(value: str) -> None:
    for check in (
        check_rpps,
        check_adeli,
        check_finess,
        check_nir,
        lambda v: check_nir(v, key_required=False),
        lambda v: check_nir(v, sex="F", birth_date=dt.date(1955, 8, 14)),
        check_sex,
        check_profession,
        check_may_answer,
        check_may_request,
        check_specialty,
        lambda v: check_date(v, today=TODAY, field="date", not_before=dt.date(1900, 1, 1)),
    ):
        _total(check, value)


@given(st.text())
def test_nir_as_sex_returns_or_raises_invalid_identifier(value: str) -> None:
    _total(lambda v: check_nir("255081416802538", sex=v), value)


_DEPARTEMENTS = st.one_of(st.integers(1, 99).map(lambda d: f"{d:02d}"), st.sampled_from(["2A", "2B"]))
_MONTHS = st.one_of(st.integers(1, 12), st.integers(20, 42), st.integers(50, 99)).map(lambda m: f"{m:02d}")
NIR_BODIES = st.builds(
    lambda s, y, m, d, c, o: f"{s}{y:02d}{m}{d}{c:03d}{o:03d}",
    st.sampled_from("123478"), st.integers(0, 99), _MONTHS, _DEPARTEMENTS, st.integers(0, 999), st.integers(0, 999),
)


def reference_key(body: str) -> int:
    """The key computed independently of the module: Corsica's letters replaced in the number."""
    number = body[:5] + {"2A": "19", "2B": "18"}.get(body[5:7], body[5:7]) + body[7:]
    return 97 - int(number) % 97


@given(NIR_BODIES, st.integers(0, 99))
def test_nir_key_validates_and_any_other_key_names_it(body: str, other: int) -> None:
    key = f"{reference_key(body):02d}"
    assert check_nir(body + key) == body + key
    assert check_nir(" ".join([body[:5], body[5:7], body[7:], key])) == body + key
    assert check_nir(body, key_required=False) == body
    wrong = f"{other:02d}"
    if wrong == key:
        return
    with pytest.raises(InvalidIdentifier) as info:
        check_nir(body + wrong)
    assert info.value.field == "ins"
    assert f"should be {key}, not {wrong}" in str(info.value)
    assert f"devrait être {key}, pas {wrong}" in info.value.message_fr


def reference_luhn_digit(payload: str) -> int:
    for d in range(10):
        digits = [int(c) for c in payload + str(d)][::-1]
        total = sum(x if i % 2 == 0 else (2 * x if x < 5 else 2 * x - 9) for i, x in enumerate(digits))
        if total % 10 == 0:
            return d
    raise AssertionError


@given(st.text(alphabet="0123456789", min_size=8, max_size=8), st.integers(0, 9))
def test_adeli_check_digit_validates_and_any_other_is_named(payload: str, other: int) -> None:
    key = reference_luhn_digit(payload)
    assert check_adeli(f"{payload}{key}") == f"{payload}{key}"
    if other != key:
        with pytest.raises(InvalidIdentifier, match=f"should be {key}, not {other}"):
            check_adeli(f"{payload}{other}")


@given(st.text(alphabet="0123456789", min_size=9, max_size=9), st.integers(0, 9))
def test_rpps_check_digit_validates_and_any_other_is_named(payload: str, other: int) -> None:
    payload = "1" + payload
    key = reference_luhn_digit(payload)
    assert check_rpps(f"{payload}{key}") == check_rpps(f"8{payload}{key}") == f"{payload}{key}"
    if other != key:
        with pytest.raises(InvalidIdentifier, match=f"should be {key}, not {other}"):
            check_rpps(f"{payload}{other}")


@given(st.sampled_from(["2A", "2B", "75", "13", "97"]), st.text(alphabet="0123456789", min_size=6, max_size=6))
def test_finess_check_digit_counts_corsica_as_20(dept: str, payload: str) -> None:
    key = reference_luhn_digit(dept.replace("A", "0").replace("B", "0") + payload)
    assert check_finess(f"{dept}{payload}{key}") == f"{dept}{payload}{key}"
    wrong = (key + 1) % 10
    with pytest.raises(InvalidIdentifier, match=f"should be {key}, not {wrong}"):
        check_finess(f"{dept}{payload}{wrong}")


@given(st.dates(min_value=dt.date(1900, 1, 1), max_value=dt.date(2100, 12, 31)))
def test_dates_round_trip_in_both_formats(d: dt.date) -> None:
    iso, fr = d.isoformat(), f"{d.day:02d}/{d.month:02d}/{d.year}"
    for typed in (iso, fr):
        if d > TODAY:
            with pytest.raises(InvalidIdentifier, match="in the future"):
                check_date(typed, today=TODAY, field="date")
        else:
            assert check_date(typed, today=TODAY, field="date") == d
        assert check_date(typed, today=TODAY, field="date", not_after_today=False) == d
