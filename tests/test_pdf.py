"""The dossier and the compte rendu: every field is on the page, French dates, same case → same bytes.

The PDFs are read back with pypdf, so what is asserted is what a reader (or the DMP's
indexer) gets out of the file, not what was handed to fpdf2.
"""

from __future__ import annotations

import copy
import io
import re
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pypdf import PdfReader

from client.pdf import _paris_offset, render_dossier, render_report, safe_text

CREATED = 1_772_717_520  # 2026-03-05 13:32 UTC = 14:32 in Paris (winter time)
REQUEST_AT = 1_783_509_300  # 2026-07-08 11:15 UTC = 13:15 in Paris (summer time)
ANSWER_AT = 1_783_578_900  # 2026-07-09 06:35 UTC = 08:35 in Paris

LONG_QUESTION = (
    "Patiente de 75 ans présentant une lésion pigmentée du dos, apparue il y a environ six mois selon sa fille, "
    "asymétrique, à bords irréguliers, polychrome (brun, noir, zones bleutées), de 9 mm de grand axe, "
    "avec un cœur légèrement surélevé depuis trois semaines. "
) * 18 + "Faut-il une exérèse rapide, et sous quel délai ? Mot-témoin : xylophonesque."

REQUERANT = {
    "name": "Dr Nguyễn Thị Ánh",
    "rpps": "10000005479",
    "profession_label": "Médecin",
    "specialty": "Médecine générale",
    "adeli": "879101558",
}
PATIENT = {
    "family_name": "Lefèvre-Œillet",
    "given_names": "Bérénice Éloïse",
    "birth_date": "1950-03-12",
    "sex": "F",
    "ins": "255081416802538",
}


def dossier() -> dict[str, Any]:
    return {
        "case_id": "3f9a1c0e7b2d4a6f8e1c3b5d7f9a0b2c",
        "created": CREATED,
        "requerant": REQUERANT,
        "requis": {"name": "Dr Paul Durand", "rpps": "10000012343", "specialty": "Dermatologie"},
        "patient": PATIENT,
        "motif": "Lésion pigmentée suspecte du dos 🩺",
        "question": LONG_QUESTION,
        "context": "Antécédents : HTA traitée, pas d'antécédent de mélanome. Phototype II. Tension ≥ 14/9.",
        "urgency": "urgent",
        "consent": {
            "informed": True,
            "consented": True,
            "date": "2026-03-04",
            "method": "written",
            "recorded_by": "Dr Nguyễn Thị Ánh",
            "form": "consentement_signé.pdf",
        },
        "attachments": [
            {"name": "dos_vue_générale.jpg", "type": "image/jpeg", "size": 2_345_678, "sha256": "ab" * 32},
            {"name": "dermoscopie_lésion.png", "type": "image/png", "size": 812_000, "sha256": "cd" * 32},
            {"name": "courrier_médecin.pdf", "type": "application/pdf", "size": 512, "sha256": "0123456789abcdef" * 4},
        ],
    }


