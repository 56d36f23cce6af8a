"""Preparing a téléexpertise request: from a case file or prompts to a checked, complete bundle.

A GP must be able to prepare a valid request in a minute. Every field is checked as it
is entered (identifiers digit by digit, dates against today, the patient's consent),
photos are cleaned (no EXIF or GPS, orientation applied, size bounded, a thumbnail) and
the pre-filled dossier PDF is generated, so that what leaves is complete and what the
specialist opens is readable by any PDF viewer.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from client import media, pdf
from client.core import file_entry, media_type
from client.home import Home, Profile, atomic_write
from protocol import ids
from protocol.case import CONSENT_METHODS, URGENCIES, check_body
from protocol.errors import PliError

__all__ = ["CaseFormError", "PreparedRequest", "load_case_file", "prepare_request"]

DOSSIER_NAME = "demande-teleexpertise.pdf"


class CaseFormError(PliError):
    """A request that cannot be sent as it stands: the message says which field and why."""

    code = "invalid_case"

    def __init__(self, en: str, *, fr: str, code: str | None = None) -> None:
        super().__init__(en, code=code)
        self.message_fr = fr


@dataclass
class PreparedRequest:
    case_id: bytes
    to_rpps: str
    body: dict[str, Any]
    files: list[Path]
    folder: Path
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (en, fr)


def load_case_file(path: Path) -> dict[str, Any]:
    """Read a case file (YAML) as practice software or a script writes it; see README."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CaseFormError(f"{path}: cannot read the case file ({e.strerror})",
                            fr=f"{path} : lecture du fichier impossible ({e.strerror})") from e
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CaseFormError(f"{path}: not a valid YAML case file: {e}",
                            fr=f"{path} : fichier YAML invalide : {e}") from e
    if not isinstance(data, dict):
        raise CaseFormError(f"{path}: a case file is a YAML mapping (see README)",
                            fr=f"{path} : un fichier de cas est un dictionnaire YAML (voir le README)")
    return data


def _text(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, dt.date):
        return v.isoformat()
    return str(v).strip()


def _number(v: object, width: int) -> str:
    """An identifier YAML may have read as a number: ADELI numbers lose their leading zero."""
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v).zfill(width)
    return _text(v)


def _section(data: dict[str, Any], key: str) -> dict[str, Any]:
    v = data.get(key) or {}
    if not isinstance(v, dict):
        raise CaseFormError(f"'{key}' must be a section with fields (see README)",
                            fr=f"« {key} » doit être une section avec des champs (voir le README)")
    return v


def _yes(v: object) -> bool:
    return v is True or _text(v).lower() in {"yes", "oui", "true", "o", "y", "1"}


def _checked(check: Callable[[], Any]) -> Any:
    try:
        return check()
    except ids.InvalidIdentifier as e:
        raise CaseFormError(str(e), fr=getattr(e, "message_fr", str(e)), code=e.code) from e


