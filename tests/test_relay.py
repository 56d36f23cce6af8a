"""The relay end to end: enrolment, directory, upload, mailbox, download, acknowledgement,
deletion and expiry, on a real relay with a real SQLite file and real blobs on disk."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
import struct
import time
from pathlib import Path

import pytest
from conftest import CARDIO, DERM, GP, PRACTITIONERS, Device, Relay, assert_problem, make_envelope, sign_headers

from client import core
from client.api import RelayClient
from protocol.envelope import split_prefix
from protocol.errors import PliError
from protocol.keys import DeviceKeys, DevicePublic
from protocol.logentry import EntryType, LogEntry
from protocol.note import TlogProof, Verifier
from relay import blobs as relay_blobs
from relay.app import UPLOAD_LOCKS
from relay.routes import ENVELOPE_TYPE, _upload_lock, purge_once
from tools.case_samples import answer_body, request_body

PATIENT = "Mme Germaine Quasimodo-Zyxwvut, née le 03/07/1937"
SUBJECT = "Lésion pigmentée du dos, avis dermatologique"
QUESTION = "Lésion évolutive depuis 3 mois, ABCDE positif : exérèse urgente ? (marqueur-question-7f3a)"
ANSWER = "Aspect de mélanome à confirmer : exérèse dans les 15 jours (marqueur-réponse-91c2)"
NIR = "237077511200584"  # the patient's INS matricule: a woman born in July 1937
REQUEST = request_body(
    requis_rpps=DERM, motif=SUBJECT, question=QUESTION,
    family_name="Quasimodo-Zyxwvut", given_names="Germaine", birth_date="1937-07-03", ins=NIR,
)
PHOTO_MARKER = b"PHOTO-PLAINTEXT-MARKER-5e1b9c0d"


def _photo(path: Path) -> bytes:
    data = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + PHOTO_MARKER + os.urandom(20_000) + PHOTO_MARKER + b"\xff\xd9"
    path.write_bytes(data)
    return data


def _markers() -> list[bytes]:
    out = [PHOTO_MARKER]
    for text in (PATIENT, SUBJECT, QUESTION, ANSWER, NIR):
        out.append(text.encode("utf-8"))
        out.append(text.encode("utf-16-le"))
    out += [b"Quasimodo-Zyxwvut", b"marqueur-question-7f3a", "marqueur-réponse-91c2".encode()]
    return out


def assert_no_plaintext(data_dir: Path) -> int:
    """Scan every file the relay wrote (database, WAL, blobs) for the flows' plaintext."""
    scanned = 0
    for path in data_dir.rglob("*"):
        if not path.is_file():
            continue
        content = path.read_bytes()
        scanned += len(content)
        for marker in _markers():
            assert marker not in content, f"{marker!r} found in {path}"
    return scanned


def _status(r: Relay, eid: bytes) -> list[tuple[str, int, int]]:
    return r.query("SELECT state, received, size FROM envelopes WHERE id = ?", (eid,))


# -- enrolment and directory ---------------------------------------------------------------


async def test_enroll_then_directory_lists_verifiable_record(relay: Relay) -> None:
    keys_gp = (await relay.enroll(GP)).keys
    derm = await relay.enroll(DERM)

    r = await relay.get(keys_gp, f"/v1/directory/{DERM}")
    assert r.status == 200
    assert r.content_type == "application/json"
    doc = r.json()
    name, profession, specialty = PRACTITIONERS[DERM]
    assert (doc["rpps"], doc["name"], doc["profession"], doc["specialty"]) == (DERM, name, profession, specialty)
    assert len(doc["devices"]) == 1
    entry = doc["devices"][0]
    record = {k: base64.b64decode(entry[k], validate=True) for k in ("sign_key", "cert", "sig")}
    pub = DevicePublic.from_record(record)  # verifies the certificate's signature
    mine = derm.keys.public()
    assert pub.device_id.hex() == entry["device_id"] == derm.hex
    assert (pub.sign_key, pub.enc_key) == (mine.sign_key, mine.enc_key)
    assert entry["fingerprint"] == mine.fingerprint
    assert len(entry["fingerprint"].split(" ")) == 6

    r = await relay.get(keys_gp, f"/v1/devices/{derm.hex}")
    assert r.status == 200
    info = r.json()
    assert info["device_id"] == derm.hex
    assert info["rpps"] == DERM
    assert info["name"] == name
    assert info["revoked"] is False
    assert info["fingerprint"] == mine.fingerprint
    assert DevicePublic.from_record({k: base64.b64decode(info[k]) for k in ("sign_key", "cert", "sig")}) == pub

    # A practitioner nobody invited, and a device nobody enrolled.
    assert_problem(await relay.get(keys_gp, f"/v1/directory/{CARDIO}"), 404, "not_found")
    assert_problem(await relay.get(keys_gp, f"/v1/devices/{os.urandom(16).hex()}"), 404, "not_found")