def report() -> dict[str, Any]:
    return {
        "case_id": "3f9a1c0e7b2d4a6f8e1c3b5d7f9a0b2c",
        "generated_at": ANSWER_AT + 60,
        "requerant": REQUERANT,
        "requis": {
            "name": "Dr Paul Durand",
            "rpps": "10000012343",
            "profession_label": "Médecin",
            "specialty": "Dermatologie",
        },
        "patient": PATIENT,
        "motif": "Lésion pigmentée suspecte du dos",
        "question": LONG_QUESTION,
        "request_at": REQUEST_AT,
        "answer_at": ANSWER_AT,
        "answer_kind": "avis",
        "avis": {
            "avis": "Aspect dermoscopique évocateur d'un mélanome nodulaire : réseau atypique, voile bleu-blanc.",
            "recommendations": "Exérèse complète avec marges de 2 mm, examen anatomopathologique.",
            "prescriptions": [
                "Exérèse chirurgicale de la lésion du dos, marges 2 mm",
                "Examen anatomopathologique de la pièce d'exérèse",
                "Photoprotection : crème solaire SPF 50+, renouveler toutes les 2 heures",
            ],
            "follow_up": "Consultation de dermatologie lundi prochain ; résultats histologiques sous 15 jours.",
        },
        "orientation": {"text": "Ajoutée aux consultations de lundi matin au CHU.", "urgency": "urgent"},
        "exchanges": [
            {"kind": "request", "at": REQUEST_AT, "author": "Dr Nguyễn Thị Ánh", "summary": "Demande initiale"},
            {
                "kind": "complement_request",
                "at": REQUEST_AT + 3600,
                "author": "Dr Paul Durand",
                "summary": "Merci d'une photo dermoscopique nette",
            },
            {"kind": "complement", "at": None, "author": "Dr Nguyễn Thị Ánh", "summary": "Photo dermoscopique"},
            {"kind": "avis", "at": ANSWER_AT, "author": "Dr Paul Durand", "summary": "Avis : exérèse"},
        ],
        "incidents": [{"at": REQUEST_AT + 7200, "text": "Relais injoignable 12 minutes, envoi repris automatiquement"}],
        "log_origin": "relais.ars-idf.sante.fr",
        "receipts": 4,
    }


def text_of(pdf: bytes) -> str:
    """The PDF's text with line breaks and runs of spaces collapsed, as a search would see it."""
    reader = PdfReader(io.BytesIO(pdf))
    return re.sub(r"\s+", " ", " ".join(page.extract_text() for page in reader.pages))


def pages_of(pdf: bytes) -> int:
    return len(PdfReader(io.BytesIO(pdf)).pages)


# --- the dossier ----------------------------------------------------------------------------------------


def test_dossier_holds_every_field() -> None:
    pdf = render_dossier(dossier())
    assert pdf.startswith(b"%PDF-")
    text = text_of(pdf)
    for expected in (
        "Demande de téléexpertise",
        "Dossier n° 3f9a1c0e7b2d",
        "créé le 05/03/2026 à 14:32",
        # Requérant, with the Vietnamese name brought to the letters the font has
        "Requérant",
        "Dr Nguyên Thi Ánh",
        "10000005479",
        "879101558",
        "Médecin, Médecine générale",
        # Requis
        "Requis",
        "Dr Paul Durand",
        "10000012343",
        "Dermatologie",
        # Patient
        "LEFÈVRE-ŒILLET",
        "Bérénice Éloïse",
        "Né(e) le 12/03/1950",
        "Féminin",
        "INS/NIR 255081416802538",
        # Texts
        "Lésion pigmentée suspecte du dos ?",  # the emoji becomes "?"
        "cœur légèrement surélevé",
        "xylophonesque",
        "Contexte clinique",
        "Tension >= 14/9",
        "Urgence Urgente",
        # Consent
        "Consentement du patient",
        "Le patient a été informé de la téléexpertise (motif, modalités, droit de refus) et y a consenti.",
        "04/03/2026",
        "écrit",
        "consentement_signé.pdf",
        # Attachments
        "Pièces jointes",
        "dos_vue_générale.jpg",
        "dermoscopie_lésion.png",
        "courrier_médecin.pdf",
        "2,3 Mo",
        "812 Ko",
        "512 o",
        "abababababababab",
        "0123456789abcdef",
        # Footer
        "Pli — dossier n° 3f9a1c0e7b2d",
    ):
        assert expected in text, expected
    assert "abababababababababab" not in text  # only the first 16 hex digits
    assert f"Page 1/{pages_of(pdf)}" in text


def test_long_question_wraps_over_pages() -> None:
    pdf = render_dossier(dossier())
    assert pages_of(pdf) >= 2
    short = dossier()
    short["question"] = "Exérèse ?"
    assert pages_of(render_dossier(short)) < pages_of(pdf)
    reader = PdfReader(io.BytesIO(pdf))
    assert "Page 2/" in reader.pages[1].extract_text()


