"""A practitioner's téléexpertise cases: send, file what arrives, see where each stands,
answer, close with a compte rendu, and bill.

A case's state is never stored: it is replayed from the envelopes of the case in the
local store through ``protocol.case.advance`` (the transition table), so it cannot drift
from what was actually exchanged. What the relay proved (submission, delivery, reading)
comes from the signed receipts kept beside them; times shown in a compte rendu are the
relay's signed log times, not this computer's clock.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from client import billing, core, logstate, media, pdf
from client.api import Progress, RelayClient
from client.caseform import PreparedRequest, profession_label
from client.home import Home, Profile, atomic_write
from protocol import ids
from protocol.case import ANSWER_KINDS, FINAL_STATES, CaseState, CaseStateError, advance
from protocol.errors import PliError
from protocol.keys import DeviceKeys
from protocol.logentry import EntryType, LogEntry

__all__ = [
    "DEADLINE",
    "CaseView",
    "SyncResult",
    "acts",
    "answer",
    "case_view",
    "complement",
    "find_case",
    "limit_warning",
    "list_cases",
    "report",
    "send_request",
    "show",
    "sync",
]

DEADLINE = 7 * 86400  # the requis has 7 days to answer (DOMAIN.md, Rules)
PARIS = ZoneInfo("Europe/Paris")

# status code -> (French, English), as `pli cases` shows it
STATUS_LABELS: dict[str, tuple[str, str]] = {
    "sent": ("envoyée", "sent"),
    "delivered": ("remise", "delivered"),
    "read": ("lue", "read"),
    "to_answer": ("à traiter", "to answer"),
    "complement_asked": ("complément demandé", "complement asked"),
    "answered": ("avis rendu", "answered"),
    "refused": ("refusée", "refused"),
    "oriented": ("consultation proposée", "in-person consultation"),
    "closed": ("clôturée", "closed"),
    "unknown": ("incomplète", "incomplete"),
}
_FINAL_STATUS = {CaseState.ANSWERED: "answered", CaseState.REFUSED: "refused", CaseState.ORIENTED: "oriented"}
KIND_LABELS: dict[str, tuple[str, str]] = {
    "request": ("demande", "request"),
    "complement_request": ("demande de complément", "request for more information"),
    "complement": ("complément", "complement"),
    "avis": ("avis", "opinion (avis)"),
    "refus": ("refus", "refusal"),
    "presentiel": ("orientation en consultation", "in-person consultation"),
}


class CaseError(PliError):
    code = "case"

    def __init__(self, en: str, *, fr: str) -> None:
        super().__init__(en)
        self.message_fr = fr


@dataclass
class CaseView:
    case_id: str
    role: str  # "requerant" or "requis": this practitioner's role in the case
    state: CaseState | None
    status: str
    patient: dict[str, Any]
    counterpart: dict[str, str]
    motif: str
    urgency: str
    opened_at: int
    last_at: int
    deadline: int | None
    overdue: bool
    unread: list[str]
    closed_at: int | None
    envelopes: list[dict[str, Any]] = field(default_factory=list)
    anomalies: list[str] = field(default_factory=list)

    @property
    def patient_label(self) -> str:
        p = self.patient
        if not p:
            return ""
        return f"{p.get('family_name', '')} {p.get('given_names', '')} ({p.get('birth_date', '')})".strip()

    def to_json(self, *, full: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "case": self.case_id, "role": self.role, "status": self.status,
            "state": self.state.value if self.state else None, "patient": self.patient_label,
            "counterpart": self.counterpart, "motif": self.motif, "urgency": self.urgency,
            "opened_at": self.opened_at, "last_at": self.last_at, "deadline": self.deadline,
            "overdue": self.overdue, "unread": len(self.unread), "closed_at": self.closed_at,
        }
        if full:
            out["envelopes"] = [
                {k: e[k] for k in ("id", "direction", "kind", "peer_name", "peer_rpps", "created",
                                   "relay_received_at", "read_at", "folder", "body")}
                | {"receipts": sorted(e["receipts"])}
                for e in self.envelopes
            ]
            out["anomalies"] = self.anomalies
        return out


def _at(row: dict[str, Any]) -> int:
    return int(row["relay_received_at"] or row["created"])


def _rows(home: Home, case_id: str) -> list[dict[str, Any]]:
    rows = home.history(case_id)
    for r in rows:
        r["body"] = json.loads(r["body"]) if r.get("body") else {}
        r["receipts"] = {x["type"] for x in logstate.receipts_of(home, r["id"])}
    return _causal_order(rows)


def _causal_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The case's envelopes in the order they answer each other (``in_reply_to``); times
    only break ties, since several envelopes often share a second."""

    def when(r: dict[str, Any]) -> tuple[int, int, str]:
        return (_at(r), r["created"], r["id"])

    children: dict[str | None, list[dict[str, Any]]] = {}
    ids_ = {r["id"] for r in rows}
    for r in rows:
        parent = r.get("in_reply_to") if r.get("in_reply_to") in ids_ else None
        children.setdefault(parent, []).append(r)
    out: list[dict[str, Any]] = []
    stack = sorted(children.get(None, []), key=when, reverse=True)
    while stack:
        r = stack.pop()
        out.append(r)
        stack += sorted(children.get(r["id"], []), key=when, reverse=True)
    return out


