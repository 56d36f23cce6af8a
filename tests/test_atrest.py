"""At rest, the relay holds no secret (issue "A hostile world"): after a broad set of flows
in one data folder, a scan of the SQLite database (with its -wal and -shm), of every file
under the data folder and of everything the relay logged finds no patient identifier, no
question or answer, no attachment byte or file name, and no practitioner's private key.

The test runs its own flows (it depends on no other test): two practitioners (and a
second device for one of them) enrol with the client library; a request with attachments
is sent, opened (read, acknowledged), answered with an attachment, the answer opened; a
device is revoked with ``pli-relay revoke`` and then refused; an envelope expires and is
purged; an upload is cut mid-request and resumed; a wrong invitation code, a refused
upload carrying plaintext and one over the sender's quota leave nothing. The relay's
structlog output goes through the production processors (``relay.cli.configure_logging``,
JSON) into a buffer; aiohttp's standard logging is captured as well.

Case bodies change with the protocol: :func:`message` is the one place that builds them.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from conftest import DERM, GP, Device, Relay, RelayFactory, assert_problem, make_envelope, sign_headers

from client import core
from protocol import age, codec
from protocol.keys import DeviceKeys
from relay.cli import configure_logging
from relay.routes import purge_once
from tools.case_samples import answer_body, request_body

ROOT = Path(__file__).resolve().parents[1]

FAMILY_NAME = "Marqueur-Atrest"
GIVEN_NAMES = "Philomène"
BIRTH_DATE = "1941-09-12"
NIR_BODY = "2410975112005"  # F, born September 1941: agrees with the birth date
NIR = NIR_BODY + f"{97 - int(NIR_BODY) % 97:02d}"
MOTIF = "Plaie du talon marqueur-motif-51d0"
QUESTION = "Plaie chronique du talon depuis 6 semaines : avis sur la prise en charge ? (marqueur-question-a7e3)"
ANSWER = "Décharge stricte et soins locaux ; revoir dans 15 jours (marqueur-réponse-3b9f)"
ATTACHMENT_MARKER = b"ATREST-ATTACHMENT-MARKER-5e61c0d2"
PHOTO_NAME = "talon-philomene-marqueur.jpg"
LETTER_NAME = "courrier-marqueur-atrest.txt"
REPORT_NAME = "compte-rendu-marqueur-atrest.txt"


def message(kind: str, text: str) -> dict[str, Any]:
    """``kind`` and ``body`` for ``core.send`` / ``core.reply``: THE helper to update when the
    case bodies (SPEC.md §6.3) change. ``text`` is the request's question or the answer."""
    if kind == "request":
        body = request_body(requis_rpps=DERM, question=text, motif=MOTIF, family_name=FAMILY_NAME,
                            given_names=GIVEN_NAMES, birth_date=BIRTH_DATE, ins=NIR)
    else:
        body = answer_body(kind, text=text)
    return {"kind": kind, "body": body}


# -- the scan -----------------------------------------------------------------------------------


def _b64_forms(data: bytes) -> list[bytes]:
    """``data`` as it would appear inside any base64 text, whatever its alignment there."""
    forms = []
    for shift in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            text = encode(b"\0" * shift + data)
            skip = (shift * 4 + 2) // 3  # characters that also carry the padding bytes
            forms.append(text[skip + 1 : -4])
    return forms


def _text_forms(text: str) -> list[bytes]:
    forms = []
    for variant in {text, text.upper(), text.lower()}:
        forms += [variant.encode(), variant.encode("utf-16-le"), variant.encode("latin-1", "replace"),
                  variant.encode("unicode_escape"), variant.encode("ascii", "xmlcharrefreplace")]
        forms += _b64_forms(variant.encode())
    return forms


def _secret_forms(secret: bytes) -> list[bytes]:
    return [secret, secret.hex().encode(), secret.hex().upper().encode(), *_b64_forms(secret)]


