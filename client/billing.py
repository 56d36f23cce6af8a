"""Billing of téléexpertise acts by the Assurance Maladie: tariffs, the yearly limit, exports.

A practitioner (or their secretary) gets, for one month, the list of acts to bill: the
requérant bills RQD, the requis bills TE2, each at the tariff in force on the day of the
act, and the 5th and later acts of a year for one patient with one requis are shown but
not billable (DOMAIN.md, Rules). Before sending a request, ``limit_warning`` says when it
would be such a 5th act, so the requérant can choose another requis or accept it unpaid.

Everything here is pure: acts and dates come in as arguments (no clock, no database), and
the only output is the CSV written to a text stream the caller opened. Errors::

    PliError (protocol.errors)
    └── BillingError   billing   no tariff for that code, zone and day; a malformed act
"""

from __future__ import annotations

import csv
import itertools
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Literal, TextIO
from zoneinfo import ZoneInfo

from protocol.errors import PliError
from protocol.ids import InvalidIdentifier, check_rpps

__all__ = [
    "TARIFFS",
    "Act",
    "BillingError",
    "LimitWarning",
    "Line",
    "Tariff",
    "act_date_from",
    "acts_this_year",
    "billing_lines",
    "format_table",
    "limit_warning",
    "tariff",
    "total_cents",
    "validate_tariffs",
    "write_csv",
]

Role = Literal["requerant", "requis"]


class BillingError(PliError):
    code = "billing"


@dataclass(frozen=True)
class Tariff:
    """One price of one act code in one zone over a closed (or open-ended) range of days."""

    code: str
    role: Role
    zone: str
    valid_from: date
    valid_to: date | None  # inclusive; None: until a newer row is added
    amount_cents: int
    source: str


_SOURCE = "Convention médicale 2024, avenant / DOMAIN.md"

# The tariff table. To change a price: close the current row (valid_to = the day before) and
# add a row starting the next day; validate_tariffs (run below, at import, and by a test)
# refuses overlaps and gaps. Rows start on 2022-01-01 in metropole: acts before that
# (the TE1/TE2 two-level era, 2019-2021) are refused rather than priced wrongly. The DOM
# rates are only known as of 2026 (DOMAIN.md, "More rules"), so both DOM rows start then.
TARIFFS: tuple[Tariff, ...] = (
    Tariff("RQD", "requerant", "metropole", date(2022, 1, 1), None, 10_00, f"{_SOURCE} (Rules: RQD 10 €)"),
    Tariff("RQD", "requerant", "dom", date(2026, 1, 1), None, 12_00, f"{_SOURCE} (More rules: DOM RQD 12 €)"),
    Tariff("TE2", "requis", "metropole", date(2022, 1, 1), date(2025, 12, 31), 20_00, f"{_SOURCE} (Rules: TE2 20 €)"),
    Tariff("TE2", "requis", "metropole", date(2026, 1, 1), None, 23_00, f"{_SOURCE} (Rules: TE2 23 € from 2026-01-01)"),
    Tariff("TE2", "requis", "dom", date(2026, 1, 1), None, 27_60, f"{_SOURCE} (More rules: DOM TE2 27.60 €)"),
)

ZONES = ("metropole", "dom")
_CODE_OF_ROLE: dict[Role, str] = {"requerant": "RQD", "requis": "TE2"}
# TRE_G15 profession codes (DOMAIN.md, Identifiers).
PROFESSIONS = {
    "10": "médecin",
    "21": "pharmacien",
    "40": "chirurgien-dentiste",
    "50": "sage-femme",
    "60": "infirmier",
    "70": "masseur-kinésithérapeute",
    "80": "pédicure-podologue",
    "91": "orthophoniste",
    "92": "orthoptiste",
}
# The professions that may request a téléexpertise (code de la santé publique, DOMAIN.md "Who")
# bill RQD; "pédicures-podologues may also bill RQD". Pharmaciens and dentists are not requérants.
_RQD_PROFESSIONS = ("10", "50", "60", "70", "80", "91", "92")

YEARLY_LIMIT = 4  # "Maximum 4 actes par an et par patient", for the same requis (DOMAIN.md)


def _limit_year(day: date) -> int:
    # "Par an" is read as the calendar year of the act: the texts say "par an", not "sur 12 mois
    # glissants", and the Assurance Maladie counts its other yearly ceilings by calendar year.
    # This is the one place to change if a rolling year is ever confirmed.
    return day.year