def case_view(home: Home, case_id: str, *, now: int) -> CaseView:
    """Where a case stands, replayed from its envelopes (see the module docstring)."""
    rows = _rows(home, case_id)
    state: CaseState | None = None
    anomalies: list[str] = []
    for r in rows:
        try:
            state = advance(state, r["kind"])
        except CaseStateError as e:
            anomalies.append(f"{r['id'][:12]}: {e}")
    request = next((r for r in rows if r["kind"] == "request"), None)
    role = "requerant" if request is None or request["direction"] == "sent" else "requis"
    body = request["body"] if request else {}
    counterpart_row = next((r for r in rows if r["direction"] == "received"), None)
    if role == "requerant":
        requis = body.get("requis", {})
        counterpart = {"name": requis.get("name") or (counterpart_row or {}).get("peer_name", ""),
                       "rpps": requis.get("rpps", "")}
    else:
        counterpart = {"name": request["peer_name"] if request else "", "rpps": request["peer_rpps"] if request else ""}
    meta = home.case_meta(case_id)
    unread = [r["id"] for r in rows if r["direction"] == "received" and not r.get("read_at")]
    deadline = None
    if state == CaseState.AWAITING_ANSWER:
        last_ask = [r for r in rows if r["kind"] in ("request", "complement")]
        deadline = _at(last_ask[-1]) + DEADLINE if last_ask else None
    if request is None:
        status = "unknown"
    elif meta["closed_at"]:
        status = "closed"
    elif state in FINAL_STATES:
        status = _FINAL_STATUS[state]
    elif state == CaseState.COMPLEMENT_ASKED:
        status = "complement_asked"
    elif role == "requis":
        status = "to_answer"
    else:
        last = [r for r in rows if r["direction"] == "sent"][-1]
        status = "read" if "read" in last["receipts"] else "delivered" if "delivered" in last["receipts"] else "sent"
    return CaseView(
        case_id=case_id, role=role, state=state, status=status, patient=body.get("patient", {}),
        counterpart=counterpart, motif=body.get("motif", ""), urgency=body.get("urgency", "routine"),
        opened_at=_at(rows[0]) if rows else 0, last_at=_at(rows[-1]) if rows else 0,
        deadline=deadline, overdue=deadline is not None and now > deadline, unread=unread,
        closed_at=meta["closed_at"], envelopes=rows, anomalies=anomalies,
    )


def list_cases(home: Home, *, now: int, include_closed: bool = True) -> list[CaseView]:
    """Every case, overdue ones first, then urgent, then the most recent activity."""
    with home.store() as db:
        case_ids = [r[0] for r in db.execute("SELECT DISTINCT case_id FROM envelopes")]
    views = [case_view(home, c, now=now) for c in case_ids]
    if not include_closed:
        views = [v for v in views if v.status != "closed"]
    return sorted(views, key=lambda v: (not v.overdue, v.urgency != "urgent", -v.last_at))


