"""The client library against a real relay on loopback: resume, refusals, pins, archives."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from client import core
from client.demo import make_photo
from client.home import Home, KeyChangedError
from protocol.errors import PliError
from protocol.keys import DeviceKeys
from relay.app import STORAGE, create_app
from relay.cli import new_invitation_code
from relay.config import RelayConfig
from relay.storage import Practitioner
from tools.case_samples import request_body

GP = Practitioner(rpps="10000005479", name="Dr Claire Martin", profession="médecin", specialty="SM54")
DERM = Practitioner(rpps="10000012343", name="Dr Karim Benali", profession="médecin", specialty="SM15")


@dataclass
class Env:
    server: TestServer
    url: str
    tmp: Path

    async def practitioner(self, who: Practitioner, name: str) -> tuple[Home, DeviceKeys]:
        code = new_invitation_code()
        now = int(time.time())
        await self.server.app[STORAGE].create_invitation(who, code, now=now, expires=now + 3600)
        home = Home(self.tmp / name)
        keys = DeviceKeys.generate(now=now)
        home.create(keys, b"passphrase", fast_kdf=True)
        await core.enroll(home, keys, self.url, code)
        return home, keys


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    app = create_app(RelayConfig(data=tmp_path / "relay", listen="127.0.0.1:0"))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield Env(server=server, url=str(server.make_url("")).rstrip("/"), tmp=tmp_path)
    await server.close()


async def _send_photo(env: Env, gp: tuple[Home, DeviceKeys], size: int = 300_000) -> tuple[core.SentEnvelope, bytes]:
    photo = env.tmp / "photo.bin"
    data = bytes((i * 7919) % 251 for i in range(size))
    photo.write_bytes(data)
    sent = await core.send(gp[0], gp[1], to=[DERM.rpps], kind="request",
                           body=request_body(requis_rpps=DERM.rpps), files=[photo])
    return sent, data


async def _whole_envelope(env: Env, keys: DeviceKeys, envelope_id: str) -> tuple[bytes, int]:
    """The envelope as the relay serves it, and the length of its prefix."""
    full = bytearray()
    async with core.RelayClient(env.url, keys) as r:
        await r.download(bytes.fromhex(envelope_id), full.extend)
    split = core.split_prefix(full)
    assert split is not None
    return bytes(full), split[1]


async def test_download_resumes_from_where_it_was_cut(env: Env) -> None:
    gp = await env.practitioner(GP, "gp")
    derm_home, derm_keys = await env.practitioner(DERM, "derm")
    sent, data = await _send_photo(env, gp)
    # A first attempt was cut after the prefix and half the ciphertext. To prove the
    # next attempt asks only for the rest (a Range request) rather than starting over,
    # the half it kept has one byte altered: a resumed download must then fail to verify.
    full, used = await _whole_envelope(env, derm_keys, sent.envelope_id)
    envelopes = derm_home.envelopes
    envelopes.mkdir(parents=True)
    (envelopes / f"{sent.envelope_id}.prefix").write_bytes(bytes(full[:used]))
    half = bytearray(full[used : used + (len(full) - used) // 2])
    half[-1] ^= 1
    (envelopes / f"{sent.envelope_id}.age.part").write_bytes(bytes(half))

    with pytest.raises(PliError) as refused:
        await core.open_envelope(derm_home, derm_keys, sent.envelope_id)
    assert refused.value.code in {"payload_corrupt", "bad_bundle", "decryption_failed"}
    # The refused bytes are kept aside as evidence, and nothing was filed as a case.
    assert list((envelopes / "rejected").iterdir())
    assert not list(derm_home.cases.glob("*/*")) if derm_home.cases.exists() else True

    # Running the command again downloads afresh and succeeds.
    opened = await core.open_envelope(derm_home, derm_keys, sent.envelope_id)
    assert (Path(opened.folder) / "files" / "photo.bin").read_bytes() == data


async def test_intact_partial_download_completes(env: Env) -> None:
    gp = await env.practitioner(GP, "gp")
    derm_home, derm_keys = await env.practitioner(DERM, "derm")
    sent, data = await _send_photo(env, gp)
    full, used = await _whole_envelope(env, derm_keys, sent.envelope_id)
    derm_home.envelopes.mkdir(parents=True)
    (derm_home.envelopes / f"{sent.envelope_id}.prefix").write_bytes(bytes(full[:used]))
    (derm_home.envelopes / f"{sent.envelope_id}.age.part").write_bytes(bytes(full[used : used + 1000]))
    opened = await core.open_envelope(derm_home, derm_keys, sent.envelope_id)
    assert (Path(opened.folder) / "files" / "photo.bin").read_bytes() == data
    assert (derm_home.envelopes / f"{sent.envelope_id}.age").read_bytes() == bytes(full[used:])


async def test_sender_can_reread_its_own_archive(env: Env) -> None:
    gp_home, gp_keys = await env.practitioner(GP, "gp")
    await env.practitioner(DERM, "derm")
    photo = env.tmp / "lesion.png"
    make_photo(photo)
    sent = await core.send(gp_home, gp_keys, to=[DERM.rpps], kind="request",
                           body=request_body(requis_rpps=DERM.rpps), files=[photo])
    from protocol import age  # noqa: PLC0415

    plain = age.decrypt((gp_home.envelopes / f"{sent.envelope_id}.age").read_bytes(), [gp_keys.identity])
    assert photo.read_bytes() in plain


async def test_opening_refuses_a_sender_whose_keys_changed(env: Env) -> None:
    gp_home, gp_keys = await env.practitioner(GP, "gp")
    derm_home, derm_keys = await env.practitioner(DERM, "derm")
    first, _ = await _send_photo(env, (gp_home, gp_keys), size=10)
    await core.open_envelope(derm_home, derm_keys, first.envelope_id)  # pins the GP's device
    # The GP's entry gains a second device; the next envelope comes from it.
    gp2 = await env.practitioner(GP, "gp2")
    second, _ = await _send_photo(env, gp2, size=10)
    with pytest.raises(KeyChangedError, match="changed"):
        await core.open_envelope(derm_home, derm_keys, second.envelope_id)


async def test_send_to_oneself_only_is_refused(env: Env) -> None:
    gp_home, gp_keys = await env.practitioner(GP, "gp")
    with pytest.raises(PliError, match="no recipient device other than this one"):
        await core.send(gp_home, gp_keys, to=[GP.rpps], kind="request",
                        body=request_body(requis_rpps=GP.rpps), files=[])


async def test_attachment_whose_name_lies_about_its_type_is_refused(env: Env) -> None:
    gp_home, gp_keys = await env.practitioner(GP, "gp")
    await env.practitioner(DERM, "derm")
    fake = env.tmp / "scan.pdf"
    fake.write_bytes(b"MZ\x90\x00 not a pdf")
    with pytest.raises(PliError, match="not"):
        await core.send(gp_home, gp_keys, to=[DERM.rpps], kind="request",
                        body=request_body(requis_rpps=DERM.rpps), files=[fake])
    assert not list(gp_home.envelopes.glob("*")) if gp_home.envelopes.exists() else True


async def test_relay_inventing_a_revoked_device_cannot_forge_a_sender(env: Env) -> None:
    """A relay (here: its operator, through the admin path) makes a device for the GP's RPPS,
    uses it to send an envelope, then marks it revoked so it leaves the directory. The
    recipient never pinned that device: it must refuse the envelope."""
    gp_home, gp_keys = await env.practitioner(GP, "gp")
    derm_home, derm_keys = await env.practitioner(DERM, "derm")
    first, _ = await _send_photo(env, (gp_home, gp_keys), size=10)
    await core.open_envelope(derm_home, derm_keys, first.envelope_id)  # the derm pins the GP's real device
    rogue = await env.practitioner(GP, "rogue")
    rogue[0].pin(DERM.rpps, [derm_keys.public()])
    forged, _ = await _send_photo(env, rogue, size=10)
    await env.server.app[STORAGE].revoke_device(rogue[1].device_id, now=int(time.time()))
    with pytest.raises(PliError, match="trusted devices"):
        await core.open_envelope(derm_home, derm_keys, forged.envelope_id)
    assert not list((derm_home.cases).glob("*/" + forged.envelope_id))


async def test_relay_slipping_an_unlogged_key_into_the_directory_is_refused(env: Env) -> None:
    """The operator adds a device row for the dermatologist straight into the database: it is
    in the directory but not in the log. A GP who never exchanged with them must not encrypt
    to it (trust on first use applies to logged keys only)."""
    import sqlite3  # noqa: PLC0415

    gp_home, gp_keys = await env.practitioner(GP, "gp")
    await env.practitioner(DERM, "derm")
    rogue = DeviceKeys.generate(now=int(time.time())).public()
    with sqlite3.connect(env.tmp / "relay" / "relay.sqlite3") as db:
        db.execute("INSERT INTO devices (device_id, rpps, sign_key, cert, sig, enrolled) VALUES (?, ?, ?, ?, ?, ?)",
                   (rogue.device_id, DERM.rpps, rogue.sign_key, rogue.cert, rogue.sig, int(time.time())))
    with pytest.raises(PliError, match="without proof in its log"):
        await core.send(gp_home, gp_keys, to=[DERM.rpps], kind="request",
                        body=request_body(requis_rpps=DERM.rpps), files=[])
    assert gp_home.pinned(DERM.rpps) is None


async def test_envelope_from_a_device_revoked_after_sending_still_opens(env: Env) -> None:
    gp_home, gp_keys = await env.practitioner(GP, "gp")
    derm_home, derm_keys = await env.practitioner(DERM, "derm")
    first, _ = await _send_photo(env, (gp_home, gp_keys), size=10)
    await core.open_envelope(derm_home, derm_keys, first.envelope_id)  # pins the GP's device
    second, data = await _send_photo(env, (gp_home, gp_keys), size=10)
    await env.server.app[STORAGE].revoke_device(gp_keys.device_id, now=int(time.time()))
    # A second GP device, so the practitioner still has one listed.
    await env.practitioner(GP, "gp-new")
    with pytest.raises(PliError, match="changed"):
        # The new device is a key change the dermatologist must confirm first...
        await core.open_envelope(derm_home, derm_keys, second.envelope_id)
    new = await _directory(env, derm_keys, GP.rpps)
    derm_home.pin(GP.rpps, new)
    # ...after which the envelope the revoked device sent before its revocation opens.
    opened = await core.open_envelope(derm_home, derm_keys, second.envelope_id)
    assert (Path(opened.folder) / "files" / "photo.bin").read_bytes() == data


async def _directory(env: Env, keys: DeviceKeys, rpps: str) -> list:
    async with core.RelayClient(env.url, keys) as r:
        info = await r.directory(rpps)
    return [core._record_from_json(d) for d in info["devices"]]
