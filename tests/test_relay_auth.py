"""Who may do what on the relay: request signatures (SPEC.md §8), replay and clock checks,
visibility of envelopes between practitioners, invitations."""

from __future__ import annotations

import base64
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import (
    CARDIO,
    DERM,
    GP,
    MIDWIFE,
    PROBLEM_TYPE,
    Device,
    Relay,
    Reply,
    assert_problem,
    make_envelope,
    send_raw,
    sign_headers,
)

from client.api import RelayClient, RelayProblem
from protocol import codec
from protocol.keys import DeviceKeys
from relay.app import PUBLIC_ROUTES, create_app
from relay.config import RelayConfig
from relay.routes import ENVELOPE_TYPE


def _route_table() -> list[tuple[str, str]]:
    """Every (method, path template) the relay serves that needs a signature."""
    app = create_app(RelayConfig(data=Path("never-created")))
    out = []
    for route in app.router.routes():
        if route.name in PUBLIC_ROUTES:
            continue
        canonical = route.resource.canonical if route.resource else ""
        out.append((route.method, canonical))
    return sorted(set(out))


AUTH_ROUTES = _route_table()
ROUTE_IDS = [f"{m} {p}" for m, p in AUTH_ROUTES]


def test_route_table_is_what_the_spec_lists() -> None:
    # If this changes, the parametrised tests below pick the new endpoint up by themselves;
    # this only guards against the table being read wrongly (e.g. empty).
    templates = {p for _, p in AUTH_ROUTES}
    assert {"/v1/inbox", "/v1/envelopes/{id}", "/v1/envelopes/{id}/ack", "/v1/envelopes/{id}/status",
            "/v1/directory/{rpps}", "/v1/devices/{device_id}"} <= templates
    assert {"PUT", "PATCH", "GET", "POST"} <= {m for m, _ in AUTH_ROUTES}
    assert "/healthz" not in templates
    assert "/v1/enroll" not in templates


@dataclass
class World:
    relay: Relay
    gp: Device
    derm: Device
    eid: bytes
    prefix: bytes
    ct: bytes

    def path(self, template: str) -> str:
        path = (
            template.replace("{id}", self.eid.hex())
            .replace("{rpps}", DERM)
            .replace("{device_id}", self.derm.hex)
        )
        assert "{" not in path, f"a new path parameter needs a value here: {template}"
        return path

    def request(self, method: str, template: str) -> tuple[str, bytes, dict[str, str]]:
        """A request that the right device, correctly signed, would get accepted (not 401)."""
        path = self.path(template)
        if method == "PATCH":
            path += "?offset=0"
            return path, self.ct[:10], {"Content-Type": "application/octet-stream"}
        if method == "PUT":
            return path, self.prefix + self.ct, {"Content-Type": ENVELOPE_TYPE}
        return path, b"", {}


@pytest.fixture
async def world(relay: Relay) -> World:
    gp = await relay.enroll(GP)
    derm = await relay.enroll(DERM)
    ct = os.urandom(2000)
    eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=relay.clock())
    r = await relay.put(gp.keys, eid, prefix + ct[:1000])
    assert r.status == 200
    return World(relay, gp, derm, eid, prefix, ct)


def _check_401(reply: Reply, method: str, code: str = "unauthorized") -> None:
    assert reply.status == 401, (reply.status, reply.body[:200])
    assert reply.content_type == PROBLEM_TYPE
    assert reply.headers.get("WWW-Authenticate", "").startswith("Signature")
    if method != "HEAD":  # HEAD answers carry no body
        assert_problem(reply, 401, code)


def _who(world: World, method: str, template: str) -> DeviceKeys:
    # Uploads are the sender's; everything else is done by the recipient.
    return world.gp.keys if method in {"PUT", "PATCH"} else world.derm.keys


def _state(world: World) -> tuple[object, ...]:
    r = world.relay
    return (
        r.query("SELECT id, state, received FROM envelopes"),
        r.query("SELECT device_id, acked_at FROM deliveries"),
        [p.stat().st_size for p in r.blob_files()],
    )


@pytest.mark.parametrize(("method", "template"), AUTH_ROUTES, ids=ROUTE_IDS)
async def test_correct_signature_is_accepted(world: World, method: str, template: str) -> None:
    # The control for every refusal below: the same request, rightly signed, gets through.
    path, body, headers = world.request(method, template)
    reply = await world.relay.signed(_who(world, method, template), method, path, body, headers=headers)
    assert reply.status != 401, reply.body
    assert reply.status < 500