def find_case(home: Home, prefix: str) -> str:
    """A case by its id or the first characters of it (people type the first few)."""
    p = prefix.strip().lower()
    with home.store() as db:
        ids_ = [r[0] for r in db.execute("SELECT DISTINCT case_id FROM envelopes WHERE case_id LIKE ?", (p + "%",))]
    if len(ids_) == 1 and p:
        return str(ids_[0])
    if not ids_ or not p:
        raise CaseError(f"no case {prefix!r} on this computer (see `pli cases`)",
                        fr=f"aucun dossier {prefix!r} sur cet ordinateur (voir `pli cases`)")
    raise CaseError(f"{prefix!r} matches {len(ids_)} cases: type more characters",
                    fr=f"{prefix!r} correspond à {len(ids_)} dossiers : tapez plus de caractères")


# -- sending a request ---------------------------------------------------------------------------


async def send_request(
    home: Home, keys: DeviceKeys, prepared: PreparedRequest, *,
    progress: Progress | None = None, relay: RelayClient | None = None,
) -> core.SentEnvelope:
    """Send a prepared request; the prepared files become the case's own copy."""
    sent = await core.send(
        home, keys, to=[prepared.to_rpps], kind="request", body=prepared.body, files=prepared.files,
        case_id=prepared.case_id, progress=progress, relay=relay,
    )
    _keep_sent_files(home, sent, prepared.folder)
    return sent


def _keep_sent_files(home: Home, sent: core.SentEnvelope, folder: Path) -> None:
    dest = home.cases / sent.case_id / sent.envelope_id
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(dest, ignore_errors=True)
    folder.replace(dest)
    with home.store() as db:
        db.execute("UPDATE envelopes SET folder = ? WHERE id = ?", (str(dest), sent.envelope_id))


# -- receiving -------------------------------------------------------------------------------


@dataclass
class SyncResult:
    new: list[core.OpenedEnvelope] = field(default_factory=list)
    refused: list[tuple[str, PliError]] = field(default_factory=list)
    receipts: int = 0


_STOP = {"relay_unreachable", "log_alarm"}  # these concern every envelope: stop, don't skip


async def sync(
    home: Home, keys: DeviceKeys, *, relay: RelayClient | None = None,
    progress: Any = None,
) -> SyncResult:
    """File every waiting envelope (verified, decrypted, delivery acknowledged) and fetch
    the relay's receipts for what this practitioner sent in open cases.

    Filing does not sign "read": that statement is made when the case is shown.
    """
    result = SyncResult()
    profile = core._session(home)  # noqa: SLF001
    async with core._relay(home, profile, keys, relay) as r:  # noqa: SLF001
        for entry in await r.inbox():
            try:
                opened = await core.open_envelope(
                    home, keys, entry["id"], relay=r, mark_read=False,
                    progress=progress(f"{entry['id'][:12]}") if progress else None,
                )
            except PliError as e:
                if e.code in _STOP:
                    raise
                result.refused.append((entry["id"], e))
                continue
            result.new.append(opened)
            view = case_view(home, opened.case_id, now=core._now())  # noqa: SLF001
            if any(a.startswith(opened.envelope_id[:12]) for a in view.anomalies):
                home.incident(
                    opened.case_id, core._now(),  # noqa: SLF001
                    f"envelope {opened.envelope_id[:12]} ({opened.kind}) does not fit the case's state; "
                    "kept as received",
                    f"le pli {opened.envelope_id[:12]} ({opened.kind}) ne correspond pas à l'état du dossier ; "
                    "conservé tel que reçu",
                )
        pending = [
            bytes.fromhex(e["id"])
            for v in list_cases(home, now=core._now(), include_closed=False)  # noqa: SLF001
            for e in v.envelopes if e["direction"] == "sent" and "read" not in e["receipts"]
        ]
        result.receipts = await core.refresh_receipts(home, r, pending)
    return result