def validate_tariffs(rows: Sequence[Tariff]) -> None:
    """Refuse a table where a day could have two prices, or a hole inside a code's history.

    Run at import on TARIFFS, so a bad edit of the table fails the first test, not a billing run.

    Raises:
        BillingError: naming the rows that overlap or the days left uncovered.
    """
    roles: dict[str, Role] = {}
    groups: dict[tuple[str, str], list[Tariff]] = defaultdict(list)
    for row in rows:
        if row.zone not in ZONES:
            raise BillingError(f"tariff {row.code} {row.valid_from}: unknown zone {row.zone!r}")
        if row.amount_cents <= 0 or not row.source:
            raise BillingError(f"tariff {row.code} {row.zone} {row.valid_from}: needs an amount and a source")
        if row.valid_to is not None and row.valid_to < row.valid_from:
            raise BillingError(f"tariff {row.code} {row.zone}: ends {row.valid_to} before it starts {row.valid_from}")
        if roles.setdefault(row.code, row.role) != row.role:
            raise BillingError(f"tariff {row.code}: rows disagree on the role ({roles[row.code]}, {row.role})")
        groups[row.code, row.zone].append(row)
    for (code, zone), group in groups.items():
        group.sort(key=lambda r: r.valid_from)
        for prev, nxt in itertools.pairwise(group):
            if prev.valid_to is None or nxt.valid_from <= prev.valid_to:
                raise BillingError(
                    f"tariff {code} {zone}: the row from {prev.valid_from} overlaps the row from {nxt.valid_from}"
                )
            if nxt.valid_from != prev.valid_to + timedelta(days=1):
                raise BillingError(
                    f"tariff {code} {zone}: no row covers {prev.valid_to + timedelta(days=1)} to "
                    f"{nxt.valid_from - timedelta(days=1)}"
                )


validate_tariffs(TARIFFS)


def tariff(code: str, zone: str, on: date) -> Tariff:
    """Return the row in force for ``code`` in ``zone`` on the day ``on``.

    Raises:
        BillingError: when no row covers that day, saying whether the table must be extended.
    """
    rows = [r for r in TARIFFS if r.code == code and r.zone == zone]
    for row in rows:
        if row.valid_from <= on and (row.valid_to is None or on <= row.valid_to):
            return row
    what = f"no tariff known for {code} in {zone} on {on.isoformat()}"
    if not rows:
        raise BillingError(f"{what}: the table has no {code} row for that zone (zones: {', '.join(ZONES)})")
    first = min(r.valid_from for r in rows)
    if on < first:
        raise BillingError(f"{what}: the table starts on {first.isoformat()}; extend TARIFFS in client/billing.py")
    raise BillingError(f"{what}: the last row has ended; add the current tariff to TARIFFS in client/billing.py")


def act_date_from(answered_at: datetime) -> date:
    """The act's date: the day, in Europe/Paris, the requis answered (an answer at 23:30 UTC on
    31 December is a 1 January act, at the new tariff).

    Raises:
        BillingError: for a naive datetime, whose day cannot be known.
    """
    if answered_at.tzinfo is None or answered_at.utcoffset() is None:
        raise BillingError("the answer time needs a time zone to give the act's date in Europe/Paris")
    return answered_at.astimezone(ZoneInfo("Europe/Paris")).date()


def _norm_patient(key: str) -> str:
    # The same patient keyed "Dupont|Jeanne|1961-03-12" once and "DUPONT|Jéanne|1961-03-12" later
    # must count once: compare without case, accents or surrounding spaces.
    decomposed = unicodedata.normalize("NFKD", key)
    bare = "".join(c for c in decomposed if not unicodedata.combining(c))
    return "|".join(" ".join(part.split()) for part in bare.casefold().split("|"))


def _rpps(value: str, who: str) -> str:
    try:
        return check_rpps(value)
    except InvalidIdentifier as e:
        raise BillingError(f"{who}: {e}") from e


@dataclass(frozen=True)
class Act:
    """One realised téléexpertise, seen from the practitioner whose billing this is (``role``).

    ``act_date`` is the day, in Europe/Paris, of the requis's answer (an avis, or an
    orientation to an in-person consultation; see ``act_date_from``). Refused and pending
    cases are not acts and must not be passed. ``patient_key`` is the INS/NIR, or
    "family|given|birthdate" without an INS. RPPS numbers are checked and normalised here.
    """

    case_id: str
    role: Role
    act_date: date
    patient_key: str
    patient_label: str
    requerant_rpps: str
    requerant_name: str
    requis_rpps: str
    requis_name: str
    zone: str = "metropole"
    requerant_profession: str = "10"
    sequence: int = 0  # orders acts of one day: the answer's index in the relay's log

    def __post_init__(self) -> None:
        where = f"act {self.case_id!r}"
        if not self.case_id or not self.patient_key.strip():
            raise BillingError(f"{where}: needs a case id and a patient key")
        if self.role not in _CODE_OF_ROLE:
            raise BillingError(f"{where}: role {self.role!r} is neither 'requerant' nor 'requis'")
        if self.zone not in ZONES:
            raise BillingError(f"{where}: zone {self.zone!r} is not one of {', '.join(ZONES)}")
        if self.requerant_profession not in PROFESSIONS:
            raise BillingError(f"{where}: profession {self.requerant_profession!r} is not a TRE_G15 code")
        object.__setattr__(self, "requerant_rpps", _rpps(self.requerant_rpps, f"{where}, requérant"))
        object.__setattr__(self, "requis_rpps", _rpps(self.requis_rpps, f"{where}, requis"))