@pytest.mark.parametrize(("method", "template"), AUTH_ROUTES, ids=ROUTE_IDS)
async def test_no_signature_is_401(world: World, method: str, template: str) -> None:
    before = _state(world)
    path, body, headers = world.request(method, template)
    reply = await send_raw(world.relay.session, method, world.relay.u(path), body, headers=headers)
    _check_401(reply, method)
    # Half a signature is no signature either.
    full = sign_headers(_who(world, method, template), method, world.relay.u(path), body, created=world.relay.clock())
    for missing in ("Signature", "Signature-Input", "Content-Digest"):
        h = {**headers, **{k: v for k, v in full.items() if k != missing}}
        reply = await send_raw(world.relay.session, method, world.relay.u(path), body, headers=h)
        _check_401(reply, method)
    assert _state(world) == before


@pytest.mark.parametrize(("method", "template"), AUTH_ROUTES, ids=ROUTE_IDS)
async def test_bad_signature_is_401(world: World, method: str, template: str) -> None:
    before = _state(world)
    keys = _who(world, method, template)
    path, body, headers = world.request(method, template)
    url = world.relay.u(path)
    h = sign_headers(keys, method, url, body, created=world.relay.clock())
    sig = bytearray(base64.b64decode(h["Signature"][5:-1]))
    sig[10] ^= 0x01
    flipped = {**h, "Signature": "pli=:" + base64.b64encode(bytes(sig)).decode() + ":", **headers}
    _check_401(await send_raw(world.relay.session, method, url, body, headers=flipped), method)
    # A valid signature over another method, or another path, or made by another key.
    other_method = "DELETE" if method != "DELETE" else "GET"
    h = {**sign_headers(keys, other_method, url, body, created=world.relay.clock()), **headers}
    _check_401(await send_raw(world.relay.session, method, url, body, headers=h), method)
    h = {**sign_headers(keys, method, world.relay.u("/v1/inbox"), body, created=world.relay.clock()), **headers}
    if path != "/v1/inbox":
        _check_401(await send_raw(world.relay.session, method, url, body, headers=h), method)
    stranger = DeviceKeys.generate(now=0)
    h = {**sign_headers(stranger, method, url, body, created=world.relay.clock(), keyid=keys.device_id.hex()),
         **headers}
    _check_401(await send_raw(world.relay.session, method, url, body, headers=h), method)
    assert _state(world) == before


@pytest.mark.parametrize(("method", "template"), AUTH_ROUTES, ids=ROUTE_IDS)
async def test_unknown_device_is_401(world: World, method: str, template: str) -> None:
    before = _state(world)
    stranger = DeviceKeys.generate(now=world.relay.clock())
    path, body, headers = world.request(method, template)
    _check_401(await world.relay.signed(stranger, method, path, body, headers=headers), method)
    assert _state(world) == before


@pytest.mark.parametrize(("method", "template"), AUTH_ROUTES, ids=ROUTE_IDS)
async def test_revoked_device_is_401(world: World, method: str, template: str) -> None:
    keys = _who(world, method, template)
    assert await world.relay.storage.revoke_device(keys.device_id, now=world.relay.clock())
    before = _state(world)
    path, body, headers = world.request(method, template)
    _check_401(await world.relay.signed(keys, method, path, body, headers=headers), method)
    assert _state(world) == before


# -- replay and clock ------------------------------------------------------------------------


async def test_replayed_request_is_refused(world: World) -> None:
    relay = world.relay
    url = relay.u("/v1/inbox")
    h = sign_headers(world.derm.keys, "GET", url, created=relay.clock())
    assert (await send_raw(relay.session, "GET", url, headers=h)).status == 200
    assert_problem(await send_raw(relay.session, "GET", url, headers=h), 401, "replayed_request")
    # The same nonce in an otherwise different request is a replay too.
    nonce = re.search(r'nonce="([^"]+)"', h["Signature-Input"])
    assert nonce is not None
    status = relay.u(f"/v1/envelopes/{world.eid.hex()}/status")
    h2 = sign_headers(world.derm.keys, "GET", status, created=relay.clock(), nonce=nonce.group(1))
    assert_problem(await send_raw(relay.session, "GET", status, headers=h2), 401, "replayed_request")
    # Another device may happen to draw the same nonce.
    h3 = sign_headers(world.gp.keys, "GET", url, created=relay.clock(), nonce=nonce.group(1))
    assert (await send_raw(relay.session, "GET", url, headers=h3)).status == 200