async def show(home: Home, keys: DeviceKeys, case_id: str, *, now: int,
               relay: RelayClient | None = None) -> tuple[CaseView, bool]:
    """The case, and the signed read statements for what this practitioner sees for the first
    time. Returns the view and whether those statements could be sent (not when offline)."""
    view = case_view(home, case_id, now=now)
    if not view.unread:
        return view, True
    try:
        await core.mark_read(home, keys, view.unread, relay=relay)
    except PliError as e:
        if e.code != "relay_unreachable":
            raise
        return view, False
    return case_view(home, case_id, now=now), True


# -- answering -------------------------------------------------------------------------------


def _author(profile: Profile, *, answering: bool) -> dict[str, Any]:
    try:
        profession = ids.check_profession(profile.profession)
        (ids.check_may_answer if answering else ids.check_may_request)(profession)
    except ids.InvalidIdentifier as e:
        raise CaseError(str(e), fr=getattr(e, "message_fr", str(e))) from e
    author: dict[str, Any] = {"profession": profession.code, "specialty": profile.specialty}
    if profile.adeli:
        author["adeli"] = profile.adeli
    return author


def _prepare_files(home: Home, case_id: str, files: list[Path]) -> tuple[list[Path], Path, list[tuple[str, str]]]:
    """Attachments of an answer or complement get the same cleaning as a request's."""
    folder = home.root / "outbox" / f"{case_id}-{core._now()}"  # noqa: SLF001
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    out: list[Path] = []
    warnings: list[tuple[str, str]] = []
    try:
        for src in files:
            if not src.is_file():
                raise CaseError(f"{src}: no such file", fr=f"{src} : fichier introuvable")  # noqa: TRY301
            try:
                item = media.prepare_attachment(src, folder)
            except media.MediaError as e:
                raise CaseError(str(e), fr=e.message_fr) from e
            out.append(item.path)
            warnings += [(f"{src.name}: {en}", f"{src.name} : {fr}")
                         for en, fr in zip(item.warnings, item.warnings_fr, strict=True)]
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return out, folder, warnings


async def _respond(
    home: Home, keys: DeviceKeys, case_id: str, kind: str, fields: dict[str, Any], files: list[Path], *,
    role: str, progress: Progress | None, relay: RelayClient | None, now: int,
) -> tuple[core.SentEnvelope, list[tuple[str, str]]]:
    view = case_view(home, case_id, now=now)
    if view.role != role:
        if role == "requis":
            raise CaseError("only the specialist who received the request answers it; as requérant, "
                            "send a complement with `pli case complement`",
                            fr="seul le spécialiste qui a reçu la demande y répond ; en tant que requérant, "
                               "envoyez un complément avec `pli case complement`")
        raise CaseError("only the requérant sends a complement to their own request",
                        fr="seul le requérant complète sa propre demande")
    try:
        advance(view.state, kind)
    except CaseStateError as e:
        state = STATUS_LABELS[view.status]
        raise CaseError(f"this case is '{state[1]}': a {KIND_LABELS[kind][1]} cannot be sent now",
                        fr=f"ce dossier est « {state[0]} » : impossible d'envoyer un(e) {KIND_LABELS[kind][0]} "
                           "maintenant") from e
    wanted = ("request", "complement") if role == "requis" else ("complement_request",)
    target = [e for e in view.envelopes if e["direction"] == "received" and e["kind"] in wanted][-1]
    profile = core._session(home)  # noqa: SLF001
    body = {"author": _author(profile, answering=role == "requis"), **fields}
    paths, folder, warnings = _prepare_files(home, case_id, files)
    try:
        async with core._relay(home, profile, keys, relay) as r:  # noqa: SLF001
            await core.mark_read(home, keys, view.unread, relay=r)  # answering is reading
            sent = await core.reply(home, keys, target["id"], kind=kind, body=body, files=paths,
                                    progress=progress, relay=r)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    _keep_sent_files(home, sent, folder)
    return sent, warnings