async def test_enroll_answer_names_the_practitioner(relay: Relay) -> None:
    keys = DeviceKeys.generate(now=relay.clock())
    code = await relay.invite(CARDIO)
    # The code is matched case-insensitively, ignoring dashes and spaces.
    typed = " ".join(code.lower().split("-"))
    async with RelayClient(relay.url) as client:
        answer = await client.enroll(typed, keys.public().to_record())
    name, profession, specialty = PRACTITIONERS[CARDIO]
    receipt = answer.pop("receipt")
    vkey, origin = answer.pop("log_vkey"), answer.pop("log_origin")
    assert answer == {
        "device_id": keys.device_id.hex(),
        "rpps": CARDIO,
        "name": name,
        "profession": profession,
        "specialty": specialty,
    }
    # The enrolment is a log leaf naming the device, its RPPS and its record's hash.
    entry = LogEntry.from_bytes(base64.b64decode(receipt["leaf"]))
    assert entry.type == EntryType.DEVICE_ENROLLED
    assert (entry.device_id, entry.rpps) == (keys.device_id, CARDIO)
    assert entry.record_hash == hashlib.sha256(keys.public().to_bytes()).digest()
    TlogProof.from_text(receipt["proof"]).verify(entry.leaf_hash, Verifier.from_vkey(vkey), origin=origin)
    rows = relay.query("SELECT rpps, revoked FROM devices WHERE device_id = ?", (keys.device_id,))
    assert rows == [(CARDIO, None)]
    assert relay.query("SELECT device_id FROM invitations WHERE used_at IS NOT NULL") == [(keys.device_id,)]


async def test_revoked_device_leaves_directory(relay: Relay) -> None:
    gp = await relay.enroll(GP)
    a = await relay.enroll(DERM)
    b = await relay.enroll(DERM)
    r = await relay.get(gp.keys, f"/v1/directory/{DERM}")
    assert {d["device_id"] for d in r.json()["devices"]} == {a.hex, b.hex}
    assert await relay.storage.revoke_device(a.device_id, now=relay.clock())
    r = await relay.get(gp.keys, f"/v1/directory/{DERM}")
    assert [d["device_id"] for d in r.json()["devices"]] == [b.hex]
    r = await relay.get(gp.keys, f"/v1/devices/{a.hex}")
    assert r.status == 200
    assert r.json()["revoked"] is True


# -- the whole flow through the client library --------------------------------------------


