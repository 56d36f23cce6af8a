"""Billing of téléexpertise acts: tariffs across 1 January 2026, the 4-a-year limit, the exports.

The fixture is Dr MARTIN's year around 1 January 2026: as requis, answering Dr DURAND about
two patients; as requérant, asking Dr LEROY. Amounts are in cents.
"""

from __future__ import annotations

import csv
import io
from dataclasses import replace
from datetime import UTC, date, datetime

import pytest

from client import billing
from client.billing import Act, BillingError, Tariff

MARTIN = "10000005479"  # valid RPPS (DOMAIN.md worked example)
DURAND = "10000000017"
LEROY = "10000000025"
PATIENT_A = "2550814168025"  # an INS matricule
PATIENT_B = "Dupont|Jeanne|1961-03-12"  # no INS: the fallback key
LIMIT_REASON = "limite de 4 actes par an pour ce patient et ce requis atteinte (5e acte)"


def act(case_id: str, day: date, *, role: billing.Role = "requis", patient: str = PATIENT_A, **kw: str) -> Act:
    requerant, requis = (DURAND, MARTIN) if role == "requis" else (MARTIN, LEROY)
    names = {DURAND: "DURAND Luc", MARTIN: "MARTIN Anne", LEROY: "LEROY Paul"}
    fields = {
        "requerant_rpps": requerant,
        "requerant_name": names[requerant],
        "requis_rpps": requis,
        "requis_name": names[requis],
    } | kw
    label = "X Y (1955-08-14)" if patient == PATIENT_A else "DUPONT Jeanne (1961-03-12)"
    return Act(case_id=case_id, role=role, act_date=day, patient_key=patient, patient_label=label, **fields)


@pytest.fixture
def acts() -> list[Act]:
    return [
        act("d1", date(2025, 12, 15)),
        act("d2", date(2025, 12, 31)),
        act("d3", date(2025, 12, 31), role="requerant", patient=PATIENT_B),
        act("j1", date(2026, 1, 1)),
        act("j2", date(2026, 1, 5)),
        act("j3", date(2026, 1, 12)),
        act("j4", date(2026, 1, 20)),
        act("j5", date(2026, 1, 25)),
        act("jb", date(2026, 1, 26), patient=PATIENT_B),
        act("jr", date(2026, 1, 10), role="requerant"),
    ]


def by_case(lines: list[billing.Line]) -> dict[str, billing.Line]:
    return {ln.case_id: ln for ln in lines}


# --- tariffs ---


def test_te2_changes_on_1_january_2026_both_sides() -> None:
    assert billing.tariff("TE2", "metropole", date(2025, 12, 31)).amount_cents == 20_00
    assert billing.tariff("TE2", "metropole", date(2026, 1, 1)).amount_cents == 23_00
    assert billing.tariff("TE2", "metropole", date(2022, 1, 1)).amount_cents == 20_00


def test_rqd_is_10_euros_on_both_sides(acts: list[Act]) -> None:
    assert billing.tariff("RQD", "metropole", date(2025, 12, 31)).amount_cents == 10_00
    assert billing.tariff("RQD", "metropole", date(2026, 1, 1)).amount_cents == 10_00
    december = by_case(billing.billing_lines(acts, month=(2025, 12)))
    january = by_case(billing.billing_lines(acts, month=(2026, 1)))
    assert (december["d3"].code, december["d3"].amount_cents) == ("RQD", 10_00)
    assert (january["jr"].code, january["jr"].amount_cents) == ("RQD", 10_00)


def test_lines_use_the_tariff_of_the_act_date(acts: list[Act]) -> None:
    december = by_case(billing.billing_lines(acts, month=(2025, 12)))
    january = by_case(billing.billing_lines(acts, month=(2026, 1)))
    assert (december["d2"].code, december["d2"].amount_cents) == ("TE2", 20_00)
    assert (january["j1"].code, january["j1"].amount_cents) == ("TE2", 23_00)


def test_dom_tariffs() -> None:
    assert billing.tariff("TE2", "dom", date(2026, 1, 1)).amount_cents == 27_60
    assert billing.tariff("RQD", "dom", date(2026, 3, 1)).amount_cents == 12_00
    lines = billing.billing_lines([act("o1", date(2026, 2, 2), zone="dom")], month=(2026, 2))
    assert lines[0].amount_cents == 27_60


