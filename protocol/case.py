"""The téléexpertise case: what a request and each kind of answer carry, and how a case moves.

A case is a conversation in one direction at a time (DOMAIN.md, "A case")::

    requérant                                     requis
    request ───────────────────────────────────▶  AWAITING_ANSWER
                       ◀──────────────────────── complement_request → COMPLEMENT_ASKED
    complement ────────────────────────────────▶  AWAITING_ANSWER   (as often as needed)
                       ◀──────────────────────── avis        → ANSWERED  (final)
                       ◀──────────────────────── refus       → REFUSED   (final)
                       ◀──────────────────────── presentiel  → ORIENTED  (final)

Rule 1: only the requérant sends ``request`` and ``complement``; only the requis sends
the other kinds, and the requis must be a médecin or a sage-femme.
Rule 2: every envelope after the request names, in ``in_reply_to``, the envelope it
answers; a state accepts only the kinds of the table below (:data:`TRANSITIONS`).
Rule 3: a final state takes nothing more: a new question is a new case.

Each kind's body is a msgpack map inside the signed manifest (SPEC.md §6.3). This module
checks a body completely (types, required fields, lengths, identifiers and their check
digits, the patient's consent), so a manifest that passes cannot describe an invalid
case. Checks that need today's date (a birth date in the future) belong to entry, in the
client, where the clock lives.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from enum import Enum
from typing import Any, Final

from protocol.errors import DecodeError, LimitError, PliError
from protocol.ids import (
    InvalidIdentifier,
    check_adeli,
    check_may_answer,
    check_may_request,
    check_nir,
    check_profession,
    check_rpps,
)

__all__ = [
    "ANSWER_KINDS",
    "FINAL_STATES",
    "KINDS",
    "REQUERANT_KINDS",
    "TRANSITIONS",
    "CaseState",
    "CaseStateError",
    "advance",
    "check_body",
]

ID_SIZE: Final = 16
MAX_TEXT: Final = 256 * 1024  # a question, an avis: UTF-8 bytes
MAX_SHORT: Final = 512  # a name, a motif line, a date
MAX_PRESCRIPTIONS: Final = 64

REQUERANT_KINDS: Final = frozenset({"request", "complement"})
ANSWER_KINDS: Final = frozenset({"complement_request", "avis", "refus", "presentiel"})
KINDS: Final = REQUERANT_KINDS | ANSWER_KINDS
URGENCIES: Final = ("routine", "urgent")
CONSENT_METHODS: Final = ("oral", "written")
SEXES: Final = ("F", "M", "U")
_DATE = re.compile(r"\A[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])\Z")


class CaseStateError(PliError):
    """An envelope that does not fit where its case stands (Rule 2 or 3)."""

    code = "case_state"


class CaseState(Enum):
    AWAITING_ANSWER = "awaiting_answer"
    COMPLEMENT_ASKED = "complement_asked"
    ANSWERED = "answered"
    REFUSED = "refused"
    ORIENTED = "oriented"


# (state before, kind) -> state after. ``None`` is a case not yet opened.
TRANSITIONS: Final[Mapping[tuple[CaseState | None, str], CaseState]] = {
    (None, "request"): CaseState.AWAITING_ANSWER,
    (CaseState.AWAITING_ANSWER, "complement_request"): CaseState.COMPLEMENT_ASKED,
    (CaseState.COMPLEMENT_ASKED, "complement"): CaseState.AWAITING_ANSWER,
    (CaseState.AWAITING_ANSWER, "avis"): CaseState.ANSWERED,
    (CaseState.AWAITING_ANSWER, "refus"): CaseState.REFUSED,
    (CaseState.AWAITING_ANSWER, "presentiel"): CaseState.ORIENTED,
}
FINAL_STATES: Final = frozenset({CaseState.ANSWERED, CaseState.REFUSED, CaseState.ORIENTED})


def advance(state: CaseState | None, kind: str) -> CaseState:
    """The case's state once an envelope of ``kind`` is added.

    Raises:
        CaseStateError: the kind does not follow from ``state`` (Rule 2, Rule 3).
    """
    after = TRANSITIONS.get((state, kind))
    if after is None:
        where = "a case not yet opened" if state is None else f"a case in state {state.value}"
        raise CaseStateError(f"a {kind!r} envelope cannot follow {where}")
    return after


# -- field readers: each names the field that is wrong -----------------------------------------


class _Body:
    """A body map being checked; every accessor raises DecodeError naming ``kind.field``."""

    def __init__(self, kind: str, body: object) -> None:
        if not isinstance(body, dict):
            raise DecodeError(f"{kind} body must be a map")
        self.kind = kind
        self.body: dict[str, Any] = body
        self.seen: set[str] = set()

    def _get(self, m: Mapping[str, Any], key: str, where: str, *, required: bool) -> Any:
        if key not in m:
            if required:
                raise DecodeError(f"{where}: field {key!r} is missing")
            return None
        if m[key] is None:  # nil is never a value here: absent optional fields are left out
            raise DecodeError(f"{where}: field {key!r} must not be nil")
        return m[key]

    def text(
        self, m: Mapping[str, Any], key: str, where: str, *, required: bool = True,
        max_len: int = MAX_TEXT, non_empty: bool = False,
    ) -> str | None:
        v = self._get(m, key, where, required=required)
        if v is None:
            return None
        if not isinstance(v, str):
            raise DecodeError(f"{where}: field {key!r} must be text")
        if len(v.encode()) > max_len:
            raise LimitError(f"{where}: field {key!r} is over {max_len} bytes")
        if non_empty and not v.strip():
            raise DecodeError(f"{where}: field {key!r} must not be empty")
        return v

    def choice(self, m: Mapping[str, Any], key: str, where: str, allowed: tuple[str, ...]) -> str:
        v = self.text(m, key, where, max_len=32)
        if v not in allowed:
            raise DecodeError(f"{where}: field {key!r} must be one of {', '.join(allowed)}")
        return v

    def date(self, m: Mapping[str, Any], key: str, where: str, *, required: bool = True) -> str | None:
        v = self.text(m, key, where, required=required, max_len=10)
        if v is not None:
            try:
                if not _DATE.match(v):
                    raise ValueError(v)  # noqa: TRY301
                dt.date.fromisoformat(v)  # a parser, not the clock: 2025-02-30 is refused
            except ValueError as e:
                raise DecodeError(f"{where}: field {key!r} must be a real date written YYYY-MM-DD") from e
        return v

    def map_(self, m: Mapping[str, Any], key: str, where: str, allowed: set[str]) -> dict[str, Any]:
        v = self._get(m, key, where, required=True)
        if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
            raise DecodeError(f"{where}: field {key!r} must be a map")
        unknown = set(v) - allowed
        if unknown:
            raise DecodeError(f"{where}.{key}: unknown field {min(unknown)!r}")
        return v

    def top(self, key: str) -> Any:
        self.seen.add(key)
        return self.body.get(key)

    def done(self) -> None:
        unknown = set(self.body) - self.seen
        if unknown:
            raise DecodeError(f"{self.kind} body: unknown field {min(unknown, key=str)!r}")


def _ident(check: Any, value: str, where: str) -> None:
    """An identifier's check digits, with the ids module's precise message."""
    try:
        check(value)
    except InvalidIdentifier as e:
        raise DecodeError(f"{where}: {e}") from e


# -- bodies ---------------------------------------------------------------------------------


def _author(b: _Body, sender_rpps: str, *, answering: bool) -> None:
    """Who writes: profession (TRE_G15 code), specialty, and ADELI where the profession uses it."""
    where = f"{b.kind}.author"
    a = b.map_(b.body, "author", f"{b.kind} body", {"profession", "specialty", "adeli"})
    b.seen.add("author")
    code = b.text(a, "profession", where, max_len=2) or ""
    try:
        profession = check_profession(code)
        if profession.code != code:
            raise DecodeError(f"{where}: profession must be a TRE_G15 code such as '10'")
        (check_may_answer if answering else check_may_request)(profession)
    except InvalidIdentifier as e:
        raise DecodeError(f"{where}: {e}") from e
    b.text(a, "specialty", where, max_len=MAX_SHORT)
    adeli = b.text(a, "adeli", where, required=False, max_len=9)
    if adeli is not None:
        _ident(check_adeli, adeli, where)
    elif profession.uses_adeli:
        raise DecodeError(f"{where}: an ADELI number is required for the profession {profession.label_fr}")
    _ident(check_rpps, sender_rpps, where)


def _in_reply_to(b: _Body) -> None:
    v = b.top("in_reply_to")
    if not isinstance(v, bytes) or len(v) != ID_SIZE:
        raise DecodeError(f"{b.kind} body: in_reply_to must be a 16-byte envelope id")


def _file_ref(name: object, where: str, files: Mapping[str, str], media: str | None = None) -> None:
    if not isinstance(name, str) or name not in files:
        raise DecodeError(f"{where} must name a file of this bundle")
    if media is not None and files[name] != media:
        raise DecodeError(f"{where} must be a {media} file")


def _request(b: _Body, files: Mapping[str, str]) -> None:  # noqa: C901, PLR0912 - one check per field, in SPEC order
    k = "request body"
    requis = b.map_(b.body, "requis", k, {"rpps", "name", "specialty"})
    b.seen.add("requis")
    rpps = b.text(requis, "rpps", "request.requis", required=False, max_len=16)
    if rpps is not None:
        _ident(check_rpps, rpps, "request.requis")
    b.text(requis, "name", "request.requis", required=False, max_len=MAX_SHORT)
    specialty = b.text(requis, "specialty", "request.requis", required=False, max_len=MAX_SHORT)
    if rpps is None and not specialty:
        raise DecodeError("request.requis: name a practitioner (rpps) or a specialty")

    p = b.map_(b.body, "patient", k, {"family_name", "given_names", "birth_date", "sex", "ins"})
    b.seen.add("patient")
    b.text(p, "family_name", "request.patient", max_len=MAX_SHORT, non_empty=True)
    b.text(p, "given_names", "request.patient", max_len=MAX_SHORT, non_empty=True)
    birth = b.date(p, "birth_date", "request.patient")
    sex = b.choice(p, "sex", "request.patient", SEXES)
    ins = b.text(p, "ins", "request.patient", required=False, max_len=15)
    if ins is not None:
        assert birth is not None
        try:
            check_nir(ins, sex=None if sex == "U" else sex, birth_date=dt.date.fromisoformat(birth))
        except (InvalidIdentifier, ValueError) as e:
            raise DecodeError(f"request.patient: {e}") from e
        if len(ins) != 15:
            raise DecodeError("request.patient: ins is stored as its 15 characters, without spaces")

    for key, required in (("motif", True), ("question", True), ("context", True)):
        b.seen.add(key)
        b.text(b.body, key, k, required=required, max_len=MAX_SHORT if key == "motif" else MAX_TEXT,
               non_empty=key != "context")
    b.seen.add("urgency")
    b.choice(b.body, "urgency", k, URGENCIES)

    c = b.map_(b.body, "consent", k, {"informed", "consented", "date", "method", "recorded_by", "form"})
    b.seen.add("consent")
    # Nothing is sent without the patient's recorded consent (DOMAIN.md, "Patient").
    if c.get("informed") is not True or c.get("consented") is not True:
        raise DecodeError("request.consent: the patient must have been informed and have consented")
    b.date(c, "date", "request.consent")
    b.choice(c, "method", "request.consent", CONSENT_METHODS)
    b.text(c, "recorded_by", "request.consent", max_len=MAX_SHORT, non_empty=True)
    if "form" in c:
        _file_ref(c["form"], "request.consent.form", files)

    # The pre-filled dossier our client generates; another client may leave it out.
    dossier = b.top("dossier")
    if dossier is not None:
        _file_ref(dossier, "request body: dossier", files, "application/pdf")
    thumbs = b.top("thumbnails")
    if thumbs is not None:
        if not isinstance(thumbs, dict):
            raise DecodeError("request body: thumbnails must be a map")
        for photo, thumb in thumbs.items():
            _file_ref(photo, "request body: a thumbnail's photo", files)
            if not files[photo].startswith("image/"):
                raise DecodeError("request body: a thumbnail's photo must be an image/* file")
            _file_ref(thumb, "request body: a thumbnail", files, "image/jpeg")


def _answer(b: _Body, files: Mapping[str, str]) -> None:
    k = f"{b.kind} body"
    _in_reply_to(b)
    if b.kind == "complement":
        b.seen.add("text")
        if not (b.text(b.body, "text", k) or "").strip() and not files:
            raise DecodeError(f"{k}: a complement carries a text or files")
    elif b.kind == "complement_request":
        b.seen.add("missing")
        b.text(b.body, "missing", k, non_empty=True)
    elif b.kind == "refus":  # the reason is mandatory: it goes into the patient's record
        b.seen.add("reason")
        b.text(b.body, "reason", k, non_empty=True)
    elif b.kind == "presentiel":
        b.seen.update({"orientation", "urgency"})
        b.text(b.body, "orientation", k, non_empty=True)
        b.choice(b.body, "urgency", k, URGENCIES)
    else:  # avis
        b.seen.update({"avis", "recommendations", "prescriptions", "follow_up"})
        b.text(b.body, "avis", k, non_empty=True)
        b.text(b.body, "recommendations", k)
        b.text(b.body, "follow_up", k)
        prescriptions = b.body.get("prescriptions")
        if not isinstance(prescriptions, list):
            raise DecodeError(f"{k}: field 'prescriptions' must be a list (possibly empty)")
        if len(prescriptions) > MAX_PRESCRIPTIONS:
            raise LimitError(f"{k}: over {MAX_PRESCRIPTIONS} prescriptions")
        for i, item in enumerate(prescriptions):
            if not isinstance(item, str) or not item.strip() or len(item.encode()) > MAX_SHORT * 8:
                raise DecodeError(f"{k}: prescription {i + 1} must be non-empty text of at most 4 KiB")


def check_body(kind: str, body: object, *, sender_rpps: str, files: Mapping[str, str]) -> None:
    """Check one manifest body against its kind (SPEC.md §6.3).

    Args:
        kind: the manifest's kind.
        body: the decoded body map.
        sender_rpps: the signing practitioner's RPPS, from the manifest's sender.
        files: the bundle's files, name → media type, for the body's references to them.

    Raises:
        DecodeError: the body is not a valid body of that kind (message names the field).
        LimitError: a text or list is over its limit.
    """
    if kind not in KINDS:
        raise DecodeError(f"unknown bundle kind {kind!r}")
    b = _Body(kind, body)
    _author(b, sender_rpps, answering=kind in ANSWER_KINDS)
    if kind == "request":
        _request(b, files)
    else:
        _answer(b, files)
    b.done()
