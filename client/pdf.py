"""The two documents a case leaves in the patient's record, as PDF: the dossier and the compte rendu.

``render_dossier`` prints the pre-filled request the requérant sends (who asks whom, about
which patient, what, and the patient's consent); ``render_report`` prints the compte rendu
that closes the case, with what the rules ask of it: date and time, the professionals'
identities, the acts and prescriptions, and any technical incident.

Both are pure (a dict in, bytes out) and deterministic: the PDF's creation date comes from
the case, never from the clock, so the same case renders to the same bytes and a hash of the
compte rendu can be signed or logged. Dates are shown in Europe/Paris time.

The text uses the PDF core font Helvetica in windows-1252, which covers French (é, ç, œ,
« », €) without embedding a font. Anything else a name or a note may hold (Vietnamese
tones, Polish ł, emoji) is brought to the nearest letter the font has (ễ → ê, ł → l) or
shown as "?": rendering never fails on a character.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fpdf import FPDF
from fpdf.enums import XPos, YPos
from fpdf.fonts import FontFace

__all__ = ["render_dossier", "render_report", "safe_text"]

_ENCODING = "windows-1252"
_FONT = "Helvetica"
_LINE = 5.2  # mm: 10 pt text with room to breathe
_TABLE_KEEP = 22.0  # mm: a table's heading and first row stay with the section title
_LABEL_W = 44.0  # mm: the widest label, "Contexte clinique", fits

# Letters NFKD does not decompose, and signs common in clinical notes, that the code page lacks.
_FALLBACKS = {
    "Đ": "D",
    "đ": "d",
    "Ł": "L",
    "ł": "l",
    "Ħ": "H",
    "ħ": "h",
    "\u0131": "i",  # dotless i
    "≥": ">=",
    "≤": "<=",
    "≠": "!=",
    "≈": "~",
    "→": "->",
    "←": "<-",
    "↑": "^",
    "↓": "v",
    "\u2212": "-",  # minus sign
    "⩾": ">=",
    "⩽": "<=",
}
_URGENCY = {"routine": "Normale", "urgent": "Urgente"}
_SEX = {"F": "Féminin", "M": "Masculin", "U": "Non précisé"}
_METHOD = {"oral": "oral", "written": "écrit"}
_KIND = {
    "request": "Demande",
    "complement_request": "Demande de complément",
    "complement": "Complément",
    "avis": "Avis",
    "refus": "Refus",
    "presentiel": "Orientation en présentiel",
}
_CONSENT = "Le patient a été informé de la téléexpertise (motif, modalités, droit de refus) et y a consenti."
_ACT = "Acte : téléexpertise (requérant RQD, requis TE2)"


def _encodes(text: str) -> bool:
    try:
        text.encode(_ENCODING)
    except UnicodeEncodeError:
        return False
    return True


@functools.lru_cache(maxsize=4096)
def _safe_char(ch: str) -> str:
    category = unicodedata.category(ch)
    if category == "Cc" and ch != "\n":
        return " "  # tabs, carriage returns and stray controls
    if category in {"Cf", "Mn", "Me"} or ch == "\u00ad":
        return ""  # zero-width joiners, variation selectors, lone combining marks, soft hyphens
    if _encodes(ch):
        return ch
    return _FALLBACKS.get(ch) or _transliterate(ch)


def _transliterate(ch: str) -> str:
    decomposed = unicodedata.normalize("NFKD", ch)
    base = "".join(c for c in decomposed if not unicodedata.combining(c))
    marks = [c for c in decomposed if unicodedata.combining(c)]
    # Keep as many accents as the code page has: Vietnamese ễ becomes ê, not e.
    for keep in range(len(marks), -1, -1):
        candidate = unicodedata.normalize("NFC", base + "".join(marks[:keep]))
        if candidate and _encodes(candidate):
            return candidate
    return "?"


def safe_text(value: object) -> str:
    """``value`` as text the core font can show: the nearest letters it has, or "?"."""
    text = unicodedata.normalize("NFC", "" if value is None else str(value))
    out: list[str] = []
    joined = False
    for ch in text:
        shown = _safe_char(ch)
        if shown and not (joined and shown == "?" and out and out[-1] == "?"):  # one "?" per emoji ZWJ sequence
            out.append(shown)
        joined = ch == "\u200d" or (joined and shown == "")
    return "".join(out)


# --- dates and sizes, the French way ------------------------------------------------------------------


def _paris_offset(moment: datetime) -> timedelta:
    """CET/CEST by the EU rule (since 1996): summer time from the last Sunday of March to that of October, 01:00 UTC."""

    def last_sunday(month: int) -> datetime:
        d = datetime(moment.year, month, 31, 1, tzinfo=UTC)
        return d - timedelta(days=(d.weekday() + 1) % 7)

    return timedelta(hours=2 if last_sunday(3) <= moment < last_sunday(10) else 1)


def _paris(ts: int) -> datetime:
    moment = datetime.fromtimestamp(ts, UTC)
    try:
        return moment.astimezone(ZoneInfo("Europe/Paris"))
    except ZoneInfoNotFoundError:  # Windows without the tzdata package
        return (moment + _paris_offset(moment)).replace(tzinfo=None)


def _when(ts: object) -> str:
    """``05/03/2026 à 14:32`` in Paris time, or "non horodaté" when there is no time."""
    if not isinstance(ts, int) or isinstance(ts, bool):
        return "non horodaté"
    return _paris(ts).strftime("%d/%m/%Y à %H:%M")


def _day(iso: object) -> str:
    """``1950-03-12`` as ``12/03/1950``; anything else is shown as given."""
    try:
        return date.fromisoformat(str(iso)).strftime("%d/%m/%Y")
    except ValueError:
        return str(iso or "")


def _size(n: object) -> str:
    if not isinstance(n, int) or n < 0:
        return "?"
    value = float(n)
    for unit in ("o", "Ko", "Mo", "Go"):
        if value < 1000 or unit == "Go":
            text = f"{value:.0f}" if unit == "o" or value >= 10 else f"{value:.1f}".replace(".", ",")
            return f"{text} {unit}"
        value /= 1000
    return "?"  # pragma: no cover - the loop always returns


def _get(d: object, key: str) -> Any:
    return d.get(key) if isinstance(d, dict) else None


def _s(d: object, key: str) -> str:
    value = _get(d, key)
    return "" if value is None else str(value)


# --- the page -------------------------------------------------------------------------------------------


class _Document(FPDF):
    """A4 portrait, French, with the case number and page numbers at the foot of every page."""

    def __init__(self, *, title: str, footer: str, created: object) -> None:
        super().__init__(orientation="P", unit="mm", format="A4")
        self.core_fonts_encoding = _ENCODING
        self._footer_text = safe_text(footer)
        ts = created if isinstance(created, int) and not isinstance(created, bool) else 0
        self.set_creation_date(datetime.fromtimestamp(ts, UTC))
        self.set_title(title)  # the metadata holds no patient data: only what is printed on the page
        self.set_lang("fr")
        self.set_creator("Pli")
        self.set_margins(18, 16, 18)
        self.set_auto_page_break(auto=True, margin=20)
        self.add_page()

    def footer(self) -> None:
        self.set_y(-14)
        self.set_font(_FONT, "", 8)
        self.set_text_color(90)
        self.cell(0, 5, self._footer_text, align="L")
        self.set_x(self.l_margin)
        self.cell(0, 5, f"Page {self.page_no()}/{{nb}}", align="R")
        self.set_text_color(0)

    def heading(self, title: str, subtitle: str) -> None:
        self.set_font(_FONT, "B", 17)
        self.cell(0, 9, safe_text(title), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        self.set_font(_FONT, "", 10)
        self.set_text_color(70)
        self.multi_cell(0, _LINE, safe_text(subtitle), align="L", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        self.set_text_color(0)
        self.ln(2)

    def section(self, title: str, *, keep: float = 2 * _LINE) -> None:
        """A section title, moved to the next page unless ``keep`` mm of its content fit under it."""
        if self.will_page_break(11 + keep):  # never a title alone at the foot of a page
            self.add_page()
        self.ln(2.5)
        self.set_font(_FONT, "B", 11)
        self.set_fill_color(228, 233, 240)
        self.cell(0, 7, " " + safe_text(title), fill=True, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        self.ln(1.5)

    def field(self, label: str, value: object, *, bold: bool = False) -> None:
        """A labelled line; a long value wraps under itself, not under the label."""
        if self.will_page_break(_LINE):
            self.add_page()
        self.set_font(_FONT, "B", 10)
        self.cell(_LABEL_W, _LINE, safe_text(label))
        self.set_font(_FONT, "B" if bold else "", 10)
        text = safe_text(value).strip() or "-"
        self.multi_cell(0, _LINE, text, align="L", new_x=XPos.LMARGIN, new_y=YPos.NEXT)

    def para(self, text: object, *, style: str = "") -> None:
        self.set_font(_FONT, style, 10)
        self.multi_cell(0, _LINE, safe_text(text).strip() or "-", align="L", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        self.ln(1)

    def numbered(self, items: Iterable[object]) -> None:
        self.set_font(_FONT, "", 10)
        for i, item in enumerate(items, 1):
            if self.will_page_break(_LINE):
                self.add_page()
            self.cell(8, _LINE, f"{i}.", align="R")
            self.multi_cell(0, _LINE, " " + safe_text(item).strip(), align="L", new_x=XPos.LMARGIN, new_y=YPos.NEXT)

    def grid(self, headings: Sequence[str], rows: Iterable[Sequence[object]], widths: Sequence[float]) -> None:
        self.set_font(_FONT, "", 9)
        style = FontFace(emphasis="BOLD", fill_color=(228, 233, 240))
        with self.table(
            col_widths=tuple(widths), headings_style=style, line_height=4.6, text_align="LEFT", padding=1
        ) as table:
            row = table.row()
            for h in headings:
                row.cell(safe_text(h))
            for values in rows:
                row = table.row()
                for v in values:
                    row.cell(safe_text(v))
        self.ln(1)

    def to_bytes(self) -> bytes:
        return bytes(self.output())


def _professional(doc: _Document, p: object, *, missing: str = "") -> None:
    name = _s(p, "name")
    doc.field("Nom", name or missing)
    if _s(p, "profession_label"):
        doc.field("Profession", ", ".join(x for x in (_s(p, "profession_label"), _s(p, "specialty")) if x))
    elif _s(p, "specialty"):
        doc.field("Spécialité", _s(p, "specialty"))
    doc.field("RPPS", _s(p, "rpps") or "non renseigné")
    if _s(p, "adeli"):
        doc.field("ADELI", _s(p, "adeli"))


def _patient(doc: _Document, p: object) -> None:
    doc.section("Patient")
    doc.field("Nom", _s(p, "family_name").upper())
    doc.field("Prénoms", _s(p, "given_names"))
    doc.field("Né(e) le", _day(_get(p, "birth_date")))
    doc.field("Sexe", _SEX.get(_s(p, "sex"), _s(p, "sex")))
    doc.field("INS/NIR", _s(p, "ins") or "non renseigné")


def _case_no(d: dict[str, Any]) -> str:
    return _s(d, "case_id")[:12]


# --- the two documents ----------------------------------------------------------------------------------


def render_dossier(d: dict[str, Any]) -> bytes:
    """The "Demande de téléexpertise" the requérant sends, as PDF bytes. Pure and deterministic."""
    doc = _Document(
        title="Demande de téléexpertise", footer=f"Pli — dossier n° {_case_no(d)}", created=d.get("created")
    )
    doc.heading(
        "Demande de téléexpertise",
        f"Dossier n° {_case_no(d)} — créé le {_when(d.get('created'))} (heure de Paris)",
    )
    doc.section("Requérant")
    _professional(doc, d.get("requerant"))
    doc.section("Requis")
    _professional(doc, d.get("requis"), missing="Non désigné (premier spécialiste disponible)")
    _patient(doc, d.get("patient"))
    doc.section("Motif")
    doc.para(d.get("motif"))
    doc.section("Question")
    doc.para(d.get("question"))
    doc.section("Contexte clinique")
    doc.para(d.get("context"))
    doc.section("Urgence")
    urgency = _s(d, "urgency")
    doc.para(_URGENCY.get(urgency, urgency), style="B" if urgency == "urgent" else "")

    consent = d.get("consent")
    doc.section("Consentement du patient")
    if _get(consent, "informed") is True and _get(consent, "consented") is True:
        doc.para(_CONSENT)
    else:
        doc.para("ATTENTION : le consentement du patient n'est pas enregistré dans ce dossier.", style="B")
    doc.field("Date", _day(_get(consent, "date")))
    doc.field("Mode", _METHOD.get(_s(consent, "method"), _s(consent, "method")))
    doc.field("Recueilli par", _s(consent, "recorded_by"))
    if _s(consent, "form"):
        doc.field("Formulaire", _s(consent, "form"))

    doc.section("Pièces jointes", keep=_TABLE_KEEP)
    attachments = [a for a in d.get("attachments") or () if isinstance(a, dict)]
    if attachments:
        doc.grid(
            ("Nom", "Type", "Taille", "SHA-256 (début)"),
            ((_s(a, "name"), _s(a, "type"), _size(a.get("size")), _s(a, "sha256")[:16]) for a in attachments),
            (46, 24, 12, 22),
        )
    else:
        doc.para("Aucune pièce jointe.")
    return doc.to_bytes()


def render_report(d: dict[str, Any]) -> bytes:
    """The "Compte rendu de téléexpertise" for the patient's record, as PDF bytes. Pure and deterministic."""
    doc = _Document(
        title="Compte rendu de téléexpertise",
        footer=f"Pli — compte rendu, dossier n° {_case_no(d)}",
        created=d.get("generated_at"),
    )
    doc.heading(
        "Compte rendu de téléexpertise",
        f"Dossier n° {_case_no(d)} — établi le {_when(d.get('generated_at'))} (heure de Paris)",
    )
    doc.section("Requérant")
    _professional(doc, d.get("requerant"))
    doc.section("Requis")
    _professional(doc, d.get("requis"))
    _patient(doc, d.get("patient"))

    origin = _s(d, "log_origin") or "?"
    stamp = f"(heure de Paris), horodatage signé par le relais {origin}"
    doc.section("Dates et heures")
    request_at, answer_at = d.get("request_at"), d.get("answer_at")
    doc.field("Demande", f"{_when(request_at)} {stamp}" if request_at is not None else "non horodatée")
    doc.field("Réponse", f"{_when(answer_at)} {stamp}" if answer_at is not None else "pas de réponse horodatée")

    doc.section("Motif")
    doc.para(d.get("motif"))
    doc.section("Question posée")
    doc.para(d.get("question"))
    _answer(doc, d)

    doc.section("Historique des échanges", keep=_TABLE_KEEP)
    exchanges = [e for e in d.get("exchanges") or () if isinstance(e, dict)]
    if exchanges:
        doc.grid(
            ("Date", "Nature", "Auteur", "Résumé"),
            (
                (_when(e.get("at")), _KIND.get(_s(e, "kind"), _s(e, "kind")), _s(e, "author"), _s(e, "summary"))
                for e in exchanges
            ),
            (24, 22, 24, 50),
        )
    else:
        doc.para("Aucun échange enregistré.")

    doc.section("Incidents techniques")
    incidents = [i for i in d.get("incidents") or () if isinstance(i, dict)]
    if incidents:
        for incident in incidents:
            doc.field(_when(incident.get("at")), _s(incident, "text"))
    else:
        doc.para("Aucun incident technique.")

    doc.section("Traçabilité")
    receipts = d.get("receipts")
    doc.field("Accusés de réception", f"{receipts if isinstance(receipts, int) else 0} accusé(s) signé(s)")
    doc.field("Journal", f"journal signé du relais {origin}")
    doc.ln(4)
    doc.para(_ACT if d.get("answer_kind") != "refus" else "Pas d'acte facturable : la demande a été refusée.",
             style="B")
    if d.get("billing_note"):
        doc.para(safe_text(d["billing_note"]))
    return doc.to_bytes()