def build_body(  # noqa: C901, PLR0912 - one check per field, each with its own message
    data: dict[str, Any], profile: Profile, *, today: dt.date,
) -> tuple[dict[str, Any], str]:
    """The request body (SPEC.md §6.3) from a case file's fields; returns it and the requis's RPPS.

    Raises:
        CaseFormError: a field is missing or invalid; the message names it and says why.
    """
    me = _section(data, "requerant")
    profession = _checked(lambda: ids.check_profession(_text(me.get("profession")) or profile.profession))
    _checked(lambda: ids.check_may_request(profession))
    adeli = _number(me.get("adeli"), 9) or profile.adeli
    author: dict[str, Any] = {"profession": profession.code, "specialty": profile.specialty}
    if adeli:
        author["adeli"] = _checked(lambda: ids.check_adeli(adeli))
        profile.adeli = author["adeli"]  # remembered once given (prepare_request saves the profile)
    elif profession.uses_adeli:
        raise CaseFormError(
            f"your ADELI number is required for {profession.label_en}s: record it once with "
            "`pli whoami --adeli NUMBER` (or add it under requerant: adeli:)",
            fr=f"votre numéro ADELI est obligatoire pour la profession {profession.label_fr} : enregistrez-le une "
               "fois avec `pli whoami --adeli NUMÉRO` (ou ajoutez-le sous requerant: adeli:)",
        )

    requis = _section(data, "requis")
    rpps = _number(requis.get("rpps"), 11)
    if not rpps:
        raise CaseFormError(
            "name the specialist who will answer: requis: rpps: (routing to a pool by specialty comes later)",
            fr="indiquez le spécialiste qui répondra : requis: rpps: (l'envoi à un groupe par spécialité "
               "viendra plus tard)",
        )
    rpps = _checked(lambda: ids.check_rpps(rpps))
    requis_out: dict[str, Any] = {"rpps": rpps}
    for key in ("name", "specialty"):
        if _text(requis.get(key)):
            requis_out[key] = _text(requis.get(key))

    p = _section(data, "patient")
    birth = _checked(lambda: ids.check_date(_text(p.get("birth_date")), today=today, field="birth_date"))
    sex = _checked(lambda: ids.check_sex(_text(p.get("sex"))))
    patient: dict[str, Any] = {
        "family_name": _text(p.get("family_name")).upper(),
        "given_names": _text(p.get("given_names")),
        "birth_date": birth.isoformat(),
        "sex": sex,
    }
    for key, en, fr in (("family_name", "family name", "nom de naissance"), ("given_names", "given names", "prénoms")):
        if not patient[key]:
            raise CaseFormError(f"the patient's {en} is missing (patient: {key}:)",
                                fr=f"le {fr} du patient manque (patient: {key}:)")
    ins = _number(p.get("ins") or p.get("nir"), 15)
    if ins:
        patient["ins"] = _checked(
            lambda: ids.check_nir(ins, sex=None if sex == "U" else sex, birth_date=birth)
        )

    c = _section(data, "consent")
    if not (_yes(c.get("informed")) and _yes(c.get("consented"))):
        raise CaseFormError(
            "no téléexpertise without the patient's consent: record that the patient was informed "
            "(consent: informed: yes) and consented (consent: consented: yes)",
            fr="pas de téléexpertise sans le consentement du patient : indiquez qu'il a été informé "
               "(consent: informed: oui) et qu'il a consenti (consent: consented: oui)",
        )
    consent_date = _checked(lambda: ids.check_date(
        _text(c.get("date")) or today.isoformat(), today=today, field="consent date", not_before=birth))
    method = _text(c.get("method")).lower() or "oral"
    method = {"écrit": "written", "ecrit": "written"}.get(method, method)
    if method not in CONSENT_METHODS:
        raise CaseFormError("consent: method: is oral or written", fr="consent: method: vaut oral ou écrit")
    consent: dict[str, Any] = {
        "informed": True, "consented": True, "date": consent_date.isoformat(), "method": method,
        "recorded_by": _text(c.get("recorded_by")) or profile.name,
    }

    urgency = _text(data.get("urgency")).lower() or "routine"
    urgency = {"normale": "routine", "urgente": "urgent"}.get(urgency, urgency)
    if urgency not in URGENCIES:
        raise CaseFormError("urgency: is routine or urgent", fr="urgency: vaut routine (normale) ou urgent")
    body = {
        "author": author, "requis": requis_out, "patient": patient,
        "motif": _text(data.get("motif")), "question": _text(data.get("question")),
        "context": _text(data.get("context")), "urgency": urgency, "consent": consent,
    }
    for key, en, fr in (("motif", "reason for the request", "motif"), ("question", "question", "question")):
        if not body[key]:
            raise CaseFormError(f"the {en} is missing ({key}:)", fr=f"la {fr} manque ({key}:)")
    return body, rpps


