"""A practitioner's téléexpertise cases: send, file what arrives, see where each stands,
answer, close with a compte rendu, and bill.

A case's state is never stored: it is replayed from the envelopes of the case in the
local store through ``protocol.case.advance`` (the transition table), so it cannot drift
from what was actually exchanged. What the relay proved (submission, delivery, reading)
comes from the signed receipts kept beside them; times shown in a compte rendu are the
relay's signed log times, not this computer's clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from client import billing, core, logstate, pdf
from client.api import Progress, RelayClient
from client.caseform import PreparedRequest, clean_attachments, profession_label
from client.home import Home, Profile, atomic_write
from protocol import ids
from protocol.case import ANSWER_KINDS, FINAL_STATES, REQUERANT_KINDS, CaseState, CaseStateError, advance
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
    "queued": ("en attente d'envoi", "waiting to be sent"),
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
    envelopes: list[dict[str, Any]] = field(default_factory=list)  # the conversation, in causal order
    anomalies: list[str] = field(default_factory=list)
    foreign: list[dict[str, Any]] = field(default_factory=list)  # kept, but outside the conversation

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
    seen: set[str] = set()
    while stack:
        r = stack.pop()
        if r["id"] in seen:
            continue
        seen.add(r["id"])
        out.append(r)
        stack += sorted(children.get(r["id"], []), key=when, reverse=True)
    # Envelopes in a reference cycle (a hostile in_reply_to) are never reached above: keep them.
    return out + sorted((r for r in rows if r["id"] not in seen), key=when)


def _bound(rows: list[dict[str, Any]], me: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The envelopes that belong to the conversation, and why the others do not.

    The request fixes the two practitioners: its sender (the requérant) and the requis it
    names. A later envelope counts only if it comes from one of them, in a kind of their
    role, and answers an envelope of the case: whoever learns a case id (it is printed,
    and in audit packages) cannot slip an avis, or a demande de complément that would
    draw the patient's data to them, into someone else's case. The others are kept (they
    are authentic) but never change the state, become a reply target, reach the compte
    rendu or the billing.
    """
    requests = [r for r in rows if r["kind"] == "request"]
    if not requests:
        return [], [f"{r['id'][:12]}: no request in this case" for r in rows]
    request = requests[0]
    requerant = me if request["direction"] == "sent" else request["peer_rpps"]
    requis = request["body"].get("requis", {}).get("rpps", "") if request["direction"] == "sent" else me
    kept, why = [request], []
    known = {request["id"]}
    for r in rows:
        if r is request:
            continue
        sender = me if r["direction"] == "sent" else r["peer_rpps"]
        role_kinds = REQUERANT_KINDS if sender == requerant else ANSWER_KINDS if sender == requis else frozenset()
        if sender not in (requerant, requis):
            why.append(f"{r['id'][:12]}: sent by RPPS {sender}, who is not part of this case")
        elif r["kind"] not in role_kinds or r["kind"] == "request":
            who = "requérant" if sender == requerant else "requis"
            why.append(f"{r['id'][:12]}: a {r['kind']!r} cannot come from the {who}")
        elif r.get("in_reply_to") not in known:
            why.append(f"{r['id'][:12]}: answers no envelope of this case")
        else:
            kept.append(r)
            known.add(r["id"])
    return kept, why