async def test_full_flow_send_inbox_open_ack_reply(relay: Relay, tmp_path: Path) -> None:
    gp = await relay.enroll(GP, with_home=True)
    derm = await relay.enroll(DERM, with_home=True)
    assert gp.home is not None
    assert derm.home is not None
    photo = tmp_path / "lesion-dos.jpg"
    photo_bytes = _photo(photo)
    letter = tmp_path / "courrier.txt"
    letter.write_text(f"Patient : {PATIENT}\n{QUESTION}\n", encoding="utf-8")

    sent = await core.send(
        gp.home, gp.keys, to=[DERM], kind="request",
        body=REQUEST, files=[photo, letter],
    )
    eid = bytes.fromhex(sent.envelope_id)
    assert sent.received_at == relay.clock()
    assert sent.first_contacts == [DERM]
    blob = relay.stored_blob(eid)
    assert blob is not None
    assert relay.incoming_files() == []
    # What the relay holds is byte for byte what the sender archived.
    archived = (gp.home.envelopes / f"{sent.envelope_id}.prefix").read_bytes() + (
        gp.home.envelopes / f"{sent.envelope_id}.age"
    ).read_bytes()
    assert blob == archived
    assert _status(relay, eid) == [("stored", sent.size, sent.size)]
    # The scan covered the ciphertext: in the SQLite file or the blob folder (on PostgreSQL, a
    # small envelope is in the database, not under relay.data).
    assert assert_no_plaintext(relay.data) > (sent.size if relay.cfg.database == "sqlite" else 0)

    entries = await core.inbox(derm.home, derm.keys)
    assert [(e["id"], e["from"], e["from_rpps"], e["size"]) for e in entries] == [
        (sent.envelope_id, gp.hex, GP, sent.size)
    ]
    assert entries[0]["received_at"] == relay.clock()
    signed_header, _ = split_prefix(archived) or (None, 0)
    assert signed_header is not None
    assert base64.b64decode(entries[0]["envelope_hash"]) == hashlib.sha256(signed_header.raw).digest()

    opened = await core.open_envelope(derm.home, derm.keys, sent.envelope_id, acknowledge=False)
    assert opened.kind == "request"
    assert opened.sender_rpps == GP
    assert opened.body == REQUEST
    assert opened.sender_fingerprint == gp.keys.public().fingerprint
    assert (Path(opened.folder) / "files" / "lesion-dos.jpg").read_bytes() == photo_bytes
    assert [f["name"] for f in opened.files] == ["lesion-dos.jpg", "courrier.txt"]
    # Opened but not acknowledged: still stored, still listed, still no plaintext on the relay.
    assert relay.stored_blob(eid) is not None
    assert len(await core.inbox(derm.home, derm.keys)) == 1
    assert_no_plaintext(relay.data)

    async with RelayClient(relay.url, derm.keys) as client:
        answer = await client.ack(eid)
        delivered = answer.pop("receipt")
        assert answer == {"id": sent.envelope_id, "acknowledged": True, "deleted": True}
        assert delivered["type"] == "delivered"
        assert await client.inbox() == []
        again = await client.ack(eid)  # acknowledging twice is harmless, and logs nothing new
        assert again.pop("receipt") == delivered
        assert again == {"id": sent.envelope_id, "acknowledged": True, "deleted": False}
    assert relay.stored_blob(eid) is None
    assert relay.blob_files() == []
    assert _status(relay, eid)[0][0] == "deleted"
    assert_problem(await relay.get(derm.keys, f"/v1/envelopes/{eid.hex()}"), 404, "not_found")
    assert_problem(await relay.get(gp.keys, f"/v1/envelopes/{eid.hex()}"), 404, "not_found")

    # The answer goes back the same way, and is deleted once the GP acknowledges it.
    rep = await core.reply(derm.home, derm.keys, sent.envelope_id, kind="avis", body=answer_body("avis", text=ANSWER),
                           files=[])
    assert rep.case_id == sent.case_id
    rid = bytes.fromhex(rep.envelope_id)
    assert relay.stored_blob(rid) is not None
    assert_no_plaintext(relay.data)
    got = await core.open_envelope(gp.home, gp.keys, rep.envelope_id)
    assert got.kind == "avis"
    assert got.body == {**answer_body("avis", text=ANSWER), "in_reply_to": sent.envelope_id}
    assert got.case_id == sent.case_id
    assert relay.stored_blob(rid) is None
    assert relay.blob_files() == []
    assert_no_plaintext(relay.data)


async def test_not_deleted_until_every_recipient_device_acknowledges(relay: Relay, tmp_path: Path) -> None:
    gp = await relay.enroll(GP, with_home=True)
    derm_laptop = await relay.enroll(DERM, with_home=True)
    derm_office = await relay.enroll(DERM, with_home=True)
    assert gp.home is not None
    assert derm_laptop.home is not None
    assert derm_office.home is not None
    photo = tmp_path / "photo.jpg"
    photo_bytes = _photo(photo)
    sent = await core.send(
        gp.home, gp.keys, to=[DERM], kind="request",
        body=REQUEST, files=[photo],
    )
    eid = bytes.fromhex(sent.envelope_id)
    recipients = relay.query("SELECT device_id FROM deliveries WHERE envelope_id = ?", (eid,))
    assert {r[0] for r in recipients} == {derm_laptop.device_id, derm_office.device_id}

    await core.open_envelope(derm_laptop.home, derm_laptop.keys, sent.envelope_id)  # acknowledges
    assert relay.stored_blob(eid) is not None
    assert _status(relay, eid)[0][0] == "stored"
    assert await core.inbox(derm_laptop.home, derm_laptop.keys) == []
    assert [e["id"] for e in await core.inbox(derm_office.home, derm_office.keys)] == [sent.envelope_id]
    await purge_once(relay.app)  # acknowledged by one device of two: nothing to purge
    assert relay.stored_blob(eid) is not None

    opened = await core.open_envelope(derm_office.home, derm_office.keys, sent.envelope_id, acknowledge=False)
    assert (Path(opened.folder) / "files" / "photo.jpg").read_bytes() == photo_bytes
    r = await relay.ack(derm_office.keys, eid)
    assert r.status == 200
    assert {k: v for k, v in r.json().items() if k != "receipt"} == {
        "id": eid.hex(), "acknowledged": True, "deleted": True,
    }
    assert r.json()["receipt"]["type"] == "delivered"
    assert relay.stored_blob(eid) is None
    assert relay.blob_files() == []


async def test_ack_retention_keeps_blob_until_purge(relay_factory) -> None:
    relay = await relay_factory(ack_retention=600)
    gp = await relay.enroll(GP)
    derm = await relay.enroll(DERM)
    ct = os.urandom(3000)
    eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=relay.clock())
    assert (await relay.put(gp.keys, eid, prefix + ct)).status == 201
    r = await relay.ack(derm.keys, eid)
    assert r.json()["deleted"] is False
    relay.clock.advance(599)
    await purge_once(relay.app)
    assert relay.stored_blob(eid) is not None
    relay.clock.advance(1)
    await purge_once(relay.app)
    assert relay.stored_blob(eid) is None
    assert _status(relay, eid)[0][0] == "deleted"