def _markers(devices: list[Device]) -> dict[str, list[bytes]]:
    markers = {name: _text_forms(text) for name, text in {
        "family name": FAMILY_NAME, "given names": GIVEN_NAMES, "birth date": BIRTH_DATE, "NIR": NIR,
        "motif": MOTIF, "question": QUESTION, "answer": ANSWER, "photo's name": PHOTO_NAME,
        "letter's name": LETTER_NAME, "report's name": REPORT_NAME,
        "question marker": "marqueur-question-a7e3", "answer marker": "marqueur-réponse-3b9f",
    }.items()}
    markers["attachment bytes"] = [ATTACHMENT_MARKER, ATTACHMENT_MARKER.hex().encode(), *_b64_forms(ATTACHMENT_MARKER)]
    for i, d in enumerate(devices):
        markers[f"signing seed of device {i}"] = _secret_forms(d.keys.sign_seed)
        markers[f"X25519 secret of device {i}"] = _secret_forms(d.keys.enc_secret)
    return markers


def _files(folder: Path) -> Iterator[tuple[str, bytes]]:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            yield str(path.relative_to(folder)), path.read_bytes()


def _scan(haystacks: list[tuple[str, bytes]], markers: dict[str, list[bytes]]) -> list[str]:
    return [f"{what} in {where}" for where, data in haystacks for what, forms in markers.items()
            if any(form and form in data for form in forms)]


# -- the flows ----------------------------------------------------------------------------------


async def _revoke_with_the_cli(relay: Relay, device: Device) -> bytes:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLI_")}
    env["PLI_RELAY_LOG_FORMAT"] = "json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "revoke", "--data", str(relay.data), device.hex,
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out + err


async def _interrupted_then_resumed_upload(relay: Relay, gp: Device, derm: Device) -> bytes:
    """Real age ciphertext of marker-laden bytes, uploaded in requests of which one is cut."""
    plaintext = (FAMILY_NAME.encode() + ATTACHMENT_MARKER + QUESTION.encode()) * 20_000
    ct = age.encrypt(plaintext, [derm.keys.public().recipient, gp.keys.public().recipient])
    eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=relay.clock())
    assert (await relay.put(gp.keys, eid, prefix + ct[:200_000])).json()["offset"] == 200_000
    rest = ct[200_000:]

    async def cut() -> Any:
        yield rest[:100_000]
        raise ConnectionAbortedError("the laptop's Wi-Fi drops")

    with pytest.raises((aiohttp.ClientError, ConnectionAbortedError)):
        await relay.patch(gp.keys, eid, 200_000, rest, send_body=cut())
    status = (await relay.get(gp.keys, f"/v1/envelopes/{eid.hex()}/status")).json()
    assert status["offset"] == 200_000
    assert not status["complete"]
    done = await relay.patch(gp.keys, eid, 200_000, rest)
    assert done.status == 201
    assert done.json()["receipt"]["type"] == "submitted"
    return eid


async def _refused_uploads(relay: Relay, gp: Device, derm: Device) -> None:
    # A buggy client sends plaintext under a header that promises other bytes: refused at
    # the end, when the hash does not match, and every byte written is gone.
    plain = (ATTACHMENT_MARKER + NIR.encode() + FAMILY_NAME.encode()) * 1000
    eid, prefix = make_envelope(gp.keys, [derm.device_id], plain, now=relay.clock(), sha256=bytes(32))
    assert_problem(await relay.put(gp.keys, eid, prefix + plain), 400, "digest_mismatch")
    # Over the sender's quota: refused from the header's size, before any byte is read.
    big = plain * 300
    eid, prefix = make_envelope(gp.keys, [derm.device_id], big, now=relay.clock())
    assert_problem(await relay.put(gp.keys, eid, prefix + big[:1000]), 413, "quota_exceeded")


