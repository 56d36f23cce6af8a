"""Valid case bodies (SPEC.md §6.3) for vectors, tests and benchmarks: one place to change.

The values are realistic but fictitious: the patient's NIR has a correct key, the
practitioners' RPPS numbers pass Luhn (they are the test practitioners of keys.json).
"""

from __future__ import annotations

from typing import Any

__all__ = ["answer_body", "request_body"]

PATIENT = {
    "family_name": "DUPONT",
    "given_names": "Jeanne",
    "birth_date": "1961-03-12",
    "sex": "F",
    "ins": "261037511200508",
}


def request_body(
    *,
    requis_rpps: str = "10000012343",
    question: str = "Lésion pigmentée du dos, asymétrique, 9 mm. Mélanome à exclure ?",
    motif: str = "Lésion pigmentée du dos",
    family_name: str = "DUPONT",
    dossier: str | None = None,
    **patient: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "author": {"profession": "10", "specialty": "SM54"},
        "requis": {"rpps": requis_rpps},
        "patient": {**PATIENT, "family_name": family_name, **patient},
        "motif": motif,
        "question": question,
        "context": "Pas d'antécédent notable.",
        "urgency": "routine",
        "consent": {"informed": True, "consented": True, "date": "2026-11-20", "method": "oral",
                    "recorded_by": "Dr Claire Martin"},
    }
    if dossier is not None:
        body["dossier"] = dossier
    return body


def answer_body(kind: str, in_reply_to: bytes | None = None, text: str = "Aspect bénin.") -> dict[str, Any]:
    """A body of an answer kind; ``in_reply_to`` is left out when core.reply adds it."""
    author = {"profession": "10", "specialty": "SM15"} if kind != "complement" else {
        "profession": "10", "specialty": "SM54"}
    fields: dict[str, Any] = {
        "avis": {"avis": text, "recommendations": "", "prescriptions": [], "follow_up": ""},
        "complement_request": {"missing": text},
        "complement": {"text": text},
        "refus": {"reason": text},
        "presentiel": {"orientation": text, "urgency": "routine"},
    }[kind]
    body = {"author": author, **fields}
    if in_reply_to is not None:
        body["in_reply_to"] = in_reply_to
    return body