# -- expiry --------------------------------------------------------------------------------


async def test_expired_envelope_is_hidden_then_purged(relay: Relay) -> None:
    gp = await relay.enroll(GP)
    derm = await relay.enroll(DERM)
    ct = os.urandom(5000)
    now = relay.clock()
    eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=now, expires=now + 3600)
    assert (await relay.put(gp.keys, eid, prefix + ct)).status == 201

    relay.clock.advance(3599)
    await purge_once(relay.app)
    assert relay.stored_blob(eid) is not None
    assert [e["id"] for e in (await relay.get(derm.keys, "/v1/inbox")).json()["envelopes"]] == [eid.hex()]

    relay.clock.advance(1)  # now == expires
    assert (await relay.get(derm.keys, "/v1/inbox")).json() == {"envelopes": []}
    assert_problem(await relay.get(derm.keys, f"/v1/envelopes/{eid.hex()}"), 404, "not_found")
    assert relay.stored_blob(eid) is not None  # hidden; the purge deletes it
    await purge_once(relay.app)
    assert relay.stored_blob(eid) is None
    assert relay.blob_files() == []
    assert _status(relay, eid)[0][0] == "deleted"


async def test_abandoned_upload_is_purged_after_a_week(relay: Relay) -> None:
    gp = await relay.enroll(GP)
    derm = await relay.enroll(DERM)
    ct = os.urandom(5000)
    now = relay.clock()
    eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=now, expires=now + 30 * 86400)
    assert (await relay.put(gp.keys, eid, prefix + ct[:1000])).status == 200
    assert len(relay.incoming_files()) == 1
    relay.clock.advance(7 * 86400 - 1)
    await purge_once(relay.app)
    assert len(relay.incoming_files()) == 1
    relay.clock.advance(1)
    await purge_once(relay.app)
    assert relay.incoming_files() == []
    assert _status(relay, eid)[0][0] == "deleted"


async def test_old_nonces_are_purged(relay: Relay) -> None:
    gp = await relay.enroll(GP)
    assert (await relay.get(gp.keys, "/v1/inbox")).status == 200
    assert relay.query("SELECT COUNT(*) FROM nonces")[0][0] == 1
    relay.clock.advance(relay.cfg.max_skew)
    await purge_once(relay.app)
    assert relay.query("SELECT COUNT(*) FROM nonces")[0][0] == 1  # still inside the replay window
    relay.clock.advance(1)
    await purge_once(relay.app)
    assert relay.query("SELECT COUNT(*) FROM nonces")[0][0] == 0


# -- upload ----------------------------------------------------------------------------------


async def test_put_is_idempotent_and_conflicts_on_other_content(relay: Relay) -> None:
    gp = await relay.enroll(GP)
    derm = await relay.enroll(DERM)
    cardio = await relay.enroll(CARDIO)
    ct = os.urandom(4000)
    now = relay.clock()
    eid, prefix = make_envelope(gp.keys, [derm.device_id, cardio.device_id], ct, now=now)

    first = await relay.put(gp.keys, eid, prefix + ct)
    assert first.status == 201
    state = first.json()
    signed_header, _ = split_prefix(prefix) or (None, 0)
    assert signed_header is not None
    receipt = state.pop("receipt")
    assert state == {
        "id": eid.hex(), "complete": True, "offset": len(ct), "size": len(ct),
        "envelope_hash": base64.b64encode(hashlib.sha256(signed_header.raw).digest()).decode(),
        "received_at": now,
    }
    submitted = LogEntry.from_bytes(base64.b64decode(receipt["leaf"]))
    assert (submitted.type, submitted.envelope_id) == (EntryType.SUBMITTED, eid)
    assert submitted.envelope_hash == hashlib.sha256(signed_header.raw).digest()
    state["receipt"] = receipt
    relay.clock.advance(5)
    second = await relay.put(gp.keys, eid, prefix + ct)
    assert second.status == 200  # a retry: the current state, unchanged
    assert second.json() == state
    assert relay.envelope_count() == 1
    assert relay.query("SELECT COUNT(*) FROM deliveries")[0][0] == 2

    # Same id, other content: refused, and the stored envelope is untouched.
    other = os.urandom(4000)
    _, other_prefix = make_envelope(gp.keys, [derm.device_id], other, now=relay.clock(), envelope_id=eid)
    assert_problem(await relay.put(gp.keys, eid, other_prefix + other), 409, "envelope_conflict")
    # Same id taken by another device's envelope.
    _, cardio_prefix = make_envelope(cardio.keys, [derm.device_id], ct, now=relay.clock(), envelope_id=eid)
    assert_problem(await relay.put(cardio.keys, eid, cardio_prefix + ct), 409, "envelope_conflict")
    assert relay.envelope_count() == 1
    assert relay.stored_blob(eid) == prefix + ct
    assert relay.incoming_files() == []