async def test_replayed_upload_is_refused_not_applied(world: World) -> None:
    relay = world.relay
    url = relay.u(f"/v1/envelopes/{world.eid.hex()}?offset=1000")
    body = world.ct[1000:1500]
    h = {**sign_headers(world.gp.keys, "PATCH", url, body, created=relay.clock()),
         "Content-Type": "application/octet-stream"}
    r = await send_raw(relay.session, "PATCH", url, body, headers=h)
    assert r.status == 200
    assert r.json()["offset"] == 1500
    assert_problem(await send_raw(relay.session, "PATCH", url, body, headers=h), 401, "replayed_request")
    assert relay.query("SELECT received FROM envelopes") == [(1500,)]


async def test_replayed_ack_is_refused(relay: Relay) -> None:
    gp = await relay.enroll(GP)
    derm = await relay.enroll(DERM)
    ct = os.urandom(100)
    eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=relay.clock())
    assert (await relay.put(gp.keys, eid, prefix + ct)).status == 201
    url = relay.u(f"/v1/envelopes/{eid.hex()}/ack")
    h = sign_headers(derm.keys, "POST", url, created=relay.clock())
    assert (await send_raw(relay.session, "POST", url, headers=h)).status == 200
    assert_problem(await send_raw(relay.session, "POST", url, headers=h), 401, "replayed_request")


@pytest.mark.parametrize("offset", [-301, 301, -10_000, 86_400])
async def test_stale_or_future_signature_is_refused(world: World, offset: int) -> None:
    relay = world.relay
    reply = await relay.get(world.derm.keys, "/v1/inbox", created=relay.clock() + offset)
    assert_problem(reply, 401, "stale_signature")
    assert reply.headers.get("WWW-Authenticate", "").startswith("Signature")


@pytest.mark.parametrize("offset", [-300, 0, 300])
async def test_signature_inside_the_window_is_accepted(world: World, offset: int) -> None:
    relay = world.relay
    assert (await relay.get(world.derm.keys, "/v1/inbox", created=relay.clock() + offset)).status == 200


async def test_relay_clock_decides_staleness(world: World) -> None:
    relay = world.relay
    created = relay.clock()
    relay.clock.advance(301)
    assert_problem(await relay.get(world.derm.keys, "/v1/inbox", created=created), 401, "stale_signature")


# -- Content-Digest ---------------------------------------------------------------------------


async def test_digest_mismatch_on_put_records_nothing(relay: Relay) -> None:
    gp = await relay.enroll(GP)
    derm = await relay.enroll(DERM)
    ct = os.urandom(3000)
    eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=relay.clock())
    body = prefix + ct
    tampered = body[:-1] + bytes([body[-1] ^ 1])
    reply = await relay.put(gp.keys, eid, tampered, digest_of=body)
    assert_problem(reply, 400, "digest_mismatch")
    relay.assert_nothing_stored()
    # A partial upload whose digest lies is refused the same way.
    reply = await relay.put(gp.keys, eid, body[:2000], digest_of=body[:1999])
    assert_problem(reply, 400, "digest_mismatch")
    relay.assert_nothing_stored()
    assert (await relay.put(gp.keys, eid, body)).status == 201


async def test_digest_mismatch_on_patch_keeps_the_offset(world: World) -> None:
    relay = world.relay
    part = next(iter(relay.incoming.iterdir()))
    size_before = part.stat().st_size
    chunk = world.ct[1000:1600]
    reply = await relay.patch(world.gp.keys, world.eid, 1000, chunk, digest_of=chunk[:-1] + b"x")
    assert_problem(reply, 400, "digest_mismatch")
    assert relay.query("SELECT received, state FROM envelopes") == [(1000, "uploading")]
    assert part.stat().st_size == size_before
    r = await relay.patch(world.gp.keys, world.eid, 1000, world.ct[1000:])
    assert r.status == 201
    assert relay.stored_blob(world.eid) == world.prefix + world.ct