def test_dom_before_2026_is_a_clear_error() -> None:
    with pytest.raises(BillingError, match=r"^no tariff known for TE2 in dom on 2025-06-01") as info:
        billing.tariff("TE2", "dom", date(2025, 6, 1))
    assert info.value.code == "billing"
    with pytest.raises(BillingError, match="no tariff known for TE2 in dom on 2025-12-31"):
        billing.billing_lines([act("o1", date(2025, 12, 31), zone="dom")], month=(2025, 12))


def test_before_2022_says_the_table_must_be_extended() -> None:
    with pytest.raises(BillingError, match=r"TE2 in metropole on 2021-12-31.*starts on 2022-01-01.*extend"):
        billing.tariff("TE2", "metropole", date(2021, 12, 31))
    with pytest.raises(BillingError, match="no tariff known for TE9"):
        billing.tariff("TE9", "metropole", date(2026, 1, 1))


def test_every_row_cites_its_source() -> None:
    assert all("Convention médicale 2024" in row.source and "DOMAIN.md" in row.source for row in billing.TARIFFS)


# --- the table's validation ---


def test_the_shipped_table_is_valid() -> None:
    billing.validate_tariffs(billing.TARIFFS)


def test_validation_catches_an_overlapping_row() -> None:
    bad = (*billing.TARIFFS, Tariff("TE2", "requis", "metropole", date(2025, 12, 1), date(2025, 12, 31), 1, "x"))
    with pytest.raises(BillingError, match=r"TE2 metropole: the row from .* overlaps"):
        billing.validate_tariffs(bad)


def test_validation_catches_a_second_open_ended_row() -> None:
    bad = (*billing.TARIFFS, Tariff("RQD", "requerant", "metropole", date(2027, 1, 1), None, 11_00, "x"))
    with pytest.raises(BillingError, match="overlaps"):
        billing.validate_tariffs(bad)


def test_validation_catches_a_gap() -> None:
    rows = [r for r in billing.TARIFFS if not (r.code == "TE2" and r.zone == "metropole")]
    rows += [
        Tariff("TE2", "requis", "metropole", date(2022, 1, 1), date(2025, 12, 30), 20_00, "x"),
        Tariff("TE2", "requis", "metropole", date(2026, 1, 1), None, 23_00, "x"),
    ]
    with pytest.raises(BillingError, match="no row covers 2025-12-31 to 2025-12-31"):
        billing.validate_tariffs(rows)


# --- the yearly limit ---


def test_four_acts_are_billable_the_fifth_is_not_and_says_why(acts: list[Act]) -> None:
    january = by_case(billing.billing_lines(acts, month=(2026, 1)))
    for case_id, rank in (("j1", 1), ("j2", 2), ("j3", 3), ("j4", 4)):
        assert (january[case_id].billable, january[case_id].rank_in_year) == (True, rank)
    fifth = january["j5"]
    assert (fifth.billable, fifth.rank_in_year, fifth.amount_cents) == (False, 5, 0)
    assert fifth.reason == LIMIT_REASON
    assert fifth.reason_en is not None
    assert "5th" in fifth.reason_en
    assert all(ln.reason is None for ln in january.values() if ln.billable)


def test_2025_acts_do_not_count_toward_2026(acts: list[Act]) -> None:
    december = by_case(billing.billing_lines(acts, month=(2025, 12)))
    assert (december["d1"].rank_in_year, december["d2"].rank_in_year) == (1, 2)
    assert by_case(billing.billing_lines(acts, month=(2026, 1)))["j1"].rank_in_year == 1


def test_earlier_months_count(acts: list[Act]) -> None:
    later = [*acts, act("f1", date(2026, 2, 3))]
    (line,) = billing.billing_lines(later, month=(2026, 2))
    assert (line.case_id, line.rank_in_year, line.billable) == ("f1", 6, False)


def test_other_requis_or_patient_counted_separately(acts: list[Act]) -> None:
    january = by_case(billing.billing_lines(acts, month=(2026, 1)))
    assert (january["jb"].rank_in_year, january["jb"].billable) == (1, True)  # other patient, same requis
    assert (january["jr"].rank_in_year, january["jr"].billable) == (1, True)  # same patient, other requis