async def test_chunked_resumable_upload(relay: Relay) -> None:
    gp = await relay.enroll(GP)
    derm = await relay.enroll(DERM)
    ct = os.urandom(10_000)
    now = relay.clock()
    eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=now)

    r = await relay.put(gp.keys, eid, prefix + ct[:4000])
    assert r.status == 200
    st = r.json()
    assert (st["complete"], st["offset"], st["size"], st["received_at"]) == (False, 4000, 10_000, None)
    assert (await relay.get(gp.keys, f"/v1/envelopes/{eid.hex()}/status")).json() == st
    # Recipients see nothing of an incomplete upload.
    assert (await relay.get(derm.keys, "/v1/inbox")).json() == {"envelopes": []}
    assert_problem(await relay.get(derm.keys, f"/v1/envelopes/{eid.hex()}"), 404, "not_found")
    assert_problem(await relay.get(gp.keys, f"/v1/envelopes/{eid.hex()}"), 404, "not_found")
    assert_problem(await relay.ack(derm.keys, eid), 404, "not_found")

    for wrong in (0, 3999, 4001, 10_000):
        doc = assert_problem(await relay.patch(gp.keys, eid, wrong, ct[wrong:wrong + 100]), 409, "offset_mismatch")
        assert doc["offset"] == 4000
    assert _status(relay, eid) == [("uploading", 4000, 10_000)]

    r = await relay.patch(gp.keys, eid, 4000, ct[4000:7000])
    assert r.status == 200
    assert (r.json()["complete"], r.json()["offset"]) == (False, 7000)

    # A PUT retry that sends less than the relay holds does not move it back.
    r = await relay.put(gp.keys, eid, prefix + ct[:5000])
    assert r.status == 200
    assert r.json()["offset"] == 7000
    # A PUT retry that sends more continues where the relay stopped.
    r = await relay.put(gp.keys, eid, prefix + ct[:8000])
    assert r.status == 200
    assert r.json()["offset"] == 8000

    relay.clock.advance(10)
    r = await relay.patch(gp.keys, eid, 8000, ct[8000:])
    assert r.status == 201
    st = r.json()
    assert (st["complete"], st["offset"], st["received_at"]) == (True, 10_000, now + 10)
    assert relay.incoming_files() == []
    assert relay.stored_blob(eid) == prefix + ct
    r = await relay.get(derm.keys, f"/v1/envelopes/{eid.hex()}")
    assert r.status == 200
    assert r.content_type == ENVELOPE_TYPE
    assert r.body == prefix + ct
    # PATCH after completion answers the state and changes nothing.
    r = await relay.patch(gp.keys, eid, 10_000, b"")
    assert r.status == 200
    assert r.json() == st


async def _big_envelope(relay: Relay, tmp_path: Path, size: int) -> tuple[Device, bytes, bytes, bytes, Path]:
    """A GP's envelope of ``size`` random ciphertext bytes to a dermatologist, its
    ciphertext in a file as the client keeps it: sender, id, prefix, ciphertext, file."""
    gp = await relay.enroll(GP)
    derm = await relay.enroll(DERM)
    ct = os.urandom(size)
    path = tmp_path / "ct.age"
    path.write_bytes(ct)
    eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=relay.clock())
    return gp, eid, prefix, ct, path


async def test_client_upload_in_several_requests(relay: Relay, tmp_path: Path) -> None:
    # Over the client's 4 MiB request size, so it PUTs then PATCHes.
    gp, eid, prefix, ct, path = await _big_envelope(relay, tmp_path, 9 << 20)
    seen: list[int] = []
    async with RelayClient(relay.url, gp.keys) as client:
        state = await client.upload(eid, prefix, path, progress=lambda done, _total: seen.append(done))
    assert state["complete"] is True
    assert state["offset"] == len(ct)
    assert seen[-1] == len(ct)
    assert len(seen) >= 3  # two intermediate offsets, then the end
    assert relay.stored_blob(eid) == prefix + ct
    assert relay.incoming_files() == []