async def _flows(relay: Relay, tmp: Path) -> tuple[list[Device], list[bytes]]:
    gp = await relay.enroll(GP, with_home=True)
    derm = await relay.enroll(DERM, with_home=True)
    laptop = await relay.enroll(GP, with_home=True)  # the GP's second device, stolen later
    assert gp.home is not None
    assert derm.home is not None
    photo = tmp / PHOTO_NAME
    photo.write_bytes(b"\xff\xd8\xff\xe0" + ATTACHMENT_MARKER + os.urandom(20_000) + ATTACHMENT_MARKER)
    letter = tmp / LETTER_NAME
    letter.write_text(f"{GIVEN_NAMES} {FAMILY_NAME}, née le {BIRTH_DATE}, NIR {NIR}\n{QUESTION}\n", encoding="utf-8")
    report = tmp / REPORT_NAME
    report.write_bytes(ANSWER.encode() + ATTACHMENT_MARKER)

    # Send, open (read and acknowledged: deleted), answer, open the answer on one GP device
    # of two (so the answer stays stored, as ciphertext, for the other).
    sent = await core.send(gp.home, gp.keys, to=[DERM], **message("request", QUESTION), files=[photo, letter])
    await core.open_envelope(derm.home, derm.keys, sent.envelope_id)
    rep = await core.reply(derm.home, derm.keys, sent.envelope_id, **message("avis", ANSWER), files=[report])
    await core.open_envelope(gp.home, gp.keys, rep.envelope_id)
    assert relay.stored_blob(bytes.fromhex(rep.envelope_id)) is not None

    # Another request stays in the inbox; a third expires and is purged.
    waiting = await core.send(gp.home, gp.keys, to=[DERM], **message("request", QUESTION), files=[letter])
    short = await core.send(gp.home, gp.keys, to=[DERM], **message("request", QUESTION), files=[photo],
                            lifetime=120)
    relay.clock.advance(121)
    await purge_once(relay.app)
    assert relay.stored_blob(bytes.fromhex(short.envelope_id)) is None

    # The laptop is stolen: revoked with the operator's command, then refused.
    cli_output = await _revoke_with_the_cli(relay, laptop)
    assert_problem(await relay.get(laptop.keys, "/v1/inbox"), 401, "unauthorized")

    resumed = await _interrupted_then_resumed_upload(relay, gp, derm)
    await _refused_uploads(relay, gp, derm)
    wrong = codec.encode({"v": 1, "code": "ZZZZZ-ZZZZZ-ZZZZZ-ZZZZZ", "device": DeviceKeys.generate(now=0)
                          .public().to_record()})
    h = {"Content-Type": "application/msgpack"}
    async with relay.session.post(relay.u("/v1/enroll"), data=wrong, headers=h) as resp:
        assert resp.status == 403
    # The dermatologist's inbox: the waiting request and the resumed upload, as ciphertext.
    url = relay.u("/v1/inbox")
    async with relay.session.get(url, headers=sign_headers(derm.keys, "GET", url, created=relay.clock())) as resp:
        inbox = {e["id"] for e in (await resp.json())["envelopes"]}
    assert inbox == {waiting.envelope_id, resumed.hex()}
    assert relay.query("SELECT state, COUNT(*) FROM envelopes GROUP BY state ORDER BY state") == [
        ("deleted", 2), ("stored", 3)]
    return [gp, derm, laptop], [cli_output]


async def test_no_plaintext_identifier_or_private_key_at_rest_after_every_flow(
    relay_factory: RelayFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    logs = io.StringIO()
    saved = structlog.get_config()
    access = logging.getLogger("aiohttp.access")
    access_level = access.level
    configure_logging("json", file=logs, cache=False)  # the production processors, into a buffer
    caplog.set_level(logging.DEBUG)
    try:
        relay = await relay_factory("atrest", device_quota=8 << 20)
        devices, outputs = await _flows(relay, tmp_path)
        haystacks = list(_files(relay.data))
    finally:
        structlog.configure(**saved)
        access.setLevel(access_level)
    names = {where for where, _ in haystacks}
    assert {"relay.sqlite3", "relay.sqlite3-wal", "relay.sqlite3-shm", "log.key"} <= names
    files = sum(1 for n in names if n.startswith("blobs/") and not n.startswith("blobs/incoming"))
    inline = relay.query("SELECT COUNT(*) FROM envelopes WHERE inline IS NOT NULL")[0][0]
    assert (files, inline) == (1, 2)  # the photo case in the blob folder, two small ones in their rows
    relay_log = logs.getvalue()
    assert relay_log.count('"event": "request"') > 40  # the relay's own lines were captured
    assert '"status": 413' in relay_log
    haystacks += [("the relay's log", relay_log.encode()), ("aiohttp's log", caplog.text.encode())]
    haystacks += [(f"pli-relay revoke's output {i}", out) for i, out in enumerate(outputs)]

    markers = _markers(devices)
    # The scan finds what it looks for: the practitioners' own folders hold all of it.
    homes = [(f"{d.rpps}/{where}", data) for d in devices if d.home is not None for where, data in _files(d.home.root)]
    found = {finding.split(" in ")[0] for finding in _scan([*homes, ("attachments", b"".join(
        p.read_bytes() for p in tmp_path.iterdir() if p.is_file()))], markers)}
    assert {"family name", "question", "answer", "attachment bytes", "photo's name", "NIR"} <= found
    assert _scan(haystacks, markers) == []
