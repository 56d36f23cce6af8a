"""Tests of protocol/case.py: how a case moves, and what each kind's body must carry (SPEC.md §6.3).

The transition table is written out again here from SPEC.md §6.3 rather than read from
``TRANSITIONS``, so that a change to the code's table has to be made twice, on purpose.
Identifiers are those of DOMAIN.md's worked examples and tools/case_samples.py: RPPS
10000005479 (sender) and 10000012343 (requis), ADELI 879101558, NIR 261037511200508 (a
woman born in March 1961) and 284052A32102552 (a woman born in May 1984 in Corse-du-Sud).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Final

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import case
from protocol.case import ANSWER_KINDS, FINAL_STATES, KINDS, CaseState, CaseStateError, advance, check_body
from protocol.errors import DecodeError, LimitError
from tools.case_samples import answer_body, request_body

SENDER: Final = "10000005479"
IN_REPLY_TO: Final = bytes(range(16))
ADELI: Final = "879101558"
FILES: Final = {
    "demande.pdf": "application/pdf",
    "consentement.pdf": "application/pdf",
    "dos.jpg": "image/jpeg",
    "dos-vignette.jpg": "image/jpeg",
    "observation.txt": "text/plain",
}

A, C, ANSWERED, REFUSED, ORIENTED = (
    CaseState.AWAITING_ANSWER, CaseState.COMPLEMENT_ASKED, CaseState.ANSWERED, CaseState.REFUSED, CaseState.ORIENTED,
)
STATES: Final = (None, *CaseState)

# SPEC.md §6.3, the table "state before / kind / state after".
ALLOWED: Final = {
    (None, "request"): A,
    (A, "complement_request"): C,
    (C, "complement"): A,
    (A, "avis"): ANSWERED,
    (A, "refus"): REFUSED,
    (A, "presentiel"): ORIENTED,
}


def _check(kind: str, body: object, *, sender: str = SENDER, files: dict[str, str] = FILES) -> None:
    check_body(kind, body, sender_rpps=sender, files=files)


# --- transitions ----------------------------------------------------------------------------


@pytest.mark.parametrize(("before", "kind", "after"), [(s, k, a) for (s, k), a in ALLOWED.items()])
def test_allowed_transition(before: CaseState | None, kind: str, after: CaseState) -> None:
    assert advance(before, kind) is after


def test_the_code_table_is_the_spec_table() -> None:
    assert dict(case.TRANSITIONS) == ALLOWED
    assert {ANSWERED, REFUSED, ORIENTED} == FINAL_STATES
    assert {"request", "complement_request", "complement", "avis", "refus", "presentiel"} == KINDS


@pytest.mark.parametrize(
    ("before", "kind"),
    [
        pytest.param(ANSWERED, "avis", id="avis-after-avis"),
        pytest.param(A, "complement", id="complement-without-complement-request"),
        pytest.param(None, "complement", id="complement-before-any-request"),
        pytest.param(A, "request", id="request-in-an-open-case"),
        pytest.param(C, "request", id="request-while-a-complement-is-asked"),
        pytest.param(None, "avis", id="avis-before-the-request"),
        pytest.param(None, "complement_request", id="complement-request-before-the-request"),
        pytest.param(C, "avis", id="avis-before-the-complement-arrives"),
        pytest.param(C, "complement_request", id="complement-request-twice"),
        pytest.param(C, "refus", id="refus-while-a-complement-is-asked"),
        pytest.param(REFUSED, "complement", id="complement-after-refus"),
        pytest.param(ORIENTED, "request", id="request-reopening-an-oriented-case"),
        pytest.param(A, "reply", id="v1-kind-reply"),
        pytest.param(None, "reply", id="v1-kind-reply-opening"),
    ],
)
def test_forbidden_transition(before: CaseState | None, kind: str) -> None:
    where = "not yet opened" if before is None else f"in state {before.value}"
    with pytest.raises(CaseStateError, match=f"'{kind}' envelope cannot follow a case {where}"):
        advance(before, kind)


@pytest.mark.parametrize("final", sorted(FINAL_STATES, key=lambda s: s.value))
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_nothing_follows_a_final_state(final: CaseState, kind: str) -> None:
    with pytest.raises(CaseStateError, match=final.value):
        advance(final, kind)


@pytest.mark.parametrize("before", STATES, ids=lambda s: "none" if s is None else s.value)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_other_pair_is_refused(before: CaseState | None, kind: str) -> None:
    if (before, kind) in ALLOWED:
        assert advance(before, kind) is ALLOWED[before, kind]
    else:
        with pytest.raises(CaseStateError) as info:
            advance(before, kind)
        assert info.value.code == "case_state"


def test_a_case_with_two_rounds_of_complements() -> None:
    state = None
    for kind in ("request", "complement_request", "complement", "complement_request", "complement", "avis"):
        state = advance(state, kind)
    assert state is ANSWERED
    for kind in KINDS:
        with pytest.raises(CaseStateError):
            advance(state, kind)


# --- valid bodies ---------------------------------------------------------------------------


def _with(body: dict[str, Any], path: str, value: Any = ...) -> dict[str, Any]:
    """A deep copy of ``body`` with the field at ``path`` ("consent.informed") set, or removed if no value."""
    out = copy.deepcopy(body)
    *parents, last = path.split(".")
    m = out
    for p in parents:
        m = m[p]
    if value is ...:
        del m[last]
    else:
        m[last] = value
    return out


REQUEST: Final = request_body()
NURSE: Final = {"profession": "60", "specialty": "", "adeli": ADELI}
CORSICA: Final = {"ins": "284052A32102552", "birth_date": "1984-05-19"}


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        pytest.param("request", REQUEST, id="request"),
        pytest.param("request", request_body(dossier="demande.pdf"), id="request-with-dossier"),
        pytest.param("request", {**REQUEST, "thumbnails": {"dos.jpg": "dos-vignette.jpg"}}, id="thumbnails"),
        pytest.param("request", _with(REQUEST, "consent.form", "consentement.pdf"), id="consent-form"),
        pytest.param("request", _with(REQUEST, "consent.method", "written"), id="written-consent"),
        pytest.param("request", {**REQUEST, "urgency": "urgent"}, id="urgent"),
        pytest.param("request", {**REQUEST, "context": ""}, id="empty-context"),
        pytest.param("request", {**REQUEST, "requis": {"specialty": "SM15 dermatologie"}}, id="requis-by-specialty"),
        pytest.param("request", {**REQUEST, "requis": {"rpps": "10000012343", "name": "Dr Paul Durand",
                                                       "specialty": ""}}, id="requis-all-fields"),
        pytest.param("request", _with(REQUEST, "patient.ins"), id="no-ins"),
        pytest.param("request", request_body(**CORSICA), id="corsica-2a-nir"),
        pytest.param("request", request_body(sex="U"), id="sex-unknown-agrees-with-any-nir"),
        pytest.param("request", request_body(ins="261307511200552", birth_date="1961-11-30"),
                     id="nir-month-unknown-30"),
        pytest.param("request", {**REQUEST, "author": NURSE}, id="nurse-requests-with-adeli"),
        pytest.param("request", {**REQUEST, "author": {"profession": "50", "specialty": ""}}, id="midwife-requests"),
        *(pytest.param(k, answer_body(k, IN_REPLY_TO), id=k) for k in sorted(KINDS - {"request"})),
        pytest.param("complement", answer_body("complement", IN_REPLY_TO, text=""), id="complement-files-only"),
        pytest.param("complement", {**answer_body("complement", IN_REPLY_TO), "author": NURSE}, id="nurse-complement"),
        pytest.param("avis", {**answer_body("avis", IN_REPLY_TO), "author": {"profession": "50", "specialty": ""}},
                     id="midwife-answers"),
        pytest.param("avis", _with(answer_body("avis", IN_REPLY_TO), "prescriptions", ["x"] * 64),
                     id="64-prescriptions"),
        pytest.param("presentiel", _with(answer_body("presentiel", IN_REPLY_TO), "urgency", "urgent"),
                     id="urgent-presentiel"),
    ],
)
def test_valid_body(kind: str, body: dict[str, Any]) -> None:
    before = copy.deepcopy(body)
    _check(kind, body)
    assert body == before  # checking does not normalise in place


def test_sample_nir_for_month_unknown_is_what_the_table_says() -> None:
    # 30 is "month unknown": no comparison with the birth month, the key still counts.
    with pytest.raises(DecodeError, match="key"):
        _check("request", request_body(ins="261307511200553", birth_date="1961-11-30"))


# --- invalid bodies -------------------------------------------------------------------------

AVIS: Final = answer_body("avis", IN_REPLY_TO)
REFUS: Final = answer_body("refus", IN_REPLY_TO)

INVALID: Final = [
    # consent: nothing is sent without it
    ("consent-not-informed", "request", _with(REQUEST, "consent.informed", value=False), DecodeError,
     "informed and have"),
    ("consent-refused", "request", _with(REQUEST, "consent.consented", value=False), DecodeError, "have consented"),
    ("consent-informed-missing", "request", _with(REQUEST, "consent.informed"), DecodeError, "have consented"),
    ("consent-consented-missing", "request", _with(REQUEST, "consent.consented"), DecodeError, "have consented"),
    ("consent-as-text", "request", _with(REQUEST, "consent.consented", "true"), DecodeError, "have consented"),
    ("consent-as-1", "request", _with(REQUEST, "consent.informed", 1), DecodeError, "have consented"),
    ("consent-without-date", "request", _with(REQUEST, "consent.date"), DecodeError, "'date' is missing"),
    ("consent-method", "request", _with(REQUEST, "consent.method", "tacit"), DecodeError, "'method' must be one of"),
    ("consent-recorded-by-empty", "request", _with(REQUEST, "consent.recorded_by", " "), DecodeError,
     "'recorded_by' must not be empty"),
    ("consent-form-missing-file", "request", _with(REQUEST, "consent.form", "absent.pdf"), DecodeError,
     "consent.form must name a file"),
    # who may write what (Rule 1)
    *((f"{k}-by-a-nurse", k, {**answer_body(k, IN_REPLY_TO), "author": NURSE}, DecodeError,
       "only médecins .* and sages-femmes .* may answer") for k in sorted(ANSWER_KINDS)),
    ("avis-by-a-physiotherapist", "avis", {**AVIS, "author": {"profession": "70", "specialty": "", "adeli": ADELI}},
     DecodeError, "may answer"),
    ("request-by-a-pharmacist", "request", {**REQUEST, "author": {"profession": "21", "specialty": ""}}, DecodeError,
     "may not request"),
    ("nurse-without-adeli", "request", {**REQUEST, "author": {"profession": "60", "specialty": ""}}, DecodeError,
     "ADELI number is required for the profession infirmier"),
    ("podiatrist-complement-without-adeli", "complement",
     {**answer_body("complement", IN_REPLY_TO), "author": {"profession": "80", "specialty": ""}}, DecodeError,
     "ADELI number is required"),
    ("adeli-check-digit", "request", {**REQUEST, "author": {**NURSE, "adeli": "879101557"}}, DecodeError,
     "ADELI '879101557': the last digit .check digit. should be 8, not 7"),
    ("adeli-8-digits", "request", {**REQUEST, "author": {**NURSE, "adeli": "87910155"}}, DecodeError, "8 digits"),
    ("profession-unknown", "request", _with(REQUEST, "author.profession", "99"), DecodeError, "not recognised"),
    ("profession-by-name", "request", _with(REQUEST, "author.profession", "médecin"), LimitError,
     "'profession' is over 2 bytes"),
    ("author-missing", "avis", _with(AVIS, "author"), DecodeError, "'author' is missing"),
    ("author-specialty-missing", "avis", _with(AVIS, "author.specialty"), DecodeError, "'specialty' is missing"),
    # the patient's NIR and dates
    ("nir-key", "request", request_body(ins="261037511200509"), DecodeError,
     "the key .last two digits. should be 08, not 09"),
    ("nir-sex-digit-says-woman", "request", request_body(sex="M"), DecodeError,
     "starts with 2 .a woman. but the sex given is M"),
    ("nir-month-contradicts-birth-date", "request", request_body(birth_date="1961-04-12"), DecodeError,
     "birth year 61 and month 03, but the birth date given is 1961-04-12"),
    ("nir-year-contradicts-birth-date", "request", request_body(birth_date="1962-03-12"), DecodeError,
     "birth year 61 and month 03"),
    ("nir-corsica-key-computed-with-20", "request", request_body(ins="284052A32102525", birth_date="1984-05-19"),
     DecodeError, "should be 52, not 25"),
    ("nir-13-characters", "request", request_body(ins="2610375112005"), DecodeError, "key .2 more digits. is missing"),
    ("nir-with-spaces", "request", request_body(ins="2610375112005 08"), LimitError, "'ins' is over 15 bytes"),
    ("nir-not-text", "request", request_body(ins=261037511200508), DecodeError, "'ins' must be text"),
    ("birth-date-30-february", "request", request_body(birth_date="2025-02-30", ins="225027511200510"), DecodeError,
     "'birth_date' must be a real date"),
    ("consent-date-30-february", "request", _with(REQUEST, "consent.date", "2025-02-30"), DecodeError,
     "'date' must be a real date"),
    ("date-in-french-order", "request", _with(REQUEST, "consent.date", "20/11/2026"), DecodeError,
     "must be a real date written YYYY-MM-DD"),
    ("date-without-zero", "request", _with(REQUEST, "consent.date", "2026-1-20"), DecodeError, "real date"),
    ("date-month-13", "request", _with(REQUEST, "consent.date", "2026-13-01"), DecodeError, "real date"),
    ("sex-x", "request", request_body(sex="X"), DecodeError, "'sex' must be one of F, M, U"),
    ("sex-in-words", "request", request_body(sex="femme"), DecodeError, "'sex' must be one of"),
    ("family-name-empty", "request", request_body(family_name=""), DecodeError, "'family_name' must not be empty"),
    ("given-names-missing", "request", _with(REQUEST, "patient.given_names"), DecodeError,
     "'given_names' is missing"),
    ("patient-name-over-512", "request", request_body(family_name="X" * 513), LimitError,
     "'family_name' is over 512 bytes"),
    # the requis
    ("requis-empty", "request", {**REQUEST, "requis": {}}, DecodeError, "name a practitioner .rpps. or a specialty"),
    ("requis-name-only", "request", {**REQUEST, "requis": {"name": "Dr Paul Durand"}}, DecodeError,
     "rpps. or a specialty"),
    ("requis-empty-specialty", "request", {**REQUEST, "requis": {"specialty": ""}}, DecodeError,
     "rpps. or a specialty"),
    ("requis-rpps-check-digit", "request", request_body(requis_rpps="10000012344"), DecodeError,
     "RPPS '10000012344': the last digit"),
    ("requis-adeli-for-rpps", "request", request_body(requis_rpps=ADELI), DecodeError, "9 digits is an ADELI"),
    ("requis-not-a-map", "request", {**REQUEST, "requis": "10000012343"}, DecodeError, "'requis' must be a map"),
    # references to the bundle's files
    ("dossier-missing-file", "request", request_body(dossier="absent.pdf"), DecodeError,
     "dossier must name a file of this bundle"),
    ("dossier-not-pdf", "request", request_body(dossier="observation.txt"), DecodeError,
     "dossier must be a application/pdf file"),
    ("dossier-not-text", "request", {**REQUEST, "dossier": 1}, DecodeError, "dossier must name a file"),
    ("thumbnail-of-missing-photo", "request", {**REQUEST, "thumbnails": {"absent.jpg": "dos-vignette.jpg"}},
     DecodeError, "a thumbnail's photo must name a file"),
    ("thumbnail-missing", "request", {**REQUEST, "thumbnails": {"dos.jpg": "absent.jpg"}}, DecodeError,
     "a thumbnail must name a file"),
    ("thumbnail-not-jpeg", "request", {**REQUEST, "thumbnails": {"dos.jpg": "demande.pdf"}}, DecodeError,
     "a thumbnail must be a image/jpeg file"),
    ("thumbnails-not-a-map", "request", {**REQUEST, "thumbnails": ["dos.jpg"]}, DecodeError,
     "thumbnails must be a map"),
    # texts
    ("motif-empty", "request", request_body(motif=""), DecodeError, "'motif' must not be empty"),
    ("motif-over-512", "request", request_body(motif="m" * 513), LimitError, "'motif' is over 512 bytes"),
    ("question-over-256k", "request", request_body(question="é" * (128 * 1024) + "x"), LimitError,
     "'question' is over 262144 bytes"),
    ("question-not-text", "request", {**REQUEST, "question": b"?"}, DecodeError, "'question' must be text"),
    ("urgency-other", "request", {**REQUEST, "urgency": "asap"}, DecodeError, "must be one of routine, urgent"),
    ("refus-reason-empty", "refus", _with(REFUS, "reason", ""), DecodeError, "'reason' must not be empty"),
    ("refus-reason-blank", "refus", _with(REFUS, "reason", " \n\t"), DecodeError, "'reason' must not be empty"),
    ("refus-reason-missing", "refus", _with(REFUS, "reason"), DecodeError, "'reason' is missing"),
    ("avis-empty", "avis", _with(AVIS, "avis", ""), DecodeError, "'avis' must not be empty"),
    ("avis-over-256k", "avis", _with(AVIS, "avis", "a" * (256 * 1024 + 1)), LimitError, "'avis' is over"),
    ("recommendations-missing", "avis", _with(AVIS, "recommendations"), DecodeError, "'recommendations' is missing"),
    ("complement-request-empty", "complement_request",
     answer_body("complement_request", IN_REPLY_TO, text=""), DecodeError, "'missing' must not be empty"),
    ("presentiel-orientation-empty", "presentiel", answer_body("presentiel", IN_REPLY_TO, text=" "), DecodeError,
     "'orientation' must not be empty"),
    ("presentiel-urgency", "presentiel", _with(answer_body("presentiel", IN_REPLY_TO), "urgency", "demain"),
     DecodeError, "'urgency' must be one of"),
    # prescriptions
    ("prescriptions-text", "avis", _with(AVIS, "prescriptions", "Doliprane"), DecodeError,
     "'prescriptions' must be a list"),
    ("prescriptions-map", "avis", _with(AVIS, "prescriptions", {"1": "Doliprane"}), DecodeError, "must be a list"),
    ("prescriptions-missing", "avis", _with(AVIS, "prescriptions"), DecodeError, "must be a list .possibly empty."),
    ("prescriptions-65", "avis", _with(AVIS, "prescriptions", ["x"] * 65), LimitError, "over 64 prescriptions"),
    ("prescription-empty", "avis", _with(AVIS, "prescriptions", ["Doliprane", ""]), DecodeError,
     "prescription 2 must be non-empty"),
    ("prescription-blank", "avis", _with(AVIS, "prescriptions", [" "]), DecodeError, "prescription 1 must be"),
    ("prescription-not-text", "avis", _with(AVIS, "prescriptions", [5]), DecodeError, "prescription 1 must be"),
    ("prescription-over-4k", "avis", _with(AVIS, "prescriptions", ["p" * 4097]), DecodeError, "at most 4 KiB"),
    # in_reply_to
    ("in-reply-to-missing", "avis", answer_body("avis"), DecodeError, "in_reply_to must be a 16-byte envelope id"),
    ("in-reply-to-15", "refus", _with(REFUS, "in_reply_to", bytes(15)), DecodeError, "16-byte envelope id"),
    ("in-reply-to-17", "complement", answer_body("complement", bytes(17)), DecodeError, "16-byte envelope id"),
    ("in-reply-to-hex", "avis", _with(AVIS, "in_reply_to", IN_REPLY_TO.hex()), DecodeError, "16-byte envelope id"),
    ("request-with-in-reply-to", "request", {**REQUEST, "in_reply_to": IN_REPLY_TO}, DecodeError,
     "request body: unknown field 'in_reply_to'"),
    # unknown fields, at the top and inside each map
    ("unknown-top-request", "request", {**REQUEST, "subject": "Avis"}, DecodeError,
     "request body: unknown field 'subject'"),
    ("unknown-top-avis", "avis", {**AVIS, "text": "Bénin."}, DecodeError, "avis body: unknown field 'text'"),
    ("unknown-top-refus", "refus", {**REFUS, "avis": "x"}, DecodeError, "refus body: unknown field 'avis'"),
    ("unknown-in-author", "avis", _with(AVIS, "author.rpps", SENDER), DecodeError,
     r"avis body\.author: unknown field 'rpps'"),
    ("unknown-in-patient", "request", _with(REQUEST, "patient.nir", "x"), DecodeError,
     r"request body\.patient: unknown field 'nir'"),
    ("unknown-in-consent", "request", _with(REQUEST, "consent.witness", "x"), DecodeError,
     r"request body\.consent: unknown field 'witness'"),
    ("unknown-in-requis", "request", _with(REQUEST, "requis.adeli", ADELI), DecodeError,
     r"request body\.requis: unknown field 'adeli'"),
    ("non-text-key-in-patient", "request", _with(REQUEST, "patient", {**REQUEST["patient"], 1: "x"}), DecodeError,
     "'patient' must be a map"),
    # the shape of the body itself
    ("body-a-list", "request", [REQUEST], DecodeError, "request body must be a map"),
    ("body-none", "avis", None, DecodeError, "avis body must be a map"),
    ("kind-reply", "reply", {"in_reply_to": IN_REPLY_TO, "text": "t"}, DecodeError, "unknown bundle kind 'reply'"),
]


@pytest.mark.parametrize(("kind", "body", "error", "match"), [pytest.param(*c[1:], id=c[0]) for c in INVALID])
def test_invalid_body(kind: str, body: object, error: type[DecodeError], match: str) -> None:
    with pytest.raises(error, match=match) as info:
        _check(kind, body)
    if error is DecodeError:
        assert not isinstance(info.value, LimitError), info.value


def test_invalid_table_has_unique_names() -> None:
    names = [c[0] for c in INVALID]
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    "rpps",
    [
        pytest.param("10000005478", id="check-digit"),
        pytest.param("20000005479", id="not-starting-with-1"),
        pytest.param("879101558", id="adeli-instead"),
        pytest.param("", id="empty"),
        pytest.param("Dr Martin", id="a-name"),
    ],
)
@pytest.mark.parametrize("kind", ["request", "avis"])
def test_wrong_sender_rpps(kind: str, rpps: str) -> None:
    body = REQUEST if kind == "request" else AVIS
    with pytest.raises(DecodeError, match=r"author: RPPS") as info:
        _check(kind, body, sender=rpps)
    assert not isinstance(info.value, LimitError)


def test_files_are_those_of_this_bundle() -> None:
    # The same dossier name is fine in a bundle that carries it and refused in one that does not.
    body = request_body(dossier="demande.pdf")
    _check("request", body, files={"demande.pdf": "application/pdf"})
    with pytest.raises(DecodeError, match="dossier must name a file"):
        _check("request", body, files={})


# Regression: a field present with the value nil was once taken for an absent optional
# one (a refus without its reason was accepted; a nil profession crashed the reader).
@pytest.mark.parametrize(
    ("kind", "body"),
    [
        pytest.param("request", request_body(question=None), id="question-nil"),
        pytest.param("request", request_body(motif=None), id="motif-nil"),
        pytest.param("refus", _with(REFUS, "reason", None), id="refus-reason-nil"),
        pytest.param("avis", _with(AVIS, "avis", None), id="avis-nil"),
        pytest.param("request", _with(REQUEST, "consent.date", None), id="consent-date-nil"),
        pytest.param("request", _with(REQUEST, "author.profession", None), id="profession-nil"),
        pytest.param("avis", _with(AVIS, "author.profession", None), id="answer-profession-nil"),
        pytest.param("request", request_body(birth_date=None), id="birth-date-nil-with-ins"),
    ],
)
def test_required_field_set_to_nil(kind: str, body: dict[str, Any]) -> None:
    with pytest.raises(DecodeError):
        _check(kind, body)


# --- fuzz: check_body refuses with our errors, never anything else ----------------------------

FIELD_NAMES: Final = sorted(
    {k for b in (REQUEST, *(answer_body(k, IN_REPLY_TO) for k in ANSWER_KINDS | {"complement"})) for k in b}
    | {k for m in ("author", "patient", "consent", "requis") for k in REQUEST[m]}
    | {"adeli", "name", "specialty", "form", "dossier", "thumbnails", "text", "missing", "reason", "orientation"}
)

_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.sampled_from(["10", "50", "60", "", "F", "U", "oral", "routine", "2025-02-30", "1961-03-12",
                       "261037511200508", "284052A32102552", "879101558", "10000012343", "demande.pdf", "dos.jpg"])
    | st.just(IN_REPLY_TO)
)
_keys = st.sampled_from(FIELD_NAMES) | st.text(max_size=8)
msgpack_values = st.recursive(
    _leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=6), max_leaves=30
)
_kinds = st.sampled_from([*sorted(KINDS), "reply", ""])
_senders = st.sampled_from([SENDER, "10000005478", "", "810000005479"]) | st.text(max_size=12)
_file_maps = st.just(FILES) | st.dictionaries(st.text(max_size=8), st.sampled_from(sorted(set(FILES.values()))))


def _returns_or_refuses(kind: str, body: object, sender: str, files: dict[str, str]) -> None:
    with contextlib.suppress(DecodeError):  # LimitError and the ids module's InvalidIdentifier are DecodeErrors
        check_body(kind, body, sender_rpps=sender, files=files)


@settings(max_examples=400, deadline=None)
@given(_kinds, st.dictionaries(_keys, msgpack_values, max_size=10) | msgpack_values, _senders, _file_maps)
def test_fuzz_any_body_is_refused_with_our_errors(kind: str, body: object, sender: str, files: dict[str, str]) -> None:
    _returns_or_refuses(kind, body, sender, files)


def _paths(value: object, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside nested maps and lists."""
    out = []
    if isinstance(value, dict):
        for k, v in value.items():
            out += [(*prefix, k), *_paths(v, (*prefix, k))]
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += [(*prefix, i), *_paths(v, (*prefix, i))]
    return out