async def test_client_upload_resumes_past_the_piece_it_read_ahead(relay: Relay, tmp_path: Path) -> None:
    # The relay already holds more than the first piece (an earlier, cut attempt): the
    # client's PUT is answered with that offset, so the piece it read ahead (right after
    # the first) is dropped and the upload goes on from the relay's offset.
    gp, eid, prefix, ct, path = await _big_envelope(relay, tmp_path, 13 << 20)
    held = (6 << 20) + 12_345
    assert (await relay.put(gp.keys, eid, prefix + ct[:1000])).status == 200
    assert (await relay.patch(gp.keys, eid, 1000, ct[1000:held])).status == 200
    offsets: list[int] = []
    async with RelayClient(relay.url, gp.keys) as client:
        state = await client.upload(eid, prefix, path, progress=lambda done, _total: offsets.append(done))
    assert (state["complete"], state["offset"]) == (True, len(ct))
    assert offsets[0] == held
    assert relay.stored_blob(eid) == prefix + ct


async def test_a_file_that_gets_shorter_while_it_streams_is_said_so(relay: Relay, tmp_path: Path) -> None:
    # The ciphertext file is cut short (another program, a full disk's cleanup) while the
    # PATCH streams it. The user is told the file changed, not that the relay is
    # unreachable; and the relay keeps what arrived, which a later upload resumes from.
    gp, eid, prefix, ct, path = await _big_envelope(relay, tmp_path, 9 << 20)

    def shorten(done: int, _total: int) -> None:
        if done > 0 and path.stat().st_size == len(ct):
            with path.open("r+b") as f:
                f.truncate(3 << 20)

    async with RelayClient(relay.url, gp.keys) as client:
        with pytest.raises(PliError) as caught:
            await client.upload(eid, prefix, path, progress=shorten)
        assert caught.value.code == "file_changed"
        assert "ct.age" in str(caught.value)
        path.write_bytes(ct)  # the whole file back: the upload resumes and completes
        state = await client.upload(eid, prefix, path)
    assert (state["complete"], state["offset"]) == (True, len(ct))
    assert relay.stored_blob(eid) == prefix + ct


async def _start_raw(relay: Relay, method: str, path: str, content_type: str, headers: dict[str, str],
                     body: bytes, send: int) -> asyncio.StreamWriter:
    """A request written by hand: its head and the first ``send`` bytes of its body."""
    head = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{relay.server.port}", f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
    _, writer = await asyncio.open_connection("127.0.0.1", relay.server.port)
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body[:send])
    await writer.drain()
    return writer


def _reset(writer: asyncio.StreamWriter) -> None:
    """Cut the connection as a pulled cable does: a reset, no orderly close."""
    writer.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _cut_patch(relay: Relay, keys: DeviceKeys, eid: bytes, offset: int, body: bytes, *, send: int,
                     digest_of: bytes | None = None) -> None:
    """A signed PATCH whose connection is reset once the relay has written ``send`` of its
    bytes into the upload's part file."""
    path = f"/v1/envelopes/{eid.hex()}?offset={offset}"
    headers = sign_headers(keys, "PATCH", relay.u(path), body, created=relay.clock(), digest_of=digest_of)
    part = relay.incoming / f"{eid.hex()}.part"
    start = part.stat().st_size
    writer = await _start_raw(relay, "PATCH", path, "application/octet-stream", headers, body, send)
    deadline = time.monotonic() + 30
    while part.stat().st_size < start + send:  # the relay's own file: a real condition, polled
        assert time.monotonic() < deadline, "the relay never wrote the bytes sent"
        await asyncio.sleep(0.01)
    _reset(writer)


async def test_a_cut_patch_keeps_what_arrived_and_the_upload_resumes(relay: Relay, tmp_path: Path) -> None:
    gp = await relay.enroll(GP)
    derm = await relay.enroll(DERM)
    ct = os.urandom(6 << 20)  # over the client's one-PUT size
    eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=relay.clock())
    assert (await relay.put(gp.keys, eid, prefix)).json()["offset"] == 0
    # The whole ciphertext in one PATCH from 0 (hashed once, for both checks), cut.
    await _cut_patch(relay, gp.keys, eid, 0, ct, send=(1 << 20) + 12_345)
    # A retried PUT waits for the cut request's end (the envelope's lock): it sees the bytes kept.
    held = (await relay.put(gp.keys, eid, prefix)).json()["offset"]
    assert held == (1 << 20) + 12_345
    assert relay.query("SELECT received, state FROM envelopes") == [(held, "uploading")]
    assert (relay.incoming / f"{eid.hex()}.part").read_bytes() == prefix + ct[:held]
    # Cut again, from there (its own Content-Digest, and the running hash goes on).
    await _cut_patch(relay, gp.keys, eid, held, ct[held:], send=1 << 20)
    path = tmp_path / "ct.age"
    path.write_bytes(ct)
    offsets: list[int] = []
    async with RelayClient(relay.url, gp.keys) as client:
        state = await client.upload(eid, prefix, path, progress=lambda done, _total: offsets.append(done))
    assert offsets[0] == held + (1 << 20)  # the client resumed where the relay stopped
    assert (state["complete"], state["offset"], state["receipt"]["type"]) == (True, len(ct), "submitted")
    assert relay.stored_blob(eid) == prefix + ct
    assert relay.incoming_files() == []


