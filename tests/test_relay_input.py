"""Bad input never breaks the relay: every refusal is a 4xx problem+json with a stable code,
never a 500, and leaves no envelope row, no blob and no part file behind."""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
from collections.abc import AsyncIterator

import pytest
from conftest import (
    CARDIO,
    DERM,
    GP,
    PROBLEM_TYPE,
    Relay,
    Reply,
    assert_problem,
    make_envelope,
    send_raw,
    sign_headers,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from protocol import codec
from protocol.envelope import MAGIC, seal_header
from protocol.keys import DeviceKeys
from relay.routes import ENVELOPE_TYPE

# -- helpers -----------------------------------------------------------------------------------


async def _pair(relay: Relay) -> tuple[DeviceKeys, DeviceKeys]:
    gp = await relay.enroll(GP)
    derm = await relay.enroll(DERM)
    return gp.keys, derm.keys


class _RawHeader:
    """Header bytes of our choosing, for ``seal_header`` (which only asks for ``to_bytes``)."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def to_bytes(self) -> bytes:
        return self.raw


def _header_prefix(keys: DeviceKeys, fields: dict[str, object]) -> bytes:
    """A prefix around arbitrary header fields, signed by ``keys`` exactly as the protocol signs."""
    signed = seal_header(_RawHeader(codec.encode(fields)), keys.signing_key)  # type: ignore[arg-type]
    assert signed.prefix[len(MAGIC) + 2 : -64] == codec.encode(fields)
    return signed.prefix


def _header_fields(sender: DeviceKeys, recipient: bytes, ct: bytes, now: int, **over: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "v": 1, "id": os.urandom(16), "from": sender.device_id, "to": [recipient], "created": now,
        "expires": now + 86400, "size": len(ct), "sha256": hashlib.sha256(ct).digest(),
    }
    fields.update(over)
    return fields


async def _raw_http(relay: Relay, head: bytes, body: bytes = b"") -> Reply:
    """Send bytes on a fresh socket (for requests aiohttp's client will not make) and read one answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.server.port)
    try:
        writer.write(head + body)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
        status = int(status_line.split()[1])
        headers: CIMultiDict[str] = CIMultiDict()
        while (line := await reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode("latin-1").partition(":")
            headers.add(k.strip(), v.strip())
        data = await reader.readexactly(int(headers.get("Content-Length", "0")))
    finally:
        writer.close()
    return Reply(status, CIMultiDictProxy(headers), data)


def _head(relay: Relay, method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{relay.server.port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _assert_clean(relay: Relay) -> None:
    assert relay.envelope_count() == 0
    assert relay.query("SELECT COUNT(*) FROM deliveries") == [(0,)]
    assert relay.incoming_files() == []
    assert relay.blob_files() == []


# -- enrolment ---------------------------------------------------------------------------------


async def _post_enroll(relay: Relay, body: bytes, content_type: str = "application/msgpack") -> Reply:
    return await send_raw(relay.session, "POST", relay.u("/v1/enroll"), body, headers={"Content-Type": content_type})


def _no_enrolment(relay: Relay) -> None:
    assert relay.query("SELECT COUNT(*) FROM devices") == [(0,)]
    assert relay.query("SELECT COUNT(*) FROM invitations WHERE used_at IS NOT NULL") == [(0,)]


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xc1",  # never used in msgpack
        b"\x93\x01\x02",  # truncated array
        b"garbage that is not msgpack at all",
        codec.encode({"v": 1}) + b"\x00",  # trailing byte
        b"\x82\xa4code\xa1x\xa1v\x01",  # keys out of canonical order
        codec.encode([1, 2, 3]),
        codec.encode({"v": 1, "code": "x"}),  # no device
        codec.encode({"v": "1", "code": "x", "device": {}}),
    ],
    ids=["empty", "c1", "truncated", "text", "trailing", "unsorted", "array", "missing", "v-text"],
)
async def test_enroll_garbage_is_malformed(relay: Relay, body: bytes) -> None:
    await relay.invite(GP)
    assert_problem(await _post_enroll(relay, body), 400, "malformed")
    _no_enrolment(relay)


async def test_enroll_bad_fields(relay: Relay) -> None:
    code = await relay.invite(GP)
    keys = DeviceKeys.generate(now=relay.clock())
    record = keys.public().to_record()
    assert_problem(
        await _post_enroll(relay, codec.encode({"v": 2, "code": code, "device": record})), 400, "unsupported_version"
    )
    assert_problem(
        await _post_enroll(relay, codec.encode({"v": 1, "code": code, "device": record, "extra": 1})), 400, "malformed"
    )
    forged = {**record, "sig": bytes(64)}
    assert_problem(
        await _post_enroll(relay, codec.encode({"v": 1, "code": code, "device": forged})), 400, "bad_signature"
    )
    assert_problem(
        await _post_enroll(relay, codec.encode({"v": 1, "code": code, "device": b"not a map"})), 400, "malformed"
    )
    assert_problem(
        await _post_enroll(relay, codec.encode({"v": 1, "code": "c" * 65, "device": record})), 413, "too_large"
    )
    _no_enrolment(relay)
    # The invitation survived all that.
    assert (await _post_enroll(relay, codec.encode({"v": 1, "code": code, "device": record}))).status == 201


@pytest.mark.parametrize("content_type", ["application/json", "application/octet-stream", "text/plain", None])
async def test_enroll_wrong_content_type_is_415(relay: Relay, content_type: str | None) -> None:
    code = await relay.invite(GP)
    body = codec.encode({"v": 1, "code": code, "device": DeviceKeys.generate(now=0).public().to_record()})
    headers = {"Content-Type": content_type} if content_type else {}
    assert_problem(
        await send_raw(relay.session, "POST", relay.u("/v1/enroll"), body, headers=headers),
        415, "unsupported_media_type",
    )
    _no_enrolment(relay)


async def test_enroll_over_4096_bytes_is_413(relay: Relay) -> None:
    code = await relay.invite(GP)
    record = DeviceKeys.generate(now=0).public().to_record()
    body = codec.encode({"v": 1, "code": code, "device": {**record, "pad": b"x" * 4096}})
    assert len(body) > 4096
    assert_problem(await _post_enroll(relay, body), 413, "too_large")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: refused as it streams
        for i in range(0, len(body), 1000):
            yield body[i : i + 1000]

    reply = await send_raw(
        relay.session, "POST", relay.u("/v1/enroll"), chunks(), headers={"Content-Type": "application/msgpack"}
    )
    assert_problem(reply, 413, "too_large")
    # A lying Content-Length is refused before the body is read.
    head = _head(relay, "POST", "/v1/enroll", {"Content-Type": "application/msgpack", "Content-Length": "1000000"})
    assert_problem(await _raw_http(relay, head, b"\x83"), 413, "too_large")
    _no_enrolment(relay)


# -- upload: the prefix -------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["application/octet-stream", "application/json", None])
async def test_put_wrong_content_type_is_415(relay: Relay, content_type: str | None) -> None:
    gp, derm = await _pair(relay)
    ct = os.urandom(100)
    eid, prefix = make_envelope(gp, [derm.device_id], ct, now=relay.clock())
    headers = {"Content-Type": content_type} if content_type else {}
    reply = await relay.signed(gp, "PUT", f"/v1/envelopes/{eid.hex()}", prefix + ct, headers=headers)
    assert_problem(reply, 415, "unsupported_media_type")
    _assert_clean(relay)


async def test_put_bad_prefixes(relay: Relay) -> None:
    gp, derm = await _pair(relay)
    ct = os.urandom(100)
    eid, prefix = make_envelope(gp, [derm.device_id], ct, now=relay.clock())
    length_at = len(MAGIC)
    cases = [
        (b"pli-envelope/v2\n" + prefix[length_at:] + ct, 400, "malformed"),  # bad magic
        (b"PLI" + prefix[3:] + ct, 400, "malformed"),
        (b"\x00" * 200, 400, "malformed"),
        (prefix[:length_at] + b"\xff\xff" + prefix[length_at + 2 :] + ct, 413, "too_large"),  # lying length
        (prefix[:length_at] + struct.pack(">H", 4097) + b"x" * 5000, 413, "too_large"),
        (prefix[:length_at] + b"\x00\x00" + prefix[length_at + 2 :] + ct, 400, "malformed"),  # zero length
        (prefix[:length_at] + b"\x00", 400, "malformed"),  # ends inside the length
        (prefix[:10], 400, "malformed"),  # ends inside the magic
        (prefix[:-1], 400, "malformed"),  # ends inside the signature
        (prefix[:length_at] + struct.pack(">H", 4000) + prefix[length_at + 2 :] + ct, 400, "malformed"),
        (prefix[:-64] + bytes(64) + ct, 400, "bad_signature"),
    ]
    for body, status, code in cases:
        reply = await relay.put(gp, eid, body)
        assert_problem(reply, status, code)
        _assert_clean(relay)


async def test_put_empty_body_is_malformed(relay: Relay) -> None:
    gp, _ = await _pair(relay)
    assert_problem(await relay.put(gp, os.urandom(16), b""), 400, "malformed")
    _assert_clean(relay)


@pytest.mark.parametrize(
    ("override", "code"),
    [
        ({"v": 2}, "unsupported_version"),
        ({"v": 0}, "unsupported_version"),
        ({"extra": 1}, "malformed"),
        ({"to": []}, "malformed"),
        ({"size": -1}, "malformed"),
        ({"sha256": b"short"}, "malformed"),
        ({"id": b"short"}, "malformed"),
        ({"created": "yesterday"}, "malformed"),
    ],
    ids=["v2", "v0", "extra-field", "no-recipient", "negative-size", "short-hash", "short-id", "text-created"],
)
async def test_put_signed_but_invalid_header(relay: Relay, override: dict[str, object], code: str) -> None:
    gp, derm = await _pair(relay)
    ct = os.urandom(100)
    fields = _header_fields(gp, derm.device_id, ct, relay.clock(), **override)
    eid = fields["id"] if isinstance(fields["id"], bytes) and len(fields["id"]) == 16 else os.urandom(16)
    assert_problem(await relay.put(gp, eid, _header_prefix(gp, fields) + ct), 400, code)
    _assert_clean(relay)


async def test_put_header_duplicate_recipient(relay: Relay) -> None:
    gp, derm = await _pair(relay)
    ct = os.urandom(100)
    fields = _header_fields(gp, derm.device_id, ct, relay.clock(), to=[derm.device_id, derm.device_id])
    assert isinstance(fields["id"], bytes)
    assert_problem(await relay.put(gp, fields["id"], _header_prefix(gp, fields) + ct), 400, "malformed")
    _assert_clean(relay)


# -- upload: limits -----------------------------------------------------------------------------


async def test_envelope_over_max_envelope_is_413(relay_factory) -> None:
    relay = await relay_factory(max_envelope=1000)
    gp, derm = await _pair(relay)
    ct = os.urandom(1001)
    eid, prefix = make_envelope(gp, [derm.device_id], ct, now=relay.clock())
    assert_problem(await relay.put(gp, eid, prefix + ct[:10]), 413, "too_large")
    _assert_clean(relay)
    ok = os.urandom(1000)
    eid, prefix = make_envelope(gp, [derm.device_id], ok, now=relay.clock())
    assert (await relay.put(gp, eid, prefix + ok)).status == 201


async def test_request_over_max_request_is_413(relay_factory) -> None:
    limit = 64 * 1024
    relay = await relay_factory(max_request=limit)
    gp, derm = await _pair(relay)
    ct = os.urandom(3 * limit)
    eid, prefix = make_envelope(gp, [derm.device_id], ct, now=relay.clock())
    path = f"/v1/envelopes/{eid.hex()}"

    # An honest Content-Length over the limit.
    assert_problem(await relay.put(gp, eid, prefix + ct[: limit]), 413, "too_large")
    _assert_clean(relay)

    # A lying Content-Length: refused from the declared length, before the body arrives.
    body = prefix + ct[:100]
    h = sign_headers(gp, "PUT", relay.u(path), body, created=relay.clock())
    head = _head(relay, "PUT", path, {**h, "Content-Type": ENVELOPE_TYPE, "Content-Length": str(10 << 20)})
    assert_problem(await _raw_http(relay, head, body), 413, "too_large")
    _assert_clean(relay)

    # No Content-Length at all (chunked): counted as it streams.
    body = prefix + ct[: 2 * limit]

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 8192):
            yield body[i : i + 8192]

    reply = await relay.put(gp, eid, body, send_body=chunks())
    assert_problem(reply, 413, "too_large")
    _assert_clean(relay)

    # A PATCH may carry the whole rest of the ciphertext (over max_request), never more:
    # refused from its declared length, or as it streams.
    first = prefix + ct[:1000]
    assert (await relay.put(gp, eid, first)).status == 200
    over = ct[1000:] + b"x"
    assert_problem(await relay.patch(gp, eid, 1000, over), 413, "too_large")
    big = over

    async def patch_chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    assert_problem(await relay.patch(gp, eid, 1000, big, send_body=patch_chunks()), 413, "too_large")
    assert relay.query("SELECT received FROM envelopes") == [(1000,)]
    [part] = relay.incoming_files()
    assert part.stat().st_size == len(prefix) + 1000

    # Under the limit, in several requests, it all goes in; the last one over max_request.
    offset = 1000
    while offset < limit:
        chunk = ct[offset : offset + limit - 1]
        r = await relay.patch(gp, eid, offset, chunk)
        assert r.status == 200
        offset = r.json()["offset"]
    assert len(ct) - offset > limit
    assert (await relay.patch(gp, eid, offset, ct[offset:])).status == 201
    assert relay.blob_path(eid).read_bytes() == prefix + ct


async def test_more_ciphertext_than_size_is_refused(relay: Relay) -> None:
    gp, derm = await _pair(relay)
    ct = os.urandom(1000)
    eid, prefix = make_envelope(gp, [derm.device_id], ct, now=relay.clock())
    assert_problem(await relay.put(gp, eid, prefix + ct + b"x"), 400, "malformed")
    _assert_clean(relay)
    assert (await relay.put(gp, eid, prefix + ct[:600])).status == 200
    assert_problem(await relay.patch(gp, eid, 600, ct[600:] + b"extra"), 400, "malformed")
    assert relay.query("SELECT received, state FROM envelopes") == [(600, "uploading")]
    [part] = relay.incoming_files()
    assert part.stat().st_size == len(prefix) + 600
    assert (await relay.patch(gp, eid, 600, ct[600:])).status == 201


# -- upload: routing fields ---------------------------------------------------------------------


async def test_unknown_or_revoked_recipient_is_refused(relay: Relay) -> None:
    gp, derm = await _pair(relay)
    cardio = await relay.enroll(CARDIO)
    ct = os.urandom(100)
    eid, prefix = make_envelope(gp, [derm.device_id, os.urandom(16)], ct, now=relay.clock())
    assert_problem(await relay.put(gp, eid, prefix + ct), 400, "unknown_recipient")
    _assert_clean(relay)
    assert await relay.storage.revoke_device(cardio.device_id, now=relay.clock())
    eid, prefix = make_envelope(gp, [derm.device_id, cardio.device_id], ct, now=relay.clock())
    assert_problem(await relay.put(gp, eid, prefix + ct), 400, "unknown_recipient")
    _assert_clean(relay)


@pytest.mark.parametrize(
    "bad_id",
    ["abc", "z" * 32, "0" * 31, "0" * 33, "0" * 64, "%00" * 16, "0" * 30 + "%20", "0" * 30 + "%20%20",
     "%2000" + "0" * 28 + "%20", "A" * 32],
    ids=["short", "not-hex", "31", "33", "64", "nul", "space", "two-spaces", "spaces-around", "upper-case"],
)
async def test_bad_envelope_id_in_url(relay: Relay, bad_id: str) -> None:
    gp, derm = await _pair(relay)
    ct = os.urandom(100)
    _, prefix = make_envelope(gp, [derm.device_id], ct, now=relay.clock())
    path = f"/v1/envelopes/{bad_id}"
    assert_problem(await relay.signed(gp, "PUT", path, prefix + ct, content_type=ENVELOPE_TYPE), 400, "malformed")
    assert_problem(
        await relay.signed(gp, "PATCH", path + "?offset=0", ct, content_type="application/octet-stream"),
        400, "malformed",
    )
    for suffix, method in (("", "GET"), ("/status", "GET"), ("/ack", "POST")):
        assert_problem(await relay.signed(derm, method, path + suffix), 400, "malformed")
    assert_problem(await relay.get(gp, f"/v1/devices/{bad_id}"), 400, "malformed")
    _assert_clean(relay)


async def test_envelope_id_mismatch_between_url_and_header(relay: Relay) -> None:
    gp, derm = await _pair(relay)
    ct = os.urandom(100)
    eid, prefix = make_envelope(gp, [derm.device_id], ct, now=relay.clock())
    other = os.urandom(16)
    assert_problem(await relay.put(gp, other, prefix + ct), 400, "malformed")
    _assert_clean(relay)
    assert_problem(await relay.get(gp, f"/v1/envelopes/{eid.hex()}/status"), 404, "not_found")


@pytest.mark.parametrize(
    ("created", "expires"),
    [
        (-601, 86400),  # created too long ago
        (601, 86400),  # created in the future
        (-100, -1),  # already expired
        (-100, 0),  # expires now
        (0, 90 * 86400 + 1),  # asks to be kept longer than 90 days
        (-500, 90 * 86400 - 499),  # ditto, counted from its creation
    ],
    ids=["old", "future", "expired", "expires-now", "too-long", "too-long-from-created"],
)
async def test_envelope_times_out_of_bounds(relay: Relay, created: int, expires: int) -> None:
    """``created`` and ``expires`` are offsets from the relay's clock."""
    gp, derm = await _pair(relay)
    ct = os.urandom(100)
    now = relay.clock()
    eid, prefix = make_envelope(gp, [derm.device_id], ct, now=now, created=now + created, expires=now + expires)
    assert_problem(await relay.put(gp, eid, prefix + ct), 400, "expired")
    _assert_clean(relay)


@pytest.mark.parametrize(("created", "lifetime"), [(-600, 86400), (600, 86400), (0, 90 * 86400)])
async def test_envelope_times_at_the_bounds_are_accepted(relay: Relay, created: int, lifetime: int) -> None:
    gp, derm = await _pair(relay)
    ct = os.urandom(100)
    now = relay.clock()
    eid, prefix = make_envelope(gp, [derm.device_id], ct, now=now, created=now + created,
                                expires=now + created + lifetime)
    assert (await relay.put(gp, eid, prefix + ct)).status == 201


# -- PATCH arguments ------------------------------------------------------------------------------


async def test_patch_bad_arguments(relay: Relay) -> None:
    gp, derm = await _pair(relay)
    ct = os.urandom(1000)
    eid, prefix = make_envelope(gp, [derm.device_id], ct, now=relay.clock())
    assert (await relay.put(gp, eid, prefix + ct[:100])).status == 200
    path = f"/v1/envelopes/{eid.hex()}"
    for query in ("", "?offset=", "?offset=abc", "?offset=1e2", "?offset=0x64", "?offset=100.0"):
        reply = await relay.signed(gp, "PATCH", path + query, ct[100:200], content_type="application/octet-stream")
        assert_problem(reply, 400, "malformed")
    # Offsets are plain decimals (SPEC §7.4): a sign is malformed, not a mismatch.
    assert_problem(await relay.patch(gp, eid, -1, ct[100:200]), 400, "malformed")
    doc = assert_problem(await relay.patch(gp, eid, 99, ct[100:200]), 409, "offset_mismatch")
    assert doc["offset"] == 100
    assert_problem(await relay.patch(gp, eid, 100, ct[100:200], content_type=ENVELOPE_TYPE), 415,
                   "unsupported_media_type")
    assert relay.query("SELECT received FROM envelopes") == [(100,)]
    # PATCH on an id nobody uploaded.
    assert_problem(await relay.patch(gp, os.urandom(16), 0, ct), 404, "not_found")


async def test_bodies_on_bodiless_requests_are_refused(relay: Relay) -> None:
    gp, _ = await _pair(relay)
    assert_problem(await relay.signed(gp, "GET", "/v1/inbox", b"x" * 10), 413, "too_large")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it is read
        yield b"x" * 10

    reply = await relay.signed(gp, "GET", "/v1/inbox", b"x" * 10, send_body=chunks())
    assert_problem(reply, 413, "too_large")


async def test_bad_rpps_in_directory(relay: Relay) -> None:
    gp, _ = await _pair(relay)
    for rpps in ("123", "10000005478", "abcdefghijk", "2" * 11):
        reply = await relay.get(gp, f"/v1/directory/{rpps}")
        assert 400 <= reply.status < 500
        assert reply.content_type == PROBLEM_TYPE
        assert isinstance(reply.json()["code"], str)


# -- routing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/v1", "/v1/nothing", "/v1/envelopes", "/v2/inbox", "/v1/inbox/extra"])
async def test_unknown_route_is_404_problem(relay: Relay, path: str) -> None:
    gp, _ = await _pair(relay)
    assert_problem(await send_raw(relay.session, "GET", relay.u(path)), 404, "not_found")
    assert_problem(await relay.signed(gp, "GET", path), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", "/v1/inbox"),
        ("POST", "/v1/inbox"),
        ("PUT", "/healthz"),
        ("GET", "/v1/enroll"),
        ("DELETE", "/v1/envelopes/" + "0" * 32),
        ("POST", "/v1/envelopes/" + "0" * 32),
        ("GET", "/v1/envelopes/" + "0" * 32 + "/ack"),
        ("PUT", "/v1/directory/10000005479"),
    ],
)
async def test_wrong_method_is_405_problem(relay: Relay, method: str, path: str) -> None:
    gp, _ = await _pair(relay)
    assert_problem(await send_raw(relay.session, method, relay.u(path)), 405, "method_not_allowed")
    reply = await relay.signed(gp, method, path)
    assert_problem(reply, 405, "method_not_allowed")
    assert "Allow" in reply.headers


# -- random bodies -------------------------------------------------------------------------------


def _mutate(data: bytes, at: int, xor: int) -> bytes:
    i = at % len(data)
    return data[:i] + bytes([data[i] ^ xor]) + data[i + 1 :]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from(["random", "magic", "mutated"]),
    noise=st.binary(max_size=400),
    at=st.integers(min_value=0, max_value=10_000),
    xor=st.integers(min_value=1, max_value=255),
)
async def test_random_put_bodies_are_4xx(relay: Relay, kind: str, noise: bytes, at: int, xor: int) -> None:
    if not hasattr(relay, "_pair"):
        relay._pair = await _pair(relay)  # type: ignore[attr-defined]
    gp, derm = relay._pair  # type: ignore[attr-defined]
    ct = os.urandom(64)
    eid, prefix = make_envelope(gp, [derm.device_id], ct, now=relay.clock())
    if kind == "random":
        body = noise
    elif kind == "magic":
        body = MAGIC + noise
    else:  # one byte of a genuine prefix changed, then anything
        body = _mutate(prefix, at, xor) + noise
    reply = await relay.put(gp, eid, body)
    assert 400 <= reply.status < 500, (reply.status, reply.body)
    assert_problem(reply, reply.status)
    _assert_clean(relay)