_SAMPLES: Final = [
    ("request", request_body(dossier="demande.pdf") | {"thumbnails": {"dos.jpg": "dos-vignette.jpg"}}),
    ("request", {**request_body(**CORSICA), "author": NURSE}),
    *((k, answer_body(k, IN_REPLY_TO)) for k in sorted(KINDS - {"request"})),
    ("avis", _with(answer_body("avis", IN_REPLY_TO), "prescriptions", ["Doliprane", "Bilan"])),
]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_valid_bodies_changed_in_one_place(data: st.DataObject) -> None:
    """From a valid body, change, add or remove one field anywhere: the deeper checks (NIR,
    dates, ADELI, file references) get arbitrary input too, and still raise only our errors."""
    kind, sample = data.draw(st.sampled_from(_SAMPLES), label="sample")
    body = copy.deepcopy(sample)
    path = data.draw(st.sampled_from(_paths(body)), label="path")
    parent: Any = body
    for step in path[:-1]:
        parent = parent[step]
    action = data.draw(st.sampled_from(["replace", "remove", "add"]), label="action")
    if action == "remove":
        del parent[path[-1]]
    elif action == "add" and isinstance(parent, dict):
        parent[data.draw(_keys, label="key")] = data.draw(msgpack_values, label="value")
    else:
        parent[path[-1]] = data.draw(msgpack_values, label="value")
    kind = data.draw(st.sampled_from([kind, *sorted(KINDS)]), label="kind")
    _returns_or_refuses(kind, body, data.draw(_senders, label="sender"), FILES)