async def test_bytes_kept_from_a_cut_patch_are_checked_at_the_end(relay: Relay) -> None:
    # A cut request's bytes cannot be checked against its Content-Digest: wrong ones are
    # kept, and the header's SHA-256 refuses the whole ciphertext once it is complete.
    gp = await relay.enroll(GP)
    derm = await relay.enroll(DERM)
    ct = os.urandom(2 << 20)
    eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=relay.clock())
    assert (await relay.put(gp.keys, eid, prefix + ct[:1000])).status == 200
    wrong = bytes(len(ct) - 1000)
    await _cut_patch(relay, gp.keys, eid, 1000, wrong, send=1 << 20, digest_of=ct[1000:])
    held = (await relay.put(gp.keys, eid, prefix)).json()["offset"]
    assert held == 1000 + (1 << 20)
    assert_problem(await relay.patch(gp.keys, eid, held, ct[held:]), 400, "digest_mismatch")
    relay.assert_nothing_stored()
    assert_problem(await relay.get(gp.keys, f"/v1/envelopes/{eid.hex()}/status"), 404, "not_found")


async def test_a_long_patch_is_synced_behind_as_it_arrives(relay: Relay, monkeypatch: pytest.MonkeyPatch) -> None:
    # Written bytes go to the disk every _WRITE_BEHIND bytes, in a thread, while more arrive;
    # a refused request, a cut one and a whole one each end with the part as they should.
    monkeypatch.setattr(relay_blobs, "_WRITE_BEHIND", 64 << 10)
    gp = await relay.enroll(GP)
    derm = await relay.enroll(DERM)
    ct = os.urandom(3 << 20)
    eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=relay.clock())
    assert (await relay.put(gp.keys, eid, prefix)).status == 200
    part = relay.incoming / f"{eid.hex()}.part"
    assert_problem(await relay.patch(gp.keys, eid, 0, ct, digest_of=b"other bytes"), 400, "digest_mismatch")
    assert part.stat().st_size == len(prefix)
    await _cut_patch(relay, gp.keys, eid, 0, ct, send=1 << 20)
    held = (await relay.put(gp.keys, eid, prefix)).json()["offset"]
    assert held == 1 << 20
    r = await relay.patch(gp.keys, eid, held, ct[held:])
    assert r.status == 201
    assert relay.stored_blob(eid) == prefix + ct


async def test_a_cut_new_envelope_leaves_nothing(relay: Relay) -> None:
    # Bytes are kept from a cut PATCH only: a PUT cut before its end created no upload.
    gp = await relay.enroll(GP)
    derm = await relay.enroll(DERM)
    ct = os.urandom(1 << 20)
    eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=relay.clock())
    path = f"/v1/envelopes/{eid.hex()}"
    body = prefix + ct
    headers = sign_headers(gp.keys, "PUT", relay.u(path), body, created=relay.clock())
    _reset(await _start_raw(relay, "PUT", path, ENVELOPE_TYPE, headers, body, len(body) // 2))
    # The same PUT, whole: it waits for the cut one's end (the envelope's lock), then goes in.
    assert (await relay.put(gp.keys, eid, body)).status == 201
    assert relay.stored_blob(eid) == body
    assert relay.incoming_files() == []


async def test_wrong_ciphertext_hash_leaves_nothing(relay: Relay) -> None:
    gp = await relay.enroll(GP)
    derm = await relay.enroll(DERM)
    ct = os.urandom(6000)
    wrong = hashlib.sha256(b"something else").digest()

    # In one request.
    eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=relay.clock(), sha256=wrong)
    assert_problem(await relay.put(gp.keys, eid, prefix + ct), 400, "digest_mismatch")
    relay.assert_nothing_stored()

    # In two: the partial upload is accepted, the completing PATCH discards everything.
    eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=relay.clock(), sha256=wrong)
    assert (await relay.put(gp.keys, eid, prefix + ct[:2000])).status == 200
    assert len(relay.incoming_files()) == 1
    assert_problem(await relay.patch(gp.keys, eid, 2000, ct[2000:]), 400, "digest_mismatch")
    relay.assert_nothing_stored()
    assert_problem(await relay.get(gp.keys, f"/v1/envelopes/{eid.hex()}/status"), 404, "not_found")
    # The id is free again: the right bytes under a right header go in.
    _, good = make_envelope(gp.keys, [derm.device_id], ct, now=relay.clock(), envelope_id=eid)
    assert (await relay.put(gp.keys, eid, good + ct)).status == 201