def _answer(doc: _Document, d: dict[str, Any]) -> None:
    """The requis's answer: an avis with its prescriptions, an orientation, or a refusal."""
    kind = _s(d, "answer_kind")
    avis, orientation = d.get("avis"), d.get("orientation")
    if kind == "refus":
        doc.section("Refus de la demande")
        doc.para(d.get("refus_reason") or "Motif non précisé.")
    elif kind == "avis" and not isinstance(avis, dict):
        doc.section("Avis du requis")
        doc.para("Le texte de l'avis n'est pas joint à ce compte rendu.")
    elif kind not in {"avis", "presentiel"}:
        doc.section("Réponse")
        doc.para("Aucune réponse du requis.")
    if isinstance(avis, dict):
        doc.section("Avis du requis")
        doc.para(avis.get("avis"))
        if _s(avis, "recommendations"):
            doc.field("Recommandations", _s(avis, "recommendations"))
        doc.section("Prescriptions")
        prescriptions = [p for p in avis.get("prescriptions") or () if str(p).strip()]
        if prescriptions:
            doc.numbered(prescriptions)
        else:
            doc.para("Aucune prescription.")
        doc.section("Suivi")
        doc.para(avis.get("follow_up") or "Aucun suivi particulier.")
    if isinstance(orientation, dict) or kind == "presentiel":
        doc.section("Orientation vers une consultation en présentiel")
        doc.para(_get(orientation, "text") or "Le requis propose de voir le patient en consultation.")
        urgency = _s(orientation, "urgency")
        if urgency:
            doc.field("Urgence", _URGENCY.get(urgency, urgency), bold=urgency == "urgent")
