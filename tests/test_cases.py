"""Whole téléexpertise cases over a real relay on loopback: the request, the demande de
complément and its answer, the avis, the refus, the compte rendu and the billing lines,
with statuses and deadlines computed at injected times (never slept)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import io
import os
import time
from pathlib import Path
from typing import Any

import pypdf
import pytest
from PIL import Image

from client import billing, cases, core, logstate
from client.api import RelayClient, RelayUnreachable
from client.caseform import DOSSIER_NAME, CaseFormError, prepare_request
from client.home import Home
from protocol.keys import DeviceKeys
from relay.storage import Practitioner
from tests.test_client import DERM, GP, Env, env  # noqa: F401 - the relay fixture
from tools.case_samples import answer_body, request_body

DAY = 86400
Side = tuple[Home, DeviceKeys]


def case_data(**change: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "requis": {"rpps": DERM.rpps, "name": DERM.name},
        "patient": {"family_name": "Dupont", "given_names": "Jeanne", "birth_date": "12/03/1961", "sex": "F",
                    "ins": "2 61 03 75 112 005 08"},
        "motif": "Lésion pigmentée du dos",
        "question": "Mélanome à exclure ? QUESTION-MARKER",
        "context": "Phototype II.",
        "consent": {"informed": "oui", "consented": "oui", "method": "oral"},
    }
    data.update(change)
    return data


def gps_photo(path: Path) -> Path:
    """A JPEG as a phone writes it: EXIF with the camera, an orientation and the GPS position."""
    img = Image.new("RGB", (1200, 900), (220, 180, 160))
    for x in range(0, 1200, 7):
        for y in range(0, 900, 50):
            img.putpixel((x, y), (40, 20, 10))
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"
    gps = exif.get_ifd(0x8825)
    gps.update({1: "N", 2: (48.0, 6.0, 42.0), 3: "W", 4: (1.0, 40.0, 30.0)})
    img.save(path, "JPEG", exif=exif)
    return path


async def new_request(gp: Side, files: list[Path] | None = None, **change: Any) -> core.SentEnvelope:
    home, keys = gp
    now = int(time.time())
    today = time.strftime("%Y-%m-%d")
    prepared = prepare_request(home, home.profile(), case_data(**change), files or [],
                               today=dt.date.fromisoformat(today), case_id=os.urandom(16), now=now)
    return await cases.send_request(home, keys, prepared)


@pytest.fixture
async def sides(env: Env) -> tuple[Side, Side]:  # noqa: F811
    return await env.practitioner(GP, "gp"), await env.practitioner(DERM, "derm")


def pdf_text(path: Path) -> str:
    return "\n".join(page.extract_text() for page in pypdf.PdfReader(io.BytesIO(path.read_bytes())).pages)


async def test_request_complement_avis_report_and_billing(env: Env, sides: tuple[Side, Side], tmp_path: Path) -> None:  # noqa: F811
    gp, derm = sides
    sent = await new_request(gp, [gps_photo(tmp_path / "dos.jpg")])
    cid = sent.case_id
    t0 = sent.received_at
    assert t0 is not None

    view = cases.case_view(gp[0], cid, now=t0)
    assert (view.role, view.status, view.deadline) == ("requerant", "sent", t0 + 7 * DAY)

    # The specialist files it: to answer, unread, same deadline; the photo arrives clean.
    synced = await cases.sync(derm[0], derm[1])
    assert [o.case_id for o in synced.new] == [cid]
    dview = cases.case_view(derm[0], cid, now=t0)
    assert (dview.role, dview.status, len(dview.unread), dview.deadline) == ("requis", "to_answer", 1, t0 + 7 * DAY)
    folder = Path(dview.envelopes[0]["folder"]) / "files"
    assert sorted(p.name for p in folder.iterdir()) == sorted([DOSSIER_NAME, "dos.jpg", "dos.thumb.jpg"])
    with Image.open(folder / "dos.jpg") as received:
        assert not received.getexif()
        assert "exif" not in received.info
    assert "QUESTION-MARKER" in pdf_text(folder / DOSSIER_NAME)

    # Not read yet on the GP's side; once the specialist shows it, "read" comes back signed.
    await cases.sync(gp[0], gp[1])
    assert cases.case_view(gp[0], cid, now=t0).status == "delivered"
    await cases.show(derm[0], derm[1], cid, now=t0)
    assert cases.case_view(derm[0], cid, now=t0).unread == []
    await cases.sync(gp[0], gp[1])
    assert cases.case_view(gp[0], cid, now=t0).status == "read"

    # Demande de complément, then the complement: the deadline restarts from the complement.
    await cases.answer(derm[0], derm[1], cid, "complement_request", {"missing": "Photo dermoscopique"}, [],
                       now=t0)
    await cases.sync(gp[0], gp[1])
    gview = cases.case_view(gp[0], cid, now=t0)
    assert (gview.status, gview.deadline, gview.overdue) == ("complement_asked", None, False)
    more, _ = await cases.complement(gp[0], gp[1], cid, "Voici la photo.", [gps_photo(tmp_path / "dermoscopie.jpg")],
                                     now=t0)
    assert more.received_at is not None
    await cases.sync(derm[0], derm[1])
    dview = cases.case_view(derm[0], cid, now=t0)
    assert (dview.status, dview.deadline) == ("to_answer", more.received_at + 7 * DAY)

    # The avis closes the exchange; the GP writes the compte rendu from the signed receipts.
    await cases.answer(derm[0], derm[1], cid, "avis", {
        "avis": "Mélanome probable AVIS-MARKER.", "recommendations": "Photoprotection.",
        "prescriptions": ["Exérèse avec marges de 2 mm", "Anatomopathologie"], "follow_up": "Consultation lundi."},
        [], now=t0)
    await cases.sync(gp[0], gp[1])
    gview = cases.case_view(gp[0], cid, now=t0 + 30 * DAY)
    assert (gview.status, gview.overdue) == ("answered", False)
    assert [e["kind"] for e in gview.envelopes] == ["request", "complement_request", "complement", "avis"]

    report = cases.report(gp[0], cid, now=t0 + DAY)
    text = pdf_text(report)
    for needle in ("DUPONT", "Jeanne", GP.rpps, DERM.rpps, GP.name, DERM.name, "QUESTION-MARKER", "AVIS-MARKER",
                   "Exérèse avec marges de 2 mm", "Anatomopathologie", "261037511200508"):
        assert needle in text, needle
    request_logged = cases._logged_time(gp[0], sent.envelope_id)
    assert request_logged is not None
    assert time.strftime("%d/%m/%Y", time.localtime(request_logged)) in text
    assert cases.case_view(gp[0], cid, now=t0).status == "closed"

    # Billing: an RQD for the GP, a TE2 for the specialist, dated by the avis.
    [gp_act] = cases.acts(gp[0], now=t0)
    [derm_act] = cases.acts(derm[0], now=t0)
    assert (gp_act.role, gp_act.requis_rpps, derm_act.role, derm_act.requerant_rpps) == (
        "requerant", DERM.rpps, "requis", GP.rpps)
    month = (gp_act.act_date.year, gp_act.act_date.month)
    [line] = billing.billing_lines([gp_act], month=month)
    assert (line.code, line.billable) == ("RQD", True)
    [line] = billing.billing_lines([derm_act], month=month)
    assert line.code == "TE2"
    assert line.amount_cents == billing.tariff("TE2", "metropole", derm_act.act_date).amount_cents


async def test_refus_is_recorded_and_not_billed(env: Env, sides: tuple[Side, Side]) -> None:  # noqa: F811
    gp, derm = sides
    sent = await new_request(gp)
    await cases.sync(derm[0], derm[1])
    await cases.answer(derm[0], derm[1], sent.case_id, "refus", {"reason": "Photo floue REFUS-MARKER."}, [],
                       now=int(time.time()))
    await cases.sync(gp[0], gp[1])
    assert cases.case_view(gp[0], sent.case_id, now=int(time.time())).status == "refused"
    assert "REFUS-MARKER" in pdf_text(cases.report(gp[0], sent.case_id, now=int(time.time())))
    assert cases.acts(gp[0], now=int(time.time())) == []
    assert cases.acts(derm[0], now=int(time.time())) == []


async def test_presentiel_is_an_act_and_urgent(env: Env, sides: tuple[Side, Side]) -> None:  # noqa: F811
    gp, derm = sides
    sent = await new_request(gp)
    await cases.sync(derm[0], derm[1])
    await cases.answer(derm[0], derm[1], sent.case_id, "presentiel",
                       {"orientation": "Je la reçois lundi 9 h.", "urgency": "urgent"}, [], now=int(time.time()))
    await cases.sync(gp[0], gp[1])
    assert cases.case_view(gp[0], sent.case_id, now=int(time.time())).status == "oriented"
    assert [a.role for a in cases.acts(gp[0], now=int(time.time()))] == ["requerant"]


async def test_deadline_and_overdue_at_injected_times(env: Env, sides: tuple[Side, Side]) -> None:  # noqa: F811
    gp, derm = sides
    older = await new_request(gp)
    newer = await new_request(gp, urgency="urgent")
    assert older.received_at is not None
    due = older.received_at + 7 * DAY
    on_time = cases.case_view(gp[0], older.case_id, now=due)
    late = cases.case_view(gp[0], older.case_id, now=due + 1)
    assert (on_time.overdue, late.overdue) == (False, True)
    listed = cases.list_cases(gp[0], now=due + 1)
    flags = [v.overdue for v in listed]
    assert flags[0]
    assert flags == sorted(flags, reverse=True)  # overdue ones first
    assert older.case_id in [v.case_id for v in listed if v.overdue]
    assert cases.list_cases(gp[0], now=older.received_at)[0].case_id == newer.case_id  # then urgent
    # The specialist sees the same deadline; an answer stops the clock.
    await cases.sync(derm[0], derm[1])
    assert cases.case_view(derm[0], older.case_id, now=due + 1).overdue
    await cases.answer(derm[0], derm[1], older.case_id, "avis",
                       {"avis": "RAS", "recommendations": "", "prescriptions": [], "follow_up": ""}, [],
                       now=int(time.time()))
    assert not cases.case_view(derm[0], older.case_id, now=due + 100 * DAY).overdue


async def test_answers_out_of_turn_are_refused(env: Env, sides: tuple[Side, Side]) -> None:  # noqa: F811
    gp, derm = sides
    sent = await new_request(gp)
    now = int(time.time())
    avis = {"avis": "RAS", "recommendations": "", "prescriptions": [], "follow_up": ""}
    with pytest.raises(cases.CaseError, match="only the specialist"):
        await cases.answer(gp[0], gp[1], sent.case_id, "avis", avis, [], now=now)
    with pytest.raises(cases.CaseError, match="cannot be sent now"):
        await cases.complement(gp[0], gp[1], sent.case_id, "texte", [], now=now)
    await cases.sync(derm[0], derm[1])
    await cases.answer(derm[0], derm[1], sent.case_id, "avis", avis, [], now=now)
    with pytest.raises(cases.CaseError, match="cannot be sent now"):
        await cases.answer(derm[0], derm[1], sent.case_id, "refus", {"reason": "x"}, [], now=now)
    with pytest.raises(cases.CaseError, match="no case"):
        cases.find_case(gp[0], "ffff")


async def test_out_of_turn_envelope_is_kept_and_reported_as_incident(env: Env, sides: tuple[Side, Side]) -> None:  # noqa: F811
    """A client that ignores the state table (an avis after an avis) is authentic, so it is
    filed, but the case records the anomaly and the compte rendu states it."""
    gp, derm = sides
    sent = await new_request(gp)
    await cases.sync(derm[0], derm[1])
    avis = {"author": {"profession": "10", "specialty": "SM15"}, "avis": "Premier avis", "recommendations": "",
            "prescriptions": [], "follow_up": ""}
    await core.reply(derm[0], derm[1], sent.envelope_id, kind="avis", body=avis, files=[])
    await core.reply(derm[0], derm[1], sent.envelope_id, kind="avis", body={**avis, "avis": "Second avis"}, files=[])
    await cases.sync(gp[0], gp[1])
    view = cases.case_view(gp[0], sent.case_id, now=int(time.time()))
    assert len(view.anomalies) == 1
    assert gp[0].incidents(sent.case_id)
    assert "ne correspond pas" in pdf_text(cases.report(gp[0], sent.case_id, now=int(time.time())))


async def test_request_without_consent_is_refused_and_nothing_leaves(env: Env, sides: tuple[Side, Side]) -> None:  # noqa: F811
    gp, derm = sides
    for consent in ({"informed": "oui", "consented": "non"}, {}, {"informed": "non", "consented": "oui"}):
        with pytest.raises(CaseFormError, match="consent"):
            await new_request(gp, consent=consent)
    assert cases.list_cases(gp[0], now=int(time.time())) == []
    assert list(gp[0].envelopes.glob("*")) == [] if gp[0].envelopes.exists() else True
    assert (await cases.sync(derm[0], derm[1])).new == []  # nothing reached the relay


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"patient": {"family_name": "Dupont", "given_names": "J", "birth_date": "1961-03-12", "sex": "F",
                      "ins": "261037511200583"}}, "should be 08"),
        ({"patient": {"family_name": "Dupont", "given_names": "J", "birth_date": "31/02/1961", "sex": "F"}}, "date"),
        ({"patient": {"family_name": "Dupont", "given_names": "J", "birth_date": "2090-01-01", "sex": "F"}}, "future"),
        ({"patient": {"family_name": "", "given_names": "J", "birth_date": "1961-03-12", "sex": "F"}}, "family name"),
        ({"requis": {"rpps": "10000012344"}}, "check digit"),
        ({"requis": {}}, "requis"),
        ({"question": ""}, "question"),
        ({"urgency": "tomorrow"}, "urgency"),
        ({"patient": "Dupont"}, "section"),
    ],
)
async def test_invalid_request_fields_are_explained(env: Env, sides: tuple[Side, Side], change: dict[str, Any],  # noqa: F811
                                                     fragment: str) -> None:
    gp, _ = sides
    with pytest.raises(CaseFormError) as caught:
        await new_request(gp, **change)
    assert fragment in str(caught.value)
    assert caught.value.message_fr
    assert cases.list_cases(gp[0], now=int(time.time())) == []


async def test_fifth_request_for_a_patient_warns_of_the_yearly_limit(env: Env, sides: tuple[Side, Side]) -> None:  # noqa: F811
    gp, derm = sides
    avis = {"avis": "RAS", "recommendations": "", "prescriptions": [], "follow_up": ""}
    patient = {"family_name": "DUPONT", "given_names": "Jeanne", "birth_date": "1961-03-12", "sex": "F",
               "ins": "261037511200508"}
    for i in range(4):
        assert cases.limit_warning(gp[0], patient, DERM.rpps, now=int(time.time())) is None, i
        sent = await new_request(gp)
        if i < 3:  # the 4th stays pending: it counts too
            await cases.sync(derm[0], derm[1])
            await cases.answer(derm[0], derm[1], sent.case_id, "avis", avis, [], now=int(time.time()))
    warning = cases.limit_warning(gp[0], patient, DERM.rpps, now=int(time.time()))
    assert warning is not None
    assert "5th" in warning.en
    # Past the limit: the act is listed, not billable, and the compte rendu says so.
    await cases.sync(derm[0], derm[1])
    await cases.answer(derm[0], derm[1], sent.case_id, "avis", avis, [], now=int(time.time()))
    fifth = await new_request(gp)
    await cases.sync(derm[0], derm[1])
    await cases.answer(derm[0], derm[1], fifth.case_id, "avis", avis, [], now=int(time.time()))
    await cases.sync(gp[0], gp[1])
    assert "non facturable" not in pdf_text(cases.report(gp[0], sent.case_id, now=int(time.time())))
    assert "limite de 4 actes" in pdf_text(cases.report(gp[0], fifth.case_id, now=int(time.time())))
    assert cases.limit_warning(gp[0], {**patient, "ins": "255081416802538"}, DERM.rpps, now=int(time.time())) is None


# -- attacks on a case's conversation ---------------------------------------------------------------

MALLORY = Practitioner(rpps="10000020007", name="Dr Mallory Intruse", profession="médecin", specialty="SM54")
NURSE = Practitioner(rpps="10000030006", name="Inf. Paul Petit", profession="infirmier", specialty="")


async def _inject(intruder: Side, into_case: str, kind: str, body: dict[str, Any], to: str) -> None:
    """An enrolled practitioner who learnt a case id sends into it, answering one of their own envelopes."""
    earlier = await core.send(intruder[0], intruder[1], to=[to], kind="request", body=request_body(requis_rpps=to),
                              files=[])
    await core.send(intruder[0], intruder[1], to=[to], kind=kind,
                    body={**body, "in_reply_to": bytes.fromhex(earlier.envelope_id)}, files=[],
                    case_id=bytes.fromhex(into_case))


async def test_third_party_complement_request_cannot_draw_the_patients_data(
    env: Env, sides: tuple[Side, Side],  # noqa: F811
) -> None:
    gp, _derm = sides
    mallory = await env.practitioner(MALLORY, "mallory")
    sent = await new_request(gp)
    await _inject(mallory, sent.case_id, "complement_request",
                  {"author": {"profession": "10", "specialty": "SM54"}, "missing": "Envoyez-moi tout"}, GP.rpps)
    await cases.sync(gp[0], gp[1])
    view = cases.case_view(gp[0], sent.case_id, now=int(time.time()))
    assert view.status != "complement_asked"
    assert any(MALLORY.rpps in a for a in view.anomalies)
    assert [e["peer_rpps"] for e in view.foreign] == [MALLORY.rpps]
    with pytest.raises(cases.CaseError, match="cannot be sent now"):
        await cases.complement(gp[0], gp[1], sent.case_id, "données du patient", [], now=int(time.time()))


async def test_third_party_avis_is_neither_reported_nor_billed(env: Env, sides: tuple[Side, Side]) -> None:  # noqa: F811
    gp, derm = sides
    mallory = await env.practitioner(MALLORY, "mallory")
    sent = await new_request(gp)
    await _inject(mallory, sent.case_id, "avis", answer_body("avis", text="FAKE-AVIS"), GP.rpps)
    await cases.sync(gp[0], gp[1])
    assert cases.case_view(gp[0], sent.case_id, now=int(time.time())).status != "answered"
    assert cases.acts(gp[0], now=int(time.time())) == []
    await cases.sync(derm[0], derm[1])
    await cases.answer(derm[0], derm[1], sent.case_id, "avis", {"avis": "REAL-AVIS", "recommendations": "",
                       "prescriptions": [], "follow_up": ""}, [], now=int(time.time()))
    await cases.sync(gp[0], gp[1])
    view = cases.case_view(gp[0], sent.case_id, now=int(time.time()))
    assert view.status == "answered"
    text = pdf_text(cases.report(gp[0], sent.case_id, now=int(time.time())))
    assert "REAL-AVIS" in text
    assert "FAKE-AVIS" not in text
    assert [a.requis_rpps for a in cases.acts(gp[0], now=int(time.time()))] == [DERM.rpps]


async def test_sender_display_name_comes_from_the_directory(env: Env, sides: tuple[Side, Side]) -> None:  # noqa: F811
    gp, _derm = sides
    mallory = await env.practitioner(MALLORY, "mallory")
    mallory[0].save_profile(dataclasses.replace(mallory[0].profile(), name=DERM.name + "\x1b[2J"))
    await core.send(mallory[0], mallory[1], to=[GP.rpps], kind="request", body=request_body(requis_rpps=GP.rpps),
                    files=[])
    [opened] = (await cases.sync(gp[0], gp[1])).new
    assert opened.sender_name == MALLORY.name
    assert {row["peer_name"] for row in gp[0].history()} == {MALLORY.name}


async def test_profession_claimed_against_the_directory_is_refused(env: Env, sides: tuple[Side, Side]) -> None:  # noqa: F811
    """A nurse's modified client signs an avis claiming to be a médecin: refused, set aside, and
    never downloaded again (so it cannot fill the disk by coming back at every sync)."""
    gp, _derm = sides
    nurse = await env.practitioner(NURSE, "nurse")
    nurse[0].save_profile(dataclasses.replace(nurse[0].profile(), profession="médecin"))
    await core.send(nurse[0], nurse[1], to=[GP.rpps], kind="request", body=request_body(requis_rpps=GP.rpps),
                    files=[])
    first = await cases.sync(gp[0], gp[1])
    [(eid, error)] = first.refused
    assert error.code == "bad_bundle"
    assert "profession" in str(error)
    assert gp[0].history() == []
    assert eid in gp[0].rejected()
    again = await cases.sync(gp[0], gp[1])
    assert (again.new, again.refused) == ([], [])


async def test_answer_naming_an_unknown_envelope_is_still_filed(env: Env, sides: tuple[Side, Side]) -> None:  # noqa: F811
    """Acknowledged means filed: an answer whose in_reply_to this device may not query (the
    relay answers 404 for its receipts) is kept, not lost after its delivery receipt."""
    gp, derm = sides
    sent = await new_request(gp)
    await cases.sync(derm[0], derm[1])
    await core.send(derm[0], derm[1], to=[GP.rpps], kind="avis",
                    body={**answer_body("avis", text="orphan"), "in_reply_to": os.urandom(16)}, files=[],
                    case_id=bytes.fromhex(sent.case_id))
    result = await cases.sync(gp[0], gp[1])
    assert [o.kind for o in result.new] == ["avis"]
    assert any(r["kind"] == "avis" for r in gp[0].history())


async def test_answered_statement_lost_to_the_network_is_sent_at_next_sync(
    env: Env, sides: tuple[Side, Side],  # noqa: F811
) -> None:
    gp, derm = sides
    sent = await new_request(gp)
    await cases.sync(derm[0], derm[1])
    original = cases.case_view(derm[0], sent.case_id, now=int(time.time())).envelopes[0]["id"]

    class Offline(RelayClient):
        async def answered(self, *args: Any, **kw: Any) -> dict[str, Any]:
            raise RelayUnreachable("connection lost")

    profile = derm[0].profile()
    async with Offline(profile.relay, derm[1]) as flaky:
        answer = await core.reply(derm[0], derm[1], original, kind="avis", body=answer_body("avis"), files=[],
                                  relay=flaky)
    assert answer.statement_pending
    assert derm[0].pending_statements() == [(original, answer.envelope_id)]
    await cases.sync(derm[0], derm[1])
    assert derm[0].pending_statements() == []
    assert "answered" in {x["type"] for x in logstate.receipts_of(derm[0], original)}


async def test_a_nurse_asks_and_completes_with_her_adeli(env: Env, sides: tuple[Side, Side]) -> None:  # noqa: F811
    _gp, derm = sides
    nurse = await env.practitioner(NURSE, "nurse")
    with pytest.raises(CaseFormError, match="ADELI"):
        await new_request(nurse)
    sent = await new_request(nurse, requerant={"adeli": "879101558"})
    assert nurse[0].profile().adeli == "879101558"  # remembered for what follows
    await cases.sync(derm[0], derm[1])
    await cases.answer(derm[0], derm[1], sent.case_id, "complement_request", {"missing": "Une photo"}, [],
                       now=int(time.time()))
    await cases.sync(nurse[0], nurse[1])
    await cases.complement(nurse[0], nurse[1], sent.case_id, "Voici.", [], now=int(time.time()))
    await cases.sync(derm[0], derm[1])
    view = cases.case_view(derm[0], sent.case_id, now=int(time.time()))
    assert view.status == "to_answer"
    assert view.envelopes[-1]["body"]["author"] == {"profession": "60", "specialty": "", "adeli": "879101558"}


def test_limit_counts_a_patient_with_and_without_ins_once() -> None:
    views = [cases.CaseView(case_id=str(i), role="requerant", state=None, status="sent",
                            patient={"family_name": "DUPONT", "given_names": "Jeanne", "birth_date": "1961-03-12",
                                     **({"ins": "261037511200508"} if i % 2 else {})},
                            counterpart={}, motif="", urgency="routine", opened_at=0, last_at=0, deadline=None,
                            overdue=False, unread=[], closed_at=None) for i in range(4)]
    key = cases._patient_keyer(views)
    assert {key(v.patient) for v in views} == {"261037511200508"}


async def test_two_answers_at_once_only_one_leaves(env: Env, sides: tuple[Side, Side]) -> None:  # noqa: F811
    """An avis and a refus typed in two terminals at the same moment: one is sent, the other
    sees the case answered and is refused (no crossing answers, no stray exception)."""
    gp, derm = sides
    sent = await new_request(gp)
    await cases.sync(derm[0], derm[1])
    now = int(time.time())
    results = await asyncio.gather(
        cases.answer(derm[0], derm[1], sent.case_id, "avis", {"avis": "A", "recommendations": "",
                     "prescriptions": [], "follow_up": ""}, [], now=now),
        cases.answer(derm[0], derm[1], sent.case_id, "refus", {"reason": "R"}, [], now=now),
        return_exceptions=True,
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1
    assert isinstance(errors[0], cases.CaseError)
    await cases.sync(gp[0], gp[1])
    view = cases.case_view(gp[0], sent.case_id, now=now)
    assert view.anomalies == []
    assert view.status in ("answered", "refused")


async def test_empty_complement_is_refused(env: Env, sides: tuple[Side, Side]) -> None:  # noqa: F811
    gp, derm = sides
    sent = await new_request(gp)
    await cases.sync(derm[0], derm[1])
    await cases.answer(derm[0], derm[1], sent.case_id, "complement_request", {"missing": "?"}, [],
                       now=int(time.time()))
    await cases.sync(gp[0], gp[1])
    with pytest.raises(cases.CaseError, match="text or files"):
        await cases.complement(gp[0], gp[1], sent.case_id, "  ", [], now=int(time.time()))


class LostReply(RelayClient):
    """The relay stores the upload, then the connection drops before its answer arrives."""

    async def upload(self, *args: Any, **kw: Any) -> dict[str, Any]:
        await super().upload(*args, **kw)
        raise RelayUnreachable("connection lost")


async def test_a_send_whose_answer_is_lost_is_resumed_not_repeated(env: Env, sides: tuple[Side, Side]) -> None:  # noqa: F811
    gp, derm = sides
    now = int(time.time())
    prepared = prepare_request(gp[0], gp[0].profile(), case_data(), [], today=dt.datetime.now(cases.PARIS).date(),
                               case_id=os.urandom(16), now=now)
    async with LostReply(gp[0].profile().relay, gp[1]) as flaky:
        with pytest.raises(RelayUnreachable):
            await cases.send_request(gp[0], gp[1], prepared, relay=flaky)
    cid = prepared.case_id.hex()
    view = cases.case_view(gp[0], cid, now=now)
    assert view.status == "queued"
    assert (gp[0].cases / cid).is_dir()  # the prepared files stay with the case
    await cases.sync(derm[0], derm[1])
    with pytest.raises(RelayUnreachable):  # the specialist's avis meets the same fate
        async with LostReply(derm[0].profile().relay, derm[1]) as flaky:
            await cases.answer(derm[0], derm[1], cid, "avis", {"avis": "Once", "recommendations": "",
                               "prescriptions": [], "follow_up": ""}, [], now=now, relay=flaky)
    with pytest.raises(cases.CaseError, match="cannot be sent now"):  # a retry would send it twice
        await cases.answer(derm[0], derm[1], cid, "avis", {"avis": "Twice", "recommendations": "",
                           "prescriptions": [], "follow_up": ""}, [], now=now)
    resumed = await cases.sync(derm[0], derm[1])
    assert len(resumed.resumed) == 1
    assert derm[0].pending_statements() == []
    gp_sync = await cases.sync(gp[0], gp[1])
    assert len(gp_sync.resumed) == 1
    view = cases.case_view(gp[0], cid, now=now)
    assert [e["kind"] for e in view.envelopes] == ["request", "avis"]
    assert view.envelopes[1]["body"]["avis"] == "Once"
    assert view.anomalies == []
    request_receipts = {x["type"] for x in logstate.receipts_of(gp[0], view.envelopes[0]["id"])}
    assert {"submitted", "delivered", "answered"} <= request_receipts