def case_view(home: Home, case_id: str, *, now: int) -> CaseView:
    """Where a case stands, replayed from its envelopes (see the module docstring)."""
    everything = _rows(home, case_id)
    rows, anomalies = _bound(everything, home.profile().rpps)
    state: CaseState | None = None
    for r in rows:
        try:
            state = advance(state, r["kind"])
        except CaseStateError as e:
            anomalies.append(f"{r['id'][:12]}: {e}")
    request = rows[0] if rows else None
    role = "requerant" if request is None or request["direction"] == "sent" else "requis"
    body = request["body"] if request else {}
    counterpart_row = next((r for r in rows if r["direction"] == "received"), None)
    if role == "requerant":
        requis = body.get("requis", {})
        counterpart = {"name": (counterpart_row or {}).get("peer_name", "") or requis.get("name", ""),
                       "rpps": requis.get("rpps", "")}
    else:
        counterpart = {"name": request["peer_name"] if request else "", "rpps": request["peer_rpps"] if request else ""}
    meta = home.case_meta(case_id)
    unread = [r["id"] for r in everything if r["direction"] == "received" and not r.get("read_at")]
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
        status = ("queued" if last.get("pending") else "read" if "read" in last["receipts"]
                  else "delivered" if "delivered" in last["receipts"] else "sent")
    return CaseView(
        case_id=case_id, role=role, state=state, status=status, patient=body.get("patient", {}),
        counterpart=counterpart, motif=body.get("motif", ""), urgency=body.get("urgency", "routine"),
        opened_at=_at(everything[0]) if everything else 0, last_at=_at(everything[-1]) if everything else 0,
        deadline=deadline, overdue=deadline is not None and now > deadline, unread=unread,
        closed_at=meta["closed_at"], envelopes=rows, anomalies=anomalies,
        foreign=[r for r in everything if r not in rows],
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
    if not all(c in "0123456789abcdef" for c in p):
        p = ""  # a case id is hex: anything else matches nothing (and no LIKE wildcard)
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
    async with _exclusive(home):
        try:
            sent = await core.send(
                home, keys, to=[prepared.to_rpps], kind="request", body=prepared.body, files=prepared.files,
                case_id=prepared.case_id, progress=progress, relay=relay,
            )
        except PliError as e:
            _keep_or_drop(home, prepared.case_id.hex(), prepared.folder, e)
            raise
    _keep_sent_files(home, sent, prepared.folder)
    return sent


def _keep_or_drop(home: Home, case_id: str, folder: Path | None, error: BaseException) -> None:
    """After a failed send: an envelope left pending (the connection dropped) keeps its files
    with the case, as a sent one does; otherwise the prepared copy goes."""
    pending = getattr(error, "pending_envelope", None)
    if pending and folder is not None:
        _move_files(home, case_id, pending, folder)
    elif folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def _keep_sent_files(home: Home, sent: core.SentEnvelope, folder: Path) -> None:
    _move_files(home, sent.case_id, sent.envelope_id, folder)


def _move_files(home: Home, case_id: str, envelope_id: str, folder: Path) -> None:
    dest = home.cases / case_id / envelope_id
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(dest, ignore_errors=True)
    folder.replace(dest)
    with home.store() as db:
        db.execute("UPDATE envelopes SET folder = ? WHERE id = ?", (str(dest), envelope_id))


# -- receiving -------------------------------------------------------------------------------


@dataclass
class SyncResult:
    new: list[core.OpenedEnvelope] = field(default_factory=list)
    refused: list[tuple[str, PliError]] = field(default_factory=list)
    receipts: int = 0
    resumed: list[str] = field(default_factory=list)  # sent envelopes an interruption had left pending


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
    rejected = home.rejected()
    async with core._relay(home, profile, keys, relay) as r:  # noqa: SLF001
        resumed, undelivered = await core.resume_pending(home, r)
        result.resumed, result.refused = resumed, [*result.refused, *undelivered]
        await core.send_pending_statements(home, keys, r)
        for entry in await r.inbox():
            if entry["id"] in rejected:  # refused before and kept as evidence: not again
                continue
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
    folder = home.root / "outbox" / f"{case_id}-{os.urandom(4).hex()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        prepared, warnings = clean_attachments(files, folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return [p.path for p in prepared], folder, warnings


@contextlib.asynccontextmanager
async def _exclusive(home: Home, *, wait: float = 60.0) -> AsyncIterator[None]:
    """One case action at a time on this computer: two terminals answering the same case
    must not both pass the state check and both send (an avis and a refus crossing)."""
    home.root.mkdir(parents=True, exist_ok=True)
    with (home.root / ".case.lock").open("a") as f:
        try:
            import fcntl  # noqa: PLC0415 - POSIX; elsewhere one terminal at a time is the user's job
        except ImportError:
            yield
            return
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise CaseError("another pli command is working on your cases; try again when it ends",
                                    fr="une autre commande pli travaille sur vos dossiers ; réessayez quand elle "
                                       "aura fini") from None
                await asyncio.sleep(0.05)  # another process holds it: poll, never block the loop
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


async def _respond(
    home: Home, keys: DeviceKeys, case_id: str, kind: str, fields: dict[str, Any], files: list[Path], *,
    role: str, progress: Progress | None, relay: RelayClient | None, now: int,
) -> tuple[core.SentEnvelope, list[tuple[str, str]]]:
    async with _exclusive(home):
        return await _respond_locked(home, keys, case_id, kind, fields, files, role=role, progress=progress,
                                     relay=relay, now=now)


async def _respond_locked(
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
    if kind == "complement" and not fields.get("text", "").strip() and not paths:
        shutil.rmtree(folder, ignore_errors=True)
        raise CaseError("a complement needs a text or files", fr="un complément contient un texte ou des fichiers")
    try:
        async with core._relay(home, profile, keys, relay) as r:  # noqa: SLF001
            await core.mark_read(home, keys, view.unread, relay=r)  # answering is reading
            sent = await core.reply(home, keys, target["id"], kind=kind, body=body, files=paths,
                                    progress=progress, relay=r)
    except BaseException as e:
        _keep_or_drop(home, case_id, folder, e)
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
    logged = _logged(home, envelope_id)
    return logged[0] if logged else None


def _logged(home: Home, envelope_id: str) -> tuple[int, int] | None:
    """(time, index) of an envelope's submission in the relay's log, from its kept receipt."""
    for x in logstate.receipts_of(home, envelope_id):
        entry = LogEntry.from_bytes(x["leaf"])
        if entry.type == EntryType.SUBMITTED:
            return entry.time, int(x["index"])
    return None


def _summary(kind: str, body: dict[str, Any]) -> str:
    key = {"request": "question", "complement_request": "missing", "complement": "text", "avis": "avis",
           "refus": "reason", "presentiel": "orientation"}.get(kind, "text")
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
    incidents += [{"at": _at(e), "text": f"pli {e['id'][:12]} hors de l'échange (expéditeur ou type inattendu), "
                                         "conservé sans effet sur le dossier"} for e in view.foreign]
    incidents += [{"at": now, "text": f"déclaration de réponse au pli {original[:12]} en attente d'envoi au relais"}
                  for original, _answer in home.pending_statements()
                  if original in {e["id"] for e in view.envelopes}]
    incidents += [{"at": _at(e), "text": f"pas de reçu signé du relais pour le pli {e['id'][:12]}"}
                  for e in view.envelopes if _logged_time(home, e["id"]) is None]
    asks = [e for e in view.envelopes if e["kind"] in ("request", "complement")]
    for ask in asks:
        answered = next((e for e in view.envelopes if e.get("in_reply_to") == ask["id"] and e["kind"] in ANSWER_KINDS),
                        None)
        asked_at = _logged_time(home, ask["id"]) or _at(ask)
        answered_at = (_logged_time(home, answered["id"]) or _at(answered)) if answered else None
        if answered_at is not None and answered_at > asked_at + DEADLINE:
            incidents.append({"at": answered_at, "text": "réponse reçue après le délai de 7 jours"})
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
    every = acts(home, now=now)
    mine = next((a for a in every if a.case_id == case_id), None)
    if mine is not None:  # the yearly limit, stated where the practitioner files the act
        with contextlib.suppress(billing.BillingError):
            month = (mine.act_date.year, mine.act_date.month)
            line = next(x for x in billing.billing_lines(every, month=month) if x.case_id == case_id)
            if not line.billable:
                data["billing_note"] = f"Acte non facturable : {line.reason}."
    target = out or home.cases / case_id / f"compte-rendu-{case_id[:12]}.pdf"
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, pdf.render_report(data), mode=0o600)
    home.close_case(case_id, now, str(target))
    return target


# -- billing ------------------------------------------------------------------------------------


def _identity(p: dict[str, Any]) -> str:
    return f"{p.get('family_name', '')}|{p.get('given_names', '')}|{p.get('birth_date', '')}".casefold()


def _patient_keyer(views: list[CaseView]) -> Callable[[dict[str, Any]], str]:
    """One key per patient, whether or not each request carried the INS: a request without it
    is matched to the INS of another request with the same names and birth date, so the
    yearly limit cannot be missed by leaving the INS out once."""
    ins_of = {_identity(v.patient): v.patient["ins"] for v in views if v.patient.get("ins")}

    def key(p: dict[str, Any]) -> str:
        return str(p.get("ins") or ins_of.get(_identity(p)) or _identity(p))

    return key


def acts(
    home: Home, *, now: int, zone: str = "metropole", views: list[CaseView] | None = None,
) -> list[billing.Act]:
    """The téléexpertise acts this practitioner took part in: cases that got an avis or an
    orientation (a refusal or a pending case is not an act), dated by the answer's log time."""
    profile = core._session(home)  # noqa: SLF001
    out: list[billing.Act] = []
    views = list_cases(home, now=now) if views is None else views
    patient_key = _patient_keyer(views)
    for v in views:
        if v.state not in (CaseState.ANSWERED, CaseState.ORIENTED):
            continue
        request = next(e for e in v.envelopes if e["kind"] == "request")
        final = next(e for e in reversed(v.envelopes) if e["kind"] in ("avis", "presentiel"))
        logged = _logged(home, final["id"])
        answered = logged[0] if logged else _at(final)
        if v.role == "requerant":
            requerant = (profile.rpps, profile.name)
            requis = (final["peer_rpps"], final["peer_name"])
        else:
            requerant = (request["peer_rpps"], request["peer_name"])
            requis = (profile.rpps, profile.name)
        out.append(billing.Act(
            case_id=v.case_id, role="requerant" if v.role == "requerant" else "requis",
            act_date=dt.datetime.fromtimestamp(answered, PARIS).date(),
            patient_key=patient_key(v.patient), patient_label=v.patient_label,
            requerant_rpps=requerant[0], requerant_name=requerant[1],
            requis_rpps=requis[0], requis_name=requis[1], zone=zone,
            requerant_profession=request["body"].get("author", {}).get("profession", "10"),
            sequence=logged[1] if logged else 0,
        ))
    return out


def limit_warning(
    home: Home, patient: dict[str, Any], requis_rpps: str, *, now: int, requis_name: str | None = None,
) -> billing.LimitWarning | None:
    """Warn, when a request is prepared, that it would exceed the 4 acts a year per patient and requis."""
    views = list_cases(home, now=now)
    patient_key = _patient_keyer(views)
    key = patient_key(patient)
    pending = sum(
        1 for v in views
        if v.role == "requerant" and v.state not in FINAL_STATES and v.counterpart.get("rpps") == requis_rpps
        and patient_key(v.patient) == key
    )
    today = dt.datetime.fromtimestamp(now, PARIS).date()
    return billing.limit_warning(acts(home, now=now, views=views), patient_key=key, requis_rpps=requis_rpps,
                                 on=today, pending=pending, requis_name=requis_name)