@dataclass(frozen=True)
class Line:
    """One line of a month's billing. Lines that cannot be billed keep amount 0 and say why."""

    date: date
    code: str
    amount_cents: int
    billable: bool
    reason: str | None  # French, as it appears in the export; None when billable
    reason_en: str | None
    case_id: str
    patient_label: str
    counterpart: str  # the other practitioner: "name (RPPS n)"
    rank_in_year: int  # rank among this patient's acts with this requis in the calendar year


def _ranks(acts: Iterable[Act]) -> dict[str, int]:
    """Rank of each act (by case id) in its (patient, requis, year), in the order the acts happened
    (date, then the answers' order in the relay's log, then case id)."""
    ordered = sorted(acts, key=lambda a: (a.act_date, a.sequence, a.case_id))
    seen: set[str] = set()
    counts: dict[tuple[str, str, int], int] = defaultdict(int)
    ranks: dict[str, int] = {}
    for act in ordered:
        if act.case_id in seen:  # the same case twice would count, and be billed, twice
            raise BillingError(f"act {act.case_id!r} is given twice")
        seen.add(act.case_id)
        key = (_norm_patient(act.patient_key), act.requis_rpps, _limit_year(act.act_date))
        counts[key] += 1
        ranks[act.case_id] = counts[key]
    return ranks


def billing_lines(acts: Sequence[Act], *, month: tuple[int, int]) -> list[Line]:
    """The lines for ``month`` (year, month), ranked against all ``acts`` (earlier months count).

    Raises:
        BillingError: for a bad month, a case given twice, or a day with no known tariff.
    """
    year, mon = month
    if not 1 <= mon <= 12:
        raise BillingError(f"month {mon} is not between 1 and 12")
    ranks = _ranks(acts)
    lines: list[Line] = []
    for act in sorted(acts, key=lambda a: (a.act_date, a.case_id)):
        if (act.act_date.year, act.act_date.month) != (year, mon):
            continue
        code = _CODE_OF_ROLE[act.role]
        rank = ranks[act.case_id]
        reason = reason_en = None
        if rank > YEARLY_LIMIT:
            reason = f"limite de {YEARLY_LIMIT} actes par an pour ce patient et ce requis atteinte ({rank}e acte)"
            reason_en = f"limit of {YEARLY_LIMIT} acts per year for this patient and requis reached ({_nth(rank)} act)"
        elif act.role == "requerant" and act.requerant_profession not in _RQD_PROFESSIONS:
            prof = f"{act.requerant_profession} ({PROFESSIONS[act.requerant_profession]})"
            reason = f"RQD non prévu pour la profession {prof}, qui n'est pas requérante en téléexpertise"
            reason_en = f"RQD not provided for profession {prof}, which may not request a téléexpertise"
        amount = tariff(code, act.zone, act.act_date).amount_cents if reason is None else 0
        if act.role == "requerant":
            counterpart = f"{act.requis_name} (RPPS {act.requis_rpps})"
        else:
            counterpart = f"{act.requerant_name} (RPPS {act.requerant_rpps})"
        lines.append(
            Line(
                date=act.act_date,
                code=code,
                amount_cents=amount,
                billable=reason is None,
                reason=reason,
                reason_en=reason_en,
                case_id=act.case_id,
                patient_label=act.patient_label,
                counterpart=counterpart,
                rank_in_year=rank,
            )
        )
    return lines


def total_cents(lines: Iterable[Line]) -> int:
    return sum(line.amount_cents for line in lines if line.billable)


def acts_this_year(acts: Iterable[Act], *, patient_key: str, requis_rpps: str, year: int) -> int:
    """How many acts count toward the yearly limit for this patient with this requis."""
    patient, requis = _norm_patient(patient_key), _rpps(requis_rpps, "requis")
    return sum(
        1
        for a in acts
        if _norm_patient(a.patient_key) == patient and a.requis_rpps == requis and _limit_year(a.act_date) == year
    )