def prepare_request(
    home: Home, profile: Profile, data: dict[str, Any], files: list[Path], *,
    today: dt.date, case_id: bytes, now: int, base: Path | None = None,
) -> PreparedRequest:
    """Check the fields, clean the attachments, render the dossier: a request ready to send.

    ``files`` come from the command line; a case file's ``attachments:`` (and
    ``consent: form:``) are read relative to ``base``, the case file's folder.
    """
    body, rpps = build_body(data, profile, today=today)
    warnings: list[tuple[str, str]] = []
    if not _text(_section(data, "consent").get("date")):
        warnings.append((f"the consent date was not given: today ({today.isoformat()}) is recorded",
                         f"date du consentement non indiquée : aujourd'hui ({today.isoformat()}) est enregistré"))
    if profile.adeli != home.profile().adeli:
        home.save_profile(profile)
    _sweep_outbox(home, now)
    paths = list(files)
    listed = data.get("attachments") or []
    if not isinstance(listed, list):
        raise CaseFormError("attachments: is a list of files", fr="attachments: est une liste de fichiers")
    paths += [(base or Path()) / _text(x) for x in listed]
    form = _text(_section(data, "consent").get("form"))
    form_path = (base or Path()) / form if form else None

    folder = home.root / "outbox" / case_id.hex()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        prepared, cleaning = clean_attachments([*paths, *([form_path] if form_path else [])], folder)
        warnings += cleaning
        out = [p.path for p in prepared]
        thumbs = {p.name: p.thumbnail.name for p in prepared if p.thumbnail is not None}
        out += [p.thumbnail for p in prepared if p.thumbnail is not None]
        if form_path is not None:
            body["consent"]["form"] = prepared[-1].name
        if thumbs:
            body["thumbnails"] = thumbs
        names = [p.name for p in out]
        if DOSSIER_NAME in names or len({n.casefold() for n in names}) != len(names):
            raise CaseFormError(  # noqa: TRY301 - the except below only cleans up
                "two attachments have the same name (or one is named like the dossier): rename one",
                                fr="deux pièces jointes ont le même nom (ou l'une porte le nom du dossier) : "
                                   "renommez-en une")
        dossier = folder / DOSSIER_NAME
        atomic_write(dossier, pdf.render_dossier(dossier_data(
            body, profile, case_id=case_id.hex(), created=now,
            attachments=[{"name": e.name, "type": e.media_type, "size": e.size, "sha256": e.sha256.hex()}
                         for e in map(file_entry, out)],
        )))
        body["dossier"] = DOSSIER_NAME
        out.insert(0, dossier)
        check_body("request", body, sender_rpps=profile.rpps,
                   files={p.name: media_type(p) for p in out})
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return PreparedRequest(case_id=case_id, to_rpps=rpps, body=body, files=out, folder=folder, warnings=warnings)


OUTBOX_KEEP = 86400  # a prepared (or --dry-run) request's files are kept a day, then swept


def _sweep_outbox(home: Home, now: int) -> None:
    """Remove prepared requests that were never sent: patients' data must not linger."""
    outbox = home.root / "outbox"
    if not outbox.is_dir():
        return
    for folder in outbox.iterdir():
        with contextlib.suppress(OSError):
            if now - folder.stat().st_mtime > OUTBOX_KEEP:
                shutil.rmtree(folder)


def clean_attachments(sources: list[Path], folder: Path) -> tuple[list[media.Prepared], list[tuple[str, str]]]:
    """Each attachment cleaned into ``folder`` (photos without metadata, PDFs checked), with
    the quality warnings (en, fr); for requests, complements and answers alike.

    Raises:
        CaseFormError: a file is missing, or not what it claims (the media error's code kept).
    """
    prepared: list[media.Prepared] = []
    warnings: list[tuple[str, str]] = []
    for src in sources:
        if not src.is_file():
            raise CaseFormError(f"{src}: no such file", fr=f"{src} : fichier introuvable")
        try:
            item = media.prepare_attachment(src, folder)
        except media.MediaError as e:
            raise CaseFormError(str(e), fr=e.message_fr, code=e.code) from e
        prepared.append(item)
        warnings += [(f"{src.name}: {en}", f"{src.name} : {fr}")
                     for en, fr in zip(item.warnings, item.warnings_fr, strict=True)]
    return prepared, warnings


def profession_label(code: str) -> str:
    try:
        return ids.check_profession(code).label_fr
    except ids.InvalidIdentifier:
        return code


def dossier_data(
    body: dict[str, Any], profile: Profile, *, case_id: str, created: int, attachments: list[dict[str, Any]],
) -> dict[str, Any]:
    """What the dossier PDF shows: the request body, with labels a reader needs."""
    author = body["author"]
    return {
        "case_id": case_id, "created": created,
        "requerant": {"name": profile.name, "rpps": profile.rpps,
                      "profession_label": profession_label(author["profession"]),
                      "specialty": author.get("specialty", ""),
                      **({"adeli": author["adeli"]} if "adeli" in author else {})},
        "requis": {"name": body["requis"].get("name", ""), "rpps": body["requis"].get("rpps", ""),
                   "specialty": body["requis"].get("specialty", "")},
        "patient": body["patient"], "motif": body["motif"], "question": body["question"],
        "context": body["context"], "urgency": body["urgency"], "consent": body["consent"],
        "attachments": attachments,
    }
