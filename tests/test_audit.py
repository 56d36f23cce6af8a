"""Audit packages, the client's log checks and the monitor, against real relays on loopback.

Each tamper test changes one thing in an exported package (or in what a relay shows)
and checks the verifier or the monitor names it.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
from aiohttp.test_utils import TestServer

from client import audit, core, logstate
from client.api import RelayClient
from client.demo import make_photo
from client.home import Home
from protocol import note
from protocol.keys import DeviceKeys
from relay.app import LOG, STORAGE, create_app
from relay.cli import new_invitation_code
from relay.config import RelayConfig
from relay.storage import Practitioner
from tools.case_samples import answer_body, request_body

GP = Practitioner(rpps="10000005479", name="Dr Claire Martin", profession="médecin", specialty="SM54")
DERM = Practitioner(rpps="10000012343", name="Dr Karim Benali", profession="médecin", specialty="SM15")
CARDIO = Practitioner(rpps="10000023456", name="Dr Inès Roussel", profession="médecin", specialty="SM04")


@dataclass
class Relay:
    server: TestServer
    url: str
    data: Path

    async def invite(self, who: Practitioner) -> str:
        code = new_invitation_code()
        now = int(time.time())
        await self.server.app[STORAGE].create_invitation(who, code, now=now, expires=now + 3600)
        return code

    async def grow(self, n: int) -> None:
        """Append n leaves (device enrolments) without any client state."""
        for _ in range(n):
            keys = DeviceKeys.generate(now=int(time.time()))
            async with RelayClient(self.url) as r:
                await r.enroll(await self.invite(CARDIO), keys.public().to_record())

    def log_signer(self) -> note.Signer:
        """The relay's own log key, read from its data folder: what a rogue operator holds."""
        seed = bytes.fromhex((self.data / "log.key").read_text().strip())
        return note.Signer(self.server.app[LOG].origin, nacl.signing.SigningKey(seed))


StartRelay = Callable[[Path], Awaitable[Relay]]