@dataclass(frozen=True)
class LimitWarning:
    """Shown while a request is prepared: the same message in English and French."""

    en: str
    fr: str
    rank: int  # the rank the new request would have in the year


def limit_warning(
    acts: Iterable[Act],
    *,
    patient_key: str,
    requis_rpps: str,
    on: date,
    pending: int = 0,
    requis_name: str | None = None,
) -> LimitWarning | None:
    """Warn when a new request on ``on`` would exceed the yearly limit with this requis.

    ``pending`` counts requests already sent but not yet answered: each will become an act.
    ``requis_name`` defaults to the name on the latest act with that requis.
    """
    acts = list(acts)
    done = acts_this_year(acts, patient_key=patient_key, requis_rpps=requis_rpps, year=_limit_year(on))
    existing = done + pending
    if existing < YEARLY_LIMIT:
        return None
    rpps = _rpps(requis_rpps, "requis")
    if requis_name is None:
        known = sorted((a for a in acts if a.requis_rpps == rpps), key=lambda a: (a.act_date, a.case_id))
        requis_name = known[-1].requis_name if known else f"RPPS {rpps}"
    dr = requis_name if requis_name.casefold().startswith("dr") else f"Dr {requis_name}"
    rank = existing + 1
    return LimitWarning(
        en=f"this would be the {_nth(rank)} téléexpertise this year for this patient with {dr} "
        f"({done} answered, {pending} pending): it cannot be billed (at most {YEARLY_LIMIT} a year)",
        fr=f"ce serait la {rank}e téléexpertise cette année pour ce patient avec le {dr} "
        f"({done} réalisées, {pending} en attente) : elle ne pourra pas être facturée ({YEARLY_LIMIT} par an au plus)",
        rank=rank,
    )


def _nth(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _amount(cents: int, sep: str) -> str:
    return f"{cents // 100}{sep}{cents % 100:02d}"


CSV_HEADER = ("date", "acte", "montant_eur", "facturable", "motif", "dossier", "patient", "correspondant", "rang_annee")


def _cell(text: str) -> str:
    # Names and labels come from other practitioners: a leading = + - @ would be run as a formula
    # by the spreadsheet (CSV injection), so such cells are quoted with an apostrophe.
    return f"'{text}" if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def write_csv(lines: Iterable[Line], stream: TextIO) -> None:
    """Write the lines as a CSV that a French spreadsheet opens in columns without an import dialog.

    French Excel and LibreOffice expect ``;`` as separator (the comma is the decimal mark), so
    amounts are written "23,00" and read as numbers; dates are ISO (2026-01-01). Open ``stream``
    with ``newline=""`` (the csv module's rule) and, for Excel, ``encoding="utf-8-sig"``.
    """
    writer = csv.writer(stream, delimiter=";")
    writer.writerow(CSV_HEADER)
    for ln in lines:
        writer.writerow(
            (
                ln.date.isoformat(),
                ln.code,
                _amount(ln.amount_cents, ","),
                "oui" if ln.billable else "non",
                _cell(ln.reason or ""),
                _cell(ln.case_id),
                _cell(ln.patient_label),
                _cell(ln.counterpart),
                ln.rank_in_year,
            )
        )


_TABLE = {
    "fr": (
        ("Date", "Acte", "Montant", "Facturable", "Dossier", "Patient", "Correspondant", "Rang", "Motif"),
        ("oui", "non"),
        "Total facturable :",
        "€",
        ",",
    ),
    "en": (
        ("Date", "Code", "Amount", "Billable", "Case", "Patient", "Counterpart", "Rank", "Reason"),
        ("yes", "no"),
        "Billable total:",
        "EUR",
        ".",
    ),
}


def format_table(lines: Sequence[Line], *, lang: str) -> str:
    """A plain-text table for the terminal, in French ("fr") or English ("en"), with the total."""
    if lang not in _TABLE:
        raise BillingError(f"language {lang!r}: 'fr' or 'en'")
    header, (yes, no), total_label, unit, sep = _TABLE[lang]
    rows = [header] + [
        (
            ln.date.isoformat(),
            ln.code,
            _amount(ln.amount_cents, sep),
            yes if ln.billable else no,
            ln.case_id,
            ln.patient_label,
            ln.counterpart,
            str(ln.rank_in_year),
            (ln.reason if lang == "fr" else ln.reason_en) or "",
        )
        for ln in lines
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    text.insert(1, "  ".join("-" * w for w in widths))
    text.append(f"{total_label} {_amount(total_cents(lines), sep)} {unit}")
    return "\n".join(text) + "\n"