async def test_download_with_range_resumes(relay: Relay) -> None:
    gp = await relay.enroll(GP)
    derm = await relay.enroll(DERM)
    ct = os.urandom(50_000)
    eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=relay.clock())
    assert (await relay.put(gp.keys, eid, prefix + ct)).status == 201
    whole = prefix + ct
    path = f"/v1/envelopes/{eid.hex()}"

    full = await relay.get(derm.keys, path)
    assert full.status == 200
    assert full.body == whole
    for start in (1, len(prefix), 12_345, len(whole) - 1):
        r = await relay.get(derm.keys, path, headers={"Range": f"bytes={start}-"})
        assert r.status == 206
        assert r.body == whole[start:]
        assert r.headers["Content-Range"] == f"bytes {start}-{len(whole) - 1}/{len(whole)}"
    # The sender may read back what it sent.
    assert (await relay.get(gp.keys, path)).body == whole

    # A range the envelope cannot satisfy is a refusal like any other: problem+json.
    for bad in (f"bytes={len(whole)}-", "bytes=99999999-", "bytes=abc", "items=0-", "bytes=10-5"):
        r = await relay.get(derm.keys, path, headers={"Range": bad})
        assert_problem(r, 416)
    # The client library's resume path.
    got = bytearray()
    async with RelayClient(relay.url, derm.keys) as client:
        await client.download(eid, got.extend, offset=777)
    assert bytes(got) == whole[777:]


async def test_inbox_lists_oldest_first_and_only_own_envelopes(relay: Relay) -> None:
    gp = await relay.enroll(GP)
    derm = await relay.enroll(DERM)
    cardio = await relay.enroll(CARDIO)
    ids = []
    for _ in range(3):
        ct = os.urandom(100)
        eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=relay.clock())
        assert (await relay.put(gp.keys, eid, prefix + ct)).status == 201
        ids.append(eid.hex())
        relay.clock.advance(1)
    ct = os.urandom(100)
    other, prefix = make_envelope(gp.keys, [cardio.device_id], ct, now=relay.clock())
    assert (await relay.put(gp.keys, other, prefix + ct)).status == 201

    listed = (await relay.get(derm.keys, "/v1/inbox")).json()["envelopes"]
    assert [e["id"] for e in listed] == ids
    assert {e["from"] for e in listed} == {gp.hex}
    assert {e["from_rpps"] for e in listed} == {GP}
    assert [e["id"] for e in (await relay.get(cardio.keys, "/v1/inbox")).json()["envelopes"]] == [other.hex()]
    assert (await relay.get(gp.keys, "/v1/inbox")).json() == {"envelopes": []}  # senders get no copy
    assert (await relay.ack(derm.keys, bytes.fromhex(ids[1]))).status == 200
    listed = (await relay.get(derm.keys, "/v1/inbox")).json()["envelopes"]
    assert [e["id"] for e in listed] == [ids[0], ids[2]]


async def test_health(relay: Relay) -> None:
    async with relay.session.get(relay.u("/healthz")) as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}


async def test_restart_keeps_state_and_sweeps_orphans(relay_factory) -> None:
    first = await relay_factory("data")
    gp = await first.enroll(GP)
    derm = await first.enroll(DERM)
    ct = os.urandom(3000)
    eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=first.clock())
    assert (await first.put(gp.keys, eid, prefix + ct)).status == 201
    await first.session.close()
    await first.server.close()
    orphan = first.incoming / (os.urandom(16).hex() + ".part")
    orphan.write_bytes(b"left by a crash")

    second = await relay_factory("data")
    assert not orphan.exists()
    r = await second.get(derm.keys, f"/v1/envelopes/{eid.hex()}")
    assert r.status == 200
    assert r.body == prefix + ct


async def test_upload_lock_stays_exclusive_while_others_wait(relay: Relay) -> None:
    # Requests for one envelope id are serialised (SPEC.md §7.4 retries may overlap). Workers
    # arrive at staggered scheduler turns while others hold or wait for the lock; at no turn
    # may two of them be inside. (asyncio.sleep(0) only yields a turn; nothing waits on time.)
    eid = os.urandom(16)
    inside: list[int] = []
    overlaps: list[list[int]] = []

    async def worker(n: int) -> None:
        for _ in range(n):
            await asyncio.sleep(0)
        async with _upload_lock(relay.app, eid):
            inside.append(n)
            if len(inside) > 1:
                overlaps.append(list(inside))
            for _ in range(3):
                await asyncio.sleep(0)
            inside.remove(n)

    await asyncio.gather(*(worker(n) for n in range(12)))
    assert overlaps == []
    assert inside == []
    assert relay.app[UPLOAD_LOCKS] == {}  # nothing left behind once every request is done