def test_fallback_patient_key_ignores_case_and_accents() -> None:
    keys = ["Dupont|Jeanne|1961-03-12", "DUPONT|Jéanne|1961-03-12", " dupont |jeanne|1961-03-12"]
    many = [act(f"k{i}", date(2026, 1, 1 + i), patient=k) for i, k in enumerate(keys)]
    assert [ln.rank_in_year for ln in billing.billing_lines(many, month=(2026, 1))] == [1, 2, 3]


def test_acts_this_year(acts: list[Act]) -> None:
    assert billing.acts_this_year(acts, patient_key=PATIENT_A, requis_rpps=MARTIN, year=2026) == 5
    assert billing.acts_this_year(acts, patient_key=PATIENT_A, requis_rpps=MARTIN, year=2025) == 2
    assert billing.acts_this_year(acts, patient_key=PATIENT_A, requis_rpps="8" + LEROY, year=2026) == 1


def test_limit_warning_fires_at_four_existing(acts: list[Act]) -> None:
    four = [a for a in acts if a.case_id != "j5"]
    warning = billing.limit_warning(four, patient_key=PATIENT_A, requis_rpps=MARTIN, on=date(2026, 3, 1))
    assert warning is not None
    assert warning.rank == 5
    assert warning.en.startswith("this would be the 5th téléexpertise this year for this patient with Dr MARTIN Anne")
    assert "cannot be billed" in warning.en
    assert warning.fr.startswith("ce serait la 5e téléexpertise cette année pour ce patient avec le Dr MARTIN Anne")


def test_limit_warning_counts_pending_requests(acts: list[Act]) -> None:
    three = [a for a in acts if a.case_id not in {"j4", "j5"}]
    on = date(2026, 3, 1)
    assert billing.limit_warning(three, patient_key=PATIENT_A, requis_rpps=MARTIN, on=on) is None
    warning = billing.limit_warning(three, patient_key=PATIENT_A, requis_rpps=MARTIN, on=on, pending=1)
    assert warning is not None
    assert "(3 answered, 1 pending)" in warning.en


def test_limit_warning_is_per_calendar_year(acts: list[Act]) -> None:
    assert billing.limit_warning(acts, patient_key=PATIENT_A, requis_rpps=MARTIN, on=date(2027, 1, 1)) is None
    warning = billing.limit_warning([], patient_key=PATIENT_A, requis_rpps=MARTIN, on=date(2027, 1, 1), pending=4)
    assert warning is not None
    assert f"Dr RPPS {MARTIN}" in warning.en


# --- month filter, totals, inputs ---


def test_month_filter(acts: list[Act]) -> None:
    assert {ln.case_id for ln in billing.billing_lines(acts, month=(2025, 12))} == {"d1", "d2", "d3"}
    january = billing.billing_lines(acts, month=(2026, 1))
    assert [ln.case_id for ln in january] == ["j1", "j2", "jr", "j3", "j4", "j5", "jb"]  # by date
    assert billing.billing_lines(acts, month=(2026, 3)) == []
    with pytest.raises(BillingError, match="month 13"):
        billing.billing_lines(acts, month=(2026, 13))


def test_total_counts_billable_lines_only(acts: list[Act]) -> None:
    assert billing.total_cents(billing.billing_lines(acts, month=(2026, 1))) == 5 * 23_00 + 10_00
    assert billing.total_cents(billing.billing_lines(acts, month=(2025, 12))) == 2 * 20_00 + 10_00
    unpaid = replace(billing.billing_lines(acts, month=(2026, 1))[0], billable=False)
    assert billing.total_cents([unpaid]) == 0


def test_counterpart_is_the_other_practitioner(acts: list[Act]) -> None:
    january = by_case(billing.billing_lines(acts, month=(2026, 1)))
    assert january["j1"].counterpart == f"DURAND Luc (RPPS {DURAND})"
    assert january["jr"].counterpart == f"LEROY Paul (RPPS {LEROY})"


