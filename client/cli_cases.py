"""``pli case …``, ``pli cases`` and ``pli billing``: the téléexpertise itself.

A GP prepares and sends a request (from a case file or by answering prompts), follows it
with ``pli cases``, sends a complement when asked, and files the compte rendu; a
specialist sees what waits, reads it and answers in one of the four ways the rules allow.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from client import billing, cases
from client.caseform import build_body, load_case_file, prepare_request
from client.cli import Ctx, cli, pass_ctx, run
from client.ui import clean, emit, lang, tr
from protocol import ids

PARIS = cases.PARIS
FILES = click.Path(exists=True, dir_okay=False, path_type=Path)


def _now() -> int:
    return int(time.time())


def _day(ts: int | None) -> str:
    return dt.datetime.fromtimestamp(ts, PARIS).strftime("%Y-%m-%d %H:%M") if ts else "-"


def _status(code: str) -> str:
    return tr(*cases.STATUS_LABELS[code])


def _kind(kind: str) -> str:
    return tr(*cases.KIND_LABELS.get(kind, (kind, kind)))


def _warn(c: Ctx, warnings: list[tuple[str, str]]) -> None:
    if not c.json:
        for en, fr in warnings:
            click.echo(click.style("! ", fg="yellow") + tr(fr, en), err=True)


def _age(since: int, now: int) -> str:
    """How long ago a case was opened, as people say it: 3 h, 2 j (d)."""
    seconds = max(now - since, 0)
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 86400:
        return f"{seconds // 3600} h"
    return tr(f"{seconds // 86400} j", f"{seconds // 86400} d")


def _due(v: cases.CaseView, now: int) -> str:
    if v.deadline is None:
        return ""
    days = (v.deadline - now) / 86400
    if v.overdue:
        return tr(f"EN RETARD de {-days:.0f} j", f"OVERDUE by {-days:.0f} d")
    return tr(f"échéance {_day(v.deadline)[:10]} ({days:.0f} j)", f"due {_day(v.deadline)[:10]} ({days:.0f} d)")


# -- pli case new ----------------------------------------------------------------------------------


def _ask(label_fr: str, label_en: str, check: Any = None, *, default: str | None = None,
         required: bool = True) -> str:
    """Prompt until the value passes ``check``; the error says which digit or field is wrong."""

    def proc(value: str) -> str:
        value = value.strip()
        if not value:
            if required:
                raise click.BadParameter(tr("ce champ est obligatoire", "this field is required"))
            return ""
        if check is None:
            return value
        try:
            check(value)
        except ids.InvalidIdentifier as e:
            raise click.BadParameter(tr(getattr(e, "message_fr", str(e)), str(e))) from e
        return value

    return str(click.prompt(tr(label_fr, label_en), default=default if default is not None else
                            ("" if not required else None), value_proc=proc, show_default=bool(default)))


def _interactive(to: str | None) -> tuple[dict[str, Any], list[Path]]:
    today = dt.datetime.now(PARIS).date()
    click.echo(tr("Nouvelle demande de téléexpertise (Ctrl-C pour abandonner).",
                  "New téléexpertise request (Ctrl-C to give up)."))
    data: dict[str, Any] = {"requis": {}, "patient": {}, "consent": {}}
    data["requis"]["rpps"] = to or _ask("RPPS du spécialiste requis", "RPPS of the specialist", ids.check_rpps)
    p = data["patient"]
    p["family_name"] = _ask("Nom de naissance du patient", "Patient's family name")
    p["given_names"] = _ask("Prénom(s)", "Given name(s)")
    p["birth_date"] = _ask("Date de naissance (JJ/MM/AAAA)", "Birth date (DD/MM/YYYY)",
                           lambda v: ids.check_date(v, today=today, field="birth_date"))
    p["sex"] = _ask("Sexe (F/M)", "Sex (F/M)", ids.check_sex)
    birth = ids.check_date(p["birth_date"], today=today, field="birth_date")
    sex = ids.check_sex(p["sex"])
    p["ins"] = _ask("INS / NIR avec sa clé (15 caractères, vide si inconnu)", "INS / NIR with its key "
                    "(15 characters, empty if unknown)",
                    lambda v: ids.check_nir(v, sex=None if sex == "U" else sex, birth_date=birth), required=False)
    data["motif"] = _ask("Motif (une ligne)", "Reason (one line)")
    data["question"] = _ask("Question posée au spécialiste", "Question for the specialist")
    data["context"] = _ask("Contexte clinique (antécédents, traitements…)", "Clinical context", required=False)
    data["urgency"] = "urgent" if click.confirm(tr("Urgent ?", "Urgent?"), default=False) else "routine"
    informed = click.confirm(tr("Le patient a-t-il été informé (motif, modalités, droit de refus) ?",
                                "Was the patient informed (why, how, right to refuse)?"), default=None)
    consented = informed and click.confirm(tr("A-t-il consenti ?", "Did they consent?"), default=None)
    data["consent"] = {"informed": informed, "consented": consented, "date": today.isoformat(),
                       "method": "written" if click.confirm(tr("Consentement écrit (sinon oral) ?",
                                                               "Written consent (else oral)?"), default=False)
                       else "oral"}
    listed = _ask("Pièces jointes (chemins séparés par des espaces, vide si aucune)",
                  "Attachments (paths separated by spaces, empty for none)", required=False)
    return data, [Path(x) for x in listed.split()]


@cli.group()
def case() -> None:
    """Prepare, answer and close téléexpertise cases (see `pli case COMMAND --help`)."""


@case.command(name="new")
@click.option("--from", "from_file", type=FILES, help="A case file (YAML): see the README for its fields.")
@click.option("--to", "to", help="RPPS of the specialist (overrides the case file's requis: rpps:).")
@click.option("--dry-run", is_flag=True, help="Check everything and write the dossier PDF, but do not send.")
@click.option("--yes", is_flag=True, help="Send without asking for confirmation.")
@click.option("--interactive", is_flag=True,
              help="Ask for each field even when not on a terminal (e.g. from a wrapper script).")
@click.argument("files", nargs=-1, type=FILES)
@pass_ctx
def case_new(c: Ctx, from_file: Path | None, to: str | None, dry_run: bool, yes: bool,
             interactive: bool, files: tuple[Path, ...]) -> None:
    """Prepare a request and send it: checked identifiers, recorded consent, cleaned photos
    (no EXIF or GPS), and the pre-filled dossier PDF, all encrypted for the specialist.

    \b
    From a case file (practice software, scripts):
      pli case new --from cas.yaml photo.jpg ecg.pdf
    Interactively (prompts for each field, checked as you type):
      pli case new photo.jpg
    """
    profile = c.home.profile()
    if not profile.relay:
        raise click.UsageError(tr("cet appareil n'est pas inscrit : pli enroll URL CODE",
                                  "this device is not enrolled: pli enroll URL CODE"))
    if from_file is not None:
        data = load_case_file(from_file)
        more: list[Path] = []
        base = from_file.parent
    elif (interactive or sys.stdin.isatty()) and not c.json:
        data, more = _interactive(to)
        if not profile.adeli and ids.check_profession(profile.profession or "10").uses_adeli:
            data["requerant"] = {"adeli": _ask("Votre numéro ADELI", "Your ADELI number", ids.check_adeli)}
        base = Path()
    else:
        raise click.UsageError(tr("sans terminal, donnez un fichier de cas : --from cas.yaml",
                                  "without a terminal, give a case file: --from case.yaml"))
    if to:
        data.setdefault("requis", {})
        if not isinstance(data["requis"], dict):
            data["requis"] = {}
        data["requis"]["rpps"] = to
    now = _now()
    today = dt.datetime.fromtimestamp(now, PARIS).date()
    body, rpps = build_body(data, profile, today=today)  # fail fast, before any file work
    limit = cases.limit_warning(c.home, body["patient"], rpps, now=now, requis_name=body["requis"].get("name"))
    prepared = prepare_request(c.home, profile, data, [*files, *more], today=today, case_id=os.urandom(16),
                               now=now, base=base)
    warnings = prepared.warnings + ([(limit.en, limit.fr)] if limit else [])
    _warn(c, warnings)
    summary = {
        "case": prepared.case_id.hex(), "to": rpps, "dossier": str(prepared.folder / prepared.body["dossier"]),
        "files": [p.name for p in prepared.files], "warnings": [en for en, _ in warnings],
    }
    if dry_run:
        emit(c.json, {**summary, "sent": False},
             tr(f"Demande prête (non envoyée). Dossier : {summary['dossier']}",
                f"Request ready (not sent). Dossier: {summary['dossier']}"))
        return
    if not yes and not c.json and sys.stdin.isatty() and not click.confirm(
            tr(f"Envoyer la demande au RPPS {rpps} ({len(prepared.files)} fichiers) ?",
               f"Send the request to RPPS {rpps} ({len(prepared.files)} files)?"), default=True):
        raise SystemExit(1)
    keys = c.keys()
    sent = run(cases.send_request(c.home, keys, prepared, progress=c.progress(tr("Envoi", "Upload"))))
    names = ", ".join(f"{p['name']} (RPPS {p['rpps']})" for p in sent.to)
    due = (sent.received_at or now) + cases.DEADLINE
    emit(c.json, {**summary, "sent": True, "envelope": sent.envelope_id, "size": sent.size,
                  "received_at": sent.received_at, "deadline": due, "first_contacts": sent.first_contacts},
         tr(f"Demande envoyée à {names}.\n  dossier {sent.case_id[:12]}, reçue par le relais le "
            f"{_day(sent.received_at)} ; réponse attendue avant le {_day(due)[:10]}.\n  Suivi : pli cases",
            f"Request sent to {names}.\n  case {sent.case_id[:12]}, received by the relay at "
            f"{_day(sent.received_at)}; answer due by {_day(due)[:10]}.\n  Follow it: pli cases")
         + "".join(tr(f"\n  Premier échange avec RPPS {r} : comparez son empreinte de vive voix "
                      f"(pli trust --show {r}).",
                      f"\n  First exchange with RPPS {r}: compare their fingerprint aloud (pli trust --show {r}).")
                   for r in sent.first_contacts))


# -- pli cases / pli case show ----------------------------------------------------------------------


@cli.command(name="cases")
@click.option("--offline", is_flag=True, help="Do not contact the relay; show what this computer knows.")
@click.option("--open", "only_open", is_flag=True, help="Hide closed cases.")
@pass_ctx
def cases_(c: Ctx, offline: bool, only_open: bool) -> None:
    """Your cases and where each stands: sent, delivered, read, complement asked, answered,
    refused, closed; with the 7-day deadline (overdue ones first).

    New envelopes waiting on the relay are fetched, verified and filed first.
    """
    refused: list[tuple[str, Any]] = []
    new = 0
    if not offline:
        keys = c.keys()
        result = run(cases.sync(c.home, keys, progress=c.progress))
        new, refused = len(result.new), result.refused
    now = _now()
    views = cases.list_cases(c.home, now=now, include_closed=not only_open)
    if c.json:
        emit(True, {"new": new, "refused": [{"envelope": e, "error": err.code, "message": str(err)}
                                            for e, err in refused],
                    "cases": [v.to_json() for v in views]}, "")
        return
    lines = []
    if new:
        lines.append(tr(f"{new} nouveau(x) pli(s) reçu(s) et vérifié(s).",
                        f"{new} new envelope(s) received and verified."))
    for eid, err in refused:
        lines.append(click.style(tr(f"! Pli {eid[:12]} refusé : {err}", f"! Envelope {eid[:12]} refused: {err}"),
                                 fg="red"))
    if not views:
        lines.append(tr("Aucun dossier.", "No cases."))
    for v in views:
        who = tr("de", "from") if v.role == "requis" else tr("à", "to")
        mark = "!" if v.overdue else ("*" if v.unread else " ")
        line = (f"{mark} {v.case_id[:12]}  {_status(v.status):<22} {clean(v.patient_label)[:32]:<32}  "
                f"{who} {clean(v.counterpart.get('name', ''))[:24]:<24}  {clean(v.motif)[:30]:<30}  "
                f"{_age(v.opened_at, now):>6}  {_due(v, now)}")
        if v.urgency == "urgent":
            line += tr("  URGENT", "  URGENT")
        lines.append(click.style(line, fg="red") if v.overdue and sys.stdout.isatty() else line)
    if views:
        lines.append(tr("(* non lu, ! en retard)  Détail : pli case show ID",
                        "(* unread, ! overdue)  Details: pli case show ID"))
    emit(False, {}, "\n".join(lines))


def _body_lines(kind: str, body: dict[str, Any]) -> list[str]:
    fields = {
        "request": [("motif", "Motif", "Reason"), ("question", "Question", "Question"),
                    ("context", "Contexte", "Context")],
        "complement_request": [("missing", "Demandé", "Asked for")],
        "complement": [("text", "Complément", "Complement")],
        "avis": [("avis", "Avis", "Opinion"), ("recommendations", "Recommandations", "Recommendations"),
                 ("follow_up", "Suivi", "Follow-up")],
        "refus": [("reason", "Motif du refus", "Reason for refusal")],
        "presentiel": [("orientation", "Orientation", "Orientation")],
    }.get(kind, [("text", "Texte", "Text")])
    out = [f"    {tr(fr, en)} : {clean(body.get(k, '')).replace(chr(10), chr(10) + '      ')}"
           for k, fr, en in fields if body.get(k)]
    for i, p in enumerate(body.get("prescriptions") or [], start=1):
        out.append(f"    {tr('Prescription', 'Prescription')} {i} : {clean(p)}")
    if kind == "presentiel" and body.get("urgency") == "urgent":
        out.append("    " + tr("Consultation URGENTE", "URGENT consultation"))
    return out


@case.command(name="show")
@click.argument("case_id")
@pass_ctx
def case_show(c: Ctx, case_id: str) -> None:
    """A case in full: patient, question, each exchange and its proof, files on disk.

    The first time you see an envelope, this device signs in the relay's log that you
    read it (the requérant sees it as "read").
    """
    cid = cases.find_case(c.home, case_id)
    keys = c.keys()
    now = _now()
    v, signed = run(cases.show(c.home, keys, cid, now=now))
    if c.json:
        emit(True, {**v.to_json(full=True), "read_signed": signed}, "")
        return
    p = v.patient
    role = "requérant" if v.role == "requerant" else "requis"
    urgency = tr("urgente", "urgent") if v.urgency == "urgent" else tr("normale", "routine")
    lines = [
        f"{tr('Dossier', 'Case')} {v.case_id}  —  {_status(v.status)}  {_due(v, now)}",
        (f"  {tr('Patient', 'Patient')} : {clean(v.patient_label)}  {tr('sexe', 'sex')} {clean(p.get('sex', '-'))}"
         f"  INS {clean(p.get('ins', tr('non renseigné', 'not given')))}"),
        (f"  {tr('Rôle', 'Role')} : {role}, {tr('avec', 'with')} {clean(v.counterpart.get('name', ''))} "
         f"(RPPS {v.counterpart.get('rpps', '')})"),
        f"  {tr('Urgence', 'Urgency')} : {urgency}",
    ]
    for e in v.envelopes:
        author = tr("vous", "you") if e["direction"] == "sent" else clean(e["peer_name"])
        proofs = ", ".join(sorted(e["receipts"])) or tr("aucun reçu", "no receipt")
        lines.append(f"- {_day(e['relay_received_at'] or e['created'])}  {_kind(e['kind'])}  ({author})  "
                     f"[{tr('preuves', 'proofs')} : {proofs}]")
        lines += _body_lines(e["kind"], e["body"])
        if e.get("folder"):
            lines.append(f"    {tr('Fichiers', 'Files')} : {e['folder']}")
    for a in v.anomalies:
        lines.append(click.style(f"! {clean(a)}", fg="yellow"))
    if not signed:
        lines.append(tr("! Relais injoignable : la lecture sera signée à la prochaine connexion.",
                        "! Relay unreachable: the reading will be signed at the next connection."))
    nxt = {
        "to_answer": tr("Répondre : pli case answer ID --avis … | --complement … | --refus … | --presentiel …",
                        "Answer: pli case answer ID --avis … | --complement … | --refus … | --presentiel …"),
        "complement_asked": tr("Compléter : pli case complement ID --text … [fichiers]",
                               "Complete it: pli case complement ID --text … [files]") if v.role == "requerant" else "",
    }.get(v.status, "")
    if v.role == "requerant" and v.status in ("answered", "refused", "oriented"):
        nxt = tr("Compte rendu : pli case report ID", "Compte rendu: pli case report ID")
    if nxt:
        lines.append(nxt.replace("ID", v.case_id[:12]))
    emit(False, {}, "\n".join(lines))


# -- answering ------------------------------------------------------------------------------------------


@case.command(name="answer")
@click.argument("case_id")
@click.option("--avis", help="Your opinion: diagnosis, what to do.")
@click.option("--complement", "complement_", help="Ask the requérant for more: what is missing.")
@click.option("--refus", help="Decline the case, with the reason (it goes into the patient's record).")
@click.option("--presentiel", help="Orient the patient to an in-person consultation: where, when.")
@click.option("--recommendations", default="", help="With --avis: recommendations.")
@click.option("--prescription", "prescriptions", multiple=True, help="With --avis: one prescription (repeatable).")
@click.option("--follow-up", default="", help="With --avis: follow-up to plan.")
@click.option("--urgent", is_flag=True, help="With --presentiel: the consultation is urgent.")
@click.argument("files", nargs=-1, type=FILES)
@pass_ctx
def case_answer(c: Ctx, case_id: str, avis: str | None, complement_: str | None, refus: str | None,
                presentiel: str | None, recommendations: str, prescriptions: tuple[str, ...], follow_up: str,
                urgent: bool, files: tuple[Path, ...]) -> None:
    """Answer a case you received, in exactly one of the four ways: --avis, --complement
    (demande de complément), --refus (reason mandatory) or --presentiel (orientation).

    \b
      pli case answer 3f2a --avis "Mélanome probable." --prescription "Exérèse sous 15 jours"
      pli case answer 3f2a --complement "Merci d'envoyer une photo dermoscopique."
      pli case answer 3f2a --refus "Photo floue, lésion non analysable."
      pli case answer 3f2a --presentiel "Je la reçois lundi 9 h." --urgent
    """
    chosen = [(k, v) for k, v in (("avis", avis), ("complement_request", complement_), ("refus", refus),
                                  ("presentiel", presentiel)) if v is not None]
    if len(chosen) != 1:
        raise click.UsageError(tr("choisissez une seule réponse : --avis, --complement, --refus ou --presentiel",
                                  "choose exactly one answer: --avis, --complement, --refus or --presentiel"))
    kind, text = chosen[0]
    if kind != "avis" and (recommendations or prescriptions or follow_up):
        raise click.UsageError(tr("--recommendations, --prescription et --follow-up vont avec --avis",
                                  "--recommendations, --prescription and --follow-up go with --avis"))
    if urgent and kind != "presentiel":
        raise click.UsageError(tr("--urgent va avec --presentiel", "--urgent goes with --presentiel"))
    options: dict[str, dict[str, Any]] = {
        "avis": {"avis": text, "recommendations": recommendations, "prescriptions": list(prescriptions),
                 "follow_up": follow_up},
        "complement_request": {"missing": text},
        "refus": {"reason": text},
        "presentiel": {"orientation": text, "urgency": "urgent" if urgent else "routine"},
    }
    fields = options[kind]
    cid = cases.find_case(c.home, case_id)
    keys = c.keys()
    sent, warnings = run(cases.answer(c.home, keys, cid, kind, fields, list(files), now=_now(),
                                      progress=c.progress(tr("Envoi", "Upload"))))
    _warn(c, warnings)
    emit(c.json, {**asdict(sent), "kind": kind},
         tr(f"{_kind(kind).capitalize()} envoyé(e) à {sent.to[0]['name']} (pli {sent.envelope_id[:12]}, "
            f"reçu par le relais le {_day(sent.received_at)}).",
            f"{_kind(kind).capitalize()} sent to {sent.to[0]['name']} (envelope {sent.envelope_id[:12]}, "
            f"received by the relay at {_day(sent.received_at)})."))


@case.command(name="complement")
@click.argument("case_id")
@click.option("--text", default="", help="What you add (answers to the specialist's questions).")
@click.option("--text-file", type=FILES, help="Read the text from a file (UTF-8).")
@click.argument("files", nargs=-1, type=FILES)
@pass_ctx
def case_complement(c: Ctx, case_id: str, text: str, text_file: Path | None, files: tuple[Path, ...]) -> None:
    """Send the complement the specialist asked for (text and/or new photos), into the same case."""
    if text_file is not None:
        text = text_file.read_text(encoding="utf-8")
    cid = cases.find_case(c.home, case_id)
    keys = c.keys()
    sent, warnings = run(cases.complement(c.home, keys, cid, text, list(files), now=_now(),
                                          progress=c.progress(tr("Envoi", "Upload"))))
    _warn(c, warnings)
    emit(c.json, asdict(sent),
         tr(f"Complément envoyé (pli {sent.envelope_id[:12]}) ; nouvelle échéance de réponse : "
            f"{_day((sent.received_at or _now()) + cases.DEADLINE)[:10]}.",
            f"Complement sent (envelope {sent.envelope_id[:12]}); new answer deadline: "
            f"{_day((sent.received_at or _now()) + cases.DEADLINE)[:10]}."))


# -- closing and billing -------------------------------------------------------------------------------


@case.command(name="report")
@click.argument("case_id")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the PDF (default: in the case's folder).")
@pass_ctx
def case_report(c: Ctx, case_id: str, output: Path | None) -> None:
    """Write the compte rendu (PDF) for the patient's record and close the case: times from
    the relay's signed receipts, identities with RPPS, question, answer, prescriptions,
    and any technical incident."""
    cid = cases.find_case(c.home, case_id)
    path = cases.report(c.home, cid, now=_now(), out=output)
    emit(c.json, {"case": cid, "report": str(path)},
         tr(f"Compte rendu : {path}\nÀ classer dans le dossier du patient et à adresser au médecin traitant.",
            f"Compte rendu: {path}\nFile it in the patient's record and send it to their médecin traitant."))


@cli.command(name="billing")
@click.option("--month", required=True, help="The month, YYYY-MM.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV for a spreadsheet (semicolons, decimal commas).")
@click.option("--zone", type=click.Choice(["metropole", "dom"]), default="metropole", show_default=True,
              help="Tariff zone: metropolitan France or overseas departments.")
@pass_ctx
def billing_(c: Ctx, month: str, as_csv: bool, zone: str) -> None:
    """Your téléexpertise acts of a month: RQD lines as requérant, TE2 as requis, at the
    tariff in force on each act's date, with the limit of 4 acts a year per patient and
    requis checked (acts beyond it are listed, not billable)."""
    try:
        year, mon = (int(x) for x in month.split("-"))
        dt.date(year, mon, 1)
    except ValueError as e:
        raise click.BadParameter(tr("le mois s'écrit AAAA-MM, par exemple 2026-11",
                                    "write the month as YYYY-MM, e.g. 2026-11"), param_hint="--month") from e
    lines = billing.billing_lines(cases.acts(c.home, now=_now(), zone=zone), month=(year, mon))
    if as_csv:
        sys.stdout.write("\ufeff")  # a BOM: French Excel reads the accents right
        billing.write_csv(lines, sys.stdout)
        return
    emit(c.json, {"month": month, "zone": zone, "total_cents": billing.total_cents(lines),
                  "lines": [{**asdict(x), "date": x.date.isoformat()} for x in lines]},
         billing.format_table(lines, lang=lang()))