async def answer(
    home: Home, keys: DeviceKeys, case_id: str, kind: str, fields: dict[str, Any], files: list[Path], *,
    now: int, progress: Progress | None = None, relay: RelayClient | None = None,
) -> tuple[core.SentEnvelope, list[tuple[str, str]]]:
    """The requis answers: an avis, a demande de complément, a refus or an orientation."""
    if kind not in ANSWER_KINDS:
        raise CaseError(f"unknown answer kind {kind!r}", fr=f"type de réponse inconnu {kind!r}")
    return await _respond(home, keys, case_id, kind, fields, files, role="requis",
                          progress=progress, relay=relay, now=now)


async def complement(
    home: Home, keys: DeviceKeys, case_id: str, text: str, files: list[Path], *,
    now: int, progress: Progress | None = None, relay: RelayClient | None = None,
) -> tuple[core.SentEnvelope, list[tuple[str, str]]]:
    """The requérant answers a demande de complément, into the same case."""
    if not text.strip() and not files:
        raise CaseError("a complement needs a text or files", fr="un complément contient un texte ou des fichiers")
    return await _respond(home, keys, case_id, "complement", {"text": text}, files, role="requerant",
                          progress=progress, relay=relay, now=now)


# -- closing: the compte rendu -----------------------------------------------------------------


def _logged_time(home: Home, envelope_id: str) -> int | None:
    """The relay's signed log time of an envelope's submission, from its kept receipt."""
    for x in logstate.receipts_of(home, envelope_id):
        entry = LogEntry.from_bytes(x["leaf"])
        if entry.type == EntryType.SUBMITTED:
            return entry.time
    return None


def _summary(kind: str, body: dict[str, Any]) -> str:
    key = {"request": "question", "complement_request": "missing", "complement": "text", "avis": "avis",
           "refus": "reason", "presentiel": "orientation"}[kind]
    text = str(body.get(key, ""))
    return text if len(text) <= 300 else text[:297] + "…"


def report(home: Home, case_id: str, *, now: int, out: Path | None = None) -> Path:
    """Write the compte rendu of a case the requis has answered, and mark the case closed.

    Raises:
        CaseError: not the requérant's case, or no final answer yet.
    """
    view = case_view(home, case_id, now=now)
    if view.role != "requerant":
        raise CaseError("the compte rendu is produced by the requérant, for the patient's record",
                        fr="le compte rendu est établi par le requérant, pour le dossier du patient")
    if view.state not in FINAL_STATES:
        raise CaseError("no final answer yet (avis, refusal or orientation): nothing to report",
                        fr="pas encore de réponse finale (avis, refus ou orientation) : rien à consigner")
    profile = core._session(home)  # noqa: SLF001
    request = next(e for e in view.envelopes if e["kind"] == "request")
    final = next(e for e in reversed(view.envelopes) if e["kind"] in ("avis", "refus", "presentiel"))
    request_at, answer_at = _logged_time(home, request["id"]), _logged_time(home, final["id"])
    incidents = [{"at": i["at"], "text": i["text_fr"]} for i in home.incidents(case_id)]
    incidents += [{"at": _at(e), "text": f"pas de reçu signé du relais pour le pli {e['id'][:12]}"}
                  for e in view.envelopes if _logged_time(home, e["id"]) is None]
    asks = [e for e in view.envelopes if e["kind"] in ("request", "complement")]
    for ask, nxt in zip(asks, [*asks[1:], None], strict=True):
        answered = next((e for e in view.envelopes if e["kind"] in ANSWER_KINDS and _at(e) >= _at(ask)
                         and (nxt is None or _at(e) <= _at(nxt))), None)
        if answered and _at(answered) > _at(ask) + DEADLINE:
            incidents.append({"at": _at(answered), "text": "réponse reçue après le délai de 7 jours"})
    author = final["body"].get("author", {})
    req_author = request["body"].get("author", {})
    data: dict[str, Any] = {
        "case_id": case_id, "generated_at": now,
        "requerant": {"name": profile.name, "rpps": profile.rpps,
                      "profession_label": profession_label(req_author.get("profession", "")),
                      "specialty": req_author.get("specialty", ""),
                      **({"adeli": req_author["adeli"]} if "adeli" in req_author else {})},
        "requis": {"name": final["peer_name"], "rpps": final["peer_rpps"],
                   "profession_label": profession_label(author.get("profession", "")),
                   "specialty": author.get("specialty", "")},
        "patient": view.patient, "motif": view.motif, "question": request["body"].get("question", ""),
        "request_at": request_at, "answer_at": answer_at, "answer_kind": final["kind"],
        "exchanges": [
            {"kind": e["kind"], "at": _logged_time(home, e["id"]),
             "author": profile.name if e["direction"] == "sent" else e["peer_name"],
             "summary": _summary(e["kind"], e["body"])}
            for e in view.envelopes
        ],
        "incidents": sorted(incidents, key=lambda i: i["at"]),
        "log_origin": profile.log_origin,
        "receipts": sum(len(logstate.receipts_of(home, e["id"])) for e in view.envelopes),
    }
    b = final["body"]
    if final["kind"] == "avis":
        data["avis"] = {k: b.get(k, [] if k == "prescriptions" else "")
                        for k in ("avis", "recommendations", "prescriptions", "follow_up")}
    elif final["kind"] == "presentiel":
        data["orientation"] = {"text": b.get("orientation", ""), "urgency": b.get("urgency", "routine")}
    else:
        data["refus_reason"] = b.get("reason", "")
    target = out or home.cases / case_id / f"compte-rendu-{case_id[:12]}.pdf"
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, pdf.render_report(data), mode=0o600)
    home.close_case(case_id, now, str(target))
    return target