def test_dossier_deterministic() -> None:
    assert render_dossier(dossier()) == render_dossier(copy.deepcopy(dossier()))
    other = dossier()
    other["created"] += 60
    assert render_dossier(other) != render_dossier(dossier())


def test_dossier_creation_date_from_the_case() -> None:
    reader = PdfReader(io.BytesIO(render_dossier(dossier())))
    assert reader.metadata is not None
    assert reader.metadata.creation_date == datetime.fromtimestamp(CREATED, UTC)
    assert "Lefèvre" not in str(dict(reader.metadata))  # no patient data in the metadata


def test_dossier_missing_optional_fields() -> None:
    d = dossier()
    d["requerant"] = {k: v for k, v in REQUERANT.items() if k != "adeli"}
    d["requerant"]["specialty"] = ""
    d["requis"] = {"name": "", "rpps": "", "specialty": ""}
    d["patient"] = {k: v for k, v in PATIENT.items() if k != "ins"}
    d["consent"] = {k: v for k, v in d["consent"].items() if k != "form"}
    d["attachments"] = []
    d["urgency"] = "routine"
    text = text_of(render_dossier(d))
    assert "Non désigné" in text
    assert "INS/NIR non renseigné" in text
    assert "Aucune pièce jointe." in text
    assert "Urgence Normale" in text
    assert "ADELI" not in text
    assert "Formulaire" not in text


def test_dossier_without_consent_says_so() -> None:
    d = dossier()
    d["consent"] = {"informed": True, "consented": False}
    text = text_of(render_dossier(d))
    assert "consentement du patient n'est pas enregistré" in text
    assert "y a consenti" not in text


def test_dossier_survives_an_almost_empty_case() -> None:
    assert pages_of(render_dossier({})) == 1
    assert pages_of(render_dossier({"case_id": "ab", "created": "hier", "patient": None, "attachments": [1]})) == 1


# --- the compte rendu -----------------------------------------------------------------------------------


def test_report_holds_every_field() -> None:
    pdf = render_report(report())
    text = text_of(pdf)
    for expected in (
        "Compte rendu de téléexpertise",
        "établi le 09/07/2026 à 08:36",
        "Dr Nguyên Thi Ánh",
        "10000005479",
        "Dr Paul Durand",
        "10000012343",
        "Médecin, Dermatologie",
        "LEFÈVRE-ŒILLET",
        "Bérénice Éloïse",
        "12/03/1950",
        "255081416802538",
        # Dates of the request and of the answer, summer time, with the signed log
        "Demande 08/07/2026 à 13:15 (heure de Paris), horodatage signé par le relais relais.ars-idf.sante.fr",
        "Réponse 09/07/2026 à 08:35 (heure de Paris), horodatage signé par le relais relais.ars-idf.sante.fr",
        "Question posée",
        "xylophonesque",
        # The avis and its prescriptions, numbered
        "mélanome nodulaire",
        "marges de 2 mm",
        "1. Exérèse chirurgicale de la lésion du dos, marges 2 mm",
        "2. Examen anatomopathologique de la pièce d'exérèse",
        "3. Photoprotection : crème solaire SPF 50+",
        "Suivi",
        "résultats histologiques sous 15 jours",
        "Ajoutée aux consultations de lundi matin au CHU.",
        # History
        "Historique des échanges",
        "Demande de complément",
        "Merci d'une photo dermoscopique nette",
        "non horodaté",
        "08/07/2026 à 14:15",
        # Incidents and trace
        "08/07/2026 à 15:15",
        "Relais injoignable 12 minutes, envoi repris automatiquement",
        "4 accusé(s) signé(s)",
        "Acte : téléexpertise (requérant RQD, requis TE2)",
    ):
        assert expected in text, expected
    assert "Aucun incident technique." not in text