async def test_digest_mismatch_on_the_completing_patch_keeps_the_upload(world: World) -> None:
    # A last request damaged in transit loses only its own bytes, not the upload before it
    # (only a complete ciphertext that does not match the header's SHA-256 is discarded).
    relay = world.relay
    rest = world.ct[1000:]
    damaged = rest[:-1] + bytes([rest[-1] ^ 0x80])
    reply = await relay.patch(world.gp.keys, world.eid, 1000, damaged, digest_of=rest)
    assert_problem(reply, 400, "digest_mismatch")
    assert relay.query("SELECT received, state FROM envelopes") == [(1000, "uploading")]
    [part] = relay.incoming_files()
    assert part.stat().st_size == len(world.prefix) + 1000
    assert (await relay.patch(world.gp.keys, world.eid, 1000, rest)).status == 201
    assert relay.stored_blob(world.eid) == world.prefix + world.ct


async def test_digest_mismatch_on_ack_does_not_acknowledge(relay: Relay) -> None:
    gp = await relay.enroll(GP)
    derm = await relay.enroll(DERM)
    ct = os.urandom(100)
    eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=relay.clock())
    assert (await relay.put(gp.keys, eid, prefix + ct)).status == 201
    reply = await relay.signed(derm.keys, "POST", f"/v1/envelopes/{eid.hex()}/ack", b"", digest_of=b"{}")
    assert_problem(reply, 400, "digest_mismatch")
    assert relay.query("SELECT acked_at FROM deliveries") == [(None,)]
    assert relay.stored_blob(eid) is not None


# -- visibility between practitioners --------------------------------------------------------


async def test_other_practitioner_cannot_see_or_touch_an_envelope(world: World) -> None:
    relay = world.relay
    cardio = await relay.enroll(CARDIO)
    # Complete the upload so the recipient could fetch it.
    assert (await relay.patch(world.gp.keys, world.eid, 1000, world.ct[1000:])).status == 201
    ghost = os.urandom(16).hex()
    eid = world.eid.hex()
    for method, suffix in (("GET", ""), ("GET", "/status"), ("POST", "/ack")):
        theirs = await relay.signed(cardio.keys, method, f"/v1/envelopes/{eid}{suffix}")
        nobodys = await relay.signed(cardio.keys, method, f"/v1/envelopes/{ghost}{suffix}")
        a = assert_problem(theirs, 404, "not_found")
        b = assert_problem(nobodys, 404, "not_found")
        assert a["detail"] == b["detail"]  # indistinguishable: ids cannot be probed
    assert relay.query("SELECT acked_at FROM deliveries") == [(None,)]
    assert (await relay.get(cardio.keys, "/v1/inbox")).json() == {"envelopes": []}
    # The recipient and the sender do see it.
    assert (await relay.get(world.derm.keys, f"/v1/envelopes/{eid}")).status == 200
    assert (await relay.get(world.gp.keys, f"/v1/envelopes/{eid}/status")).status == 200
    # The sender is not a recipient: it may not acknowledge.
    assert_problem(await relay.ack(world.gp.keys, world.eid), 403, "forbidden")


async def test_only_the_uploader_may_append(world: World) -> None:
    relay = world.relay
    cardio = await relay.enroll(CARDIO)
    ghost = os.urandom(16)
    chunk = world.ct[1000:1100]
    for keys in (cardio.keys, world.derm.keys):
        theirs = assert_problem(await relay.patch(keys, world.eid, 1000, chunk), 404, "not_found")
        nobodys = assert_problem(await relay.patch(keys, ghost, 1000, chunk), 404, "not_found")
        assert theirs["detail"] == nobodys["detail"]
        # Even at a wrong offset, the answer must not reveal the relay's offset.
        doc = assert_problem(await relay.patch(keys, world.eid, 0, chunk), 404, "not_found")
        assert "offset" not in doc
    assert relay.query("SELECT received FROM envelopes") == [(1000,)]
    part = next(iter(relay.incoming.iterdir()))
    assert part.stat().st_size == len(world.prefix) + 1000