# -- billing ------------------------------------------------------------------------------------


def _patient_key(p: dict[str, Any]) -> str:
    return str(p.get("ins") or f"{p.get('family_name', '')}|{p.get('given_names', '')}|{p.get('birth_date', '')}")


def acts(home: Home, *, now: int, zone: str = "metropole") -> list[billing.Act]:
    """The téléexpertise acts this practitioner took part in: cases that got an avis or an
    orientation (a refusal or a pending case is not an act), dated by the answer's log time."""
    profile = core._session(home)  # noqa: SLF001
    out: list[billing.Act] = []
    for v in list_cases(home, now=now):
        if v.state not in (CaseState.ANSWERED, CaseState.ORIENTED):
            continue
        request = next(e for e in v.envelopes if e["kind"] == "request")
        final = next(e for e in reversed(v.envelopes) if e["kind"] in ("avis", "presentiel"))
        answered = _logged_time(home, final["id"]) or _at(final)
        if v.role == "requerant":
            requerant = (profile.rpps, profile.name)
            requis = (final["peer_rpps"], final["peer_name"])
        else:
            requerant = (request["peer_rpps"], request["peer_name"])
            requis = (profile.rpps, profile.name)
        out.append(billing.Act(
            case_id=v.case_id, role="requerant" if v.role == "requerant" else "requis",
            act_date=dt.datetime.fromtimestamp(answered, PARIS).date(),
            patient_key=_patient_key(v.patient), patient_label=v.patient_label,
            requerant_rpps=requerant[0], requerant_name=requerant[1],
            requis_rpps=requis[0], requis_name=requis[1], zone=zone,
            requerant_profession=request["body"].get("author", {}).get("profession", "10"),
        ))
    return out


def limit_warning(
    home: Home, patient: dict[str, Any], requis_rpps: str, *, now: int, requis_name: str | None = None,
) -> billing.LimitWarning | None:
    """Warn, when a request is prepared, that it would exceed the 4 acts a year per patient and requis."""
    key = _patient_key(patient)
    pending = sum(
        1 for v in list_cases(home, now=now)
        if v.role == "requerant" and v.state not in FINAL_STATES and v.counterpart.get("rpps") == requis_rpps
        and _patient_key(v.patient) == key
    )
    today = dt.datetime.fromtimestamp(now, PARIS).date()
    return billing.limit_warning(acts(home, now=now), patient_key=key, requis_rpps=requis_rpps,
                                 on=today, pending=pending, requis_name=requis_name)