def test_rqd_by_profession() -> None:
    podiatrist = act("p1", date(2026, 1, 2), role="requerant", requerant_profession="80")
    nurse = act("p3", date(2026, 1, 4), role="requerant", requerant_profession="60")
    pharmacist = act("p2", date(2026, 1, 3), role="requerant", requerant_profession="21", patient=PATIENT_B)
    lines = by_case(billing.billing_lines([podiatrist, nurse, pharmacist], month=(2026, 1)))
    assert (lines["p1"].billable, lines["p1"].amount_cents) == (True, 10_00)
    assert (lines["p3"].billable, lines["p3"].amount_cents) == (True, 10_00)
    assert (lines["p2"].billable, lines["p2"].amount_cents) == (False, 0)
    assert lines["p2"].reason is not None
    assert "21 (pharmacien)" in lines["p2"].reason


def test_act_checks_its_fields() -> None:
    good = act("a", date(2026, 1, 1))
    with pytest.raises(BillingError, match=r"act 'a', requis: RPPS '10000005478'"):
        replace(good, requis_rpps="10000005478")
    with pytest.raises(BillingError, match="zone 'reunion'"):
        replace(good, zone="reunion")
    with pytest.raises(BillingError, match="role 'expert'"):
        replace(good, role="expert")  # type: ignore[arg-type]
    assert replace(good, requis_rpps="8 1000000 5479").requis_rpps == MARTIN


def test_a_case_given_twice_is_refused(acts: list[Act]) -> None:
    with pytest.raises(BillingError, match="'j1' is given twice"):
        billing.billing_lines([*acts, acts[3]], month=(2026, 1))


def test_act_date_is_the_answer_day_in_paris() -> None:
    assert billing.act_date_from(datetime(2025, 12, 31, 23, 30, tzinfo=UTC)) == date(2026, 1, 1)
    assert billing.act_date_from(datetime(2025, 12, 31, 22, 59, tzinfo=UTC)) == date(2025, 12, 31)
    with pytest.raises(BillingError, match="time zone"):
        billing.act_date_from(datetime(2025, 12, 31, 23, 30))  # noqa: DTZ001


# --- exports ---


def test_csv_round_trips_with_semicolons_and_decimal_commas(acts: list[Act]) -> None:
    lines = billing.billing_lines(acts, month=(2026, 1))
    stream = io.StringIO(newline="")
    billing.write_csv(lines, stream)
    rows = list(csv.reader(io.StringIO(stream.getvalue(), newline=""), delimiter=";"))
    assert rows[0] == list(billing.CSV_HEADER)
    body = {r[5]: r for r in rows[1:]}
    assert len(body) == len(lines)
    assert body["j1"][:4] == ["2026-01-01", "TE2", "23,00", "oui"]
    assert body["j5"][2:5] == ["0,00", "non", LIMIT_REASON]
    assert body["jr"][7] == f"LEROY Paul (RPPS {LEROY})"
    total = sum(round(float(r[2].replace(",", ".")) * 100) for r in rows[1:] if r[3] == "oui")
    assert total == billing.total_cents(lines)


def test_csv_neutralises_formulas() -> None:
    lines = billing.billing_lines([act("f", date(2026, 1, 2), requerant_name="=HYPERLINK(1)")], month=(2026, 1))
    stream = io.StringIO(newline="")
    billing.write_csv(lines, stream)
    row = list(csv.reader(io.StringIO(stream.getvalue(), newline=""), delimiter=";"))[1]
    assert row[7].startswith("'=HYPERLINK(1)")


def test_table_in_french_and_english(acts: list[Act]) -> None:
    lines = billing.billing_lines(acts, month=(2026, 1))
    fr = billing.format_table(lines, lang="fr")
    en = billing.format_table(lines, lang="en")
    assert fr.splitlines()[0].split() == [
        "Date",
        "Acte",
        "Montant",
        "Facturable",
        "Dossier",
        "Patient",
        "Correspondant",
        "Rang",
        "Motif",
    ]
    assert fr.rstrip().endswith("Total facturable : 125,00 €")
    assert LIMIT_REASON in fr
    assert en.rstrip().endswith("Billable total: 125.00 EUR")
    assert "limit of 4 acts per year for this patient and requis reached (5th act)" in en
    assert len(fr.splitlines()) == len(lines) + 3  # header, rule, lines, total
    with pytest.raises(BillingError, match="language 'de'"):
        billing.format_table(lines, lang="de")