async def _pli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The `pli` command, in a thread so the relay in this event loop keeps serving."""
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "client", *args], capture_output=True, text=True,
        env={**os.environ, "PLI_LANG": "en", **env}, check=False,
    )


@pytest.fixture
async def start_relay() -> AsyncIterator[StartRelay]:
    servers: list[TestServer] = []

    async def start(data: Path) -> Relay:
        server = TestServer(create_app(RelayConfig(data=data, listen="127.0.0.1:0")), host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return Relay(server=server, url=str(server.make_url("")).rstrip("/"), data=data)

    yield start
    for s in servers:
        await s.close()


async def _practitioner(relay: Relay, tmp: Path, who: Practitioner, name: str) -> tuple[Home, DeviceKeys]:
    home = Home(tmp / name)
    keys = DeviceKeys.generate(now=int(time.time()))
    home.create(keys, b"passphrase", fast_kdf=True)
    await core.enroll(home, keys, relay.url, await relay.invite(who))
    return home, keys


@dataclass
class Case:
    relay: Relay
    gp: tuple[Home, DeviceKeys]
    derm: tuple[Home, DeviceKeys]
    case_id: str
    request: str
    answer: str
    package: Path


@pytest.fixture
async def case(tmp_path: Path, start_relay: StartRelay) -> Case:
    relay = await start_relay(tmp_path / "relay")
    gp = await _practitioner(relay, tmp_path, GP, "gp")
    derm = await _practitioner(relay, tmp_path, DERM, "derm")
    photo = tmp_path / "lesion.png"
    make_photo(photo)
    sent = await core.send(gp[0], gp[1], to=[DERM.rpps], kind="request",
                           body=request_body(requis_rpps=DERM.rpps, question="Mélanome ?"), files=[photo])
    await core.open_envelope(derm[0], derm[1], sent.envelope_id)
    answer = await core.reply(derm[0], derm[1], sent.envelope_id, kind="avis",
                              body=answer_body("avis", text="Avis : exérèse."), files=[])
    await core.open_envelope(gp[0], gp[1], answer.envelope_id)
    package = tmp_path / "case.pliaudit"
    async with RelayClient(relay.url, gp[1]) as r:
        await audit.export_package(gp[0], r, gp[1], sent.case_id, package, with_content=True)
    return Case(relay, gp, derm, sent.case_id, sent.envelope_id, answer.envelope_id, package)


def _rewrite(package: Path, out: Path, change: Callable[[dict[str, Any], dict[str, bytes]], None]) -> Path:
    doc, content = audit._read_package(package, hash_files=False)
    change(doc, content)
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [("audit.json", json.dumps(doc).encode()), *content.items()]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


def _failures(path: Path, **kw: Any) -> list[str]:
    rep = audit.verify_package(path, **kw)
    assert not rep.ok
    return rep.failures


# -- a genuine package -----------------------------------------------------------------------


async def test_package_verifies_and_tells_the_whole_story(case: Case) -> None:
    rep = audit.verify_package(case.package)
    assert rep.ok, rep.failures
    events = [(e["event"], e["envelope"][:32]) for e in rep.timeline if e["event"] != "enrolled"]
    assert events == [
        ("submitted", case.request), ("read", case.request), ("delivered", case.request),
        ("submitted", case.answer), ("answered", case.request), ("read", case.answer), ("delivered", case.answer),
    ]
    answered = next(e for e in rep.timeline if e["event"] == "answered")
    assert answered["detail"] == f"by envelope {case.answer[:12]}"
    assert answered["who"] == "Dr Karim Benali (RPPS 10000012343)"
    assert any("content of" in c and "1 file(s) match" in c for c in rep.checks)


async def test_package_holds_no_content_without_the_flag(case: Case, tmp_path: Path) -> None:
    out = tmp_path / "nocontent.pliaudit"
    async with RelayClient(case.relay.url, case.gp[1]) as r:
        await audit.export_package(case.gp[0], r, case.gp[1], case.case_id, out, with_content=False)
    with tarfile.open(out) as tar:
        assert tar.getnames() == ["audit.json"]
        raw = tar.extractfile("audit.json").read()  # type: ignore[union-attr]
    assert b"Mme Test" not in raw
    assert b"M\xc3\xa9lanome" not in raw
    assert audit.verify_package(out).ok


async def test_verify_command_prints_timeline_and_verdict(case: Case) -> None:
    ok = await _pli("audit", "verify", str(case.package))
    assert ok.returncode == 0, ok.stderr
    assert "VERDICT: verified" in ok.stdout
    assert "answered   Dr Karim Benali (RPPS 10000012343)" in ok.stdout


# -- tampering with a package -----------------------------------------------------------------


def _flip_b64(text: str, at: int = 10) -> str:
    raw = bytearray(base64.b64decode(text))
    raw[at] ^= 1
    return base64.b64encode(bytes(raw)).decode()


async def test_changed_leaf_is_detected(case: Case, tmp_path: Path) -> None:
    def change(doc: dict[str, Any], _: dict[str, bytes]) -> None:
        doc["envelopes"][0]["receipts"][0]["leaf"] = _flip_b64(doc["envelopes"][0]["receipts"][0]["leaf"], 20)

    failures = _failures(_rewrite(case.package, tmp_path / "t.pliaudit", change))
    assert any("receipt submitted" in f for f in failures), failures


async def test_receipt_moved_to_another_index_is_detected(case: Case, tmp_path: Path) -> None:
    def change(doc: dict[str, Any], _: dict[str, bytes]) -> None:
        doc["envelopes"][0]["receipts"][0]["index"] += 1

    failures = _failures(_rewrite(case.package, tmp_path / "t.pliaudit", change))
    assert any("index differs" in f for f in failures), failures


async def test_changed_checkpoint_signature_is_detected(case: Case, tmp_path: Path) -> None:
    def change(doc: dict[str, Any], _: dict[str, bytes]) -> None:
        text = doc["checkpoints"][-1]
        head, sig = text.rsplit(" ", 1)
        doc["checkpoints"][-1] = head + " " + _flip_b64(sig.strip(), 30) + "\n"

    failures = _failures(_rewrite(case.package, tmp_path / "t.pliaudit", change))
    assert any(f.startswith("checkpoint signature") for f in failures), failures


async def test_missing_consistency_proof_is_detected(case: Case, tmp_path: Path) -> None:
    def change(doc: dict[str, Any], _: dict[str, bytes]) -> None:
        doc["consistency"] = []

    failures = _failures(_rewrite(case.package, tmp_path / "t.pliaudit", change))
    assert any("is not proved to be a prefix" in f for f in failures), failures


async def test_fork_in_package_is_detected(case: Case, tmp_path: Path) -> None:
    signer = case.relay.log_signer()
    size = note.Checkpoint.from_text(note.open_note(
        audit._read_package(case.package)[0]["checkpoints"][-1], [signer.verifier])[0]).size
    other = note.sign_checkpoint(note.Checkpoint(signer.name, size, os.urandom(32)), signer)

    def change(doc: dict[str, Any], _: dict[str, bytes]) -> None:
        doc["checkpoints"].append(other)

    failures = _failures(_rewrite(case.package, tmp_path / "t.pliaudit", change))
    assert any(f.startswith(f"FORK: two different trees of size {size}") for f in failures), failures


async def test_altered_attachment_is_detected(case: Case, tmp_path: Path) -> None:
    def change(_: dict[str, Any], content: dict[str, bytes]) -> None:
        name = next(k for k in content if k.endswith("/files/lesion.png"))
        content[name] = content[name][:-1] + bytes([content[name][-1] ^ 1])

    failures = _failures(_rewrite(case.package, tmp_path / "t.pliaudit", change))
    assert any("'lesion.png' does not match the signed manifest" in f for f in failures), failures


async def test_swapped_device_keys_are_detected(case: Case, tmp_path: Path) -> None:
    stranger = DeviceKeys.generate(now=1).public()

    def change(doc: dict[str, Any], _: dict[str, bytes]) -> None:
        doc["devices"][0]["record"] = base64.b64encode(stranger.to_bytes()).decode()

    failures = _failures(_rewrite(case.package, tmp_path / "t.pliaudit", change))
    assert any("the log records other keys" in f for f in failures), failures


async def test_untrusted_log_key_is_refused(case: Case) -> None:
    other = note.Signer(case.relay.log_signer().name, nacl.signing.SigningKey.generate()).verifier.vkey
    failures = _failures(case.package, vkey=other)
    assert any("another log key" in f for f in failures)
    assert any("checkpoint signature" in f for f in failures)


async def test_not_a_package(tmp_path: Path) -> None:
    bogus = tmp_path / "x.pliaudit"
    bogus.write_bytes(b"not a tar")
    with pytest.raises(audit.AuditError, match="cannot read the package"):
        audit.verify_package(bogus)


# -- the client's own checks -------------------------------------------------------------------


async def test_client_alarm_on_fork(case: Case) -> None:
    home, keys = case.gp
    held = logstate.held_checkpoints(home)
    top = max(held)
    signer = case.relay.log_signer()
    # This device "saw" another tree of the current size: the relay's real one is a fork of it.
    fake = note.sign_checkpoint(note.Checkpoint(signer.name, top, os.urandom(32)), signer)
    with home.store() as db:
        db.execute("UPDATE checkpoints SET note = ?, root = ? WHERE size = ?",
                   (fake, note.Checkpoint.from_text(note.open_note(fake, [signer.verifier])[0]).root_hash, top))
    with pytest.raises(logstate.LogAlarm, match="fork"):
        await core.inbox(home, keys)
    recorded = logstate.alarm(home)
    assert recorded is not None
    assert recorded["what"] == "fork"
    # The CLI refuses every relay command while the alarm stands.
    out = await _pli("--home", str(home.root), "cases", PLI_PASSPHRASE="passphrase")
    assert out.returncode == 3
    assert "ALERT" in out.stderr
    assert "Traceback" not in out.stderr


async def test_client_alarm_on_rollback(case: Case) -> None:
    home, keys = case.gp
    signer = case.relay.log_signer()
    top = max(logstate.held_checkpoints(home))
    bigger = note.sign_checkpoint(note.Checkpoint(signer.name, top + 5, os.urandom(32)), signer)
    with home.store() as db:
        db.execute("INSERT INTO checkpoints (size, root, note, seen_at) VALUES (?, ?, ?, 0)",
                   (top + 5, os.urandom(32), bigger))
    with pytest.raises(logstate.LogAlarm, match="rollback"):
        await core.inbox(home, keys)


async def test_client_alarm_on_checkpoint_from_another_key(case: Case) -> None:
    home, keys = case.gp
    profile = home.profile()
    profile.log_vkey = note.Signer(profile.log_origin, nacl.signing.SigningKey.generate()).verifier.vkey
    home.save_profile(profile)
    with pytest.raises(logstate.LogAlarm, match="not signed by the relay's log key"):
        await core.inbox(home, keys)


# -- the monitor --------------------------------------------------------------------------------


async def test_monitor_follows_a_growing_log(case: Case, tmp_path: Path) -> None:
    state = tmp_path / "monitor.json"
    async with RelayClient(case.relay.url) as r:
        first = await audit.monitor_once(r, state)
        assert first["first_run"]
        assert first["new_entries"] == first["size"] > 0
        await case.relay.grow(3)
        second = await audit.monitor_once(r, state)
    assert (second["size"], second["new_entries"], second["first_run"]) == (first["size"] + 3, 3, False)


async def _forked_pair(tmp_path: Path, start_relay: StartRelay) -> tuple[Relay, Relay]:
    """Two relays with the same log key and origin and one common history, then diverging."""
    a = await start_relay(tmp_path / "a")
    await a.grow(2)
    await a.server.close()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    a = await start_relay(tmp_path / "a")
    b = await start_relay(tmp_path / "b")
    return a, b


async def test_monitor_detects_a_fork(tmp_path: Path, start_relay: StartRelay) -> None:
    a, b = await _forked_pair(tmp_path, start_relay)
    await a.grow(2)
    await b.grow(2)  # same size as a now, another history
    state = tmp_path / "m.json"
    async with RelayClient(a.url) as ra:
        assert (await audit.monitor_once(ra, state))["size"] == 4
    async with RelayClient(b.url) as rb:
        with pytest.raises(audit.AuditError, match="FORK: another tree of size 4"):
            await audit.monitor_once(rb, state)
        await b.grow(1)
        # The alarm stands on every later run, whatever the relay shows now.
        with pytest.raises(audit.AuditError, match="ALARM"):
            await audit.monitor_once(rb, state)


async def test_monitor_detects_a_fork_at_another_size(tmp_path: Path, start_relay: StartRelay) -> None:
    a, b = await _forked_pair(tmp_path, start_relay)
    await a.grow(1)
    await b.grow(3)
    state = tmp_path / "m.json"
    async with RelayClient(a.url) as ra:
        await audit.monitor_once(ra, state)
    async with RelayClient(b.url) as rb:
        with pytest.raises(audit.AuditError, match="does not extend"):
            await audit.monitor_once(rb, state)


async def test_monitor_detects_a_rollback(tmp_path: Path, start_relay: StartRelay) -> None:
    a, b = await _forked_pair(tmp_path, start_relay)
    await a.grow(3)  # b stays behind: a truncated copy of a's log
    state = tmp_path / "m.json"
    async with RelayClient(a.url) as ra:
        await audit.monitor_once(ra, state)
    async with RelayClient(b.url) as rb:
        with pytest.raises(audit.AuditError, match="ROLLBACK: the log went back from size 5 to 2"):
            await audit.monitor_once(rb, state)


async def test_monitor_detects_entries_that_do_not_make_the_root(tmp_path: Path, start_relay: StartRelay) -> None:
    relay = await start_relay(tmp_path / "r")
    await relay.grow(3)
    import sqlite3  # noqa: PLC0415 - the operator's own hands on the database file

    with sqlite3.connect(relay.data / "relay.sqlite3") as db:
        (leaf,) = db.execute("SELECT data FROM log_leaves WHERE idx = 1").fetchone()
        changed = bytearray(leaf)
        changed[-1] ^= 1
        db.execute("UPDATE log_leaves SET data = ? WHERE idx = 1", (bytes(changed),))
    async with RelayClient(relay.url) as r:
        with pytest.raises(audit.AuditError, match="do not hash to the signed root"):
            await audit.monitor_once(r, tmp_path / "m.json")


async def test_monitor_command_exits_3_on_a_standing_alarm(tmp_path: Path) -> None:
    state = tmp_path / "m.json"
    state.write_text(json.dumps({"alarm": {"what": "FORK: test", "when": "then"}}))
    out = await _pli("audit", "monitor", "http://127.0.0.1:9", "--state", str(state))
    assert out.returncode == 3
    assert "ALERT: ALARM" in out.stderr


# -- packages that try to lie, and hostile shapes (review findings) ---------------------------


async def test_unsigned_extra_attachment_is_detected(case: Case, tmp_path: Path) -> None:
    def change(_: dict[str, Any], content: dict[str, bytes]) -> None:
        content[f"content/{case.request}/files/ordonnance-falsifiee.pdf"] = b"%PDF-1.4 forged"

    failures = _failures(_rewrite(case.package, tmp_path / "t.pliaudit", change))
    assert any("not covered by any verified manifest" in f and "ordonnance-falsifiee.pdf" in f for f in failures)


async def test_package_claiming_another_case_is_detected(case: Case, tmp_path: Path) -> None:
    def change(doc: dict[str, Any], _: dict[str, bytes]) -> None:
        doc["case_id"] = "00" * 16

    failures = _failures(_rewrite(case.package, tmp_path / "t.pliaudit", change))
    assert any("not this package's case" in f for f in failures), failures


@pytest.mark.parametrize(
    "change",
    [
        lambda doc: doc.__setitem__("checkpoints", 5),
        lambda doc: doc["envelopes"][0].__setitem__("receipts", ["not a receipt"]),
        lambda doc: doc["envelopes"][0].__setitem__("prefix", base64.b64encode(b"not-an-envelope-prefix").decode()),
        lambda doc: doc.__setitem__("devices", [{"record": 12}]),
    ],
    ids=["checkpoints-not-a-list", "receipt-a-string", "bad-prefix-magic", "record-not-base64"],
)
async def test_hostile_package_shapes_are_reported_not_crashed(case: Case, tmp_path: Path, change: Any) -> None:
    out = _rewrite(case.package, tmp_path / "t.pliaudit", lambda doc, _: change(doc))
    rep = audit.verify_package(out)
    assert not rep.ok
    cli = await _pli("audit", "verify", str(out))
    assert cli.returncode == 1
    assert "Traceback" not in cli.stderr
    assert "VERDICT: FAILED" in cli.stdout


async def test_monitor_refuses_a_relay_serving_more_entries_than_asked(case: Case, tmp_path: Path) -> None:
    """A lying relay answers /log/entries with one leaf too many: the monitor must not follow."""
    from aiohttp import web  # noqa: PLC0415

    real = RelayClient(case.relay.url)

    async def proxy(request: web.Request) -> web.StreamResponse:
        async with real:
            if request.path == "/log/entries":
                start, end = int(request.query["start"]), int(request.query["end"])
                leaves = await real.entries(start, end)
                return web.json_response({"start": start, "entries": [base64.b64encode(x).decode()
                                                                      for x in [*leaves, leaves[-1]]]})
            if request.path == "/checkpoint":
                return web.Response(text=await real.checkpoint())
            return web.Response(text=await real.log_vkey() + "\n")

    app = web.Application()
    app.router.add_get("/{tail:.*}", proxy)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with RelayClient(str(server.make_url("")).rstrip("/")) as r:
            with pytest.raises(audit.AuditError, match=r"entries where .* were asked"):
                await audit.monitor_once(r, tmp_path / "m.json")
    finally:
        await server.close()