async def test_put_naming_another_sender_is_refused(relay: Relay) -> None:
    gp = await relay.enroll(GP)
    derm = await relay.enroll(DERM)
    ct = os.urandom(500)
    # The GP's genuine envelope, uploaded by the dermatologist's device.
    eid, prefix = make_envelope(gp.keys, [derm.device_id], ct, now=relay.clock())
    assert_problem(await relay.put(derm.keys, eid, prefix + ct), 400, "bad_signature")
    # A header the dermatologist signed but that claims to come from the GP.
    eid, prefix = make_envelope(derm.keys, [gp.device_id], ct, now=relay.clock(), sender_id=gp.device_id)
    assert_problem(await relay.put(derm.keys, eid, prefix + ct), 400, "bad_signature")
    relay.assert_nothing_stored()


# -- invitations ------------------------------------------------------------------------------


async def _enroll(relay: Relay, code: str, keys: DeviceKeys) -> Reply:
    body = codec.encode({"v": 1, "code": code, "device": keys.public().to_record()})
    return await send_raw(
        relay.session, "POST", relay.u("/v1/enroll"), body, headers={"Content-Type": "application/msgpack"}
    )


async def test_used_invitation_is_refused(relay: Relay) -> None:
    code = await relay.invite(GP)
    first = DeviceKeys.generate(now=relay.clock())
    assert (await _enroll(relay, code, first)).status == 201
    second = DeviceKeys.generate(now=relay.clock())
    assert_problem(await _enroll(relay, code, second), 403, "invalid_invitation")
    assert relay.query("SELECT device_id FROM devices") == [(first.device_id,)]


async def test_unknown_invitation_is_refused(relay: Relay) -> None:
    await relay.invite(GP)
    keys = DeviceKeys.generate(now=relay.clock())
    for code in ("AAAAA-BBBBB-CCCCC-DDDDD", "", "x" * 64):
        assert_problem(await _enroll(relay, code, keys), 403, "invalid_invitation")
    assert relay.query("SELECT COUNT(*) FROM devices") == [(0,)]


async def test_expired_invitation_is_refused(relay: Relay) -> None:
    code = await relay.invite(GP, ttl=3600)
    keys = DeviceKeys.generate(now=relay.clock())
    relay.clock.advance(3600)
    doc = assert_problem(await _enroll(relay, code, keys), 403, "invalid_invitation")
    # One answer for unknown, used and expired, so codes cannot be probed.
    unknown = assert_problem(await _enroll(relay, "AAAAA-BBBBB-CCCCC-DDDDD", keys), 403, "invalid_invitation")
    assert doc["detail"] == unknown["detail"]
    assert relay.query("SELECT COUNT(*) FROM devices") == [(0,)]


async def test_invitation_just_before_expiry_works(relay: Relay) -> None:
    code = await relay.invite(GP, ttl=3600)
    relay.clock.advance(3599)
    assert (await _enroll(relay, code, DeviceKeys.generate(now=relay.clock()))).status == 201


async def test_enrolling_the_same_device_twice_is_409(relay: Relay) -> None:
    keys = DeviceKeys.generate(now=relay.clock())
    first = await relay.invite(GP)
    second = await relay.invite(GP)
    assert (await _enroll(relay, first, keys)).status == 201
    assert_problem(await _enroll(relay, second, keys), 409, "device_exists")
    # The refusal did not use up the second code: another device can still enrol with it.
    assert relay.query("SELECT COUNT(*) FROM invitations WHERE used_at IS NULL") == [(1,)]
    other = DeviceKeys.generate(now=relay.clock())
    assert (await _enroll(relay, second, other)).status == 201
    # Through the client library too, with the error typed.
    third = await relay.invite(MIDWIFE)
    async with RelayClient(relay.url) as client:
        with pytest.raises(RelayProblem) as e:
            await client.enroll(third, keys.public().to_record())
    assert (e.value.status, e.value.code) == (409, "device_exists")


async def test_enrolment_needs_no_signature_but_ignores_one(relay: Relay) -> None:
    # Public routes stay public even when a (foreign) signature is attached.
    code = await relay.invite(GP)
    keys = DeviceKeys.generate(now=relay.clock())
    body = codec.encode({"v": 1, "code": code, "device": keys.public().to_record()})
    url = relay.u("/v1/enroll")
    h = {**sign_headers(DeviceKeys.generate(now=0), "POST", url, body, created=0),
         "Content-Type": "application/msgpack"}
    assert (await send_raw(relay.session, "POST", url, body, headers=h)).status == 201