def test_report_deterministic() -> None:
    assert render_report(report()) == render_report(report())


def test_report_without_incidents_says_so() -> None:
    d = report()
    d["incidents"] = []
    assert "Aucun incident technique." in text_of(render_report(d))


@pytest.mark.parametrize("kind", ["refus", "presentiel"])
def test_report_refus_and_presentiel_without_avis(kind: str) -> None:
    d = report()
    d["answer_kind"] = kind
    del d["avis"]
    del d["orientation"]
    if kind == "refus":
        d["refus_reason"] = "Photo floue : impossible de conclure, merci de renvoyer une photo nette."
    text = text_of(render_report(d))
    assert "Prescriptions" not in text
    if kind == "refus":
        assert "Refus de la demande" in text
        assert "impossible de conclure" in text
        assert "Pas d'acte facturable : la demande a été refusée." in text
        assert "Acte : téléexpertise (requérant RQD, requis TE2)" not in text
    else:
        assert "Orientation vers une consultation en présentiel" in text
        assert "Acte : téléexpertise (requérant RQD, requis TE2)" in text


def test_report_unanswered_and_untimed() -> None:
    d = report()
    for key in ("avis", "orientation", "answer_kind"):
        d.pop(key)
    d["request_at"] = None
    d["answer_at"] = None
    d["exchanges"] = []
    text = text_of(render_report(d))
    assert "Demande non horodatée" in text
    assert "pas de réponse horodatée" in text
    assert "Aucune réponse du requis." in text
    assert "Aucun échange enregistré." in text
    assert pages_of(render_report({})) >= 1


# --- text the core font can show ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        ("Nguyễn Thị Ánh", "Nguyên Thi Ánh"),
        ("Đặng Văn Lâm", "Dang Van Lâm"),
        ("Łukasz Wałęsa", "Lukasz Walesa"),
        ("cœur, œdème, « urgent », 38 °C, 5 µg, 50 €", "cœur, œdème, « urgent », 38 °C, 5 µg, 50 €"),
        ("fièvre 🤒 et toux 👩\u200d⚕️", "fièvre ? et toux ?"),
        ("\uff26\uff55\uff4c\uff4c \ufb01le ½", "Full file ½"),  # fullwidth letters, fi ligature
        ("a\tb\rc\nd", "a b c\nd"),
        ("e\u0301te\u0301", "été"),  # decomposed accents are composed first
        ("北京", "??"),
        ("SpO2 ≥ 95 %, K+ ≤ 3,5", "SpO2 >= 95 %, K+ <= 3,5"),
    ],
)
def test_safe_text(given: str, shown: str) -> None:
    assert safe_text(given) == shown
    shown.encode("windows-1252")


def test_every_character_renders() -> None:
    d = dossier()
    d["question"] = "".join(chr(c) for c in range(0x20, 0x3000) if not 0xD800 <= c < 0xE000)
    assert render_dossier(d).startswith(b"%PDF-")


@pytest.mark.parametrize(
    ("utc", "paris_hours"),
    [
        (datetime(2026, 3, 29, 0, 59, tzinfo=UTC), 1),  # a minute before summer time
        (datetime(2026, 3, 29, 1, 0, tzinfo=UTC), 2),
        (datetime(2026, 10, 25, 0, 59, tzinfo=UTC), 2),
        (datetime(2026, 10, 25, 1, 0, tzinfo=UTC), 1),
        (datetime(2027, 7, 1, tzinfo=UTC), 2),
        (datetime(2027, 12, 1, tzinfo=UTC), 1),
    ],
)
def test_paris_offset_fallback_matches_zoneinfo(utc: datetime, paris_hours: int) -> None:
    """Without tz data (Windows lacking tzdata) the EU rule is used; it agrees with the database."""
    assert _paris_offset(utc).total_seconds() == paris_hours * 3600
    assert utc.astimezone(ZoneInfo("Europe/Paris")).utcoffset() == _paris_offset(utc)
